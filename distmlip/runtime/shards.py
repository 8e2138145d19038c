"""Shards: the parts one worker evaluates together, laid out as one local graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..partition import PartitionPlan

__all__ = ["Shard", "build_shards"]


@dataclass(frozen=True, eq=False)
class Shard:
    """The parts assigned to one worker, as the disjoint union of their local graphs.

    Attributes:
        index: the worker's number.
        parts: the plan's parts in this shard, in row order.
        atoms: (n,) int64 global atom ids of the rows.
        owned: (n,) bool, rows whose atom this shard owns.
        edges: (E,) int64 global edge ids evaluated here.
        edge_index: (2, E) int64 local ``[senders; receivers]`` rows.
        halo_rows: (h,) int64 rows refreshed by the halo exchange, grouped by source shard.
        halo_from: (h,) int64 shard owning each of those rows' atoms.
        halo_src: (h,) int64 row of that atom in its owning shard.
    """

    index: int
    parts: tuple[int, ...]
    atoms: np.ndarray
    owned: np.ndarray
    edges: np.ndarray
    edge_index: np.ndarray
    halo_rows: np.ndarray
    halo_from: np.ndarray
    halo_src: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.atoms)

    def sources(self) -> list[int]:
        """Shards this one receives halo rows from (itself included when it does)."""
        return [int(s) for s in np.unique(self.halo_from)]

    def rows_from(self, source: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows here, rows in ``source``) of the halo rows refreshed from ``source``."""
        mask = self.halo_from == source
        return self.halo_rows[mask], self.halo_src[mask]


def build_shards(plan: PartitionPlan, num_shards: int) -> tuple[Shard, ...]:
    """Group the plan's parts round-robin (part p -> shard p % num_shards) into shards."""
    num_shards = max(1, min(int(num_shards), plan.num_parts))
    members = [list(range(s, plan.num_parts, num_shards)) for s in range(num_shards)]
    shard_of = np.arange(plan.num_parts) % num_shards
    offset = np.zeros(plan.num_parts, dtype=np.int64)  # first row of each part in its shard
    for parts in members:
        sizes = [plan.parts[p].num_local for p in parts]
        offset[parts] = np.concatenate(([0], np.cumsum(sizes)[:-1])) if parts else []
    exchange = plan.mode == "halo"
    shards = []
    for s, parts in enumerate(members):
        pp = [plan.parts[p] for p in parts]
        atoms = np.concatenate([p.atoms for p in pp])
        owned = np.concatenate([np.arange(p.num_local) < p.num_owned for p in pp])
        edges = np.concatenate([p.edges for p in pp])
        edge_index = np.concatenate([p.edge_index + offset[p.index] for p in pp], axis=1)
        if exchange:
            rows = np.concatenate([offset[p.index] + p.num_owned + np.arange(p.num_halo) for p in pp])
            src_part = np.concatenate([p.halo_owner for p in pp])
            src = offset[src_part] + np.concatenate([p.halo_source for p in pp])
            frm = shard_of[src_part]
            order = np.argsort(frm, kind="stable")
            rows, frm, src = rows[order], frm[order], src[order]
        else:
            rows = frm = src = np.zeros(0, dtype=np.int64)
        shards.append(Shard(s, tuple(parts), atoms, owned, edges, edge_index.reshape(2, -1),
                            rows.astype(np.int64), frm.astype(np.int64), src.astype(np.int64)))
    return tuple(shards)
