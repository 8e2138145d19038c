"""Small, awkward test systems: the cases a distributed potential most easily gets wrong.

Every builder returns a new, rattled ``ase.Atoms`` (so that forces and stress are non-zero) of at
most ~150 atoms, deterministic for a given ``seed``. Nearest-neighbour distances are 2.2-2.9 Å,
so a 5 Å cutoff sees one to three neighbour shells. What each system is for:

- ``fcc_bulk``: Cu fcc, 3x3x3 conventional cells (108 atoms), fully periodic, cubic.
- ``small_triclinic``: 3 atoms in a skewed triclinic cell whose three plane spacings are all
  below 3.6 Å (its edges 3.7-4.2 Å): with a 5 Å cutoff every atom is bonded to several of its own
  periodic images, and a pair of atoms is linked by many edges with different lattice shifts.
- ``slab_vacuum``: Cu(111) slab, 3x3x4, ``pbc=[True, True, False]`` with 8 Å of vacuum on
  each side along z (the cell is still full rank, so stress is defined).
- ``molecule``: a Cu55 icosahedral cluster, ``pbc=False`` and an all-zero cell.
- ``multi_element_isolated``: a periodic box holding a rock-salt NaCl block with one Na
  replaced by K (three elements), plus one Ar atom more than 5 Å from every atom and every
  periodic image: it has no neighbours at all.

The properties each name claims are checked by ``tests/unit/test_graph.py``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ISOLATED_CUTOFF",
    "awkward_structures",
    "fcc_bulk",
    "molecule",
    "multi_element_isolated",
    "slab_vacuum",
    "small_triclinic",
]

#: The cutoff (Å) the systems are designed around: ``small_triclinic`` is smaller than it and the
#: isolated atom of ``multi_element_isolated`` has no neighbour within it.
ISOLATED_CUTOFF = 5.0

_RATTLE = 0.05  # Å, standard deviation of the random displacements


def _rattled(atoms, seed: int, stdev: float = _RATTLE):
    atoms.rattle(stdev=stdev, seed=seed)
    return atoms


def fcc_bulk(seed: int = 0, size: int = 3, a: float = 3.61):
    """Cu fcc, ``size``^3 conventional cubic cells (4 * size^3 atoms), fully periodic."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((size, size, size))
    return _rattled(atoms, seed)


def small_triclinic(seed: int = 0):
    """Three atoms (Al, Mg, Al) in a rattled triclinic cell smaller than a 5 Å cutoff.

    Cell edges 3.7-4.2 Å with angles of 64-102 degrees: all three spacings between lattice planes
    are < 3.6 Å, so each atom sees many images of every atom, itself included (nearest distance
    ~2.3 Å).
    """
    from ase import Atoms
    from ase.geometry import cellpar_to_cell

    cell = cellpar_to_cell([3.9, 4.2, 3.7, 78.0, 102.0, 64.0])
    frac = np.array([[0.02, 0.05, 0.01], [0.45, 0.35, 0.22], [0.46, 0.76, 0.69]])
    atoms = Atoms("AlMgAl", scaled_positions=frac, cell=cell, pbc=True)
    return _rattled(atoms, seed)


def slab_vacuum(seed: int = 0, vacuum: float = 8.0):
    """Cu(111) 3x3x4 slab (36 atoms), periodic in x and y only, ``vacuum`` Å of vacuum each side
    along z."""
    from ase.build import fcc111

    atoms = fcc111("Cu", size=(3, 3, 4), a=3.61, vacuum=vacuum)
    atoms.pbc = [True, True, False]
    return _rattled(atoms, seed)


def molecule(seed: int = 0):
    """A Cu55 icosahedral cluster (55 atoms, ~10 Å across): ``pbc=False`` and an all-zero cell."""
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Cu", noshells=3, latticeconstant=3.61)
    atoms.set_cell(np.zeros((3, 3)))
    atoms.pbc = False
    atoms.center(about=(0.0, 0.0, 0.0))
    return _rattled(atoms, seed)


def multi_element_isolated(seed: int = 0, box: float = 20.0):
    """A rock-salt block of 2x2x2 conventional cells (64 atoms: 31 Na, 32 Cl, 1 K) in a periodic
    cubic box of ``box`` Å, plus one Ar atom (the last one) whose nearest neighbour, counting
    periodic images, is more than ``ISOLATED_CUTOFF`` away."""
    from ase import Atoms
    from ase.build import bulk

    block = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    block.numbers[np.flatnonzero(block.numbers == 11)[3]] = 19  # one Na -> K
    block.positions += 0.5
    lone = Atoms("Ar", positions=[[0.5 + 8.46 + 6.3] * 3])
    atoms = block + lone
    atoms.set_cell(np.eye(3) * box)
    atoms.pbc = True
    _rattled(atoms, seed)
    return atoms


def awkward_structures(seed: int = 0) -> dict:
    """All the systems above, by name (``dict[str, ase.Atoms]``, new objects on every call)."""
    return {
        "fcc_bulk": fcc_bulk(seed),
        "small_triclinic": small_triclinic(seed),
        "slab_vacuum": slab_vacuum(seed),
        "molecule": molecule(seed),
        "multi_element_isolated": multi_element_isolated(seed),
    }
