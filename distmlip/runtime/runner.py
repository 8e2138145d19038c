"""The one runner: positions, cell, pbc, numbers -> ``Evaluation``, in one process or on every rank.

Each call:

1. the system (under a launcher: rank 0's, broadcast to every rank);
2. if it is stale (first call, an atom moved more than ``skin / 2`` since the last build, or the
   cell, periodicity or atomic numbers changed; under a launcher every rank agrees), a rebuild:
   owners (partitioner), the neighbour graph of this process's region with cutoff + skin (the
   whole system in one process; under a launcher the atoms near the rank's parts), the parts, the
   shards (one per worker: a device in this process, or this rank) and their exchange maps;
3. edge vectors from the current positions, keeping only edges shorter than the model's cutoff
   (so every call gives exactly what a fresh build would);
4. the model on every shard, ``halo_exchange`` between its layers, one backward pass;
5. energies, forces (from d E / d edge_vec) and virial gathered; under a launcher one all-reduce
   gives every rank the same full results.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..graph import NeighborGraph
from ..graph.neighbors import validate_system
from ..graph.region import atoms_near
from ..models.base import NUM_ELEMENTS, DistributableModel, LocalGraph, no_exchange
from ..partition import PartitionPlan
from ..partition.assign import grid_owners, metis_owners, slab_owners
from ..partition.plan import build_parts, owned_rows
from ..typing import MODES, PARTITIONERS, Mode, Partitioner
from .exchange import CommunicationError, Hub, LocalExchange, P2PExchange, PeerFailed
from .shards import Shard, build_shard, owned_row_offsets, part_groups

__all__ = ["Evaluation", "MIN_DISTANCE", "Runner", "TIMING_KEYS", "add_edge_terms", "check_distances",
           "run_model"]

#: ``Runner.timings`` keys (seconds), the same on both backends: ``broadcast`` (rank 0's system to
#: every rank), ``partition`` (owners, parts, shards), ``graph`` (neighbour list), ``handshake``
#: (exchange maps between ranks), ``edges`` (edge vectors of the call), ``evaluate`` (model,
#: exchanges and backward pass), ``exchange`` (time inside point-to-point halo exchanges),
#: ``reduce`` (the all-reduce of the results), ``total``, and ``communication`` (the sum of the
#: communicating stages under a launcher; 0 in one process). Graph, partition and handshake are 0
#: on calls that reuse the last build.
TIMING_KEYS = ("broadcast", "partition", "graph", "handshake", "edges", "evaluate", "exchange",
               "reduce", "total", "communication")


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Results of one evaluation, float64, in the system's atom order.

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


#: Atoms closer than this (Å) are refused as coincident: a zero-length edge has no direction and
#: gives NaN forces. No physical structure comes near it (the shortest bond, H2's, is 0.74 Å), and
#: it is the tolerance by which the CHGNet adapter tells periodic images apart.
MIN_DISTANCE = 1e-3


def check_distances(d2: np.ndarray, senders: np.ndarray, receivers: np.ndarray,
                    ids: np.ndarray | None = None) -> None:
    """``ValueError`` naming the closest pair if any edge (squared lengths ``d2``, of graph atoms
    ``senders``/``receivers``; ``ids``: their global ids, if the graph is a region) is shorter
    than ``MIN_DISTANCE``. O(E) on edge lengths already computed."""
    if not len(d2) or d2.min() >= MIN_DISTANCE ** 2:
        return
    e = int(np.argmin(d2))
    i, j = int(receivers[e]), int(senders[e])
    if ids is not None:
        i, j = int(ids[i]), int(ids[j])
    count = int(np.count_nonzero(d2 < MIN_DISTANCE ** 2)) // 2  # each pair is two edges
    what = (f"atom {i} and its own periodic image" if i == j else f"atoms {min(i, j)} and {max(i, j)}")
    raise ValueError(
        f"positions: expected atoms at least {MIN_DISTANCE} Å apart, got {what} "
        f"{np.sqrt(d2[e]):.3g} Å apart (coincident{f'; {count} such pairs' if count > 1 else ''}); "
        f"remove the duplicated atom"
    )


def edges_within(graph: NeighborGraph, positions: np.ndarray, cell: np.ndarray, edges: np.ndarray,
                 cutoff: float, check: bool = False, ids: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Of the graph's ``edges`` (ids), the mask of those shorter than ``cutoff`` at ``positions``
    (the graph's atoms; it was built with cutoff + skin) and their (kept, 3) float64 vectors
    ``pos[sender] - pos[receiver] + shift @ cell``. ``check``: refuse coincident atoms
    (``check_distances``; ``ids``: the graph atoms' global ids if it is a region)."""
    s, r = np.take(graph.senders, edges), np.take(graph.receivers, edges)
    vec = np.take(positions, s, axis=0)
    vec -= np.take(positions, r, axis=0)
    vec += np.take(graph.shifts, edges, axis=0) @ cell
    d2 = np.einsum("ij,ij->i", vec, vec)
    if check:
        check_distances(d2, s, r, ids)
    keep = d2 < cutoff * cutoff
    return keep, (vec if keep.all() else vec[keep])


def local_edges(graph: NeighborGraph, positions: np.ndarray, ids: np.ndarray | None, cell: np.ndarray,
                edges: np.ndarray, edge_index: np.ndarray, cutoff: float):
    """A part's (or shard's) edges within ``cutoff`` at ``positions`` (global; ``ids``: the graph
    atoms' global ids if it is a region), coincident atoms refused: kept edge ids, their local
    (2, kept) ``edge_index`` and (kept, 3) float64 vectors."""
    pos = positions if ids is None else positions[ids]
    keep, vec = edges_within(graph, pos, cell, edges, cutoff, check=True, ids=ids)
    if len(vec) == len(keep):
        return edges, edge_index, vec
    return edges[keep], np.ascontiguousarray(edge_index[:, keep]), vec


