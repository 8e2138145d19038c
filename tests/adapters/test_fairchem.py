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

import distmlip
from distmlip.models.fairchem import UMAModel
from distmlip.testing import assert_partition_invariant, evaluate
from distmlip.testing.adapters import ADAPTER_SPLITS, adapter_structures, assert_matches_calculator, oxide

from support import assert_ranks_pass, counted
from support.adapters import MOE_BACKBONE, make_uma, make_uma_moe, split_row_counts


@pytest.fixture(scope="module")
def uma32():
    return make_uma()


@pytest.fixture(scope="module")
def uma64(uma32):
    return copy.deepcopy(uma32).double()


def fairchem_reference(model, atoms, dtype, task: str = "omat") -> dict:
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.datasets.atomic_data import AtomicData

    work = atoms.copy()
    if not work.pbc.all() and work.pbc.any():  # a slab: fairchem needs full periodicity
        work.pbc = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = AtomicData.from_ase(work, task_name=task, r_edges=False, max_neigh=300, radius=5.0)
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


def assert_float64_equals_fairchem(model, name: str) -> None:
    """``wrap(model, task="omat")`` on structure ``name``, every split (1, 2, 3, 5 parts, both
    modes, the structure's partitioners) against fairchem's float64 forward: 1e-11 absolute."""
    atoms = STRUCTURES[name]
    worst = assert_matches_calculator(
        distmlip.wrap(model, task="omat"), None, atoms,
        reference=fairchem_reference(model, atoms, torch.float64),
        energy_atol=1e-11, forces_atol=1e-11, stress_atol=1e-11, partitioners=SPLITS[name])
    print(name, worst)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_float64_equals_fairchem(uma64, name):
    """Every split (1, 2, 3, 5 parts), both modes, equals fairchem's float64 forward."""
    assert_float64_equals_fairchem(uma64, name)


@pytest.mark.parametrize("name", ["oxide", "molecule"])
def test_float32_equals_fairchem(uma32, name):
    """float32 against fairchem's float32 forward: 1e-6 eV/atom, 1e-5 eV/Å, 1e-6 eV/Å^3."""
    atoms = STRUCTURES[name]
    worst = assert_matches_calculator(
        distmlip.wrap(uma32, task="omat"), None, atoms,
        reference=fairchem_reference(uma32, atoms, torch.float32),
        energy_atol=1e-6, forces_atol=1e-5, stress_atol=1e-6, num_parts=(1, 3))
    print(name, worst)


@pytest.mark.parametrize("name", ["oxide", "slab", "molecule"])
def test_split_equals_whole(uma64, name):
    """float64, every partitioner, 1, 2, 3, 5 parts, both modes: 1e-10."""
    report = assert_partition_invariant(UMAModel(uma64, task="omat"), STRUCTURES[name],
                                        num_parts=(1, 2, 3, 5), rtol=1e-10)
    assert max(r["max_err"] for r in report) <= 1e-10


def test_errors(uma32):
    with pytest.raises(ValueError, match=r"task: expected one of \['omat'\], got 'omol'"):
        distmlip.wrap(uma32, task="omol")
    with pytest.raises(TypeError, match=r"^max_num_neighbors: expected one of "
                                        r"\['charge', 'spin', 'task'\] for fairchem models"):
        distmlip.wrap(uma32, max_num_neighbors=3)
    assert distmlip.wrap(uma32).task == "omat"  # the only task is the default


@pytest.mark.mpi
@pytest.mark.slow
def test_under_mpirun():
    """mpirun -n 2: the model split over two ranks equals the single-process result (1e-10)."""
    assert_ranks_pass("adapter.py", "fairchem", expect="fairchem 24 checks passed")


# ---------------------------------------------------------------- mixture of experts
@pytest.fixture(scope="module")
def moe64():
    return make_uma_moe().double()


def _slow_unless(names):
    """The structures, those not in ``names`` marked slow (the default suite's time budget)."""
    return [n if n in names else pytest.param(n, marks=pytest.mark.slow) for n in STRUCTURES]


