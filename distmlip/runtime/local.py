"""In-process execution: every shard in this process, one thread per shard when there are several
(each on its own device), halo exchange through shared tensors so autograd sees one graph."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..graph import NeighborGraph
from ..models.base import DistributableModel, LocalGraph, no_exchange
from ..partition import PartitionPlan
from .shards import Shard, build_shards

__all__ = [
    "Evaluation",
    "InProcessRunner",
    "ShardExchange",
    "add_edge_terms",
    "assemble",
    "build_local_graph",
    "run_model",
]


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Results of one evaluation, float64, in the graph's atom order.

    Attributes:
        energy: total energy, eV.
        energies: (N,) per-atom energies, eV.
        forces: (N, 3) forces, eV/Å.
        virial: (3, 3) ``dE/d(strain)`` (symmetrised), eV; stress is ``virial / volume``.
    """

    energy: float
    energies: np.ndarray
    forces: np.ndarray
    virial: np.ndarray


class _Hub:
    """Where the shards of one process meet at each halo exchange."""

    def __init__(self, num_shards: int, timeout: float):
        self.slots: list[torch.Tensor | None] = [None] * num_shards
        self.barrier = threading.Barrier(num_shards, timeout=timeout)

    def wait(self):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise _PeerFailed() from None


class _PeerFailed(RuntimeError):
    """Another shard failed; this one stops."""


class ShardExchange:
    """The halo exchange of one shard: ``x -> x`` with the halo rows refreshed from their owners.

    Built on differentiable indexing (``index_copy``), so the backward pass adds each halo row's
    gradient to its owner's row, across shards and devices.
    """

    def __init__(self, shard: Shard, device: torch.device, hub: _Hub | None = None):
        self.index = shard.index
        self.hub = hub
        self.rows = torch.as_tensor(shard.halo_rows, device=device)
        self.blocks = [
            (source, torch.as_tensor(src, device=device))
            for source in shard.sources()
            for src in [shard.rows_from(source)[1]]
        ]
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.hub is None:
            if len(self.rows) == 0:
                return x
            return x.index_copy(0, self.rows, x.index_select(0, self.blocks[0][1]))
        self.hub.slots[self.index] = x
        self.hub.wait()  # every shard has posted its features
        values = []
        for source, src in self.blocks:
            other = x if source == self.index else self.hub.slots[source]
            values.append(other.index_select(0, src.to(other.device)).to(x.device))
        self.hub.wait()  # every shard has read what it needs; slots may be reused
        if not values:
            return x
        return x.index_copy(0, self.rows, torch.cat(values))


def build_local_graph(graph: NeighborGraph | None, rows: np.ndarray, vec: np.ndarray,
                      edge_index: np.ndarray, owned: np.ndarray, atom_ids: np.ndarray, device,
                      dtype, exchange) -> LocalGraph:
    """The ``LocalGraph`` of ``rows`` (atoms of ``graph``) with float64 edge vectors ``vec``
    ((E, 3), cast to ``dtype``). ``graph=None`` gives an empty one."""
    if graph is None:
        numbers = np.zeros(0, dtype=np.int64)
        cell = np.zeros((3, 3))
    else:
        numbers, cell = graph.numbers[rows], graph.cell
    return LocalGraph(
        numbers=torch.as_tensor(numbers, device=device),
        edge_index=torch.as_tensor(edge_index, device=device).reshape(2, -1),
        edge_vec=torch.as_tensor(vec, device=device).to(dtype).requires_grad_(True),
        halo_exchange=exchange,
        owned=torch.as_tensor(owned, device=device),
        atom_ids=torch.as_tensor(atom_ids, device=device),
        cell=torch.as_tensor(cell, device=device).to(dtype),
    )


