"""matgl TensorNet and M3GNet through ``distmlip.wrap``: equal to matgl's own ``PESCalculator``,
whatever the split.

The models are a randomly initialised TensorNet (16 units, 2 interactions, 8 Gaussians, 4 Å) and
M3GNet (16 units, 2 blocks, 5 Å, three-body 4 Å), each in a ``Potential`` with a scale
(``data_std`` 1000 and 3000, so that forces are ~0.1-5 eV/Å), a shift and per-element references:
matgl's pretrained weights download at run time. The float64 reference
is matgl's calculator with ``matgl.set_default_dtype("float", 64)`` and its pymatgen neighbour list
(its Warp neighbour list casts the cell to float32); the float32 one is matgl's defaults.
matgl treats any non-periodic direction as a molecule, so the slab (periodic in x, y) is compared
with matgl's result for the same slab in a periodic cell (12 Å of vacuum > cutoff: same graph).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import matgl
import numpy as np
import pytest
import torch

import distmlip
from distmlip.models.matgl import M3GNetModel, TensorNetModel
from distmlip.testing import assert_partition_invariant, evaluate
from distmlip.testing.adapters import (
    ADAPTER_ELEMENTS,
    ADAPTER_SPLITS,
    adapter_structures,
    assert_matches_calculator,
    calculator_reference,
    oxide,
)

from support import CALLS, counted
from support.adapters import make_matgl, split_row_counts


@contextlib.contextmanager
def matgl_dtype(bits: int):
    """matgl's global float dtype (and torch's default, which matgl sets with it), restored after;
    in float64 also matgl's pymatgen neighbour list."""
    import matgl.ext.ase as mase

    saved = (matgl.float_th, matgl.float_np, torch.get_default_dtype(), mase._alchmtk_available)
    matgl.set_default_dtype("float", bits)
    if bits == 64:
        mase._alchmtk_available = False
    try:
        yield
    finally:
        matgl.float_th, matgl.float_np = saved[:2]
        torch.set_default_dtype(saved[2])
        mase._alchmtk_available = saved[3]


@pytest.fixture(scope="module")
def potential():
    return make_matgl()


@pytest.fixture(scope="module")
def potential64(potential):
    return copy.deepcopy(potential).double()


@pytest.fixture(scope="module")
def m3gnet():
    return make_matgl(arch="M3GNet")


@pytest.fixture(scope="module")
def m3gnet64(m3gnet):
    return copy.deepcopy(m3gnet).double()


def matgl_reference(potential, atoms, bits: int) -> dict:
    from matgl.ext.ase import PESCalculator

    with matgl_dtype(bits):  # a slab: matgl needs a periodic cell
        return calculator_reference(PESCalculator(potential, stress_unit="eV/A3"), atoms,
                                    full_periodicity=True)


STRUCTURES = adapter_structures()
SPLITS = ADAPTER_SPLITS


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_float64_equals_matgl(potential64, name):
    """Every split, both modes, equals matgl's float64 calculator to ~1e-12."""
    atoms = STRUCTURES[name]
    model = distmlip.wrap(potential64)
    worst = assert_matches_calculator(
        model, None, atoms, reference=matgl_reference(potential64, atoms, 64),
        energy_atol=1e-9, forces_atol=1e-8, stress_atol=1e-9, partitioners=SPLITS[name])
    print(name, worst)


@pytest.mark.parametrize("name", ["oxide", "slab", "molecule"])
def test_float32_equals_matgl(potential, name):
    """float32 against matgl's float32 calculator: 5e-5 eV/atom, 2e-5 eV/Å, 1e-6 eV/Å^3 (energies
    here are ~100 eV/atom, so these are ~5e-7 relative; measured: 1.9e-5, 2.9e-6, 8e-8)."""
    atoms = STRUCTURES[name]
    worst = assert_matches_calculator(
        distmlip.wrap(potential), None, atoms, reference=matgl_reference(potential, atoms, 32),
        energy_atol=5e-5, forces_atol=2e-5, stress_atol=1e-6, num_parts=(1, 3))
    print(name, worst)


