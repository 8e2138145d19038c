"""The whole system's neighbour graph built in spatial chunks, for a bounded memory: the same
``NeighborGraph`` as ``NeighborGraph.from_arrays`` (same edges, same order, same shifts), at a peak
near the compact graph's size instead of vesin's full output.

The receivers are cut into a grid of chunks in fractional coordinates. For each chunk, vesin lists
the pairs of the atoms within ``cutoff`` of it (its fractional box widened by ``cutoff`` over the
lattice planes' spacing, periodic images included), the edges received inside the chunk are kept,
mapped to global ids and stored in the compact types at once; the pieces are then scattered into
the graph's arrays by receiver.

Why the order is the same: the one-shot build sorts vesin's pairs by receiver, stably, so within a
receiver the order is vesin's. vesin's cell list gives each receiver its pairs in the order of its
traversal: neighbour bins in a fixed order, and within a bin the atoms in the order they were
given. A chunk's atoms are given in ascending global order and bin the same way as in the whole
system when the box is the same: along periodic directions the bins come from the cell; along open
directions from the atoms' extent (vesin's bounding box), so every chunk also lists the atoms at
the system's extremes along each Cartesian axis (real atoms; their edges into the chunk are real).
``tests/unit/test_graph.py`` checks the equality on periodic, triclinic, slab and molecule systems.
"""

from __future__ import annotations

import numpy as np

from .neighbors import NeighborGraph, index_dtype, validate_system
from .region import fractional_coordinates

__all__ = ["CHUNK_SHARE", "MAX_LISTED", "chunk_grid", "graph_in_chunks", "listed_share"]

#: a chunk with its surroundings lists about this share of the system (chunks are added until it
#: does): its build (56 bytes an edge while vesin builds) then adds about 6 bytes an edge of the
#: whole graph to the pieces kept (11-16), against 56 for the one-shot build; the chunks list
#: 1.5-3 times the system in all (that much more vesin time)
CHUNK_SHARE = 0.1
#: ... but chunks are used only when one lists at most this share (thin systems, tiny cells)
MAX_LISTED = 0.4


def listed_share(extent: np.ndarray, counts: np.ndarray, radius: float) -> float:
    """The share of the system a chunk lists: its width plus ``radius`` on either side, per axis."""
    return float(np.prod(np.minimum(1.0, (extent / counts + 2.0 * radius) / np.maximum(extent, 1e-300))))


def chunk_grid(frac: np.ndarray, spacing: np.ndarray, pbc: np.ndarray, radius: float,
               share: float = CHUNK_SHARE) -> np.ndarray:
    """Chunks along each axis ((3,) int): added on the axis where chunks are widest until one
    lists at most ``share`` of the system (``listed_share``), no chunk thinner than ``2 radius``
    (thinner chunks list more surroundings than receivers). All ones: the build is not worth
    chunking (one chunk would list more than ``MAX_LISTED``: its build, beside the pieces kept,
    would peak near the one-shot build's)."""
    lo = np.where(pbc, 0.0, frac.min(axis=0))
    extent = np.where(pbc, 1.0, frac.max(axis=0) - lo) * spacing  # Å along each axis
    counts = np.ones(3, dtype=np.int64)
    while listed_share(extent, counts, radius) > share and counts.prod() < len(frac):
        axis = int(np.argmax(extent / counts))
        if extent[axis] / (counts[axis] + 1) < 2.0 * radius:
            break
        counts[axis] += 1
    return counts if listed_share(extent, counts, radius) <= MAX_LISTED else np.ones(3, dtype=np.int64)