@pytest.mark.parametrize("name", _slow_unless(("oxide", "slab", "molecule")))
def test_moe_float64_equals_fairchem(moe64, name):
    """UMA's mixture of experts, unmerged (4 experts mixed by the whole system's composition
    embedding and the task): every split (1, 2, 3, 5 parts), both modes, equals fairchem's float64
    forward (1e-11 absolute; the parts of a split hold different compositions)."""
    assert_float64_equals_fairchem(moe64, name)


def test_moe_other_task_threads_and_bounded(moe64):
    """The task option selects the task embedding that also routes the experts ("omol" here);
    threads on two devices and parts one at a time (bounded memory) give the same, 1e-11."""
    from support import one_at_a_time

    atoms = STRUCTURES["oxide"]
    model = distmlip.wrap(moe64, task="omol", spin=0)  # AtomicData.from_ase's spin
    assert distmlip.wrap(moe64, task="omol").spin == 1  # FAIRChemCalculator's default for omol
    want = fairchem_reference(moe64, atoms, torch.float64, task="omol")
    other = fairchem_reference(moe64, atoms, torch.float64, task="omat")
    assert abs(want["energy"] - other["energy"]) > 1e-3  # the task matters
    assert_matches_calculator(model, None, atoms, reference=want, energy_atol=1e-11,
                              forces_atol=1e-11, stress_atol=1e-11, num_parts=(3,))
    for calc in (distmlip.DistributedCalculator(model, 4, device=["cpu", "cpu"]),
                 one_at_a_time(model, 3), one_at_a_time(model, 2, mode="extended")):
        got = evaluate(calc, atoms)
        assert abs(got["energy"] - want["energy"]) <= 1e-11 * len(atoms)
        assert np.max(np.abs(got["forces"] - want["forces"])) <= 1e-11
        assert np.max(np.abs(got["stress"] - want["stress"])) <= 1e-11


def test_moe_coefficients_are_the_whole_systems(moe64):
    """The expert coefficients a part uses are the whole system's: those of one part's own
    composition differ (so mixing per part would be wrong)."""
    from distmlip.models.base import LocalGraph

    model = distmlip.wrap(moe64, task="omat")
    bb = model.module.backbone
    csd = bb.csd_embedding(charge=torch.tensor([0]), spin=torch.tensor([0]), dataset=["omat"])
    atoms = STRUCTURES["oxide"]
    numbers = torch.as_tensor(atoms.numbers)
    empty = (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.float64))
    whole = LocalGraph.single(numbers, *empty)
    part = LocalGraph.single(numbers[:5], *empty)  # 5 of 12 atoms: another Li:O ratio
    model._set_experts(whole, csd)
    mixed_whole = bb.global_mole_tensors.expert_mixing_coefficients.clone()
    model._set_experts(part, csd)
    mixed_part = bb.global_mole_tensors.expert_mixing_coefficients.clone()
    # fairchem's own coefficients for the whole system (its mean over every atom)
    bb.set_MOLE_coefficients(atomic_numbers_full=numbers, batch_full=torch.zeros_like(numbers),
                             csd_mixed_emb=csd)
    fairchem = bb.global_mole_tensors.expert_mixing_coefficients.detach()
    assert (mixed_whole - fairchem).abs().max() <= 1e-14
    assert (mixed_whole - mixed_part).abs().max() > 1e-4


# ---------------------------------------------------------------- what a FAIRChemCalculator holds
def _task(name, dataset, prop, level, dim, rmsd, refs=None) -> dict:
    base = "fairchem.core"
    task = {"_target_": f"{base}.units.mlip_unit.mlip_unit.Task", "name": name, "level": level,
            "property": prop, "datasets": [dataset],
            "out_spec": {"_target_": f"{base}.units.mlip_unit.mlip_unit.OutputSpec", "dim": dim,
                         "dtype": "float32"},
            "normalizer": {"_target_": f"{base}.modules.normalization.normalizer.Normalizer",
                           "mean": 0.0, "rmsd": rmsd}}
    if refs is not None:
        task["element_references"] = {
            "_target_": f"{base}.modules.normalization.element_references.ElementReferences",
            "element_references": refs}
    return task


