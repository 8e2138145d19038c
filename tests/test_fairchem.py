"""fairchem eSCN-MD (UMA's architecture) through ``distmlip.wrap``: equal to fairchem's own
``HydraModelV2`` forward, whatever the split.

The model is a randomly initialised ``eSCNMDBackbone`` (16 sphere channels, lmax = mmax = 2,
2 blocks, 5 Å, one task "omat") with an ``MLP_EFS_Head`` whose output is multiplied by 30 so that
forces are ~0.5-2 eV/Å: UMA's weights download at run time (and are gated). The reference is the
model's own forward on fairchem's ``AtomicData`` (graph built on the fly by fairchem); in float64
the positions and cell are set from the ``Atoms`` in float64 (``AtomicData.from_ase`` stores them
in float32). fairchem needs full periodicity or none, so the slab (periodic in x, y) is compared
with its result for the same slab in a periodic cell (12 Å of vacuum > cutoff: same graph).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("fairchem.core", reason="fairchem-core is not installed (pip install distmlip[fairchem])")

import distmlip  # noqa: E402
from distmlip.models.fairchem import UMAModel  # noqa: E402
from distmlip.testing import assert_partition_invariant  # noqa: E402
from distmlip.testing.adapters import ADAPTER_SPLITS, adapter_structures, assert_matches_calculator  # noqa: E402


def make_uma(seed: int = 0, **extra):
    from fairchem.core.models.base import HydraModelV2
    from fairchem.core.models.uma.escn_md import MLP_EFS_Head, eSCNMDBackbone

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        backbone = eSCNMDBackbone(
            max_num_elements=100, sphere_channels=16, lmax=2, mmax=2, otf_graph=True, cutoff=5.0,
            edge_channels=16, num_distance_basis=16, num_layers=2, hidden_channels=16,
            direct_forces=False, regress_forces=True, regress_stress=True,
            dataset_mapping={"omat": "omat"}, max_neighbors=300, always_use_pbc=False, **extra)
        head = MLP_EFS_Head(backbone)
        with torch.no_grad():
            head.energy_block[-1].weight.mul_(30.0)
        return HydraModelV2(backbone, {"efs": head}).eval()


@pytest.fixture(scope="module")
def uma32():
    return make_uma()


@pytest.fixture(scope="module")
def uma64(uma32):
    return copy.deepcopy(uma32).double()


def fairchem_reference(model, atoms, dtype) -> dict:
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.datasets.atomic_data import AtomicData

    work = atoms.copy()
    if not work.pbc.all() and work.pbc.any():  # a slab: fairchem needs full periodicity
        work.pbc = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = AtomicData.from_ase(work, task_name="omat", r_edges=False, max_neigh=300, radius=5.0)
        batch = data_list_collater([data], otf_graph=True)
        if dtype == torch.float64:
            batch.pos = torch.tensor(work.positions, dtype=dtype)
            batch.cell = torch.tensor(np.array(work.cell)[None], dtype=dtype)
        out = model(batch)["efs"]
    energy = float(out["energy"]["energy"])
    forces = out["forces"]["forces"].detach().double().numpy()
    result = {"energy": energy, "forces": forces}
    if atoms.cell.rank == 3:
        s = out["stress"]["stress"].detach().double().numpy().reshape(3, 3)
        result["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return result


STRUCTURES = adapter_structures()
SPLITS = ADAPTER_SPLITS


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_float64_equals_fairchem(uma64, name):
    """Every split (1, 2, 3, 5 parts), both modes, equals fairchem's float64 forward."""
    atoms = STRUCTURES[name]
    worst = assert_matches_calculator(
        distmlip.wrap(uma64, task="omat"), None, atoms,
        reference=fairchem_reference(uma64, atoms, torch.float64),
        energy_atol=1e-11, forces_atol=1e-11, stress_atol=1e-11, partitioners=SPLITS[name])
    print(name, worst)


@pytest.mark.parametrize("name", ["oxide", "molecule"])
def test_float32_equals_fairchem(uma32, name):
    """float32 against fairchem's float32 forward: 1e-6 eV/atom, 1e-5 eV/Å, 1e-6 eV/Å^3."""
    atoms = STRUCTURES[name]
    worst = assert_matches_calculator(
        distmlip.wrap(uma32, task="omat"), None, atoms,
        reference=fairchem_reference(uma32, atoms, torch.float32),
        energy_atol=1e-6, forces_atol=1e-5, stress_atol=1e-6, num_partitions=(1, 3))
    print(name, worst)


@pytest.mark.parametrize("name", ["oxide", "slab", "molecule"])
def test_split_equals_whole(uma64, name):
    """float64, every partitioner, 1, 2, 3, 5 parts, both modes: 1e-10."""
    report = assert_partition_invariant(UMAModel(uma64, task="omat"), STRUCTURES[name],
                                        num_partitions=(1, 2, 3, 5), rtol=1e-10)
    assert max(r["max_err"] for r in report) <= 1e-10


def test_errors(uma32):
    with pytest.raises(ValueError, match=r"task: expected one of \['omat'\], got 'omol'"):
        distmlip.wrap(uma32, task="omol")
    with pytest.raises(TypeError, match="options: expected task, charge or spin"):
        distmlip.wrap(uma32, max_num_neighbors=3)
    assert distmlip.wrap(uma32).task == "omat"  # the only task is the default


@pytest.mark.mpi
@pytest.mark.slow
def test_under_mpirun():
    """mpirun -n 2: the model split over two ranks equals the single-process result (1e-10)."""
    from test_mpi import launch

    proc, _ = launch("mpirun", 2, "adapter.py", "fairchem")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for rank in range(2):
        assert f"rank {rank}: fairchem 24 checks passed" in out, out[-4000:]
