"""Atoms -> NeighborGraph: the periodic neighbour graph of a whole system (built with vesin)."""

from .neighbors import NeighborGraph, as_ase_atoms, complete_cell, validate_system
from .region import atoms_near, fractional_coordinates

__all__ = [
    "NeighborGraph",
    "as_ase_atoms",
    "atoms_near",
    "complete_cell",
    "fractional_coordinates",
    "validate_system",
]