def graph_in_chunks(positions, cell, pbc, numbers, cutoff: float, neighbors: str = "vesin",
                    device=None, share: float | None = None) -> NeighborGraph:
    """``NeighborGraph.from_arrays(positions, cell, pbc, numbers, cutoff, neighbors, device)``, built
    chunk by chunk (module docstring); at once where chunks cannot help (``chunk_grid``: a system
    or cell too small against the cutoff). The graph's
    ``build_edges`` is the most edges one chunk's build listed (what the build's transient scales
    with). ``share``: of the system one chunk lists (default ``CHUNK_SHARE``; ``chunk_grid``)."""
    positions, cell, pbc, numbers = validate_system(positions, cell, pbc, numbers)
    cutoff = float(cutoff)
    frac, spacing = fractional_coordinates(positions, cell, pbc)
    counts = chunk_grid(frac, spacing, pbc, cutoff, CHUNK_SHARE if share is None else share)
    if counts.prod() < 2:
        return NeighborGraph.from_arrays(positions, cell, pbc, numbers, cutoff, neighbors, device)
    n = len(positions)
    lo = np.where(pbc, 0.0, frac.min(axis=0))
    width = np.where(pbc, 1.0, np.maximum(frac.max(axis=0) - lo, 1e-300))
    cells = np.minimum(np.floor((frac - lo) / width * counts).astype(np.int64), counts - 1)
    chunk = np.ravel_multi_index(cells.T, tuple(counts))
    # fractional reach of the cutoff along each axis (lattice planes' spacing), a little wider for
    # rounding: a superset of the surroundings is harmless, a subset is not
    reach = cutoff / spacing * (1 + 1e-9) + 1e-12
    # vesin bins open directions over the atoms' extent: every chunk lists the extremes too
    anchors = np.zeros(0, dtype=np.int64) if pbc.all() else \
        np.unique(np.concatenate([positions.argmin(axis=0), positions.argmax(axis=0)]))
    index = index_dtype(n)
    pieces, degree, largest = [], np.zeros(n, dtype=np.int64), 0
    largest_shift = np.dtype(np.int8)
    for c in range(int(counts.prod())):
        inside = chunk == c
        if not inside.any():
            continue
        at = np.unravel_index(c, tuple(counts))
        near = np.ones(n, dtype=bool)
        for axis in range(3):
            start = lo[axis] + width[axis] * at[axis] / counts[axis] - reach[axis]
            span = width[axis] / counts[axis] + 2 * reach[axis]
            if pbc[axis]:
                if span < 1.0:
                    near &= np.mod(frac[:, axis] - start, 1.0) <= span
            else:
                near &= (frac[:, axis] >= start) & (frac[:, axis] <= start + span)
        near[anchors] = True
        ids = np.flatnonzero(near)
        del near
        sub = NeighborGraph.from_arrays(positions[ids], cell, pbc, numbers[ids], cutoff, neighbors,
                                        device)
        largest = max(largest, sub.num_edges)
        keep = inside[ids][sub.receivers]
        receivers = ids[sub.receivers[keep]].astype(index)
        senders = ids[sub.senders[keep]].astype(index)
        shifts = sub.shifts[keep]
        del sub, keep, ids
        degree += np.bincount(receivers, minlength=n)
        # a chunk's pairs are the system's, so the widest chunk's type is the one-shot's
        if shifts.dtype.itemsize > largest_shift.itemsize:
            largest_shift = shifts.dtype
        pieces.append((receivers, senders, shifts))
    return _assemble(positions, cell, pbc, numbers, cutoff, pieces, degree, largest_shift, largest)


def _assemble(positions, cell, pbc, numbers, cutoff, pieces: list, degree: np.ndarray,
              shift_type: np.dtype, largest: int) -> NeighborGraph:
    """The graph from chunks' pieces (each sorted by receiver, stably; receivers disjoint between
    pieces): each edge goes to its receiver's rows, in its piece's order, one array at a time, each
    piece's part freed once copied (the peak: the pieces and one whole array)."""
    n = len(positions)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(degree, out=offsets[1:])
    num_edges = int(offsets[-1])
    index = index_dtype(n)

    def places(receivers: np.ndarray) -> np.ndarray:
        """Where a piece's edges go: their receiver's first row, plus their rank among its edges
        in the piece (a piece lists a receiver's edges contiguously)."""
        if not len(receivers):
            return np.zeros(0, dtype=np.int64)
        first = np.flatnonzero(np.r_[True, receivers[1:] != receivers[:-1]])
        run = np.diff(np.r_[first, len(receivers)])
        rank = np.arange(len(receivers), dtype=np.int64) - np.repeat(first, run)
        return offsets[receivers] + rank

    senders = np.empty(num_edges, dtype=index)
    for p, (receivers, piece, shifts) in enumerate(pieces):
        senders[places(receivers)] = piece
        pieces[p] = (receivers, None, shifts)
    shifts_out = np.empty((num_edges, 3), dtype=shift_type if num_edges else np.dtype(np.int8))
    for p, (receivers, _, piece) in enumerate(pieces):
        shifts_out[places(receivers)] = piece
        pieces[p] = (receivers, None, None)
    pieces.clear()
    receivers = np.repeat(np.arange(n, dtype=index), degree)
    return NeighborGraph(positions, cell, pbc, numbers, cutoff, senders, receivers, shifts_out,
                         build_edges=largest)