def write_uma_checkpoint(path, seed: int = 2, experts: int = 4,
                         head: str = "DatasetSpecificSingleHeadWrapper", **backbone) -> None:
    """An inference checkpoint in UMA's layout (a ``HydraModel`` config with the MoE backbone,
    ``model_id`` "UMA-S-1.2", a ``DatasetSpecificSingleHeadWrapper`` energy/forces/stress head,
    tasks with normalisers (energy scale 30 / 20) and element references), random weights.
    ``head``: the energy head's wrapper (``DatasetSpecificMoEWrapper``: one expert per dataset).
    The element references are multiples of 1/64, so that fairchem's float32 sum of them is
    exact (fairchem adds them in the references' dtype, float32). ``backbone``: options of
    the backbone that replace the test's small ones (bench/bench_families.py uses larger)."""
    import hydra
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    uma = "fairchem.core.models.uma"
    config = {"_target_": "fairchem.core.models.base.HydraModel", "model_id": "UMA-S-1.2",
              "pass_through_head_outputs": True,
              "backbone": {"model": f"{uma}.escn_moe.eSCNMDMoeBackbone", "num_experts": experts,
                           "use_composition_embedding": True, **{**MOE_BACKBONE, **backbone}},
              "heads": {"efs": {"module": f"{uma}.escn_moe.{head}",
                                "head_cls": f"{uma}.escn_md.MLP_EFS_Head",
                                "dataset_names": ["omat", "omol"],
                                "head_kwargs": {"wrap_property": False}}}}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = hydra.utils.instantiate(config)
        refs = torch.round(torch.randn(101) * 3 * 64) / 64
    tasks = []
    for dataset, scale in (("omat", 30.0), ("omol", 20.0)):
        tasks += [_task(f"{dataset}_energy", dataset, "energy", "system", [1], scale, refs),
                  _task(f"{dataset}_forces", dataset, "forces", "atom", [3], scale),
                  _task(f"{dataset}_stress", dataset, "stress", "system", [1, 9], scale)]
    ema = torch.optim.swa_utils.AveragedModel(model)
    torch.save(MLIPInferenceCheckpoint(model_config=config, model_state_dict=model.state_dict(),
                                       ema_state_dict=ema.state_dict(), tasks_config=tasks), path)


def predict_unit(path, merge_mole: bool = False):
    from fairchem.core.units.mlip_unit.api.inference import InferenceSettings
    from fairchem.core.units.mlip_unit.predict import MLIPPredictUnit

    settings = InferenceSettings(base_precision_dtype=torch.float64, merge_mole=merge_mole)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MLIPPredictUnit(str(path), device="cpu", inference_settings=settings)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("uma") / "uma-random.pt"
    write_uma_checkpoint(path)
    return path


@pytest.mark.parametrize("name", ["oxide", pytest.param("slab", marks=pytest.mark.slow), "molecule"])
def test_predict_unit_equals_fairchem_calculator(checkpoint, name):
    """``wrap(predict_unit, task=...)`` and ``wrap(FAIRChemCalculator)`` (its task, "omol"
    here): equal to the FAIRChemCalculator's results (energy denormalised, element references
    added), float64, 1e-11, 1 and 3 parts, both modes."""
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator

    from distmlip.testing.adapters import calculator_reference

    unit = predict_unit(checkpoint)
    atoms = STRUCTURES[name]
    for task, obj in (("omat", None), ("omol", "calculator")):
        calc = FAIRChemCalculator(unit, task_name=task)
        model = distmlip.wrap(calc) if obj else distmlip.wrap(unit, task=task)
        assert isinstance(model, UMAModel) and model.task == task and model.num_experts == 4
        assert model.energy_scale == (30.0 if task == "omat" else 20.0)
        want = calculator_reference(calc, atoms, full_periodicity=True)
        worst = assert_matches_calculator(model, None, atoms, reference=want, energy_atol=1e-11,
                                          forces_atol=1e-11, stress_atol=1e-11,
                                          num_parts=(1, 3), dtype="float64")
        print(name, task, worst)
    # the references are in: the energy differs from the bare model's by their sum
    bare = evaluate(distmlip.DistributedCalculator(distmlip.wrap(unit.model.module, task="omol"),
                                                   dtype="float64"), atoms)
    refs = float(model.references[torch.as_tensor(atoms.numbers)].sum())
    assert abs(want["energy"] - (20.0 * bare["energy"] + refs)) <= 1e-9 * len(atoms)


