"""Spatial helpers: fractional coordinates to cut in, and the atoms near a region."""

from __future__ import annotations

import numpy as np

from .neighbors import complete_cell

__all__ = ["fractional_coordinates", "atoms_near"]


def fractional_coordinates(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray):
    """Fractional coordinates in the completed cell, wrapped into [0, 1) along periodic directions,
    and the spacing of the lattice planes (Å per unit of each fractional coordinate).

    Returns ``frac`` (N, 3) and ``spacing`` (3,).
    """
    full = complete_cell(cell, pbc)
    inverse = np.linalg.inv(full)
    frac = positions @ inverse
    wrapped = frac[:, pbc] - np.floor(frac[:, pbc])
    frac[:, pbc] = np.where(wrapped >= 1.0, 0.0, wrapped)
    spacing = 1.0 / np.linalg.norm(inverse.T, axis=1)
    return frac, spacing


def atoms_near(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, selected: np.ndarray,
               radius: float, subdivisions: int = 3) -> np.ndarray:
    """Ids (ascending) of a superset of the atoms within ``radius`` (periodic images included) of
    the ``selected`` atoms ((N,) bool), the selected ones included. O(N).

    Atoms are binned into cells at least ``radius / subdivisions`` wide (measured between lattice
    planes, so the bound holds in triclinic cells); the result is every atom in a bin at most
    ``subdivisions`` bins away from a selected atom's bin along each axis. The superset exceeds
    the exact set by at most one bin width beyond ``radius``.
    """
    k = int(subdivisions)
    frac, spacing = fractional_coordinates(positions, cell, pbc)
    lo = np.where(pbc, 0.0, frac.min(axis=0))
    width = np.where(pbc, 1.0, frac.max(axis=0) - lo)
    nbins = np.maximum(1, np.floor(width * spacing * k / radius)).astype(np.int64)
    bins = np.floor((frac - lo) / np.where(width > 0, width, 1.0) * nbins).astype(np.int64)
    bins = np.clip(bins, 0, nbins - 1)
    flat = np.ravel_multi_index(bins.T, nbins)
    occupied = np.zeros(int(np.prod(nbins)), dtype=bool)
    occupied[flat[selected]] = True
    # dilate the occupied bins by k along each axis in turn (separable: 3 x (2k + 1) shifts)
    grid = occupied.reshape(tuple(nbins))
    for axis in range(3):
        if 2 * k + 1 >= nbins[axis] and pbc[axis]:
            grid = np.broadcast_to(grid.any(axis=axis, keepdims=True), grid.shape).copy()
            continue
        out = grid.copy()
        for step in range(1, k + 1):
            if pbc[axis]:
                out |= np.roll(grid, step, axis=axis) | np.roll(grid, -step, axis=axis)
            else:
                out |= _shift(grid, step, axis) | _shift(grid, -step, axis)
        grid = out
    return np.flatnonzero(grid.reshape(-1)[flat])


def _shift(grid: np.ndarray, step: int, axis: int) -> np.ndarray:
    """``grid`` moved by ``step`` along ``axis`` without wrapping (vacated cells False)."""
    out = np.zeros_like(grid)
    n = grid.shape[axis]
    if abs(step) >= n:
        return out
    src = [slice(None)] * grid.ndim
    dst = [slice(None)] * grid.ndim
    if step > 0:
        src[axis], dst[axis] = slice(0, n - step), slice(step, n)
    else:
        src[axis], dst[axis] = slice(-step, n), slice(0, n + step)
    out[tuple(dst)] = grid[tuple(src)]
    return out
