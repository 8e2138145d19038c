"""Build and reuse: owners, the neighbour graph of this process's region, the parts, the shards
and their exchange maps (a ``Built``), and the rule that says when a build is stale."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..graph import NeighborGraph
from ..graph.chunks import graph_in_chunks
from ..graph.neighbors import complete_cell
from ..graph.region import atoms_near
from ..partition import PartitionPlan
from ..partition.assign import grid_owners, metis_owners, slab_owners
from ..partition.plan import build_parts, owned_rows
from ..typing import Neighbors, Partitioner
from .shards import Shard, build_shard, owned_row_offsets

__all__ = ["Builder", "Built", "owners"]


def owners(partitioner: Partitioner, positions, cell, pbc, num_parts: int, graph=None) -> np.ndarray:
    """Each atom's part, by ``partitioner`` (metis needs the whole system's ``graph``)."""
    if partitioner == "slab":
        return slab_owners(positions, cell, pbc, num_parts)
    if partitioner == "grid":
        return grid_owners(positions, cell, pbc, num_parts)
    return metis_owners(graph, num_parts)


@dataclass(eq=False)
class Built:
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
    # ``cell`` when a deformed cell reuses the build: see ``Builder.stale``)
    step: object = None  # the evaluation under way's ``resident.StepState`` (positions on devices)
    on_device: dict = field(default_factory=dict)  # per-build arrays moved to a device (resident.py)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True, eq=False)
class Builder:
    """Builds the parts of a system for ``comm``'s workers (``runtime/comm.py``): ``partitioner``,
    ``mode`` and ``num_hops`` as for the plan; the graph holds pairs within ``cutoff + skin``,
    built by ``neighbors`` (``NeighborGraph.from_arrays``) on the first device of ``comm``."""

    comm: object
    partitioner: Partitioner
    mode: str
    num_hops: int
    cutoff: float
    skin: float
    neighbors: Neighbors = "auto"

    def graph(self, positions, cell, pbc, numbers, chunked: bool = False) -> NeighborGraph:
        """The neighbour graph (cutoff + skin) of a system (or of a rank's region); ``chunked``:
        built chunk by chunk (the same graph at a peak near its stored size, for a bounded memory:
        ``graph.chunks.graph_in_chunks``)."""
        build = graph_in_chunks if chunked else NeighborGraph.from_arrays
        return build(positions, cell, pbc, numbers, self.cutoff + self.skin, self.neighbors,
                     self.comm.devices[0])

    def stale(self, b: Built | None, positions, cell, pbc, numbers) -> bool:
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
        if b is None or len(positions) != len(b.positions):
            return True
        if not (np.array_equal(pbc, b.pbc) and np.array_equal(numbers, b.numbers)):
            return True
        if np.array_equal(cell, b.cell):
            moved = positions - b.positions
            room = self.skin
        else:
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

    def build(self, positions, cell, pbc, numbers, times: dict, num_parts: int,
              graph: NeighborGraph | None = None, sequential: bool = False) -> Built:
        """Owners, the graph of this process's region (``graph``: the whole system's, if already
        built), the parts, the shards (``sequential``: compact, for parts evaluated one at a time)
        and the exchange handshake; ``times`` gets the seconds of each stage. With ``sequential``
        the graph is built in chunks (``graph``: the same graph, a lower peak)."""
        radius = self.cutoff + self.skin
        n = len(positions)
        t0 = time.perf_counter()
        comm = self.comm
        groups = comm.groups(num_parts)
        if comm.world_size == 1:
            # one process holds every part: the region is the whole system
            if graph is None:
                graph = self.graph(positions, cell, pbc, numbers, sequential)
            t1 = time.perf_counter()
            owner = owners(self.partitioner, positions, cell, pbc, num_parts, graph)
            ids = None
            mine = range(num_parts)
        else:
            mine = groups[comm.rank]
            if self.partitioner == "metis":  # needs the whole graph: rank 0 partitions
                owner = None
                if comm.rank == 0:
                    owner = metis_owners(self.graph(positions, cell, pbc, numbers), num_parts)
                owner = comm.broadcast_owner(owner, n)
            else:
                owner = owners(self.partitioner, positions, cell, pbc, num_parts)
            t1 = time.perf_counter()
            selected = (owner >= mine.start) & (owner < mine.stop)
            ids = atoms_near(positions, cell, pbc, selected, self.num_hops * radius) if selected.any() \
                else np.zeros(0, dtype=np.int64)
            graph = self.graph(positions[ids], cell, pbc, numbers[ids], sequential) if len(ids) \
                else None
        t2 = time.perf_counter()
        rows = owned_rows(owner, num_parts)
        # only parts that own atoms are built (an empty part has no halo and no edges): a build
        # costs O(atoms + parts) however many parts are empty
        present = np.flatnonzero(np.bincount(owner, minlength=num_parts))
        present = present[(present >= mine.start) & (present < mine.stop)]
        if graph is None:
            parts = ()
        elif ids is None:
            parts = build_parts(graph, present, owner, rows, self.num_hops, lean=sequential)
        else:
            parts = build_parts(graph, present, owner[ids], rows[ids], self.num_hops, lean=sequential)
        worker_of_part, offset = owned_row_offsets(owner, groups)
        if comm.world_size == 1:
            shards = tuple(build_shard(w, [p for p in parts if p.index in g], worker_of_part, offset,
                                       sequential) for w, g in enumerate(groups))
        else:
            shards = (build_shard(comm.rank, list(parts), worker_of_part, offset, sequential),)
        plan = PartitionPlan(n, graph.num_edges if graph is not None else 0, self.mode, self.num_hops,
                             owner, tuple(parts), atom_ids=ids, total_parts=num_parts)
        t3 = time.perf_counter()
        send: tuple[dict, ...] = tuple({} for _ in shards)
        if comm.world_size > 1 and self.mode == "halo":
            send = (comm.handshake(shards[0], comm.devices[0]),)
        t4 = time.perf_counter()
        if comm.world_size == 1:
            times.update(graph=t1 - t0, partition=t3 - t1, handshake=0.0)
        else:
            times.update(partition=(t1 - t0) + (t3 - t2), graph=t2 - t1, handshake=t4 - t3)
        return Built(positions.copy(), cell.copy(), pbc.copy(), numbers.copy(), ids, graph,
                      plan, shards, send, sequential)