@pytest.mark.parametrize("name", ["oxide", "slab", "molecule"])
def test_split_equals_whole(potential64, name):
    """float64, every partitioner, 1, 2, 3, 5 parts, both modes: 1e-10."""
    report = assert_partition_invariant(TensorNetModel(potential64), STRUCTURES[name],
                                        num_parts=(1, 2, 3, 5), rtol=1e-10)
    assert max(r["max_err"] for r in report) <= 1e-10


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_m3gnet_float64_equals_matgl(m3gnet64, name):
    """M3GNet (three-body terms): every split, both modes, equals matgl's float64 calculator."""
    atoms = STRUCTURES[name]
    model = distmlip.wrap(m3gnet64)
    assert isinstance(model, M3GNetModel)
    worst = assert_matches_calculator(
        model, None, atoms, reference=matgl_reference(m3gnet64, atoms, 64),
        energy_atol=1e-9, forces_atol=1e-8, stress_atol=1e-9, partitioners=SPLITS[name])
    print(name, worst)


@pytest.mark.parametrize("name", ["oxide", "molecule"])
def test_m3gnet_float32_equals_matgl(m3gnet, name):
    """M3GNet float32 against matgl's float32 calculator (tolerances as for TensorNet)."""
    atoms = STRUCTURES[name]
    worst = assert_matches_calculator(
        distmlip.wrap(m3gnet), None, atoms, reference=matgl_reference(m3gnet, atoms, 32),
        energy_atol=5e-5, forces_atol=2e-5, stress_atol=1e-6, num_parts=(1, 3))
    print(name, worst)


@pytest.mark.parametrize("name", ["oxide", "slab"])
def test_m3gnet_split_equals_whole(m3gnet64, name):
    report = assert_partition_invariant(M3GNetModel(m3gnet64), STRUCTURES[name],
                                        num_parts=(1, 2, 3, 5), rtol=1e-10)
    assert max(r["max_err"] for r in report) <= 1e-10


@pytest.mark.parametrize("smooth", [False, True])
def test_m3gnet_saves_and_loads(tmp_path, m3gnet64, smooth):
    """matgl's M3GNet does not pickle (its bases hold ``sympy.lambdify`` functions); the wrapped
    model does: ``torch.save`` stores how the functions are built, ``torch.load`` builds them
    again, and the loaded model gives the same energy, forces and stress (bitwise). The caller's
    Potential is left as it was. ``smooth``: matgl's smooth Bessel basis, built from the float
    cutoff (4.7 Å: not exact in float32)."""
    from matgl.apps.pes import Potential
    from matgl.models import M3GNet

    potential = m3gnet64
    if smooth:
        torch.manual_seed(3)
        model = M3GNet(element_types=ADAPTER_ELEMENTS, dim_node_embedding=16, dim_edge_embedding=16,
                       units=16, nblocks=2, max_n=3, max_l=3, cutoff=4.7, threebody_cutoff=3.9,
                       use_smooth=True, is_intensive=False)
        potential = Potential(model=model, data_std=3000.0).double()
    wrapped = distmlip.wrap(potential)
    torch.save(wrapped, tmp_path / "m3gnet.pt")
    loaded = torch.load(tmp_path / "m3gnet.pt", weights_only=False)
    bases = [m for m in loaded.modules() if hasattr(m, "funcs")]
    assert len(bases) == 3
    if not smooth:  # built again, not carried over (the smooth ones are cached by matgl)
        before, after = (m.module.model.basis_expansion.shf.funcs for m in (wrapped, loaded))
        assert after[1] is not before[1]
    atoms = oxide()
    first, second = (evaluate(distmlip.DistributedCalculator(m), atoms) for m in (wrapped, loaded))
    for key in ("energy", "forces", "stress"):
        assert np.array_equal(first[key], second[key]), key
    assert type(potential.model.bond_expansion.rbf.funcs) is list  # the caller's is untouched
    with pytest.raises(Exception, match="lambdify"):
        torch.save(potential, tmp_path / "potential.pt")


def _count_m3gnet_rows(model: M3GNetModel) -> dict:
    """Forward pre-hooks counting the rows given to M3GNet's node-wise maps: every block's
    three-body gate (``update_network_atom``; from block 1 on it reads the node features the
    block before updated) and the readout (``final_layer``, after the last block):
    {name: [rows per call]}."""
    m = model._m3gnet
    rows: dict = {}

    def counter(name):
        def hook(module, args):
            rows.setdefault(name, []).append(int(args[0].shape[0]))
        return hook

    for i, block in enumerate(m.three_body_interactions):
        block.update_network_atom.register_forward_pre_hook(counter(f"{i}.gate"))
    m.final_layer.register_forward_pre_hook(counter("readout"))
    return rows


