"""Partitioners: give every atom one owning part.

Each partitioner returns ``owner``, an (N,) int64 array of part indices in ``[0, num_parts)``.
Any ``num_parts >= 1`` is accepted; parts may be empty (more parts than atoms) or thinner than the
cutoff. The spatial partitioners are O(N log P) and need only positions; METIS needs the graph.
"""

from __future__ import annotations

import numpy as np

from ..graph import NeighborGraph
from ..graph.region import fractional_coordinates
from ..typing import PARTITIONERS, Partitioner

__all__ = ["assign_owners", "grid_owners", "metis_owners", "slab_owners"]


def _check_parts(num_parts) -> int:
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)):
        raise TypeError(f"num_parts: expected an integer >= 1, got {num_parts!r}")
    if num_parts < 1:
        raise ValueError(f"num_parts: expected an integer >= 1, got {num_parts}")
    return int(num_parts)


def _extent(frac: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Physical extent (Å, between lattice planes) of a set of atoms along each cutting axis."""
    if len(frac) == 0:
        return np.zeros(3)
    width = frac.max(axis=0) - frac.min(axis=0)
    return width * spacing


def slab_owners(positions, cell, pbc, num_parts: int) -> np.ndarray:
    """1-D cuts along the longest axis, balanced by atom count (not by width)."""
    num_parts = _check_parts(num_parts)
    frac, spacing = fractional_coordinates(np.asarray(positions, dtype=np.float64), cell,
                                           np.asarray(pbc, dtype=bool))
    axis = int(np.argmax(_extent(frac, spacing)))
    order = np.argsort(frac[:, axis], kind="stable")
    owner = np.empty(len(positions), dtype=np.int64)
    owner[order] = (np.arange(len(positions)) * num_parts) // len(positions)
    return owner


def grid_owners(positions, cell, pbc, num_parts: int) -> np.ndarray:
    """Recursive coordinate bisection: split the atoms along their widest physical extent into
    two sets whose sizes are proportional to the number of parts each side receives."""
    num_parts = _check_parts(num_parts)
    frac, spacing = fractional_coordinates(np.asarray(positions, dtype=np.float64), cell,
                                           np.asarray(pbc, dtype=bool))
    owner = np.empty(len(positions), dtype=np.int64)
    stack = [(np.arange(len(positions)), num_parts, 0)]
    while stack:
        idx, parts, first = stack.pop()
        if len(idx) == 0:  # no atoms for these parts: they stay empty (O(N log P), not O(P))
            continue
        if parts == 1:
            owner[idx] = first
            continue
        left_parts = parts // 2
        n_left = (len(idx) * left_parts) // parts
        if 0 < n_left < len(idx):
            sub = frac[idx]
            axis = int(np.argmax(_extent(sub, spacing)))
            order = np.argpartition(sub[:, axis], n_left - 1)
            left, right = idx[order[:n_left]], idx[order[n_left:]]
        else:
            left, right = idx[:n_left], idx[n_left:]
        stack.append((left, left_parts, first))
        stack.append((right, parts - left_parts, first + left_parts))
    return owner


def metis_owners(graph: NeighborGraph, num_parts: int, seed: int = 0) -> np.ndarray:
    """METIS (pymetis) k-way partition of the undirected neighbour graph, vertices weighted by
    their number of edges (the work they cost)."""
    num_parts = _check_parts(num_parts)
    n = graph.num_atoms
    if num_parts == 1:
        return np.zeros(n, dtype=np.int64)
    if num_parts >= n:
        return np.arange(n, dtype=np.int64)
    try:
        import pymetis
    except ImportError as exc:  # pragma: no cover - pymetis is a hard dependency
        raise ImportError("partitioner='metis' needs pymetis: pip install pymetis") from exc
    s, r = graph.senders, graph.receivers
    keep = s != r
    pairs = np.unique(np.stack([r[keep], s[keep]], axis=1), axis=0)  # sorted by receiver
    xadj = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs[:, 0], minlength=n), out=xadj[1:])
    weights = (graph.in_degree() + 1).astype(np.int64)
    options = pymetis.Options(seed=seed)
    _, parts = pymetis.part_graph(
        num_parts,
        adjacency=pymetis.CSRAdjacency(adj_starts=xadj, adjacent=pairs[:, 1].copy()),
        vweights=weights,
        options=options,
    )
    return np.asarray(parts, dtype=np.int64)


def assign_owners(graph: NeighborGraph, num_parts: int, partitioner: Partitioner = "grid") -> np.ndarray:
    """(N,) owning part of each atom, by the named partitioner (``distmlip.typing.Partitioner``)."""
    if partitioner == "slab":
        return slab_owners(graph.positions, graph.cell, graph.pbc, num_parts)
    if partitioner == "grid":
        return grid_owners(graph.positions, graph.cell, graph.pbc, num_parts)
    if partitioner == "metis":
        return metis_owners(graph, num_parts)
    raise ValueError(f"partitioner: expected one of {list(PARTITIONERS)}, got {partitioner!r}")
