"""Atoms -> NeighborGraph: the periodic neighbour graph of a whole system (built with vesin).

Helpers used inside distmlip (``as_ase_atoms``, ``validate_system``, ``atoms_near``, ...) are
imported from their modules, ``distmlip.graph.neighbors`` and ``distmlip.graph.region``.
"""

from .neighbors import NeighborGraph

__all__ = ["NeighborGraph"]