def test_m3gnet_node_work_only_on_owned_rows(m3gnet64):
    """4 parts in halo mode: M3GNet's node-wise work (the three-body gate of every block after
    the first, the node updates feeding it, the readout) runs on exactly the owned rows, whose
    total over the parts is the number of atoms (before: every local row), with one exchange
    (node features and gate together) before every block after the first; the first block's gate
    is per element (its table: one row per element type). Extended mode computes every local row.
    Both equal the unsplit model's at 1e-10 (``split_row_counts``) and matgl's float64
    calculator."""
    model = distmlip.wrap(m3gnet64)
    assert isinstance(model, M3GNetModel)
    atoms = oxide(repeat=(2, 2, 2))  # 96 atoms
    n = len(atoms)
    ref = matgl_reference(m3gnet64, atoms, 64)
    nblocks = model._m3gnet.n_blocks
    table = len(model._m3gnet.element_types)
    for mode, calc, rows, local in split_row_counts(model, atoms, _count_m3gnet_rows):
        assert set(rows) == {"readout"} | {f"{i}.gate" for i in range(nblocks)}
        assert set(rows["0.gate"]) == {table}, rows["0.gate"]
        for name, counts in rows.items():
            if name != "0.gate":
                assert sum(counts) == (n if mode == "halo" else local), (mode, name, counts)
        assert calc.runner.last_exchange_calls == (nblocks - 1 if mode == "halo" else 0)
        got = evaluate(calc, atoms)
        assert abs(got["energy"] - ref["energy"]) / n < 1e-9
        assert np.abs(got["forces"] - ref["forces"]).max() < 1e-8
        assert np.abs(got["stress"] - ref["stress"]).max() < 1e-9


def test_bare_tensornet_and_energies(potential64):
    """A bare TensorNet (no scale, shift or references) equals Potential(model) with defaults;
    per-atom energies add up to the total."""
    from matgl.apps.pes import Potential

    atoms = STRUCTURES["oxide"]
    from distmlip.models._adapter import private_copy

    bare = private_copy(potential64.model)
    ref = matgl_reference(Potential(model=bare, calc_stresses=True).double(), atoms, 64)
    assert_matches_calculator(distmlip.wrap(bare), None, atoms, reference=ref, energy_atol=1e-10,
                              forces_atol=1e-10, stress_atol=1e-10, num_parts=(1, 3),
                              modes=("halo",))
    calc = distmlip.DistributedCalculator(distmlip.wrap(potential64), num_parts=3)
    work = atoms.copy()
    work.calc = calc
    assert abs(work.get_potential_energies().sum() - work.get_potential_energy()) < 1e-9


def test_tensornet_gets_matgl_index_dtype(potential):
    """matgl's message sums get the edge index in matgl's own dtype, int32 (torch's CPU
    ``index_add`` on matgl's permuted messages takes a ~15x slower ``scatter_add`` route with an
    int64 index: 1.4x matgl's calculator's time on 324 atoms before); int64 only past int32's
    range."""
    from distmlip.models.matgl import _index_dtype

    model = TensorNetModel(potential)
    m = model._tensornet
    seen = []

    def recording(name, aggregate):
        def wrapper(messages, index, dim_size):
            seen.append((name, index.dtype))
            return aggregate(messages, index, dim_size)
        return wrapper

    # the adapter calls the modules' aggregate methods: instance attributes shadow them
    for name, mod in [("embedding", m.tensor_embedding)] + [("layer", layer) for layer in m.layers]:
        mod.aggregate = recording(name, mod.aggregate)
    try:
        calc = distmlip.DistributedCalculator(model, num_parts=2)
        atoms = STRUCTURES["oxide"].copy()
        atoms.calc = calc
        atoms.get_forces()
    finally:
        for mod in [m.tensor_embedding, *m.layers]:
            del mod.aggregate
    assert {name for name, _ in seen} == {"embedding", "layer"}, seen
    assert {dtype for _, dtype in seen} == {torch.int32}, seen
    assert _index_dtype(2**31 - 1) == torch.int32 and _index_dtype(2**31) == torch.int64


