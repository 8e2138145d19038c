"""PartitionPlan: who owns which atom, which halo each part holds, which edges it evaluates."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..graph import NeighborGraph
from ..graph.neighbors import index_dtype
from ..typing import MODES, PARTITIONERS, Mode, Partitioner
from .assign import _check_parts, assign_owners

__all__ = ["PartPlan", "PartitionPlan", "build_part", "build_parts", "owned_rows", "part_edge_index"]


@dataclass(frozen=True, eq=False)
class PartPlan:
    """One part of a plan.

    Attributes:
        index: the part's number.
        atoms: (n_local,) int64 global atom ids; the ``num_owned`` owned atoms first (ascending),
            then the halo, ordered by hop distance, then owning part, then id.
        num_owned: number of owned atoms.
        halo_owner: (n_halo,) int64 owning part of each halo atom.
        halo_source: (n_halo,) int64 row of each halo atom among its owner's owned atoms.
        edges: (E_p,) global edge ids evaluated by this part (ascending); int32 below 2^31
            edges (``graph.index_dtype``), else int64.
        edge_index: (2, E_p) local ``[senders; receivers]``, int32 below 2^31 rows; ``None`` in a
            lean plan (``build_parts(lean=True)``: parts evaluated one at a time, whose plans are
            all kept while one part is evaluated), made from the graph when the part is evaluated
            (``part_edge_index``).
    """

    index: int
    atoms: np.ndarray
    num_owned: int
    halo_owner: np.ndarray
    halo_source: np.ndarray
    edges: np.ndarray
    edge_index: np.ndarray | None

    @property
    def num_local(self) -> int:
        return len(self.atoms)

    @property
    def num_halo(self) -> int:
        return len(self.atoms) - self.num_owned

    @property
    def owned_ids(self) -> np.ndarray:
        """(num_owned,) int64 global ids of the owned atoms (ascending)."""
        return self.atoms[: self.num_owned]

    @property
    def halo_ids(self) -> np.ndarray:
        """(n_halo,) int64 global ids of the halo atoms."""
        return self.atoms[self.num_owned :]

    @property
    def owned(self) -> np.ndarray:
        """Deprecated alias of ``owned_ids`` (removed in the next release)."""
        warnings.warn("PartPlan.owned is deprecated: use PartPlan.owned_ids (the owned atoms' global "
                      "ids); it is removed in the next release", DeprecationWarning, stacklevel=2)
        return self.owned_ids

    @property
    def halo(self) -> np.ndarray:
        """Deprecated alias of ``halo_ids`` (removed in the next release)."""
        warnings.warn("PartPlan.halo is deprecated: use PartPlan.halo_ids (the halo atoms' global "
                      "ids); it is removed in the next release", DeprecationWarning, stacklevel=2)
        return self.halo_ids


@dataclass(frozen=True, eq=False)
class PartitionPlan:
    """How a graph is split into parts (all of them, or the ones one process evaluates).

    Each part holds its owned atoms and a ``num_hops``-deep halo, and evaluates every edge received
    by its atoms less than ``num_hops`` hops away. ``mode="halo"`` (normally ``num_hops=1``: each
    edge evaluated exactly once): node features of the halo are refreshed from their owners between
    message-passing layers. ``mode="extended"`` (``num_hops`` = the model's layers): no exchange.

    Attributes:
        num_atoms, num_edges: size of the whole graph.
        mode: ``"halo"`` or ``"extended"``.
        num_hops: depth of the halo.
        owner: (N,) int64 owning part of each atom.
        parts: one ``PartPlan`` per part (``PartitionPlan.build``/``from_owner``). The runner's
            plans (``DistributedCalculator.last_plan``) list only the parts that own atoms (their
            ``index`` says which) and, under a multi-process launch,
            only the parts this rank evaluates, built on this rank's region of the system.
        atom_ids: ``None`` when the graph is the whole system; else (n,) int64 global id of each
            atom of the region graph the parts index into.
        total_parts: number of parts of the whole plan (default ``len(parts)``).
    """

    num_atoms: int
    num_edges: int
    mode: Mode
    num_hops: int
    owner: np.ndarray
    parts: tuple[PartPlan, ...]
    atom_ids: np.ndarray | None = None
    total_parts: int | None = None

    @property
    def num_parts(self) -> int:
        """Parts of the whole plan (``len(parts)`` unless this process holds only some)."""
        return len(self.parts) if self.total_parts is None else self.total_parts

    @classmethod
    def build(
        cls,
        graph: NeighborGraph,
        num_parts: int = 1,
        partitioner: Partitioner = "grid",
        mode: Mode = "halo",
        num_hops: int = 1,
    ) -> PartitionPlan:
        """Partition ``graph`` with the named partitioner and build every part."""
        num_parts = _check_parts(num_parts)
        if partitioner not in PARTITIONERS:
            raise ValueError(
                f"partitioner: expected one of {list(PARTITIONERS)}, got {partitioner!r}"
            )
        owner = assign_owners(graph, num_parts, partitioner)
        return cls.from_owner(graph, owner, num_parts, mode=mode, num_hops=num_hops)

    @classmethod
    def from_owner(
        cls,
        graph: NeighborGraph,
        owner: np.ndarray,
        num_parts: int,
        mode: Mode = "halo",
        num_hops: int = 1,
    ) -> PartitionPlan:
        """Build the parts for a given owner assignment ((N,) ints in ``[0, num_parts)``)."""
        num_parts = _check_parts(num_parts)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        if isinstance(num_hops, bool) or not isinstance(num_hops, (int, np.integer)) or num_hops < 1:
            raise ValueError(f"num_hops: expected an integer >= 1, got {num_hops!r}")
        num_hops = int(num_hops)
        owner = np.asarray(owner, dtype=np.int64)
        if owner.shape != (graph.num_atoms,):
            raise ValueError(f"owner: expected shape ({graph.num_atoms},), got {owner.shape}")
        if len(owner) and (owner.min() < 0 or owner.max() >= num_parts):
            raise ValueError(
                f"owner: expected part indices in [0, {num_parts}), got values in "
                f"[{owner.min()}, {owner.max()}]"
            )
        rank_in_owner = _owner_layout(owner, num_parts)[2]
        parts = build_parts(graph, range(num_parts), owner, rank_in_owner, num_hops)
        return cls(graph.num_atoms, graph.num_edges, mode, num_hops, owner, parts)

    # ------------------------------------------------------------------ statistics
    def edges_evaluated(self) -> int:
        """Edges evaluated summed over all parts (== num_edges in halo mode)."""
        return int(sum(len(p.edges) for p in self.parts))

    def redundancy(self) -> float:
        """Edges evaluated over the graph's edges: 1.0 means zero redundancy."""
        return self.edges_evaluated() / max(self.num_edges, 1)

    def nodes_updated(self) -> int:
        """Node-wise updates per layer summed over parts, as the runtime asks for them
        (``LocalGraph.num_needed``): the owned rows in halo mode, every local row in extended
        mode."""
        if self.mode == "halo":
            return int(sum(p.num_owned for p in self.parts))
        return int(sum(p.num_local for p in self.parts))

    def node_redundancy(self) -> float:
        """Node updates over the system's atoms: 1.0 means every atom's update computed once."""
        return self.nodes_updated() / max(self.num_atoms, 1)

    def halo_fraction(self) -> float:
        """Halo atoms summed over parts, as a fraction of all atoms."""
        return sum(p.num_halo for p in self.parts) / max(self.num_atoms, 1)

    def _part(self, index: int) -> PartPlan:
        """The part numbered ``index`` (an empty one if this plan does not list it: plans built
        by the runner list only parts that own atoms)."""
        if index < len(self.parts) and self.parts[index].index == index:
            return self.parts[index]
        for p in self.parts:
            if p.index == index:
                return p
        empty = np.zeros(0, dtype=np.int64)
        return PartPlan(int(index), empty, 0, empty, empty, empty, np.zeros((2, 0), dtype=np.int64))

    def send_rows(self, source: int, target: int) -> np.ndarray:
        """Rows of ``source``'s owned atoms that ``target`` holds in its halo, in the order of
        ``target``'s halo rows that come from ``source``."""
        part = self._part(target)
        return part.halo_source[part.halo_owner == source]

    def recv_rows(self, target: int, source: int) -> np.ndarray:
        """Local rows of ``target`` whose atoms are owned by ``source``."""
        part = self._part(target)
        return part.num_owned + np.flatnonzero(part.halo_owner == source)

    def validate(self, graph: NeighborGraph | None = None) -> None:
        """Check the plan's invariants; raises ``ValueError`` on the first one broken."""
        owned_ids = np.concatenate([p.owned_ids for p in self.parts])
        if not np.array_equal(np.sort(owned_ids), np.arange(self.num_atoms)):
            raise ValueError("plan: every atom must be owned by exactly one part")
        owned_by_part, starts, _ = _owner_layout(self.owner, self.num_parts)  # every part's owned atoms
        for p in self.parts:
            if not np.all(self.owner[p.owned_ids] == p.index):
                raise ValueError(f"plan: part {p.index} lists atoms it does not own")
            if not np.array_equal(self.owner[p.halo_ids], p.halo_owner):
                raise ValueError(f"plan: part {p.index} has wrong halo owners")
            if np.any(p.halo_source >= starts[p.halo_owner + 1] - starts[p.halo_owner]) or \
                    not np.array_equal(owned_by_part[starts[p.halo_owner] + p.halo_source], p.halo_ids):
                raise ValueError(f"plan: part {p.index} has wrong halo sources")
            if len(np.unique(p.atoms)) != len(p.atoms):
                raise ValueError(f"plan: part {p.index} holds an atom twice")
            if graph is not None and len(p.edges):
                edge_index = part_edge_index(p, graph)
                if not np.array_equal(p.atoms[edge_index[0]], graph.senders[p.edges]):
                    raise ValueError(f"plan: part {p.index} has wrong local senders")
                if not np.array_equal(p.atoms[edge_index[1]], graph.receivers[p.edges]):
                    raise ValueError(f"plan: part {p.index} has wrong local receivers")
        if self.mode == "halo" and self.num_hops == 1:
            edges = np.concatenate([p.edges for p in self.parts])
            if not np.array_equal(np.sort(edges), np.arange(self.num_edges)):
                raise ValueError("plan: in halo mode every edge must be evaluated exactly once")


def _owner_layout(owner: np.ndarray, num_parts: int):
    """Atoms grouped by owning part (ascending ids), each part's start in that order, and each
    atom's row among its owner's owned atoms."""
    by_part = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=num_parts)
    starts = np.zeros(num_parts + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    rank_in_owner = np.empty(len(owner), dtype=np.int64)
    rank_in_owner[by_part] = np.arange(len(owner)) - np.repeat(starts[:-1], counts)
    return by_part, starts, rank_in_owner


def owned_rows(owner: np.ndarray, num_parts: int) -> np.ndarray:
    """(N,) row of each atom among its owner's owned atoms (owned atoms are kept in ascending id)."""
    return _owner_layout(owner, num_parts)[2]


def build_part(graph: NeighborGraph, part: int, owner: np.ndarray, rows: np.ndarray,
               num_hops: int = 1) -> PartPlan:
    """One part, built from a graph that need only contain the part's region.

    ``graph`` may be the subgraph of a subset of atoms (then ``owner`` and ``rows``, the owning part
    and owned row of each of *its* atoms, are the global arrays restricted to that subset, and the
    returned ``atoms``/``edges`` index the subgraph). The subset must hold every atom within
    ``num_hops`` cutoffs of the part's owned atoms.
    """
    return build_parts(graph, [part], owner, rows, num_hops)[0]


def build_parts(graph: NeighborGraph, parts, owner: np.ndarray, rows: np.ndarray,
                num_hops: int = 1, lean: bool = False) -> tuple[PartPlan, ...]:
    """``build_part`` for several parts of one graph, sharing the work arrays. O(N + E) in all.
    ``lean``: the parts keep no local ``edge_index`` (4 bytes an edge instead of 12; made again
    by ``part_edge_index`` when a part is evaluated)."""
    owner = np.asarray(owner, dtype=np.int64)
    parts = [int(p) for p in parts]
    order = np.argsort(owner, kind="stable")
    sorted_owner = owner[order]
    offsets = graph.receiver_offsets()
    scratch = np.full(graph.num_atoms, -1, dtype=np.int64)
    # where each part's owned atoms start and end in ``order``: one vectorised search for all
    bounds = np.searchsorted(sorted_owner, np.repeat(np.asarray(parts, dtype=np.int64), 2)
                             + np.tile([0, 1], len(parts))).reshape(-1, 2)
    empty = np.zeros(0, dtype=np.int64)
    empty_index = np.zeros((2, 0), dtype=np.int64)
    out = []
    for p, (lo, hi) in zip(parts, bounds.tolist(), strict=True):
        if lo == hi:  # no owned atoms: no halo, no edges (more parts than atoms is legal)
            out.append(PartPlan(p, empty, 0, empty, empty, empty, empty_index))
            continue
        out.append(_build_part(p, order[lo:hi], int(num_hops), graph, owner, rows, offsets, scratch,
                               lean))
    return tuple(out)


def part_edge_index(part: PartPlan, graph: NeighborGraph) -> np.ndarray:
    """(2, E_p) the part's local ``[senders; receivers]``: ``part.edge_index`` (of a part or a
    shard), or for a lean plan made from ``graph`` (the graph the part was built from) by a search
    of the part's atoms: O(E_p log n_local), no O(N) array."""
    if part.edge_index is not None:
        return part.edge_index
    if len(part.edges) == 0:
        return np.zeros((2, 0), dtype=np.int64)
    order = np.argsort(part.atoms, kind="stable")
    ordered = part.atoms[order]
    out = np.empty((2, len(part.edges)), dtype=index_dtype(len(part.atoms)))
    for row, ends in enumerate((graph.senders, graph.receivers)):
        # an end missing from the part (a plan of another graph) reads a wrong atom, not out of
        # bounds: validate() names it
        out[row] = order[np.minimum(np.searchsorted(ordered, ends[part.edges]), len(order) - 1)]
    return out


def _edges_received(atoms: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Ids of all edges received by ``atoms`` (CSR gather)."""
    begin = offsets[atoms]
    lengths = offsets[atoms + 1] - begin
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(begin - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return shift + np.arange(total, dtype=np.int64)


def _build_part(p, owned, num_hops, graph, owner, rank_in_owner, offsets, scratch,
                lean: bool = False) -> PartPlan:
    """Owned atoms plus a ``num_hops``-deep halo; edges received by atoms < ``num_hops`` away."""
    levels = [owned]
    edge_sets = []
    scratch[owned] = 1
    frontier = owned
    for _ in range(num_hops):
        edges = _edges_received(frontier, offsets)
        edge_sets.append(edges)
        senders = graph.senders[edges]
        new = np.unique(senders[scratch[senders] < 0])
        if len(new):
            # order each hop level by owning part, then id, so that exchange blocks are contiguous
            new = new[np.argsort(owner[new], kind="stable")]
        scratch[new] = 1
        levels.append(new)
        frontier = new
    atoms = np.concatenate(levels)
    edges = np.sort(np.concatenate(edge_sets))
    edge_index = None
    if not lean:
        scratch[atoms] = np.arange(len(atoms))
        edge_index = np.stack([scratch[graph.senders[edges]], scratch[graph.receivers[edges]]])
        edge_index = edge_index.reshape(2, -1).astype(index_dtype(len(atoms)), copy=False)
    scratch[atoms] = -1
    halo = atoms[len(owned) :]
    return PartPlan(
        index=p,
        atoms=atoms,
        num_owned=len(owned),
        halo_owner=owner[halo],
        halo_source=rank_in_owner[halo],
        # compact (12 bytes an edge instead of 24; 4 when lean): a bounded evaluation keeps every
        # part's plan
        edges=edges.astype(index_dtype(graph.num_edges), copy=False),
        edge_index=edge_index,
    )
