"""MatterSim M3GNet through ``distmlip.wrap``: equal to MatterSim's own ``MatterSimCalculator``,
whatever the split.

The model is a randomly initialised MatterSim ``M3Gnet`` (2 blocks, 16 units, 5 Å, three-body
4 Å) with its per-element energy scale set to 300 so that forces are ~0.5-3 eV/Å: MatterSim's
weights download at run time. MatterSim runs in float32 only (its model casts the one-hot
species and the periodic offsets with ``.float()``), so the comparison with it is at float32
precision; split against whole is checked in float64 (1e-10). MatterSim boxes a molecule in a
large periodic cell and needs full periodicity, so the slab (periodic in x, y) is compared with
its result for the same slab in a periodic cell (12 Å of vacuum > cutoff: same graph).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import distmlip
from distmlip import DistributedCalculator
from distmlip.models.mattersim import MatterSimModel, triplets
from distmlip.testing import assert_partition_invariant, evaluate
from distmlip.testing.adapters import (
    ADAPTER_SPLITS,
    adapter_structures,
    assert_matches_calculator,
    calculator_reference,
)

from support import assert_ranks_pass
from support.adapters import make_mattersim, split_row_counts


@pytest.fixture(scope="module")
def potential():
    return make_mattersim()


def mattersim_reference(potential, atoms) -> dict:
    from mattersim.forcefield.potential import MatterSimCalculator

    # a slab: MatterSim needs full periodicity
    return calculator_reference(MatterSimCalculator(potential, device="cpu"), atoms,
                                full_periodicity=True)


STRUCTURES = adapter_structures()
SPLITS = {**ADAPTER_SPLITS, "molecule": ("grid",)}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_float32_equals_mattersim(potential, name):
    """float32, every split (1, 2, 3, 5 parts), both modes, against MatterSim's calculator:
    1e-5 eV/atom, 5e-5 eV/Å, 1e-6 eV/Å^3 (energies ~5-15 eV/atom, forces up to ~3 eV/Å;
    measured up to 2e-6 eV/atom, 1e-5 eV/Å, 1.6e-7 eV/Å^3)."""
    atoms = STRUCTURES[name]
    worst = assert_matches_calculator(
        distmlip.wrap(potential), None, atoms, reference=mattersim_reference(potential, atoms),
        energy_atol=1e-5, forces_atol=5e-5, stress_atol=1e-6, partitioners=SPLITS[name])
    print(name, worst)


@pytest.mark.parametrize("name", ["oxide", "slab", "molecule"])
def test_split_equals_whole(potential, name):
    """float64, every partitioner, 1, 2, 3, 5 parts, both modes: 1e-10."""
    model = MatterSimModel(potential).double()
    report = assert_partition_invariant(model, STRUCTURES[name], num_parts=(1, 2, 3, 5),
                                        rtol=1e-10)
    assert max(r["max_err"] for r in report) <= 1e-10


def test_triplets_match_mattersim():
    """The triplets built per part are MatterSim's (as sets of bond pairs)."""
    from mattersim.datasets.utils.convertor import compute_threebody_indices

    rng = np.random.default_rng(0)
    centres = np.sort(rng.integers(0, 6, 40))
    length = rng.uniform(1.0, 5.0, 40)
    bonds = np.stack([centres, rng.integers(0, 6, 40)], axis=1)
    want = compute_threebody_indices(bonds, length, 6, np.ones(6, dtype=int), 4.0)[0]
    ij, ik = triplets(torch.as_tensor(centres), torch.as_tensor(length <= 4.0))
    assert sorted(map(tuple, want.tolist())) == sorted(zip(ij.tolist(), ik.tolist(), strict=True))


def test_wrap_accepts_calculator_and_model(potential):
    from mattersim.forcefield.potential import MatterSimCalculator

    for obj in (potential, potential.model, MatterSimCalculator(potential, device="cpu")):
        assert isinstance(distmlip.wrap(obj), MatterSimModel)
    with pytest.raises(TypeError, match="^task: expected no options for MatterSim models"):
        distmlip.wrap(potential, task="omat")
    copy.deepcopy(distmlip.wrap(potential))  # the runner copies it per device