def inside_cutoff(graph: NeighborGraph | None, positions: np.ndarray, cell: np.ndarray,
                  cutoff: float) -> np.ndarray:
    """(E,) bool: the graph's edges shorter than ``cutoff`` at ``positions``, computed in chunks
    (no E x 3 temporary)."""
    if graph is None or graph.num_edges == 0:
        return np.zeros(0, dtype=bool)
    inside = np.empty(graph.num_edges, dtype=bool)
    for start in range(0, graph.num_edges, 1 << 18):
        chunk = np.arange(start, min(start + (1 << 18), graph.num_edges))
        inside[start : start + len(chunk)] = edges_within(graph, positions, cell, chunk, cutoff)[0]
    return inside


def run_model(model: DistributableModel, local: LocalGraph) -> torch.Tensor:
    """Run ``model`` on ``local`` and return the owned atoms' energies, checking the output."""
    with torch.enable_grad():
        out = model(local)
    n, owned = local.num_nodes, local.num_owned
    if not isinstance(out, torch.Tensor) or out.ndim != 1 or not owned <= out.shape[0] <= n:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model: {type(model).__name__}.forward must return per-atom energies of shape "
            f"({n},) (or of the first graph.num_needed = {local.num_needed} rows), got {got}"
        )
    if not out.is_floating_point():
        raise ValueError(
            f"model: {type(model).__name__}.forward must return per-atom energies as a floating "
            f"tensor (differentiable with respect to graph.edge_vec), got dtype {out.dtype}"
        )
    return out[:owned]


def composition_of(numbers: np.ndarray, device) -> torch.Tensor:
    """``LocalGraph.composition`` of a whole system: (119,) int64 counts per atomic number."""
    return torch.as_tensor(np.bincount(numbers, minlength=NUM_ELEMENTS)[:NUM_ELEMENTS],
                           dtype=torch.int64, device=device)


def _owners(partitioner: Partitioner, positions, cell, pbc, num_parts: int, graph=None) -> np.ndarray:
    if partitioner == "slab":
        return slab_owners(positions, cell, pbc, num_parts)
    if partitioner == "grid":
        return grid_owners(positions, cell, pbc, num_parts)
    return metis_owners(graph, num_parts)


class _LocalComm:
    """The communication of a single process: nothing to communicate."""

    rank, world_size = 0, 1

    def system(self, positions, cell, pbc, numbers):
        return validate_system(positions, cell, pbc, numbers)

    def agree(self, flag: bool) -> bool:
        return flag

    def maximum(self, value: float) -> float:
        return value

    def sum(self, buffer: np.ndarray) -> np.ndarray:
        return buffer

    def total(self, value: torch.Tensor) -> torch.Tensor:
        return value


