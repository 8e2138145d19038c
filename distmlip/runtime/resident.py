"""The per-step work on the model's device: between rebuilds only positions (and the cell) go in and
energies, forces and virial come out, each once per step and device.

At a build nothing per step exists yet; the first step on a device moves each part's (or shard's)
index arrays there once (``DeviceItem``: senders and receivers as global atom ids, image shifts,
local ``edge_index``, numbers, atom ids) and keeps them on the ``Built``. Every step then:

1. ``StepState.positions``: the positions (N, 3) float64 go to each device once;
2. ``device_piece``: edge vectors ``pos[s] - pos[r] + shift @ cell`` in float64, the edges within
   the cutoff kept (the graph holds pairs within cutoff + skin), coincident atoms refused from one
   scalar (the shortest squared length), the ``LocalGraph`` of the kept edges;
3. ``StepState.deposit``: the model's edge gradients added to float64 forces (a scatter) and virial
   (``vec^T grad``) on the device, energies copied to their rows;
4. ``StepState.flush``: each device's (N,) energies, (N, 3) forces and (3, 3) virial added to the
   host buffer (4N + 9 float64), the only host arrays of the step: O(N), none O(E). Over ranks
   ``results.gather_results`` takes the device sums instead: halo forces go home point to point,
   owned rows are gathered (no O(N) all-reduce).

Synchronisation (audited for issue 21, item 4). Between the model's layers nothing makes the
host wait for the device: the exchanges (``exchange.py``'s docstring) read no tensor value on the
host, and ``deposit`` only queues device work (``len`` of a tensor is its shape, known on the
host). Per step, outside the layers, the host waits for the device at these points only:

- ``device_piece``, per part: ``float(d2.min())`` (the coincident-atom check) and
  ``torch.nonzero`` of the cutoff mask (the kept edges' count decides the graph's shape, and
  ``len(idx) == len(vec)`` compares it on the host);
- ``StepState.flush``: the results' copy to the host (``.cpu()``), once per device;
- the backward's start (``torch.autograd.grad``) waits for nothing; under a launcher the
  exchanges' ``req.wait()`` is a host wait on gloo (CPU) and a stream wait on NCCL.

``tests/engine/test_resident.py::test_no_device_sync_between_the_layers`` (CUDA only) runs the
layers of a 2-part evaluation, forward and backward, in ``torch.cuda.set_sync_debug_mode("error")``.

Measured on one CPU thread (E = 1.26 M edges, N = 23,328, float64; bench/bench_step.py times the
whole step): forces and virial by NumPy take + bincount 0.052 s; torch ``index_add_`` of a
(2E, 3) block 0.055 s, two ``index_add_`` 0.082 s (float32 0.072 s), ``torch.bincount`` per
component 0.040 s, the backward of ``pos[s] - pos[r]`` (positions as the leaf) 0.049 s, a CSR
incidence matrix times the gradients 0.016 s (0.028 s with the scatter of the kept edges into
all of them; beta API, not on every device), two ``scatter_add_`` with an expanded index
0.025 s: the last is used. Squared lengths ``(v * v) @ ones(3)`` 0.013 s against
``(v * v).sum(1)`` 0.041 s.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..models.base import NUM_ELEMENTS, LocalGraph
from ..partition.plan import part_edge_index
from .local import MIN_DISTANCE, check_distances

__all__ = ["DeviceItem", "Kept", "StepState", "add_edge_gradients", "device_item", "device_piece"]


@dataclass(frozen=True, eq=False)
class DeviceItem:
    """A part's (or shard's) per-build arrays on one device, made once per build.

    Attributes:
        senders, receivers: (E,) int64 global atom ids of each edge's ends (skin edges included).
        shifts: (E, 3) float64 image shifts.
        edge_index: (2, E) int64 local ``[senders; receivers]`` rows.
        numbers, atom_ids, owned_mask: the ``LocalGraph`` fields of the rows.
        num_owned: owned rows.
    """

    senders: torch.Tensor
    receivers: torch.Tensor
    shifts: torch.Tensor
    edge_index: torch.Tensor
    numbers: torch.Tensor
    atom_ids: torch.Tensor
    owned_mask: torch.Tensor
    num_owned: int


@dataclass(frozen=True, eq=False)
class Kept:
    """The edges of one step within the cutoff: global ``senders``/``receivers`` (E,) and float64
    vectors ``vec`` (E, 3), on the device."""

    senders: torch.Tensor
    receivers: torch.Tensor
    vec: torch.Tensor

    def __len__(self) -> int:
        return len(self.vec)


def _empty_item(device) -> DeviceItem:
    long = torch.zeros(0, dtype=torch.int64, device=device)
    return DeviceItem(long, long, torch.zeros((0, 3), dtype=torch.float64, device=device),
                      torch.zeros((2, 0), dtype=torch.int64, device=device), long, long,
                      torch.zeros(0, dtype=torch.bool, device=device), 0)


def device_item(built, item, device: torch.device) -> DeviceItem:
    """``item``'s (a ``Shard`` or ``PartPlan`` of ``built``; ``None``: nothing) ``DeviceItem`` on
    ``device``, made at its first use and kept on ``built`` (per build, not per step). Parts
    evaluated one at a time (``built.sequential``, a memory budget) are not kept: every part's
    arrays together are O(E) bytes the budget does not hold; each pass makes its part's again."""
    key = (id(item), str(device))
    cache = built.on_device
    hit = cache.get(key)
    if hit is not None and hit[0] is item:
        return hit[1]
    if item is None or built.graph is None or len(item.atoms) == 0:
        out = _empty_item(device)
    else:
        graph, ids = built.graph, built.ids

        def glob(rows):
            return rows if ids is None else ids[rows]

        def dev(a, dtype=None):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

        edges = item.edges
        atoms = item.atoms
        out = DeviceItem(
            senders=dev(glob(graph.senders[edges]), torch.int64),
            receivers=dev(glob(graph.receivers[edges]), torch.int64),
            shifts=dev(graph.shifts[edges], torch.float64),
            edge_index=dev(part_edge_index(item, graph), torch.int64).reshape(2, -1),
            numbers=dev(graph.numbers[atoms]),
            atom_ids=dev(glob(atoms)),
            owned_mask=dev(np.arange(len(atoms)) < item.num_owned),
            num_owned=int(item.num_owned),
        )
    if not built.sequential:
        with built.lock:
            cache[key] = (item, out)
    return out