def _count_mattersim_rows(model: MatterSimModel) -> dict:
    """Forward pre-hooks counting the rows given to MatterSim's node-wise maps: every block's
    three-body atom gate (``three_body.atom_mlp``) and the readout (``final``):
    {name: [rows per call]}."""
    rows: dict = {}

    def counter(name):
        def hook(module, args):
            rows.setdefault(name, []).append(int(args[0].shape[0]))
        return hook

    for i, conv in enumerate(model.module.graph_conv):
        conv.three_body.atom_mlp.register_forward_pre_hook(counter(f"{i}.gate"))
    model.module.final.register_forward_pre_hook(counter("readout"))
    return rows


def test_node_work_only_on_owned_rows(potential):
    """4 parts in halo mode: MatterSim's node-wise work (every block's three-body atom gate, the
    readout) runs on exactly the owned rows, whose total over the parts is the number of atoms
    (before: every local row), with one exchange per block after the first; extended mode
    computes every local row. Both equal the unsplit model's at 1e-10 (float64,
    ``split_row_counts``)."""
    model = MatterSimModel(copy.deepcopy(potential)).double()
    atoms = STRUCTURES["oxide"].repeat((2, 1, 1))
    n = len(atoms)
    blocks = len(model.module.graph_conv)
    for mode, calc, rows, local in split_row_counts(model, atoms, _count_mattersim_rows):
        assert set(rows) == {"readout"} | {f"{i}.gate" for i in range(blocks)}
        for name, counts in rows.items():
            assert sum(counts) == (n if mode == "halo" else local), (mode, name, counts)
        assert calc.runner.last_exchange_calls == (blocks - 1 if mode == "halo" else 0)
        assert np.isfinite(evaluate(calc, atoms)["energy"])


# ---------------------------------------------------------------------- the layer protocol
@pytest.mark.parametrize("name", ["oxide", "slab", "molecule"])
def test_steps_compose_to_forward(potential, name):
    """embed / step / energies (bond features as an edge entry, atom features exchanged) compose
    to forward: float64 and float32."""
    from distmlip.testing import check_steps

    model = MatterSimModel(potential)
    assert model.exchanged == (1,) and model.edge_entries == (0,)
    assert model.num_steps == len(potential.model.graph_conv)
    atoms = STRUCTURES[name]
    report = check_steps(model, atoms, dtype=torch.float64)
    assert report["ok"] and report["steps"] and max(report["energies"], report["gradient"]) < 1e-12, \
        report["message"]
    assert check_steps(model, atoms, dtype=torch.float32)["ok"]


@pytest.mark.parametrize("name", ["oxide", "slab"])
def test_bounded_steps_equal_unbounded(potential, name):
    """Parts one at a time in halo mode go by the steps (forward only on the runtime's probe, run
    when the calculator is built; 2 L - 1 steps per part and call) and equal the unbounded result
    within 1e-10 (float64: energy, forces, stress, per-atom energies): 3 metis, 4 grid, 5 parts,
    one worker or two."""
    from support import assert_steps_counted, counted

    model = MatterSimModel(copy.deepcopy(potential)).double()
    counted_model = counted(MatterSimModel)(model.module)
    atoms = STRUCTURES[name].repeat((2, 1, 1))
    ref = evaluate(DistributedCalculator(model, 1, dtype="float64"), atoms)
    assert "energies" in ref
    assert_steps_counted(counted_model, atoms, ref, dtype="float64")


@pytest.mark.mpi
@pytest.mark.slow
def test_under_mpirun():
    """mpirun -n 2: MatterSim split over two ranks equals the single-process result (1e-10)."""
    assert_ranks_pass("adapter.py", "mattersim", expect="mattersim 24 checks passed")