def test_dataset_specific_moe_head(tmp_path):
    """UMA's ``DatasetSpecificMoEWrapper`` head (one expert per dataset, mixed by the task): the
    adapter merges the task's expert; equal to FAIRChemCalculator for each task, float64, 1e-11,
    1 and 3 parts; the two tasks' experts really differ."""
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator

    from distmlip.testing.adapters import calculator_reference

    path = tmp_path / "uma-moe-head.pt"
    write_uma_checkpoint(path, seed=5, head="DatasetSpecificMoEWrapper")
    unit = predict_unit(path)
    wrapper = unit.model.module.output_heads["efs"]
    assert type(wrapper).__name__ == "DatasetSpecificMoEWrapper" and wrapper.merged_on_dataset is None
    atoms = STRUCTURES["oxide"]
    energies = {}
    for task in ("omat", "omol"):
        calc = FAIRChemCalculator(unit, task_name=task)
        model = distmlip.wrap(unit, task=task)
        want = calculator_reference(calc, atoms, full_periodicity=True)
        assert_matches_calculator(model, None, atoms, reference=want, energy_atol=1e-11,
                                  forces_atol=1e-11, stress_atol=1e-11, num_parts=(1, 3),
                                  dtype="float64")
        energies[task] = (want["energy"] - float(model.references[torch.as_tensor(atoms.numbers)].sum())) \
            / model.energy_scale
    assert abs(energies["omat"] - energies["omol"]) > 1e-6, energies  # different experts
    assert wrapper.merged_on_dataset is None  # the caller's module is not modified
    with pytest.raises(ValueError, match=r"task: expected one of \['omat', 'omol'\]"):
        distmlip.wrap(unit.model.module, task="oc20")


def test_merged_predict_unit(checkpoint):
    """A predict unit whose experts fairchem merged (merge_mole, after a first prediction) is
    accepted for the composition it was merged for, and refuses another."""
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator

    from distmlip.testing.adapters import calculator_reference, oxide

    unit = predict_unit(checkpoint, merge_mole=True)
    calc = FAIRChemCalculator(unit, task_name="omat")
    calculator_reference(calc, STRUCTURES["oxide"])  # the first prediction merges
    assert type(unit.model.module.backbone).__name__ == "eSCNMDBackbone"  # merged: no experts
    model = distmlip.wrap(calc)
    assert model.num_experts == 0 and model.merged is not None
    bigger = oxide(repeat=(2, 1, 1), seed=7)  # the same reduced composition
    assert_matches_calculator(model, None, bigger, reference=calculator_reference(calc, bigger),
                              energy_atol=1e-11, forces_atol=1e-11, stress_atol=1e-11,
                              num_parts=(1, 3), modes=("halo",), dtype="float64")
    metal = STRUCTURES["metal"]
    metal_atoms = metal.copy()
    metal_atoms.calc = distmlip.DistributedCalculator(model, 2, dtype="float64")
    with pytest.raises(ValueError, match="numbers: expected the reduced composition"):
        metal_atoms.get_potential_energy()
    with pytest.raises(ValueError, match=r"task: expected 'omat' \(the experts of this predict "
                                         r"unit were merged"):
        distmlip.wrap(calc, task="omol")


def test_predict_unit_errors(checkpoint):
    unit = predict_unit(checkpoint)
    with pytest.raises(ValueError, match=r"task: expected one of \['omat', 'omol'\], got None"):
        distmlip.wrap(unit)  # two tasks: one must be chosen
    assert distmlip.models.fairchem.supports(unit)


@pytest.mark.mpi
@pytest.mark.slow
def test_moe_under_mpirun():
    """mpirun -n 2: the mixture of experts split over two ranks equals one process (1e-10)."""
    assert_ranks_pass("adapter.py", "fairchem-moe", expect="fairchem-moe 24 checks passed")


# ---------------------------------------------------------------- the layer protocol, owned rows
CountedUMA = counted(UMAModel)