class _TorchComm:
    """The collectives the runner needs, on torch.distributed's default group."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def system(self, positions, cell, pbc, numbers):
        """Everyone gets rank 0's system (rank 0's positions are the truth)."""
        if self.rank == 0:
            positions, cell, pbc, numbers = validate_system(positions, cell, pbc, numbers)
        dist, dev = self.dist, self.device
        n = torch.tensor([len(positions) if self.rank == 0 else 0], dtype=torch.int64, device=dev)
        dist.broadcast(n, 0)
        n = int(n.item())
        packed = torch.zeros(3 * n + 12, dtype=torch.float64, device=dev)
        ints = torch.zeros(n, dtype=torch.int64, device=dev)
        if self.rank == 0:
            packed[: 3 * n] = torch.as_tensor(np.ravel(positions), dtype=torch.float64)
            packed[3 * n : 3 * n + 9] = torch.as_tensor(np.ravel(cell), dtype=torch.float64)
            packed[3 * n + 9 :] = torch.as_tensor(np.asarray(pbc, dtype=np.float64))
            ints[:] = torch.as_tensor(np.asarray(numbers, dtype=np.int64))
        dist.broadcast(packed, 0)
        dist.broadcast(ints, 0)
        packed = packed.cpu().numpy()
        return validate_system(packed[: 3 * n].reshape(n, 3), packed[3 * n : 3 * n + 9].reshape(3, 3),
                               packed[3 * n + 9 :] > 0.5, ints.cpu().numpy())

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any."""
        t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def maximum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t.item())

    def broadcast_owner(self, owner: np.ndarray | None, n: int) -> np.ndarray:
        t = torch.zeros(n, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            t[:] = torch.as_tensor(owner)
        self.dist.broadcast(t, 0)
        return t.cpu().numpy()

    def handshake(self, shard: Shard, device: torch.device) -> dict[int, torch.Tensor]:
        """Tell each source rank which of its owned rows this rank holds (in halo-row order);
        returns ``{peer: owned rows of this rank that peer holds}``."""
        dist, dev = self.dist, self.device
        want = {q: rows for q, rows in shard.blocks if q != self.rank}
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=dev)
        for q, rows in want.items():
            counts[q] = len(rows)
        table = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(table, counts)
        asked = {q: int(table[q][self.rank]) for q in range(self.world_size)
                 if q != self.rank and int(table[q][self.rank]) > 0}
        ops, bufs = [], {}
        for q, count in asked.items():
            bufs[q] = torch.empty(count, dtype=torch.int64, device=dev)
            ops.append(dist.P2POp(dist.irecv, bufs[q], q))
        for q, rows in want.items():
            ops.append(dist.P2POp(dist.isend, torch.as_tensor(rows, device=dev), q))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return {q: b.to(device) for q, b in bufs.items()}

    def sum(self, buffer: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(buffer, device=self.device)
        self.dist.all_reduce(t)
        return t.cpu().numpy()

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``value`` (a tensor; a new one, on ``value``'s device)."""
        t = value.detach().to(self.device).clone().contiguous()
        self.dist.all_reduce(t)
        return t.to(value.device)


@dataclass(eq=False)
class _Built:
    """What a rebuild makes; reused until the system moves more than skin / 2."""

    positions: np.ndarray  # (N, 3) positions at the build
    cell: np.ndarray
    pbc: np.ndarray
    numbers: np.ndarray
    ids: np.ndarray | None  # region -> global atom ids (None: the region is the whole system)
    graph: NeighborGraph | None
    plan: PartitionPlan
    shards: tuple[Shard, ...]
    send: tuple[dict, ...]  # per shard, P2P send rows (multi-process only)
    sequential: bool = False  # parts evaluated one at a time
    predicted: float = 0.0  # bytes one evaluation is predicted to add (with a budget)
    now_cell: np.ndarray | None = None  # the cell of the evaluation under way (may differ from
    # ``cell`` when a deformed cell reuses the build: see ``Runner._stale``)


class Runner:
    """Evaluates a system split into parts: in this process (``comm=None``) or, one shard per
    rank, on torch.distributed's default process group (``comm="torch"``).

    Args:
        model: the model; copied once per device (the caller's module is not modified).
        devices: in one process, one worker per entry (a thread each when there are several);
            part blocks go to workers in order. Under a launcher: this rank's device.
        dtype: floating dtype to run in (``None`` keeps the model's).
        partitioner, mode: as for ``DistributedCalculator``.
        num_partitions: parts in all (under a launcher a multiple of the number of ranks; each
            rank evaluates a contiguous block of them as one shard).
        skin: Verlet skin, Å: the graph is built with ``cutoff + skin`` and reused until some atom
            has moved more than ``skin / 2`` (or the cell, periodicity or numbers change).
        timeout: seconds a worker waits for the others at a halo exchange (in one process).
        comm: ``None`` (this process) or ``"torch"`` (torch.distributed, already initialised).
        sequential: ``True``: evaluate each worker's parts one at a time (bounded memory, exact;
            see ``runtime/sequential.py``); ``False``: all at once as one union graph; ``None``
            (default): all at once unless ``max_memory`` needs otherwise.
        max_memory: bytes one evaluation may add on each device (``None``: no bound). If the
            parts all at once are predicted (``runtime/memory.py``) to fit, they run so;
            otherwise one at a time, as few parts as fit (at least ``num_partitions``).

    After each call: ``last_plan`` (the parts this process evaluates), ``last_graph`` (the graph
    they index: the whole system's in one process, this rank's region under a launcher),
    ``timings`` (seconds per stage; the same keys on both backends), ``graph_builds`` (rebuilds so
    far), ``last_exchange_calls``, ``rank`` and ``world_size``.
    """

    def __init__(self, model: DistributableModel, devices: list[torch.device], dtype=None,
                 partitioner: Partitioner = "grid", mode: Mode = "halo", num_partitions: int = 1,
                 skin: float = 0.0, timeout: float = 600.0, comm: Literal["torch"] | None = None,
                 sequential: bool | None = None, max_memory: int | None = None,
                 progress: bool = False):
        if partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner: expected one of {list(PARTITIONERS)}, got {partitioner!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        self.devices = list(devices)
        self.dtype = dtype or model.dtype
        self.partitioner = partitioner
        self.mode = mode
        self.num_partitions = int(num_partitions)
        self.skin = float(skin)
        self.timeout = timeout
        self.cutoff = float(model.cutoff)
        self.hops = int(model.num_layers) if mode == "extended" else 1
        self.budget = None if max_memory is None else int(max_memory)
        if self.budget is not None:
            from .memory import release_memory_eagerly

            release_memory_eagerly()
        self._sequential = sequential
        self.progress = bool(progress)
        self.memory_model = None
        # per forward, the kinds of its communicating calls, "halo_exchange" (halo mode) or
        # "global_sum", in order (bounded memory; found on the first call)
        self._levels: tuple[str, ...] | None = None
        self.comm = _TorchComm(self.devices[0]) if comm == "torch" else _LocalComm()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self._source = model  # the caller's module: memory calibrations are cached per it
        self.replicas: dict[torch.device, DistributableModel] = {}
        for device in self.devices:
            if device not in self.replicas:
                replica = copy.deepcopy(model).to(device=device, dtype=self.dtype)
                replica.eval()
                for p in replica.parameters():
                    p.requires_grad_(False)
                self.replicas[device] = replica
        self.graph_builds = 0
        self.last_exchange_calls = 0
        self.timings: dict[str, float] = {}
        self._built: _Built | None = None

    # ------------------------------------------------------------------ public
    @property
    def sequential(self) -> bool:
        """Whether the last build evaluates each worker's parts one at a time."""
        if self._built is not None:
            return self._built.sequential
        return bool(self._sequential)

    @property
    def predicted_peak(self) -> float:
        """Bytes the current build is predicted to add per evaluation (set when ``max_memory``
        chose it; 0.0 otherwise)."""
        return 0.0 if self._built is None else float(self._built.predicted)

    @property
    def last_shards(self) -> list[Shard]:
        """The shards (one per worker of this process: its parts' rows, edges, halo blocks) of the
        current build."""
        return [] if self._built is None else list(self._built.shards)

    @property
    def last_plan(self) -> PartitionPlan | None:
        return None if self._built is None else self._built.plan

    @property
    def last_graph(self) -> NeighborGraph | None:
        return None if self._built is None else self._built.graph

    def evaluate(self, positions, cell, pbc, numbers) -> Evaluation:
        """Evaluate the system (under a launcher: rank 0's); every rank returns the same results."""
        if self.world_size == 1:
            return self._evaluate(positions, cell, pbc, numbers)
        from .launch import is_comm_failure, peer_status, report_failure

        try:
            return self._evaluate(positions, cell, pbc, numbers)
        except CommunicationError as exc:
            raise self._peer_failure(exc, peer_status(self.rank, exc.peers or None)) from exc
        except RuntimeError as exc:
            if not is_comm_failure(exc):
                report_failure(self.rank, exc)
                raise
            raise self._peer_failure(exc, peer_status(self.rank)) from exc
        except BaseException as exc:
            report_failure(self.rank, exc)
            raise

    def _peer_failure(self, exc: BaseException, status: str) -> CommunicationError:
        """The error of a rank whose collective failed, naming what is known of the peers; said at
        once on stderr too (the launcher may kill this process before Python prints the error)."""
        import sys

        message = (f"rank {self.rank} stopped: a collective with the other ranks failed or timed "
                   f"out (timeout {self.timeout:g} s) because "
                   + (status or "a peer has failed, died or hung") + f". {exc}")
        print(f"distmlip: {message}", file=sys.stderr, flush=True)
        return CommunicationError(message, printed=True)

    # ------------------------------------------------------------------ building
    def _stale(self, positions, cell, pbc, numbers) -> bool:
        """Whether the build must be redone for this system: a different atom count, periodicity or
        elements, or an atom moved too far for the graph to still hold every pair within the cutoff.

        Unchanged cell: the graph (built with cutoff + skin) holds every such pair while no atom has
        moved more than skin / 2. Changed cell (NPT, cell relaxations): write each atom as the build
        position carried along by the cell's deformation ``M = inv(h0) h`` plus ``u``; a pair at
        distance ``d0 >= cutoff + skin`` at the build (image shifts ``S``: ``S h = S h0 M``) is now
        at least ``sigma_min(M) d0 - 2 max|u|`` apart, so the graph still holds every pair while
        ``2 max|u| <= sigma_min(M) (cutoff + skin) - cutoff`` (with M = 1 this is the rule above).
        Open directions have no images: both cells take the build's completed vectors there, so a
        changed vacuum vector does not count (a molecule's cell never does)."""
        b = self._built
        if b is None or len(positions) != len(b.positions):
            return True
        if not (np.array_equal(pbc, b.pbc) and np.array_equal(numbers, b.numbers)):
            return True
        if np.array_equal(cell, b.cell):
            moved = positions - b.positions
            room = self.skin
        else:
            from ..graph.neighbors import complete_cell

            # open directions carry no images: their vectors keep the build's (completed) ones
            old = complete_cell(b.cell, pbc)
            new = old.copy()
            new[pbc] = cell[pbc]
            try:
                deform = np.linalg.solve(old, new)  # rows: x = f h, so x0 @ inv(h0) @ h
            except np.linalg.LinAlgError:
                return True
            moved = positions - b.positions @ deform
            room = float(np.linalg.svd(deform, compute_uv=False).min()) * (self.cutoff + self.skin) \
                - self.cutoff
            if not room > 0:
                return True
        moved = np.einsum("ij,ij->i", moved, moved)
        return bool(moved.max(initial=0.0) > (0.5 * room) ** 2)

    def _build(self, positions, cell, pbc, numbers, times: dict) -> _Built:
        if self.budget is None:
            return self._build_parts(positions, cell, pbc, numbers, times, self.num_partitions)
        return self._build_within_budget(positions, cell, pbc, numbers, times)

    def _build_parts(self, positions, cell, pbc, numbers, times: dict, num_parts: int,
                     graph: NeighborGraph | None = None, sequential: bool | None = None) -> _Built:
        radius = self.cutoff + self.skin
        n = len(positions)
        t0 = time.perf_counter()
        if self.world_size == 1:
            # one process holds every part: the region is the whole system
            if graph is None:
                graph = NeighborGraph.from_arrays(positions, cell, pbc, numbers, radius)
            t1 = time.perf_counter()
            owner = _owners(self.partitioner, positions, cell, pbc, num_parts, graph)
            ids = None
            groups = part_groups(num_parts, min(len(self.devices), num_parts))
            mine = range(num_parts)
        else:
            groups = part_groups(num_parts, self.world_size)
            mine = groups[self.rank]
            if self.partitioner == "metis":  # needs the whole graph: rank 0 partitions
                owner = None
                if self.rank == 0:
                    owner = metis_owners(NeighborGraph.from_arrays(positions, cell, pbc, numbers,
                                                                   radius), num_parts)
                owner = self.comm.broadcast_owner(owner, n)
            else:
                owner = _owners(self.partitioner, positions, cell, pbc, num_parts)
            t1 = time.perf_counter()
            selected = (owner >= mine.start) & (owner < mine.stop)
            ids = atoms_near(positions, cell, pbc, selected, self.hops * radius) if selected.any() \
                else np.zeros(0, dtype=np.int64)
            graph = NeighborGraph.from_arrays(positions[ids], cell, pbc, numbers[ids], radius) \
                if len(ids) else None
        t2 = time.perf_counter()
        rows = owned_rows(owner, num_parts)
        # only parts that own atoms are built (an empty part has no halo and no edges): a build
        # costs O(atoms + parts) however many parts are empty
        present = np.flatnonzero(np.bincount(owner, minlength=num_parts))
        present = present[(present >= mine.start) & (present < mine.stop)]
        if graph is None:
            parts = ()
        elif ids is None:
            parts = build_parts(graph, present, owner, rows, self.hops)
        else:
            parts = build_parts(graph, present, owner[ids], rows[ids], self.hops)
        worker_of_part, offset = owned_row_offsets(owner, groups)
        if sequential is None:
            sequential = bool(self._sequential)
        compact = sequential
        if self.world_size == 1:
            shards = tuple(build_shard(w, [p for p in parts if p.index in g], worker_of_part, offset,
                                       compact) for w, g in enumerate(groups))
        else:
            shards = (build_shard(self.rank, list(parts), worker_of_part, offset, compact),)
        plan = PartitionPlan(n, graph.num_edges if graph is not None else 0, self.mode, self.hops,
                             owner, tuple(parts), atom_ids=ids, total_parts=num_parts)
        t3 = time.perf_counter()
        send: tuple[dict, ...] = tuple({} for _ in shards)
        if self.world_size > 1 and self.mode == "halo":
            send = (self.comm.handshake(shards[0], self.devices[0]),)
        t4 = time.perf_counter()
        if self.world_size == 1:
            times.update(graph=t1 - t0, partition=t3 - t1, handshake=0.0)
        else:
            times.update(partition=(t1 - t0) + (t3 - t2), graph=t2 - t1, handshake=t4 - t3)
        return _Built(positions.copy(), cell.copy(), pbc.copy(), numbers.copy(), ids, graph,
                      plan, shards, send, sequential)

    # ------------------------------------------------------------------ memory
    def _memory(self, positions, cell, pbc, numbers):
        """The model's calibrated memory costs (probes built from this system; cached)."""
        if self.memory_model is None:
            from ase import Atoms

            from .memory import calibrate

            atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
            self.memory_model = calibrate(self.replicas[self.devices[0]], atoms, self.dtype,
                                          self.devices[0], limit=self.budget, key=self._source)
        return self.memory_model

    def predict(self, b: _Built, memory, inside: np.ndarray | None = None) -> dict:
        """Predicted bytes one evaluation of build ``b`` adds on this process's devices.

        Returns ``peak`` (the largest over devices; on CPU, the process), ``fixed`` (graph, plan,
        stored exchange rows: what does not shrink with more parts), ``largest_part`` (the
        biggest part's activations) and ``floor`` (``fixed`` plus the largest one-atom part on
        every worker: about the peak of the finest partition, the least more parts can reach).
        ``inside``: the graph's edges within the cutoff, if already known (``inside_cutoff``)."""
        from .memory import (
            CALL_BYTES_PER_EDGE,
            GRAPH_BUILD_BYTES_PER_EDGE,
            GRAPH_BYTES_PER_EDGE,
            PLAN_BYTES_PER_EDGE,
        )

        graph, n = b.graph, len(b.positions)
        if inside is None:
            inside = inside_cutoff(graph, graph.positions, b.cell, self.cutoff) if graph is not None \
                else np.zeros(0, dtype=bool)
        max_degree = int(np.bincount(graph.receivers[inside], minlength=graph.num_atoms).max()) \
            if len(inside) else 0
        # with the skin: a one-atom part holds up to this many halo rows and edges to filter
        max_listed = int(np.bincount(graph.receivers, minlength=graph.num_atoms).max()) \
            if len(inside) else 0
        num_edges = graph.num_edges if graph is not None else 0
        plan_edges = sum(len(p.edges) for p in b.plan.parts)
        host = (GRAPH_BYTES_PER_EDGE * num_edges + PLAN_BYTES_PER_EDGE * plan_edges
                + 8 * (4 * n + 9) + 64 * n)
        stored, acts = [], []  # per worker: exchange rows kept between parts, the largest part
        by_index = {p.index: p for p in b.plan.parts}
        for shard in b.shards:
            parts = [by_index[i] for i in shard.parts]
            halo = self.mode == "halo"
            if b.sequential:
                act = max((memory.part(p.num_owned if halo else p.num_local,
                                       int(inside[p.edges].sum()), p.num_halo if halo else 0)
                           + CALL_BYTES_PER_EDGE * len(p.edges) for p in parts),
                          default=memory.part(0, 0))
                stored.append(memory.stored(shard.num_rows))
            else:
                kept = sum(int(inside[p.edges].sum()) for p in parts)
                owned = shard.num_owned if halo else shard.num_rows
                act = memory.part(owned, kept, shard.num_rows - owned) \
                    + (CALL_BYTES_PER_EDGE + PLAN_BYTES_PER_EDGE) * len(shard.edges)
                stored.append(0.0)
            acts.append(float(act))
        # the largest one-atom part (what the most parts reach; at most this): the floor estimates
        # the peak of the finest partition, which the budget search tries last
        smallest = memory.part(1, max_degree, max_listed) + CALL_BYTES_PER_EDGE * max_listed

        def total(workers: list[float]) -> float:
            """The peak from each worker's bytes: on a GPU each device holds its worker alone; on
            CPU the process holds them all, the host arrays, and the graph while it is built."""
            if self.devices[0].type == "cuda":
                return max(workers, default=0.0)
            return max(host + sum(workers), GRAPH_BUILD_BYTES_PER_EDGE * num_edges)

        return {"peak": float(total([s + a for s, a in zip(stored, acts, strict=True)])),
                "fixed": float(total(stored)), "largest_part": max(acts, default=0.0),
                "floor": float(total([s + smallest for s in stored]))}

    def _build_within_budget(self, positions, cell, pbc, numbers, times: dict) -> _Built:
        """The build with the fewest parts (at least ``num_partitions``; a multiple of the
        workers) whose predicted peak fits ``max_memory``."""
        memory = self._memory(positions, cell, pbc, numbers)
        workers = len(self.devices) if self.world_size == 1 else self.world_size
        n = len(positions)
        parts = -(-max(self.num_partitions, workers) // workers) * workers
        graph = None
        if not self._sequential:  # all parts at once, if that fits: the fastest
            b = self._build_parts(positions, cell, pbc, numbers, times, self.num_partitions,
                                  sequential=False)
            graph = b.graph if self.world_size == 1 else None
            peak = self.comm.maximum(self.predict(b, memory)["peak"])
            if peak <= self.budget or self._sequential is False:
                b.predicted = peak
                return b
            del b
        inside = None  # the graph's edges within the cutoff: one graph for every attempt
        finest = n * workers  # one atom per part (every partitioner): the last attempt
        while True:
            b = self._build_parts(positions, cell, pbc, numbers, times, parts, graph, sequential=True)
            graph = b.graph if self.world_size == 1 else None
            if inside is None or graph is None:
                inside = inside_cutoff(b.graph, b.graph.positions, b.cell, self.cutoff) \
                    if b.graph is not None else np.zeros(0, dtype=bool)
            pred = self.predict(b, memory, inside)
            peak = self.comm.maximum(pred["peak"])
            if peak <= self.budget:
                b.predicted = peak
                return b
            if parts >= finest:
                # the smallest budget named is this very prediction: a budget of it is met here
                raise ValueError(
                    f"max_memory: expected at least {_gb(peak, up=True)} for "
                    f"this system ({n} atoms: graph, plan and stored exchange rows "
                    f"{_gb(pred['fixed'])}, plus one atom's neighbourhood), got "
                    f"{_gb(self.budget)}; raise max_memory or use more devices or processes"
                )
            if self.comm.maximum(pred["floor"]) > self.budget:
                parts = finest  # not even one-atom parts would fit: try them once, to name the need
                continue
            room = max(self.budget - pred["fixed"], 1.0)
            grow = min(max(1.25, 1.15 * pred["largest_part"] / room), 64.0)
            wanted = max(parts + workers, int(np.ceil(parts * grow)))
            parts = min(-(-wanted // workers) * workers, finest)

    # ------------------------------------------------------------------ evaluation
    def _device(self, shard: Shard) -> torch.device:
        return self.devices[shard.index % len(self.devices)] if self.world_size == 1 else self.devices[0]

    def _local_graph(self, b: _Built, shard: Shard, positions: np.ndarray, exchange):
        """The shard's ``LocalGraph`` at ``positions`` (global) and what the gather needs: kept
        edge ids and their float64 vectors."""
        device = self._device(shard)
        graph = b.graph
        if graph is None or shard.num_rows == 0:
            edges = np.zeros(0, dtype=np.int64)
            vec = np.zeros((0, 3))
            edge_index = np.zeros((2, 0), dtype=np.int64)
            numbers = np.zeros(0, dtype=np.int64)
        else:
            edges, edge_index, vec = local_edges(graph, positions, b.ids, b.now_cell, shard.edges,
                                                 shard.edge_index, self.cutoff)
            numbers = graph.numbers[shard.atoms]
        ids = shard.atoms if b.ids is None else b.ids[shard.atoms]
        needed = shard.num_owned if self.mode == "halo" else shard.num_rows
        local = LocalGraph(
            numbers=torch.as_tensor(numbers, device=device),
            edge_index=torch.as_tensor(edge_index, device=device).reshape(2, -1),
            edge_vec=torch.as_tensor(vec, device=device).to(self.dtype).requires_grad_(True),
            halo_exchange=exchange,
            owned_mask=torch.as_tensor(shard.owned_mask, device=device),
            atom_ids=torch.as_tensor(ids, device=device),
            cell=torch.as_tensor(b.now_cell, device=device).to(self.dtype),
            num_owned=shard.num_owned,
            num_needed=needed,
            composition=composition_of(b.numbers, device),
        )
        return local, edges, vec

    def _exchanges(self, b: _Built) -> list:
        """One exchange per shard. In extended mode they refresh nothing but still carry
        ``global_sum`` between shards and ranks."""
        halo = self.mode == "halo"
        if self.world_size > 1:
            shard = b.shards[0]
            return [P2PExchange(shard, b.send[0], self.devices[0], self.rank, halo=halo)]
        if not halo and len(b.shards) == 1:
            return [no_exchange]
        hub = Hub(len(b.shards), self.timeout) if len(b.shards) > 1 else None
        return [LocalExchange(s, self._device(s), hub, halo=halo) for s in b.shards]

    def _evaluate(self, positions, cell, pbc, numbers) -> Evaluation:
        t0 = time.perf_counter()
        positions, cell, pbc, numbers = self.comm.system(positions, cell, pbc, numbers)
        t1 = time.perf_counter()
        times = {"partition": 0.0, "graph": 0.0, "handshake": 0.0}
        if self.comm.agree(self._stale(positions, cell, pbc, numbers)):
            self._built = self._build(positions, cell, pbc, numbers, times)
            self.graph_builds += 1
        b = self._built
        b.now_cell = cell
        n = len(positions)
        buffer = np.zeros(4 * n + 9)  # energies (N), forces (N, 3), virial (3, 3)
        t2 = time.perf_counter()
        if b.sequential:
            exchange_s = self._compute_sequential(b, positions, buffer, n)
            t3 = t2
        else:
            exchanges = self._exchanges(b)
            pieces = [self._local_graph(b, s, positions, ex)
                      for s, ex in zip(b.shards, exchanges, strict=True)]
            t3 = time.perf_counter()
            self._compute(b, pieces, exchanges, buffer, n)
            self.last_exchange_calls = max(
                (getattr(e, "calls", 0) for e in exchanges if e is not no_exchange), default=0)
            exchange_s = sum(e.seconds for e in exchanges if isinstance(e, P2PExchange))
        t4 = time.perf_counter()
        total = self.comm.sum(buffer)
        t5 = time.perf_counter()
        self.timings = {
            "broadcast": t1 - t0, **times, "edges": t3 - t2, "evaluate": t4 - t3,
            "exchange": exchange_s, "reduce": t5 - t4, "total": t5 - t0,
        }
        self.timings["communication"] = (self.timings["broadcast"] + times["handshake"] + exchange_s
                                         + self.timings["reduce"]) if self.world_size > 1 else 0.0
        if not np.isfinite(total).all():  # every rank holds the same sums: they all raise
            self._refuse_non_finite(total, n)
        energies = total[:n]
        virial = total[4 * n :].reshape(3, 3)
        return Evaluation(float(energies.sum()), energies.copy(), total[n : 4 * n].reshape(n, 3).copy(),
                          0.5 * (virial + virial.T))

    def _refuse_non_finite(self, total: np.ndarray, n: int) -> None:
        name = type(self._source).__name__
        energies, forces = total[:n], total[n : 4 * n].reshape(n, 3)
        bad = np.flatnonzero(~np.isfinite(energies))
        if len(bad):
            raise ValueError(
                f"model: {name} returned NaN or inf energies for atoms {bad[:5].tolist()} "
                f"({len(bad)} in all); expected finite per-atom energies (check the structure "
                f"and the model's inputs)"
            )
        bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
        raise ValueError(
            f"model: {name} gave NaN or inf " + (f"forces on atoms {bad[:5].tolist()} ({len(bad)} in all)"
                                                 if len(bad) else "stress")
            + "; expected finite gradients with respect to the edge vectors (a non-smooth or "
              "singular function of distances?)"
        )

    def _compute(self, b: _Built, pieces, exchanges, buffer: np.ndarray, n: int) -> None:
        """Run the model on every shard, differentiate, and add each shard's energies, forces and
        virial to ``buffer``."""
        outputs: list[torch.Tensor | None] = [None] * len(pieces)

        def work(i: int):
            outputs[i] = run_model(self.replicas[self._device(b.shards[i])], pieces[i][0])

        if len(pieces) == 1:
            work(0)
        else:
            _run_threads(work, len(pieces), getattr(exchanges[0], "hub", None))
        locals_ = [p[0] for p in pieces]
        if isinstance(exchanges[0], P2PExchange):
            ex = exchanges[0]
            loss = outputs[0].sum() + 0.0 * ex.token.to(outputs[0].device, outputs[0].dtype)
            wrt = [locals_[0].edge_vec, ex.first_token]
        else:
            loss = sum(o.sum().to(device="cpu", dtype=torch.float64) for o in outputs)
            wrt = [lg.edge_vec for lg in locals_]
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)[: len(locals_)]
        else:
            grads = [None] * len(locals_)
        ids_of = (lambda rows: rows) if b.ids is None else (lambda rows: b.ids[rows])
        forces = buffer[n : 4 * n].reshape(n, 3)
        for shard, (_local, edges, vec), out, grad in zip(b.shards, pieces, outputs, grads, strict=True):
            if shard.num_rows == 0:
                continue
            buffer[ids_of(shard.atoms[: shard.num_owned])] = out.detach().to("cpu", torch.float64).numpy()
            if len(edges) == 0:
                continue
            g = np.zeros_like(vec) if grad is None else grad.detach().to("cpu", torch.float64).numpy()
            buffer[4 * n :] += add_edge_terms(forces, ids_of(b.graph.receivers[edges]),
                                              ids_of(b.graph.senders[edges]), vec, g).ravel()


    # ------------------------------------------------------------------ bounded memory
    def _compute_sequential(self, b: _Built, positions: np.ndarray, buffer: np.ndarray, n: int) -> float:
        """Every worker evaluates its parts one at a time (``runtime/sequential.py``); the level
        exchanges between them run here. Returns the seconds spent in point-to-point exchanges."""
        from .sequential import SequentialWorker

        workers = [SequentialWorker(self, b, s, self._device(s)) for s in b.shards]
        bar = self._progress_bar(workers)
        for w in workers:
            w.tick = bar.tick
        p2p = None
        if self.world_size > 1 and self.mode == "halo":
            p2p = P2PExchange(b.shards[0], b.send[0], self.devices[0], self.rank)

        def each(fn):
            if len(workers) == 1:
                return [fn(workers[0])]
            results = [None] * len(workers)

            def work(i):
                results[i] = fn(workers[i])

            _run_threads(work, len(workers), None)
            return results

        # levels (halo exchanges in halo mode, global sums): found by running up to one more each
        # time on the first call; known after (the replays check that the model still makes them)
        level, first = 0, self._levels is None
        while self._levels is None or level < len(self._levels):
            kinds = each(lambda w: w.forward_level(level, positions))
            if len(set(kinds)) > 1:
                raise RuntimeError(f"model: workers made different halo_exchange/global_sum calls "
                                   f"(call {level + 1}: {sorted(map(str, set(kinds)))})")
            kind = kinds[0]
            if first:
                if self.world_size > 1:  # every rank must make the same call
                    code = {None: 0, "halo_exchange": 1, "global_sum": 2}[kind]
                    if self.comm.maximum(code) != -self.comm.maximum(-code):
                        raise RuntimeError(f"model: ranks made different halo_exchange/global_sum "
                                           f"calls (call {level + 1}: this rank {kind})")
                if kind is None:
                    break
            elif self.comm.agree(kind != self._levels[level]):  # every rank raises together
                raise RuntimeError(
                    f"model: call {level + 1} to halo_exchange/global_sum was a "
                    f"{self._levels[level]} on the first evaluation and now (on this rank) "
                    f"{kind or 'not made'} or differs on another rank; every evaluation must make "
                    f"the same calls")
            self._level_forward(workers, level, p2p, kind)
            level += 1
        if first:
            self._levels = tuple(workers[0].store.kinds)
            bar.expect(level)
        levels = self._levels
        ids_of = (lambda rows: rows) if b.ids is None else (lambda rows: b.ids[rows])
        forces = buffer[n : 4 * n].reshape(n, 3)
        lock = threading.Lock()

        def gather(ids, e, edges, vec, grad):
            with lock:
                if e is not None:
                    buffer[ids] = e
                if len(edges):
                    buffer[4 * n :] += add_edge_terms(forces, ids_of(b.graph.receivers[edges]),
                                                      ids_of(b.graph.senders[edges]), vec, grad).ravel()

        if not levels:
            each(lambda w: w.final(positions, gather))
        for j in reversed(range(len(levels))):
            each(lambda w: w.backward_level(j, positions, gather if j == 0 else None))
            self._level_backward(workers, j, p2p, levels[j])
        if levels:
            each(lambda w: w.prefix(positions, gather))
        self.last_exchange_calls = levels.count("halo_exchange")
        bar.close()
        return p2p.seconds if p2p is not None else 0.0

    def _progress_bar(self, workers) -> _Progress:
        """A progress bar over the pieces the sequential evaluation runs (``progress=True``; rank 0
        only), or a silent counter."""
        pieces = sum(len(w._indices()) for w in workers)
        guess = None if self._levels is not None or self.mode != "halo" else \
            max(int(self.replicas[self.devices[0]].num_layers) - 1, 0)
        levels = None if self._levels is None else len(self._levels)
        return _Progress(pieces, levels, enabled=self.progress and self.rank == 0, guess=guess)

    def _level_forward(self, workers, level: int, p2p: P2PExchange | None, kind: str) -> None:
        """Fill the halo rows of every worker's Z^level from the owners' posted rows (a sum
        level: Z^level is the sum of every worker's partial sums, over the ranks too)."""
        if kind == "global_sum":
            total = self._total(workers, [w.store.X[level] for w in workers])
            for w in workers:
                w.store.Z[level] = total.to(w.device)
                w.store.X[level] = None
            return
        if p2p is not None:
            w = workers[0]
            x = w.store.X[level]
            remote = iter(p2p.swap(x, backward=False))
            values = [x.index_select(0, torch.as_tensor(rows, device=x.device)) if src == self.rank
                      else next(remote) for src, rows in w.shard.blocks]
            w.store.Z[level] = torch.cat([x, *values])
        else:
            for w in workers:
                x = w.store.X[level]
                values = [workers[src].store.X[level].index_select(
                    0, torch.as_tensor(rows, device=workers[src].device)).to(x.device)
                    for src, rows in w.shard.blocks]
                w.store.Z[level] = torch.cat([x, *values])
        for w in workers:
            w.store.X[level] = None  # Z holds the owned rows first

    def _total(self, workers, values: list[torch.Tensor]) -> torch.Tensor:
        """The sum of the workers' ``values`` (one each), added in worker order on the first worker's
        device (the same order everywhere, so every worker holds the same total), then over the
        ranks."""
        total = values[0]
        for v in values[1:]:
            total = total + v.to(total.device)
        return self.comm.total(total)

    def _level_backward(self, workers, level: int, p2p: P2PExchange | None, kind: str) -> None:
        """dE/dX^level: each worker's owned-row gradients plus its halo rows' gradients sent home
        (a sum level: every part's partial sum gets dE/dZ^level summed over all workers)."""
        if kind == "global_sum":
            total = self._total(workers, [w.store.G[level] for w in workers])
            for w in workers:
                w.store.Gown[level] = total.to(w.device)
                w.store.G[level] = None
            return
        for w in workers:
            w.store.Gown[level] = w.store.G[level][: w.store.num_owned].clone()
        remote = []
        for w in workers:
            g, offset = w.store.G[level], w.store.num_owned
            for src, rows in w.shard.blocks:
                block = g[offset : offset + len(rows)]
                offset += len(rows)
                if p2p is not None and src != self.rank:
                    remote.append(block.contiguous())
                    continue
                home = workers[0] if p2p is not None else workers[src]
                home.store.Gown[level].index_add_(
                    0, torch.as_tensor(rows, device=home.device), block.to(home.device))
        if p2p is not None:
            own = workers[0].store.Gown[level]
            back = p2p.swap(remote, backward=True, meta=(own.shape, own.dtype, own.device))
            for rows, g in zip(p2p.send_rows, back, strict=True):
                own.index_add_(0, rows, g)
        for w in workers:
            w.store.G[level] = None


class _Progress:
    """Counts the parts evaluated by a sequential (bounded-memory) evaluation and shows a tqdm bar
    when enabled: L forward passes, L backward replays and one prefix pass per part (L: exchange
    calls; unknown until the first call's forward passes are done)."""

    def __init__(self, pieces: int, levels: int | None, enabled: bool, guess: int | None = None):
        """``guess``: the exchange calls expected when ``levels`` is not known yet (the model's
        layers - 1), corrected once the first call has found them."""
        self.pieces, self.bar, self.lock = pieces, None, threading.Lock()
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                total = self._total(levels) if levels is not None else \
                    None if guess is None else self.pieces * (2 * guess + 2)
                self.bar = tqdm(total=total, desc="distmlip: parts", unit="part",
                                dynamic_ncols=True, leave=False)

    def _total(self, levels):
        if levels is None:
            return None
        return self.pieces * (2 * levels + 1) if levels else self.pieces

    def expect(self, levels: int) -> None:
        """The first call has found ``levels``: what remains is L backward replays and a prefix
        pass per part (or one final pass without exchanges)."""
        if self.bar is not None:
            self.bar.total = self.bar.n + self.pieces * (levels + 1 if levels else 1)
            self.bar.refresh()

    def tick(self) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()  # the last state, whatever the bar's update interval
            self.bar.close()


def _gb(value: float, up: bool = False) -> str:
    """A size in bytes, readably (three significant digits; ``up``: rounded up, so that the size
    named is never below ``value``)."""
    if value >= 1:
        step = 10.0 ** (int(np.floor(np.log10(value))) - 2)
        value = (np.ceil(value / step) if up else np.round(value / step)) * step
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{np.ceil(value) if up else np.round(value):.0f} B"


def _run_threads(work, count: int, hub: Hub) -> None:
    errors: list[BaseException | None] = [None] * count

    def target(i):
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors[i] = exc
            if hub is not None:
                hub.barrier.abort()

    threads = [threading.Thread(target=target, args=(i,), name=f"distmlip-worker-{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [(i, e) for i, e in enumerate(errors) if e is not None and not isinstance(e, PeerFailed)]
    if real:
        i, exc = real[0]
        exc.add_note(f"(raised in distmlip worker {i} of {count})")
        raise exc
    if any(errors):
        raise RuntimeError("a worker timed out waiting for the others at a halo exchange")
