"""Shards: the parts one worker evaluates together, laid out as one local graph, owned rows first."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..partition import PartPlan

__all__ = ["Shard", "build_shard", "owned_row_offsets", "part_groups"]


def part_groups(num_parts: int, num_workers: int) -> list[range]:
    """Contiguous blocks of parts, one per worker: worker ``w`` gets parts
    ``[w * P // W, (w + 1) * P // W)`` (spatial partitioners number neighbouring parts
    consecutively, so a block is compact). ``num_workers`` may exceed ``num_parts``: the extra
    workers get no parts."""
    return [range(w * num_parts // num_workers, (w + 1) * num_parts // num_workers)
            for w in range(num_workers)]


def owned_row_offsets(owner: np.ndarray, groups: list[range]) -> tuple[np.ndarray, np.ndarray]:
    """For every part: the worker it belongs to and the first row of its owned atoms in that
    worker's owned block (the worker's parts' owned atoms, part after part, ascending ids).

    Returns ``worker_of_part`` (P,) and ``offset`` (P,), int64. Every process computes the same
    arrays from the global ``owner``: this is where "which row of which worker holds atom a" is
    decided, for the in-process and the multi-process exchange alike.
    """
    num_parts = sum(len(g) for g in groups)
    counts = np.bincount(owner, minlength=num_parts)
    worker_of_part = np.zeros(num_parts, dtype=np.int64)
    offset = np.zeros(num_parts, dtype=np.int64)
    for w, group in enumerate(groups):
        if len(group):
            worker_of_part[group.start:group.stop] = w
            c = counts[group.start:group.stop]
            offset[group.start:group.stop] = np.cumsum(c) - c
    return worker_of_part, offset


@dataclass(frozen=True, eq=False)
class Shard:
    """The parts one worker evaluates, as the disjoint union of their local graphs.

    Rows: first the owned atoms of every part (part after part, each ascending), then every
    part's halo rows, grouped by the worker that owns them (so each exchange block is contiguous).

    Attributes:
        index: the worker's number.
        parts: the plan's part indices in this shard, in row order.
        atoms: (n,) int64 rows of the graph the parts were built from (its atom ids).
        num_owned: owned rows (the first ``num_owned`` rows).
        edges: (E,) int64 edge ids of that graph evaluated here.
        edge_index: (2, E) int64 local ``[senders; receivers]`` rows.
        blocks: ``(source worker, rows in that worker's owned block)`` per exchange block, in the
            order of the halo rows: the halo rows refreshed from ``source`` are the next
            ``len(rows)`` rows after the previous blocks'.
        part_rows: per part (in ``parts`` order), the shard row of each of its local rows (to
            evaluate the parts one at a time).
    """

    index: int
    parts: tuple[int, ...]
    atoms: np.ndarray
    num_owned: int
    edges: np.ndarray
    edge_index: np.ndarray
    blocks: tuple[tuple[int, np.ndarray], ...]
    part_rows: tuple[np.ndarray, ...]

    @property
    def num_rows(self) -> int:
        return len(self.atoms)

    @property
    def owned_mask(self) -> np.ndarray:
        """(n,) bool: owned rows."""
        return np.arange(self.num_rows) < self.num_owned


def build_shard(index: int, parts: list[PartPlan], worker_of_part: np.ndarray,
                offset: np.ndarray, compact: bool = False) -> Shard:
    """The shard of worker ``index`` holding ``parts`` (``PartPlan``s of one graph, in order).
    ``worker_of_part``/``offset``: from ``owned_row_offsets``.

    ``compact=False`` (all parts evaluated at once, as one union graph): each part keeps its own
    halo rows, refreshed by the exchange even from parts of the same worker, so the union computes
    exactly what separate devices would. ``compact=True`` (parts evaluated one at a time): a halo
    atom owned by this worker is read from its owned row, other halo atoms are held once, and the
    union's ``edges``/``edge_index`` are left empty (each part reads its own).
    """
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return Shard(index, (), empty, 0, empty, np.zeros((2, 0), np.int64), (), ())
    owned_counts = np.array([p.num_owned for p in parts], dtype=np.int64)
    halo_counts = np.array([p.num_halo for p in parts], dtype=np.int64)
    own_off = np.cumsum(owned_counts) - owned_counts
    halo_off = np.cumsum(halo_counts) - halo_counts
    num_owned = int(owned_counts.sum())
    halo_owner = np.concatenate([p.halo_owner for p in parts]).astype(np.int64)
    halo_atoms = np.concatenate([p.halo_ids for p in parts]).astype(np.int64)
    source = worker_of_part[halo_owner]
    src_row = offset[halo_owner] + np.concatenate([p.halo_source for p in parts]).astype(np.int64)
    if compact:
        here = source == index
        halo_row = np.empty(len(source), dtype=np.int64)
        halo_row[here] = src_row[here]  # offset[q] + row: the owned row of part q in this shard
        away = np.flatnonzero(~here)
        key = source[away] * (int(src_row.max(initial=0)) + 1) + src_row[away]
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        halo_row[away] = num_owned + inverse.reshape(-1)
        pick = away[first]  # unique by (source, row), sorted by source then row
        source, src_row, extra = source[pick], src_row[pick], halo_atoms[pick]
    else:
        order = np.argsort(source, kind="stable")
        halo_row = np.empty(len(order), dtype=np.int64)
        halo_row[order] = num_owned + np.arange(len(order))
        source, src_row, extra = source[order], src_row[order], halo_atoms[order]
    atoms = np.concatenate([p.owned_ids for p in parts] + [extra])
    part_rows, edge_index = [], []
    for k, p in enumerate(parts):
        local = np.concatenate([own_off[k] + np.arange(p.num_owned),
                                halo_row[halo_off[k] : halo_off[k] + p.num_halo]])
        part_rows.append(local)
        if not compact:
            edge_index.append(local[p.edge_index])
    blocks = []
    if len(source):
        cuts = np.flatnonzero(np.diff(source)) + 1
        for rows_src, rows in zip(np.split(source, cuts), np.split(src_row, cuts), strict=True):
            blocks.append((int(rows_src[0]), rows.astype(np.int64)))
    if compact:
        edges, edge_index = np.zeros(0, dtype=np.int64), np.zeros((2, 0), dtype=np.int64)
    else:
        edges = np.concatenate([p.edges for p in parts]).astype(np.int64)
        edge_index = np.concatenate(edge_index, axis=1).reshape(2, -1).astype(np.int64)
    return Shard(
        index=index,
        parts=tuple(p.index for p in parts),
        atoms=atoms.astype(np.int64),
        num_owned=num_owned,
        edges=edges,
        edge_index=edge_index,
        blocks=tuple(blocks),
        part_rows=tuple(part_rows),
    )
