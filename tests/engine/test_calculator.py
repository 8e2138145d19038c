"""The ASE calculator: forces and stress are derivatives of the energy (finite differences, on
partitioned evaluations), work counting, caching and result conventions."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from ase.neighborlist import neighbor_list

from distmlip import DistributedCalculator
from distmlip.runtime.runner import TIMING_KEYS
from distmlip.testing import (
    awkward_structures,
    check_forces_finite_difference,
    check_stress_finite_difference,
    count_work,
    evaluate,
)
from distmlip.testing.structures import fcc_bulk

DELTA = 1e-3  # Å, step of the 4th-order central difference


def _atoms_away_from_cutoff(atoms, cutoff, margin, count=3):
    """Atoms none of whose pair distances lies within ``margin`` of ``cutoff``: a pair potential
    truncated without smoothing has a kink there, which finite differences cannot straddle."""
    i, j, d = neighbor_list("ijd", atoms, cutoff + 2 * margin)
    near = np.abs(d - cutoff) < margin
    bad = set(i[near].tolist()) | set(j[near].tolist())
    good = [a for a in range(len(atoms)) if a not in bad]
    rng = np.random.default_rng(0)
    assert good, "no atom is far enough from the cutoff kink"
    return np.sort(rng.choice(good, size=min(count, len(good)), replace=False))


@pytest.mark.parametrize("name", ["fcc_bulk", "small_triclinic", "slab_vacuum", "molecule"])
@pytest.mark.parametrize("mode", ["halo", "extended"])
def test_schnet_forces_are_minus_energy_gradient(schnet_model, name, mode):
    atoms = awkward_structures()[name]
    calc = DistributedCalculator(schnet_model, num_parts=3, partitioner="grid", mode=mode)
    dev = check_forces_finite_difference(calc, atoms, delta=DELTA, atol=1e-6, num_atoms=2)
    assert calc.last_plan.num_parts == 3
    print(f"{name} {mode}: max |F - F_fd| = {dev:.2e} eV/Å")


@pytest.mark.parametrize("name", ["fcc_bulk", "small_triclinic", "multi_element_isolated"])
def test_lj_forces_are_minus_energy_gradient(lj_model, name):
    atoms = awkward_structures()[name]
    idx = _atoms_away_from_cutoff(atoms, lj_model.cutoff, margin=5 * DELTA, count=2)
    calc = DistributedCalculator(lj_model, num_parts=3, partitioner="metis")
    check_forces_finite_difference(calc, atoms, delta=DELTA, atol=1e-6, indices=idx)


@pytest.mark.parametrize("name", ["fcc_bulk", "small_triclinic", "slab_vacuum", "multi_element_isolated"])
def test_schnet_stress_is_numerical_stress(schnet_model, name):
    atoms = awkward_structures()[name]
    calc = DistributedCalculator(schnet_model, num_parts=3, partitioner="slab")
    dev = check_stress_finite_difference(calc, atoms, atol=1e-6)
    print(f"{name}: max |stress - numerical| = {dev:.2e} eV/Å^3")


@pytest.mark.parametrize("name", ["fcc_bulk", "small_triclinic"])
def test_lj_stress_is_numerical_stress(lj_model, name):
    atoms = awkward_structures()[name]
    i, d = neighbor_list("id", atoms, lj_model.cutoff + 0.01)
    assert np.abs(d - lj_model.cutoff).min() > 1e-5 * lj_model.cutoff  # strain 1e-6 moves d by 5e-6 Å
    calc = DistributedCalculator(lj_model, num_parts=3, partitioner="grid")
    check_stress_finite_difference(calc, atoms, atol=1e-6)


def test_finite_difference_checks_catch_wrong_derivatives(lj_model):
    """A calculator whose forces are off by 1e-4 is rejected; so is a wrong stress."""
    atoms = fcc_bulk()

    class Wrong(DistributedCalculator):
        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            self.results["forces"] = self.results["forces"] * (1 + 1e-4)
            if "stress" in self.results:
                self.results["stress"] = self.results["stress"] + 1e-5

    idx = _atoms_away_from_cutoff(atoms, lj_model.cutoff, margin=5 * DELTA, count=1)
    with pytest.raises(AssertionError, match=r"forces: atom \d+, [xyz]: .* deviation"):
        check_forces_finite_difference(Wrong(lj_model, 2), atoms, indices=idx)
    with pytest.raises(AssertionError, match=r"stress: component (xx|yy|zz|yz|xz|xy)"):
        check_stress_finite_difference(Wrong(lj_model, 2), atoms)


# ---------------------------------------------------------------- work counting
@pytest.mark.parametrize("partitioner", ["slab", "grid", "metis"])
@pytest.mark.parametrize("parts", [2, 3, 7, 16])
def test_halo_mode_evaluates_each_edge_once(schnet_model, partitioner, parts):
    atoms = fcc_bulk()
    calc = DistributedCalculator(schnet_model, parts, partitioner=partitioner, mode="halo")
    evaluate(calc, atoms)
    work = count_work(calc)
    assert work["edges_evaluated"] == work["graph_edges"] == calc.last_graph.num_edges
    assert work["distinct_edges_evaluated"] == work["graph_edges"]
    assert work["redundancy"] == 1.0 and work["node_redundancy"] == 1.0
    assert len(work["edges_per_part"]) == parts and min(work["edges_per_part"]) > 0


@pytest.mark.parametrize("parts", [2, 3, 7, 16])
def test_extended_mode_redundancy_reported(schnet_model, parts):
    from distmlip.testing.structures import fcc_bulk as build

    atoms = build(size=4)  # 256 atoms: big enough that not every part holds the whole system
    calc = DistributedCalculator(schnet_model, parts, partitioner="grid", mode="extended")
    evaluate(calc, atoms)
    work = count_work(calc)
    halo = DistributedCalculator(schnet_model, parts, partitioner="grid", mode="halo")
    evaluate(halo, atoms)
    print(f"extended, {parts} parts: redundancy {work['redundancy']:.2f}, "
          f"halo atoms {work['halo_atoms']} vs {count_work(halo)['halo_atoms']} in halo mode")
    assert work["redundancy"] > 1.0 and work["node_redundancy"] > 1.0
    assert work["redundancy"] == calc.last_plan.redundancy()
    assert work["edges_evaluated"] > work["graph_edges"]
    assert work["distinct_edges_evaluated"] == work["graph_edges"]
    assert work["num_hops"] == schnet_model.num_layers
    # on a 14 Å cube a one-hop (5 Å) halo may already span everything: extended holds no less
    assert work["halo_atoms"] >= count_work(halo)["halo_atoms"]


def test_count_work_needs_a_calculation(schnet_model):
    with pytest.raises(ValueError, match="calc"):
        count_work(DistributedCalculator(schnet_model, 2))


# ---------------------------------------------------------------- calculator conventions
def test_results_shapes_and_sums(schnet_model, structure):
    name, atoms = structure
    calc = DistributedCalculator(schnet_model, 3)
    atoms.calc = calc
    e = atoms.get_potential_energy()
    assert atoms.get_forces().shape == (len(atoms), 3)
    assert atoms.get_potential_energies().shape == (len(atoms),)
    assert atoms.get_potential_energies().sum() == pytest.approx(e, rel=1e-12, abs=1e-12)
    assert calc.results["free_energy"] == e
    # Newton's third law: the total force vanishes
    assert np.abs(atoms.get_forces().sum(axis=0)).max() < 1e-10
    assert set(calc.timings) == set(TIMING_KEYS)
    if atoms.cell.rank == 3:
        assert atoms.get_stress().shape == (6,)
    else:
        with pytest.raises(PropertyNotImplementedError, match="stress"):
            atoms.get_stress()


def test_caching_and_recalculation(lj_model):
    atoms = fcc_bulk()
    calc = DistributedCalculator(lj_model, 2)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    plan = calc.last_plan
    atoms.get_forces()
    assert calc.last_plan is plan, "forces after energy must not recompute"
    atoms.positions[0] += 0.05  # within the skin: graph and plan are reused
    e1 = atoms.get_potential_energy()
    assert calc.last_plan is plan and calc.graph_builds == 1 and e1 != e0
    atoms.positions[0] += 0.25  # 0.3 Å in all: more than skin / 2 = 0.25 Å, a rebuild
    e2 = atoms.get_potential_energy()
    assert calc.last_plan is not plan and calc.graph_builds == 2 and e2 != e1
    fresh = DistributedCalculator(lj_model, 2, skin=0.0)
    atoms.positions[0] += 0.01
    fresh.calculate(atoms)
    assert fresh.graph_builds == 1
    fresh.calculate(atoms)  # same positions: nothing to rebuild even without a skin
    assert fresh.graph_builds == 1
    atoms.positions[0] += 1e-6
    fresh.calculate(atoms)
    assert fresh.graph_builds == 2
    # a different system with the same calculator
    other = awkward_structures()["molecule"]
    other.calc = calc
    assert other.get_forces().shape == (len(other), 3)


def test_model_is_not_modified(schnet_model):
    before = {k: v.clone() for k, v in schnet_model.state_dict().items()}
    evaluate(DistributedCalculator(schnet_model, 3, dtype="float32"), fcc_bulk())
    for k, v in schnet_model.state_dict().items():
        assert v.dtype == before[k].dtype and bool((v == before[k]).all()), k
    assert all(not p.grad_fn and p.grad is None for p in schnet_model.parameters())


def test_translation_and_wrapping_invariance(schnet_model):
    """Periodic images are the same physics: shifting every atom by lattice vectors (so that
    positions lie outside the cell) changes nothing but rounding."""
    atoms = awkward_structures()["small_triclinic"]
    ref = evaluate(DistributedCalculator(schnet_model, 2), atoms)
    moved = atoms.copy()
    moved.positions += np.array([[1, -2, 0], [0, 3, 1], [-1, 0, 2]]) @ atoms.cell.array
    got = evaluate(DistributedCalculator(schnet_model, 2), moved)
    for q in ref:
        np.testing.assert_allclose(got[q], ref[q], rtol=0, atol=1e-10, err_msg=q)


def test_extended_mode_warns_when_every_part_holds_the_whole_system():
    import warnings

    from distmlip.models import SchNet
    from distmlip.testing import fcc_bulk

    atoms = fcc_bulk(size=2)
    model = SchNet(cutoff=5.0, num_interactions=3, hidden_channels=8)
    atoms.calc = DistributedCalculator(model, num_parts=4, mode="extended")
    with pytest.warns(UserWarning, match="halo covers the whole system"):
        atoms.get_potential_energy()
    atoms.rattle(0.01, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per calculator
        atoms.get_potential_energy()
    halo = fcc_bulk(size=2)
    halo.calc = DistributedCalculator(model, num_parts=4, mode="halo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        halo.get_potential_energy()