def _count_tensornet_rows(model: TensorNetModel) -> dict:
    """Forward pre-hooks counting the rows given to TensorNet's node-wise maps: the embedding's
    ``LayerNorm``, every interaction's first (before the messages) and last (after) channel
    mixing, the readout's ``LayerNorm``: {name: [rows per call]}."""
    m = model._tensornet
    rows: dict = {}

    def counter(name):
        def hook(module, args):
            rows.setdefault(name, []).append(int(args[0].shape[0]))
        return hook

    m.tensor_embedding.init_norm.register_forward_pre_hook(counter("embedding"))
    for i, layer in enumerate(m.layers):
        layer.linears_tensor[0].register_forward_pre_hook(counter(f"{i}.before"))
        layer.linears_tensor[3].register_forward_pre_hook(counter(f"{i}.after"))
    m.out_norm.register_forward_pre_hook(counter("readout"))
    return rows


def test_tensornet_node_work_only_on_owned_rows(potential64):
    """4 parts in halo mode: TensorNet's node-wise work (embedding update, both channel mixings
    of every interaction, readout) runs on exactly the owned rows, whose total over the parts is
    the number of atoms (before: every local row), with one exchange per interaction; extended
    mode computes every local row. Both equal the unsplit model's at 1e-10 (``split_row_counts``)
    and matgl's float64 calculator."""
    model = distmlip.wrap(potential64)
    atoms = oxide(repeat=(2, 2, 2))  # 96 atoms
    n = len(atoms)
    ref = matgl_reference(potential64, atoms, 64)
    nblocks = len(model._tensornet.layers)
    for mode, calc, rows, local in split_row_counts(model, atoms, _count_tensornet_rows):
        assert set(rows) == {"embedding", "readout"} | {f"{i}.{w}" for i in range(nblocks)
                                                         for w in ("before", "after")}
        for name, counts in rows.items():
            assert sum(counts) == (n if mode == "halo" else local), (mode, name, counts)
        assert calc.runner.last_exchange_calls == (nblocks if mode == "halo" else 0)
        got = evaluate(calc, atoms)
        assert abs(got["energy"] - ref["energy"]) / n < 1e-9
        assert np.abs(got["forces"] - ref["forces"]).max() < 1e-8
        assert np.abs(got["stress"] - ref["stress"]).max() < 1e-9


def test_warp_built_model_is_rebuilt_without_warp():
    """A TensorNet built with matgl's Warp kernels runs through the plain layers with the same
    weights, and equals matgl's own (Warp) evaluation."""
    from matgl.models._tensornet import _warp_available

    if not _warp_available:
        pytest.skip("matgl's Warp kernels are not installed")
    warp = make_matgl(seed=2, use_warp=True).double()
    assert warp.model._use_warp
    atoms = STRUCTURES["metal"]
    ref = matgl_reference(warp, atoms, 64)
    # Warp's kernels sum in another order: ~1e-11 relative (energies are ~100 eV/atom)
    worst = assert_matches_calculator(distmlip.wrap(warp), None, atoms, reference=ref,
                                      energy_atol=1e-8, forces_atol=1e-7, stress_atol=1e-8,
                                      num_parts=(2,), modes=("halo",))
    print(worst)


def test_errors(potential):
    from ase.build import bulk
    from matgl.models import TensorNet

    model = distmlip.wrap(potential)
    with pytest.raises(ValueError, match=r"numbers: TensorNet has no parameters for atomic "
                                         r"number\(s\) \[26\] \(Fe\); it knows "):
        calc = distmlip.DistributedCalculator(model)
        atoms = bulk("Fe", "bcc", a=2.87)
        atoms.calc = calc
        atoms.get_potential_energy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        intensive = TensorNet(element_types=ADAPTER_ELEMENTS, units=8, nblocks=1, is_intensive=True,
                              use_warp=False)
    with pytest.raises(ValueError, match="is_intensive=False"):
        distmlip.wrap(intensive)
    with pytest.raises(TypeError, match="^task: expected no options for matgl models"):
        distmlip.wrap(potential, task="omat")


