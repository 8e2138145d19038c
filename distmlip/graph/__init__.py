"""Atoms -> NeighborGraph: the periodic neighbour graph of a whole system (built with vesin)."""

from .neighbors import NeighborGraph, as_ase_atoms, complete_cell, validate_system

__all__ = ["NeighborGraph", "as_ase_atoms", "complete_cell", "validate_system"]