def test_steps_compose_to_forward(uma64, moe64):
    """embed, the blocks + 1 steps and energies equal forward (float64, 1e-10), the exchanged
    state included, with and without experts, on a bulk, a slab and a molecule."""
    from distmlip.models.base import has_steps
    from distmlip.testing import check_steps

    for module in (uma64, moe64):
        model = UMAModel(module, task="omat")
        blocks = len(model.module.backbone.blocks)
        assert has_steps(model) and model.num_steps == blocks + 1 == model.num_layers
        for name in ("oxide", "slab", "molecule"):
            report = check_steps(model, STRUCTURES[name])
            assert report["ok"] and report["steps"], report["message"]
            assert len(report["levels"]) == blocks, report


def test_bounded_steps_equal_unbounded(moe64):
    """Parts one at a time (the bounded-memory path, halo mode) go through the steps, not the
    replay, and equal the unbounded result at 1e-10 (float64, experts mixed by the whole
    system's composition)."""
    from support import assert_bounded_by_steps

    assert_bounded_by_steps(CountedUMA(moe64, task="omat"), oxide(repeat=(2, 2, 2)))  # 96 atoms


def _count_uma_rows(model: UMAModel) -> dict:
    """Forward pre-hooks counting the rows given to UMA's node-wise modules: every block's
    ``norm_1``, ``norm_2`` and atom-wise feed-forward, the final norm and the energy head:
    {name: [rows per call]}."""
    bb = model.module.backbone
    rows: dict = {}

    def counter(name):
        def hook(module, args):
            rows.setdefault(name, []).append(int(args[0].shape[0]))
        return hook

    for i, block in enumerate(bb.blocks):
        for name in ("norm_1", "norm_2", "atom_wise"):
            getattr(block, name).register_forward_pre_hook(counter(f"{i}.{name}"))
    bb.norm.register_forward_pre_hook(counter("norm"))
    model.head.energy_block.register_forward_pre_hook(counter("energy"))
    return rows


def test_node_work_only_on_owned_rows(moe64):
    """4 parts in halo mode: UMA's node-wise work (every block's norms and atom-wise
    feed-forward, the final norm, the energy head) runs on exactly the owned rows, whose total
    over the parts is the number of atoms (before: every local row), with one exchange per
    block; extended mode computes every local row. Both equal the unsplit model's at 1e-10
    (``split_row_counts``) and fairchem's float64 forward at 1e-11."""
    model = distmlip.wrap(moe64, task="omat")
    atoms = oxide(repeat=(2, 2, 2))  # 96 atoms
    n = len(atoms)
    ref = fairchem_reference(moe64, atoms, torch.float64)
    blocks = len(model.module.backbone.blocks)
    names = {"norm", "energy"} | {f"{i}.{m}" for i in range(blocks)
                                  for m in ("norm_1", "norm_2", "atom_wise")}
    for mode, calc, rows, local in split_row_counts(model, atoms, _count_uma_rows):
        assert set(rows) == names, rows
        for name, counts in rows.items():
            assert sum(counts) == (n if mode == "halo" else local), (mode, name, counts)
        assert calc.runner.last_exchange_calls == (blocks if mode == "halo" else 0)
        got = evaluate(calc, atoms)
        assert abs(got["energy"] - ref["energy"]) <= 1e-11 * n
        assert np.abs(got["forces"] - ref["forces"]).max() <= 1e-11
        assert np.abs(got["stress"] - ref["stress"]).max() <= 1e-11


def test_checkpointed_edge_chunks(uma64):
    """fairchem's activation checkpointing (edges in chunks, on in its default
    ``InferenceSettings``) with chunks much smaller than the edges: the adapter sums the same
    chunks; equal to fairchem's float64 forward (1e-11), split or not, and the steps compose."""
    from distmlip.testing import check_steps

    module = copy.deepcopy(uma64)
    bb = module.backbone
    for layer in [bb.edge_degree_embedding, *(block.edge_wise for block in bb.blocks)]:
        layer.activation_checkpoint_chunk_size = 100
    atoms = STRUCTURES["oxide"]
    model = distmlip.wrap(module, task="omat")
    assert check_steps(model, atoms)["ok"]
    assert_matches_calculator(model, None, atoms,
                              reference=fairchem_reference(module, atoms, torch.float64),
                              energy_atol=1e-11, forces_atol=1e-11, stress_atol=1e-11,
                              num_parts=(1, 3), modes=("halo",))
