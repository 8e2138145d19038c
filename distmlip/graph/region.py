"""Spatial helpers: fractional coordinates to cut in, and the atoms near a region."""

from __future__ import annotations

import itertools

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
               radius: float) -> np.ndarray:
    """Ids (ascending) of a superset of the atoms within ``radius`` (periodic images included) of
    the ``selected`` atoms ((N,) bool), the selected ones included. O(N).

    Atoms are binned into cells at least ``radius`` wide (measured between lattice planes, so the
    bound holds in triclinic cells); the result is every atom in a bin next to a selected atom's bin.
    """
    frac, spacing = fractional_coordinates(positions, cell, pbc)
    lo = np.where(pbc, 0.0, frac.min(axis=0))
    width = np.where(pbc, 1.0, frac.max(axis=0) - lo)
    nbins = np.maximum(1, np.floor(width * spacing / radius)).astype(np.int64)
    bins = np.floor((frac - lo) / np.where(width > 0, width, 1.0) * nbins).astype(np.int64)
    bins = np.clip(bins, 0, nbins - 1)
    flat = np.ravel_multi_index(bins.T, nbins)
    occupied = np.unique(flat[selected])
    occ = np.stack(np.unravel_index(occupied, nbins), axis=1)
    mark = np.zeros(int(np.prod(nbins)), dtype=bool)
    for offset in itertools.product((-1, 0, 1), repeat=3):
        near = occ + np.asarray(offset)
        near = np.where(pbc, near % nbins, np.clip(near, 0, nbins - 1))
        mark[np.ravel_multi_index(near.T, nbins)] = True
    return np.flatnonzero(mark[flat])