def add_edge_gradients(forces: torch.Tensor, virial: torch.Tensor, receivers: torch.Tensor,
                       senders: torch.Tensor, vec: torch.Tensor, grad: torch.Tensor) -> None:
    """Add, in place and on their device, the dE/dx of edge gradients ``grad = dE/d(vec)``
    ((E, 3), float64) to ``forces`` ((N, 3): the receiver gets ``+grad``, the sender ``-grad``,
    as ``vec = pos[sender] - pos[receiver] + shift @ cell``) and ``vec^T grad`` to ``virial``
    ((3, 3): dE/d(strain) before symmetrising). Two ``scatter_add_`` with an expanded index (the
    fastest of the scatters timed above). Used by ``StepState.deposit`` and by LAMMPS's pair
    driver."""
    forces.scatter_add_(0, receivers[:, None].expand(-1, 3), grad)
    forces.scatter_add_(0, senders[:, None].expand(-1, 3), grad.neg())
    virial.add_(vec.T @ grad)


class StepState:
    """One evaluation's device-side state of a build: the positions and cell on each device (moved
    once), and per device the float64 energies (N), forces (N, 3) and virial (3, 3) accumulated
    there; ``flush`` adds them to the host buffer. Thread-safe (workers of several devices)."""

    def __init__(self, built, positions: np.ndarray, cell: np.ndarray):
        self.built, self.host, self.cell = built, positions, cell
        self.n = len(positions)
        self.lock = threading.Lock()
        self._positions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._composition: dict[str, torch.Tensor] = {}

    def positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3) float64 positions and (3, 3) float64 cell on ``device`` (moved once a step)."""
        key = str(device)
        with self.lock:
            if key not in self._positions:
                self._positions[key] = (
                    torch.as_tensor(self.host, dtype=torch.float64).to(device),
                    torch.as_tensor(self.cell, dtype=torch.float64).to(device))
            return self._positions[key]

    def composition(self, device) -> torch.Tensor:
        """``LocalGraph.composition``: (119,) int64 counts of the system's atomic numbers (made once
        per build and device)."""
        key = ("composition", str(device))
        cache = self.built.on_device
        if key not in cache:
            counts = np.bincount(self.built.numbers, minlength=NUM_ELEMENTS)[:NUM_ELEMENTS]
            with self.built.lock:
                cache[key] = torch.as_tensor(counts, dtype=torch.int64, device=device)
        return cache[key]

    def sums(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``device``'s float64 energies (N,), forces (N, 3) and virial (3, 3) of this step (zeros
        where nothing was deposited)."""
        key = str(device)
        with self.lock:
            if key not in self._sums:
                zeros = dict(dtype=torch.float64, device=device)
                self._sums[key] = (torch.zeros(self.n, **zeros), torch.zeros((self.n, 3), **zeros),
                                   torch.zeros((3, 3), **zeros))
            return self._sums[key]

    def deposit(self, device, owned_ids: torch.Tensor | None, energies: torch.Tensor | None,
                kept: Kept | None, grad: torch.Tensor | None) -> None:
        """Add the energies of the owned atoms ``owned_ids`` (global) and the forces (dE/dx: the
        receiver gets ``+grad``, the sender ``-grad``) and virial ``vec^T grad`` of the edge
        gradients ``grad = dE/d(vec)`` of ``kept``, on ``device``."""
        e_sum, f_sum, w_sum = self.sums(device)
        with torch.no_grad(), self.lock:
            if energies is not None and owned_ids is not None and len(owned_ids):
                e_sum.index_copy_(0, owned_ids, energies.detach().to(torch.float64))
            if kept is None or grad is None or not len(kept):
                return
            add_edge_gradients(f_sum, w_sum, kept.receivers, kept.senders, kept.vec.detach(),
                               grad.detach().to(torch.float64))

    def flush(self, buffer: np.ndarray) -> None:
        """Add every device's sums to ``buffer`` (energies (n), forces (n, 3), virial (3, 3)): the
        one copy back per device and step."""
        n = self.n
        for e_sum, f_sum, w_sum in self._sums.values():
            buffer[:n] += e_sum.cpu().numpy()
            buffer[n : 4 * n] += f_sum.cpu().numpy().ravel()
            buffer[4 * n :] += w_sum.cpu().numpy().ravel()