def add_edge_terms(forces: np.ndarray, receivers: np.ndarray, senders: np.ndarray,
                   vec: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Add the forces of edge gradients ``grad = dE/d(vec)`` ((E, 3)) to ``forces`` ((N, 3),
    in place) and return their virial ``vec^T grad`` ((3, 3), dE/d(strain) before symmetrising).

    ``vec = pos[sender] - pos[receiver] + shift @ cell``, so the receiver gets ``+grad`` and the
    sender ``-grad``.
    """
    n = len(forces)
    for k in range(3):
        forces[:, k] += np.bincount(receivers, grad[:, k], minlength=n)
        forces[:, k] -= np.bincount(senders, grad[:, k], minlength=n)
    return vec.T @ grad


def run_model(model: DistributableModel, local: LocalGraph) -> torch.Tensor:
    """Run ``model`` on ``local`` and return the owned atoms' energies, checking the output."""
    with torch.enable_grad():
        out = model(local)
    if not isinstance(out, torch.Tensor) or out.shape != (local.num_nodes,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model: {type(model).__name__}.forward must return per-atom energies of shape "
            f"({local.num_nodes},), got {got}"
        )
    return out[local.owned]


def assemble(graph: NeighborGraph, pieces) -> Evaluation:
    """Combine per-shard ``(atoms_owned, energies_owned, edges, edge_vec, edge_grad)`` numpy
    pieces (``edge_vec`` float64, as given to the model)."""
    n = graph.num_atoms
    energies = np.zeros(n)
    forces = np.zeros((n, 3))
    virial = np.zeros((3, 3))
    for atoms, e, edges, vec, grad in pieces:
        energies[atoms] = e
        virial += add_edge_terms(forces, graph.receivers[edges], graph.senders[edges], vec, grad)
    virial = 0.5 * (virial + virial.T)
    return Evaluation(float(energies.sum()), energies, forces, virial)


class InProcessRunner:
    """Evaluates a plan with every shard in this process.

    Args:
        model: the model; copied once per device (the caller's module is not modified).
        devices: one entry per worker; part ``p`` runs on ``devices[p % len(devices)]``. Several
            entries (even equal ones) mean several workers, each in its own thread.
        dtype: floating dtype to run in (``None`` keeps the model's).
        timeout: seconds a worker waits for the others at a halo exchange before giving up.
    """

    def __init__(self, model: DistributableModel, devices: list[torch.device], dtype=None,
                 timeout: float = 600.0):
        self.devices = list(devices)
        self.dtype = dtype or model.dtype
        self.timeout = timeout
        self.replicas: dict[torch.device, DistributableModel] = {}
        for device in self.devices:
            if device not in self.replicas:
                replica = copy.deepcopy(model).to(device=device, dtype=self.dtype)
                replica.eval()
                for p in replica.parameters():
                    p.requires_grad_(False)
                self.replicas[device] = replica
        self.last_exchange_calls = 0

    def evaluate(self, graph: NeighborGraph, plan: PartitionPlan) -> Evaluation:
        shards = build_shards(plan, len(self.devices))
        hub = _Hub(len(shards), self.timeout) if len(shards) > 1 else None
        exchanges = [
            ShardExchange(s, self.devices[s.index], hub) if plan.mode == "halo" else None
            for s in shards
        ]
        vec64 = [graph.edge_vectors(s.edges) for s in shards]
        locals_ = [
            build_local_graph(graph, s.atoms, v, s.edge_index, s.owned, s.atoms,
                              self.devices[s.index], self.dtype, exchanges[s.index] or no_exchange)
            for s, v in zip(shards, vec64)
        ]
        outputs: list[torch.Tensor | None] = [None] * len(shards)

        def work(i: int):
            outputs[i] = run_model(self.replicas[self.devices[i]], locals_[i])

        if hub is None:
            work(0)
        else:
            _run_threads(work, len(shards), hub)
        self.last_exchange_calls = max((e.calls for e in exchanges if e), default=0)
        total = sum(o.sum().to(device="cpu", dtype=torch.float64) for o in outputs)
        vecs = [lg.edge_vec for lg in locals_]
        if total.requires_grad:
            grads = torch.autograd.grad(total, vecs, allow_unused=True)
        else:
            grads = [None] * len(vecs)
        pieces = []
        for s, out, vec, grad in zip(shards, outputs, vec64, grads):
            g = np.zeros((len(s.edges), 3)) if grad is None else grad.detach().to("cpu", torch.float64).numpy()
            pieces.append((s.atoms[s.owned], out.detach().to("cpu", torch.float64).numpy(), s.edges, vec, g))
        return assemble(graph, pieces)


def _run_threads(work, count: int, hub: _Hub) -> None:
    errors: list[BaseException | None] = [None] * count

    def target(i):
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors[i] = exc
            hub.barrier.abort()

    threads = [threading.Thread(target=target, args=(i,), name=f"distmlip-worker-{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [(i, e) for i, e in enumerate(errors) if e is not None and not isinstance(e, _PeerFailed)]
    if real:
        i, exc = real[0]
        exc.add_note(f"(raised in distmlip worker {i} of {count})")
        raise exc
    if any(errors):
        raise RuntimeError("a worker timed out waiting for the others at a halo exchange")
