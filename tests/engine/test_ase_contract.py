"""The calculator as ASE expects one (ase/calculators/lj.py's contract), pymatgen input in every
entry point, and more parts than atoms at O(atoms + parts)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError

from distmlip import DistributedCalculator
from distmlip.models import SchNet


def _model():
    return SchNet(cutoff=4.0, num_interactions=3, hidden_channels=8, num_gaussians=10, seed=5)


def _atoms():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=2)
    return atoms


def _close(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-10 * max(np.abs(b).max(), 1)


def test_parameters_defaults_and_todict():
    calc = DistributedCalculator(_model())
    assert dict(calc.parameters) == DistributedCalculator.default_parameters
    assert calc.todict() == {}
    calc = DistributedCalculator(_model(), num_parts=3, mode="extended", dtype="float64",
                                 device=["cpu", "cpu"], skin=0.3)
    assert calc.todict() == {"num_parts": 3, "mode": "extended", "dtype": "float64",
                             "device": ["cpu", "cpu"], "skin": 0.3}


@pytest.mark.parametrize("change", [{"mode": "extended"}, {"num_parts": 4}, {"partitioner": "slab"},
                                    {"partitioner": "metis", "num_parts": 3},
                                    {"skin": 0.0}, {"device": ["cpu", "cpu"]}, {"timeout": 60.0},
                                    {"dtype": "float32"}])
def test_set_takes_effect_at_the_next_call(change):
    atoms = _atoms()
    calc = DistributedCalculator(_model(), num_parts=2)
    atoms.calc = calc
    atoms.get_forces()
    changed = calc.set(**change)
    assert changed == change  # what changed, as ASE's set() returns it
    assert calc.results == {}  # the old results are not served for the new options
    assert calc.todict() == {"num_parts": 2, **change}
    forces = atoms.get_forces()
    fresh = DistributedCalculator(_model(), **{"num_parts": 2, **change})
    assert np.array_equal(forces, fresh.get_forces(_atoms()))
    plan = calc.last_plan
    if "mode" in change:
        assert plan.mode == "extended" and plan.num_hops == 3
    if "num_parts" in change:
        assert plan.num_parts == change["num_parts"]
    if "dtype" in change:
        assert calc.runner.dtype.__repr__() == "torch.float32"
    if "skin" in change:
        assert calc.runner.skin == 0.0


def test_set_same_value_changes_nothing():
    atoms = _atoms()
    calc = DistributedCalculator(_model(), num_parts=2)
    atoms.calc = calc
    atoms.get_potential_energy()
    runner, builds = calc.runner, calc.graph_builds
    assert calc.set(num_parts=2, mode="halo") == {}
    atoms.get_potential_energy()
    assert calc.runner is runner and calc.graph_builds == builds


def test_set_unknown_raises_and_ase_keywords_accepted(tmp_path):
    calc = DistributedCalculator(_model(), label="run", directory=str(tmp_path))
    assert calc.directory == str(tmp_path)
    with pytest.raises(TypeError, match=r"^skn: .*did you mean 'skin'\?"):
        calc.set(skn=0.1)
    atoms = _atoms()
    DistributedCalculator(_model(), atoms=atoms)
    assert isinstance(atoms.calc, DistributedCalculator)


def test_pymatgen_in_every_entry_point():
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = _atoms()
    ref = DistributedCalculator(_model(), num_parts=2)
    energy, forces, stress = ref.get_potential_energy(atoms), ref.get_forces(atoms), ref.get_stress(atoms)
    structure = AseAtomsAdaptor.get_structure(atoms)

    calc = DistributedCalculator(_model(), num_parts=2)
    assert _close(calc.get_stress(structure), stress)  # stress first (it used to fail)
    assert _close(calc.get_potential_energy(structure), energy)
    assert _close(calc.get_forces(structure), forces)
    assert _close(calc.get_potential_energy(structure), energy)  # repeated: served from the cache
    assert calc.graph_builds == 1
    calc.calculate(structure)
    calc.calculate(structure, ["energy"], ["positions"])
    assert _close(calc.results["forces"], forces)
    assert _close(calc.get_property("energies", structure).sum(), energy)
    assert not calc.calculation_required(structure, ["energy", "forces"])
    moved = structure.copy()
    moved.translate_sites([0], [0.02, 0, 0], frac_coords=False)
    assert calc.calculation_required(moved, ["energy"])
    assert not _close(calc.get_forces(moved), forces)

    mol = AseAtomsAdaptor.get_molecule(molecule("CH4"))
    m_ref = DistributedCalculator(_model()).get_forces(molecule("CH4"))
    calc = DistributedCalculator(_model(), num_parts=2)
    assert _close(calc.get_forces(mol), m_ref)
    with pytest.raises(PropertyNotImplementedError, match=r"^stress: needs a cell with three"):
        calc.get_stress(mol)


def test_rank_and_world_size_in_one_process():
    calc = DistributedCalculator(_model(), num_parts=3)
    assert (calc.rank, calc.world_size) == (0, 1)


def test_a_million_parts_on_108_atoms_is_quick():
    """More parts than atoms costs O(atoms + parts): only parts that own atoms are built (this
    took 23-37 s per call before). A behaviour bound, not a benchmark: ~0.1 s here."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=1)
    ref = DistributedCalculator(_model()).get_forces(atoms)
    for partitioner in ("grid", "slab", "metis"):
        calc = DistributedCalculator(_model(), num_parts=10**6, partitioner=partitioner)
        t0 = time.perf_counter()
        forces = calc.get_forces(atoms)
        assert time.perf_counter() - t0 < 5.0, partitioner
        assert _close(forces, ref)
        plan = calc.last_plan
        assert plan.num_parts == 10**6 and len(plan.parts) == len(atoms)  # the non-empty ones
        assert sorted(p.index for p in plan.parts) == sorted(set(plan.owner.tolist()))
        plan.validate(calc.last_graph)