def device_piece(state: StepState, item, exchange, cutoff: float, mode: str, dtype: torch.dtype,
                 device: torch.device, requires_grad: bool = True) -> tuple[LocalGraph, Kept]:
    """The ``LocalGraph`` of ``item`` (a ``Shard`` or ``PartPlan`` of the build; ``None``: an
    empty graph) at this step's positions, all on ``device``, and its kept edges."""
    d = device_item(state.built, item, device)
    pos, cell = state.positions(device)
    if len(d.senders):
        vec = pos.index_select(0, d.senders).sub_(pos.index_select(0, d.receivers))
        vec.add_(d.shifts @ cell)
        d2 = (vec * vec) @ torch.ones(3, dtype=vec.dtype, device=device)
        if float(d2.min()) < MIN_DISTANCE ** 2:  # the one scalar the check reads
            check_distances(d2.cpu().numpy(), d.senders.cpu().numpy(), d.receivers.cpu().numpy())
        idx = torch.nonzero(d2 < cutoff * cutoff).reshape(-1)
        if len(idx) == len(vec):
            kept = Kept(d.senders, d.receivers, vec)
            edge_index = d.edge_index
        else:
            kept = Kept(d.senders.index_select(0, idx), d.receivers.index_select(0, idx),
                        vec.index_select(0, idx))
            edge_index = d.edge_index.index_select(1, idx)
    else:
        kept = Kept(d.senders, d.receivers, torch.zeros((0, 3), dtype=torch.float64, device=device))
        edge_index = d.edge_index
    n_rows = len(d.numbers)
    local = LocalGraph(
        numbers=d.numbers,
        edge_index=edge_index,
        edge_vec=kept.vec.detach().to(dtype).requires_grad_(requires_grad),  # a leaf of its own
        halo_exchange=exchange,
        owned_mask=d.owned_mask,
        atom_ids=d.atom_ids,
        cell=cell.to(dtype),
        num_owned=d.num_owned,
        num_needed=d.num_owned if mode == "halo" else n_rows,
        composition=state.composition(device),
    )
    return local, kept