@pytest.mark.mpi
@pytest.mark.slow
def test_under_mpirun():
    """mpirun -n 2: TensorNet and M3GNet split over two ranks equal the single-process result
    (1e-10)."""
    from support import launch

    for name in ("matgl", "matgl-m3gnet"):
        proc, _ = launch("mpirun", 2, "adapter.py", name)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        for rank in range(2):
            assert f"rank {rank}: {name} 24 checks passed" in out, out[-4000:]


# ---------------------------------------------------------------- the layer protocol
CountedTensorNet = counted(TensorNetModel)


def test_tensornet_steps_compose_to_forward(potential64):
    """embed, the nblocks + 1 steps and energies equal forward (float64, 1e-10), exchanged state
    included, on a periodic bulk and a slab; the model declares its steps."""
    from distmlip.models.base import has_steps
    from distmlip.testing import check_steps

    model = TensorNetModel(potential64)
    assert has_steps(model) and model.num_steps == len(model._tensornet.layers) + 1
    for name in ("oxide", "slab"):
        report = check_steps(model, STRUCTURES[name])
        assert report["ok"] and report["steps"], report["message"]
        assert len(report["levels"]) == len(model._tensornet.layers), report


def test_tensornet_bounded_steps_equal_unbounded(potential64):
    """Parts one at a time (the bounded-memory path) go through the steps, not the replay, and
    equal the unbounded result at 1e-10 (float64)."""
    from support import assert_bounded_by_steps

    assert_bounded_by_steps(CountedTensorNet(potential64), oxide(repeat=(2, 2, 2)))  # 96 atoms


def test_tensornet_budget_takes_the_steps(potential64):
    """A ``max_memory`` budget small enough for several parts, one at a time, goes through the
    steps and equals the unbounded result at 1e-10 (float64)."""
    from distmlip import estimate_memory
    from distmlip.runtime.steps import uses_steps

    from support import assert_close

    model = CountedTensorNet(potential64)
    atoms = oxide(repeat=(2, 2, 2))  # 96 atoms
    ref = evaluate(distmlip.DistributedCalculator(model, 1), atoms)
    calc = distmlip.DistributedCalculator(model, 1, max_memory=int(0.4 * estimate_memory(model, atoms)))
    CALLS.clear()
    assert_close(evaluate(calc, atoms), ref, 1e-10, "budget")
    assert calc.runner.sequential and calc.last_plan.num_parts > 1 and uses_steps(calc.runner)
    assert CALLS["step"] > 0 and CALLS["forward"] <= 1, CALLS


CountedM3GNet = counted(M3GNetModel)


@pytest.mark.parametrize("name", ["oxide", "slab", "molecule"])
def test_m3gnet_steps_compose_to_forward(m3gnet, name):
    """M3GNet: embed, one step per block and energies (bond features as an edge entry, node
    features and the next gate exchanged) equal forward: float64 (1e-12) and float32."""
    from distmlip.models.base import has_steps
    from distmlip.testing import check_steps

    model = M3GNetModel(m3gnet)
    assert has_steps(model) and model.exchanged == (1,) and model.edge_entries == (0,)
    assert model.num_steps == model._m3gnet.n_blocks
    report = check_steps(model, STRUCTURES[name], dtype=torch.float64)
    assert report["ok"] and report["steps"] and max(report["energies"], report["gradient"]) < 1e-12, \
        report["message"]
    assert len(report["levels"]) == model._m3gnet.n_blocks - 1, report
    assert check_steps(model, STRUCTURES[name], dtype=torch.float32)["ok"]


@pytest.mark.parametrize("name", ["oxide", "slab"])
def test_m3gnet_bounded_steps_equal_unbounded(m3gnet64, name):
    """M3GNet: parts one at a time in halo mode go by the steps (forward only on the runtime's
    probe, run when the calculator is built; 2 L - 1 steps per part and call) and equal the
    unbounded result within 1e-10 (float64: energy, forces, stress, per-atom energies): 3 metis,
    4 grid, 5 parts, one worker or two."""
    from support import assert_steps_counted

    model = CountedM3GNet(m3gnet64)
    atoms = STRUCTURES[name].repeat((2, 1, 1))
    ref = evaluate(distmlip.DistributedCalculator(M3GNetModel(m3gnet64), 1), atoms)
    assert "energies" in ref
    assert_steps_counted(model, atoms, ref)
