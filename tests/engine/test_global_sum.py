"""The contract's system-wide sum (``LocalGraph.global_sum``) and composition: a model whose
energy is not a sum of per-atom terms (``N * MLP(mean h)`` plus a composition factor) split in
every runner equals the unsplit model (float64, 1e-10), and its forces are the energy's gradient."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from distmlip import DistributedCalculator
from distmlip.models import LocalGraph
from distmlip.testing import (
    assert_partition_invariant,
    check_forces_finite_difference,
    check_stress_finite_difference,
    evaluate,
)
from distmlip.testing.models import GlobalReadoutToy

from support import assert_ranks_pass, salt, slab

RTOL = 1e-10


@pytest.fixture(scope="module")
def model():
    return GlobalReadoutToy(cutoff=4.0, seed=3, scale=4.0).double()


def test_energy_is_the_global_formula(model):
    """The calculator's energy is the model evaluated on the whole system in one piece, and the
    per-atom energies hold the per-atom terms plus an equal share of the global term."""
    atoms = salt()
    out = evaluate(DistributedCalculator(model, num_parts=3), atoms)
    from distmlip.graph import NeighborGraph

    g = NeighborGraph.from_atoms(atoms, model.cutoff)
    vec = torch.as_tensor(g.edge_vectors(np.arange(g.num_edges)))
    local = LocalGraph.single(torch.as_tensor(g.numbers),
                              torch.as_tensor(np.stack([g.senders, g.receivers])), vec)
    eps = model(local).detach().numpy()
    assert abs(out["energy"] - eps.sum()) <= RTOL * abs(eps.sum())
    assert np.max(np.abs(out["energies"] - eps)) <= RTOL * np.max(np.abs(eps))
    assert local.num_system_atoms == len(atoms) and int(local.composition[11]) == len(atoms) // 2


@pytest.mark.parametrize("make", [salt, slab], ids=["salt", "slab"])
def test_split_equals_whole(model, make):
    """One union graph (one device), 1, 2, 3, 5 parts, both modes, every partitioner."""
    report = assert_partition_invariant(model, make(), num_parts=(1, 2, 3, 5),
                                        partitioners=("grid", "slab", "metis"), rtol=RTOL)
    assert max(r["max_err"] for r in report) <= RTOL


def test_threads_on_several_devices(model):
    """Two and three worker threads (one per device), the partial sums meet at the hub."""
    for devices in (["cpu", "cpu"], ["cpu", "cpu", "cpu"]):
        assert_partition_invariant(model, salt(), num_parts=(2, 3, 4), partitioners=("grid",),
                                   device=devices, rtol=RTOL)


def test_more_parts_than_atoms(model):
    """Empty parts and empty workers still take part in the sum."""
    water = molecule("H2O")
    atoms = Atoms(water.numbers, water.positions, pbc=False)
    assert_partition_invariant(model, atoms, num_parts=(2, 5), partitioners=("grid",), rtol=RTOL)
    assert_partition_invariant(model, atoms, num_parts=(5,), partitioners=("grid",),
                               device=["cpu", "cpu"], rtol=RTOL)


def test_forces_and_stress_are_gradients(model):
    calc = DistributedCalculator(model, num_parts=3)
    check_forces_finite_difference(calc, salt(), delta=1e-4, atol=1e-6)
    check_stress_finite_difference(calc, salt(), atol=1e-6)


def test_global_sum_rejects_a_reduced_tensor(model):
    local = LocalGraph.single(torch.tensor([1, 1]), torch.zeros(2, 0, dtype=torch.long),
                              torch.zeros(0, 3))
    with pytest.raises(ValueError, match="global_sum: expected a per-atom tensor"):
        local.global_sum(torch.zeros(()))


@pytest.mark.mpi
def test_global_sum_under_mpirun():
    """mpirun -n 2, 1 part per rank: the all-reduce and its backward across ranks (salt, slab,
    a molecule with fewer atoms than parts; both modes; grid, slab, METIS)."""
    assert_ranks_pass("global_sum.py", expect="66 global-sum checks passed with 2 parts")


@pytest.mark.mpi
@pytest.mark.slow
def test_global_sum_several_parts_per_rank():
    assert_ranks_pass("global_sum.py", "2", expect="66 global-sum checks passed with 4 parts")
