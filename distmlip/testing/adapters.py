"""Shared checks for adapters of third-party models: the package's own calculator is the truth.

An adapter test needs three things: small structures of the kinds that break adapters (an ionic
crystal, a metal, a slab with vacuum, a cell smaller than the cutoff, a molecule), the package's
own ASE calculator, and a comparison of the two over several splits::

    from distmlip.testing.adapters import adapter_structures, assert_matches_calculator

    for name, atoms in adapter_structures().items():
        assert_matches_calculator(distmlip.wrap(module), PackageCalculator(module), atoms)

Every structure uses only the elements in ``ADAPTER_ELEMENTS``: build the random test model for
those.
"""

from __future__ import annotations

import numpy as np

from ..calculators import DistributedCalculator
from ..graph.neighbors import as_ase_atoms
from .checks import evaluate

__all__ = [
    "ADAPTER_ELEMENTS",
    "ADAPTER_SPLITS",
    "adapter_structures",
    "assert_matches_calculator",
    "calculator_reference",
    "metal",
    "molecule",
    "oxide",
    "slab",
    "small_cell",
]

#: Chemical symbols of every structure below (H, Li, C, O, Al, Cu).
ADAPTER_ELEMENTS = ("H", "Li", "C", "O", "Al", "Cu")


def oxide(repeat=(1, 1, 1), rattle: float = 0.08, seed: int = 1):
    """Li2O (antifluorite): 12 atoms per conventional cell, rattled."""
    from ase.build import bulk

    atoms = bulk("OLi2", "fluorite", a=4.61, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    return atoms


def metal(repeat=(2, 2, 1), rattle: float = 0.08, seed: int = 2):
    """Cu fcc, conventional cells (default 2x2x1: 16 atoms, thinner than most cutoffs along z)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    return atoms


def slab(periodic: bool = False, vacuum: float = 6.0, rattle: float = 0.08, seed: int = 3,
         size=(2, 2, 4)):
    """Al(100), ``size`` (default 2x2x4: 16 atoms) with ``vacuum`` Å each side. ``periodic=False``:
    periodic in x and y only; ``True``: a periodic cell with a vacuum gap (for packages that treat
    any non-periodic direction as a molecule)."""
    from ase.build import fcc100

    atoms = fcc100("Al", size=tuple(size), a=4.05, vacuum=vacuum)
    atoms.pbc = [True, True, bool(periodic)]
    atoms.rattle(rattle, seed=seed)
    return atoms


def small_cell(rattle: float = 0.05, seed: int = 4):
    """LiCu in a 2-atom triclinic cell far smaller than the cutoff: many images of each atom."""
    from ase import Atoms

    cell = np.array([[2.6, 0.0, 0.0], [0.7, 2.5, 0.0], [0.4, 0.6, 2.7]])
    atoms = Atoms("LiCu", scaled_positions=[[0.0, 0.0, 0.0], [0.45, 0.55, 0.5]], cell=cell, pbc=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


def molecule(rattle: float = 0.03, seed: int = 5):
    """Ethanol, isolated (no cell, not periodic)."""
    from ase import Atoms
    from ase.build import molecule as ase_molecule

    mol = ase_molecule("CH3CH2OH")
    mol.rattle(rattle, seed=seed)
    return Atoms(mol.numbers, mol.positions, pbc=False)


def adapter_structures(periodic_slab: bool = False, molecules: bool = True) -> dict:
    """``{name: Atoms}``: oxide, metal, slab, small_cell and (``molecules``) molecule."""
    out = {"oxide": oxide(), "metal": metal(), "slab": slab(periodic=periodic_slab),
           "small_cell": small_cell()}
    if molecules:
        out["molecule"] = molecule()
    return out


#: A partitioner or two per structure of ``adapter_structures``: every partitioner is used at least
#: once over the set without multiplying each adapter test's cost.
ADAPTER_SPLITS = {"oxide": ("grid", "metis"), "metal": ("slab",), "slab": ("metis",),
                  "small_cell": ("grid",), "molecule": ("grid", "slab")}


def calculator_reference(calculator, atoms, stress: bool | None = None,
                         full_periodicity: bool = False) -> dict:
    """``energy``, ``forces`` (and ``stress``: default for cells of rank 3) of ``atoms`` from a
    package's ASE ``calculator``, warnings silenced. ``full_periodicity``: evaluate a partly
    periodic structure (a slab) as fully periodic, for packages that refuse mixed periodicity (with
    enough vacuum the graph is the same)."""
    import warnings

    work = atoms.copy()
    if full_periodicity and not work.pbc.all() and work.pbc.any():
        work.pbc = True
    if stress is None:
        stress = atoms.cell.rank == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work.calc = calculator
        out = {"energy": float(work.get_potential_energy()),
               "forces": np.array(work.get_forces(), dtype=np.float64)}
        if stress:
            out["stress"] = np.array(work.get_stress(voigt=True), dtype=np.float64)
    work.calc = None
    return out


def assert_matches_calculator(model, reference_calculator, atoms, *, energy_atol: float = 1e-6,
                              forces_atol: float = 1e-5, stress_atol: float = 1e-6,
                              num_parts=(1, 2, 3, 5), modes=("halo", "extended"),
                              partitioners=("grid",), dtype=None, stress: bool | None = None,
                              reference: dict | None = None) -> dict:
    """Check ``model`` (a ``DistributableModel``), split in several ways, against the package's own
    ASE calculator on ``atoms``.

    Args:
        model: the wrapped model.
        reference_calculator: the package's ASE calculator (evaluated once; or pass
            ``reference`` instead: a dict with ``energy``, ``forces`` and optionally ``stress``).
        atoms: the structure.
        energy_atol: largest |energy difference| per atom, eV/atom.
        forces_atol: largest |force component difference|, eV/Å.
        stress_atol: largest |stress component difference|, eV/Å^3 (checked for cells of rank 3
            unless ``stress=False``).
        num_parts, modes, partitioners: the splits (every combination).
        dtype: passed to ``DistributedCalculator``.

    Returns:
        ``{"energy": eV/atom, "forces": eV/Å, "stress": eV/Å^3}``: the largest differences found
        over all splits (so a test can print them).

    Raises:
        AssertionError naming the split and quantity that exceeded its tolerance.
    """

    atoms = as_ase_atoms(atoms)
    if stress is None:
        stress = atoms.cell.rank == 3
    want = reference if reference is not None else calculator_reference(reference_calculator, atoms, stress)
    n = max(len(atoms), 1)
    atol = {"energy": energy_atol, "forces": forces_atol, "stress": stress_atol}
    worst = {"energy": 0.0, "forces": 0.0}
    if stress:
        worst["stress"] = 0.0
    for partitioner in partitioners:
        for parts in num_parts:
            for mode in modes:
                calc = DistributedCalculator(model, num_parts=parts, partitioner=partitioner,
                                             mode=mode, dtype=dtype, backend="local")
                got = evaluate(calc, atoms)
                for key in worst:
                    diff = float(np.max(np.abs(np.asarray(got[key]) - np.asarray(want[key])),
                                        initial=0.0))
                    if key == "energy":
                        diff /= n
                    worst[key] = max(worst[key], diff)
                    if not diff <= atol[key]:
                        unit = {"energy": "eV/atom", "forces": "eV/Å", "stress": "eV/Å^3"}[key]
                        raise AssertionError(
                            f"{key}: {partitioner} x {parts} parts, {mode} mode differs from the "
                            f"package's calculator by {diff:.3e} {unit} > {atol[key]:.1e}"
                        )
    return worst
