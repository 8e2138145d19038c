"""The SevenNet adapter (distmlip/models/sevenn.py) against SevenNet's own ASE calculator.

Structures (rattled so forces and stress are non-zero; small, SevenNet is heavy on CPU):
a rutile TiO2 bulk oxide (48 atoms), Cu fcc bulk (32 atoms) and a Cu(111) slab with
``pbc=[True, True, False]`` and 6 Å of vacuum each side (27 atoms; its cell has full rank, so
stress is defined for both calculators).

Tolerances, and why:

- distmlip vs ``sevenn.calculator.SevenNetCalculator("7net-0")``. SevenNet's weights are float32
  and its calculator runs in float32, so it is the reference only to float32 precision. With the
  model in float32 the two runs do the same arithmetic except for summation order (vesin's edge
  order differs from matscipy's, and distmlip sums energies and assembles forces in float64);
  with the model cast to float64 they differ by the whole float32 rounding of SevenNet's run.
  Measured on these structures (both dtypes, 1-5 parts, both modes): per-atom energies
  <= 7.3e-7 eV (under 1 float32 ulp, 9.5e-7 eV for |e| in [8, 16) eV), total energy
  <= 3.7e-7 eV/atom, forces <= 5.4e-6 eV/Å (float64 vs SevenNet's float32 on the oxide;
  <= 3.2e-6 in float32), stress <= 5e-8 eV/Å^3. Asserted:
    * total energy: 1e-6 eV/atom (the target precision; float32 resolves ~1e-6 relative of a
      ~-9 eV/atom energy, so this is about as tight as a float32 reference allows);
    * per-atom energies: 4 float32 ulps of the largest |e_i| (4 * 2^-23 * 16 eV = 7.6e-6 eV for
      the oxide's ~-9.6 eV Ti sites; 3.8e-6 eV for Cu at ~-4 eV): a single float32 per-atom
      energy cannot be compared more tightly than its own rounding step;
    * forces: 1e-5 eV/Å (the target);
    * stress: 1e-6 eV/Å^3 (1.6e-4 GPa; float32 virial of a ~1e-2 eV/Å^3 stress is good to ~1e-8).
- distmlip partitioned vs distmlip unpartitioned, in float64: relative error <= 1e-10
  (``distmlip.testing.assert_partition_invariant``; only summation order differs).

Runtime: ~2.5 min on 2 shared cores (``-m slow`` adds a 3-rank mpirun check, ~40 s).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import distmlip
from distmlip import DistributedCalculator
from distmlip.models.base import has_steps, no_exchange
from distmlip.models.sevenn import SevenNetModel
from distmlip.runtime.steps import uses_steps
from distmlip.testing import assert_partition_invariant, check_steps, evaluate
from distmlip.testing.battery import AdapterBattery

from support import CALLS, assert_close, counted, one_at_a_time
from support.adapters import RecordExchange, sevenn_rutile

warnings.filterwarnings("ignore", message=".*accelerat.*")  # sevenn: "no cuEq/flash" notice

PARTS = (1, 2, 3, 5)
MODES = ("halo", "extended")
EPS32 = float(np.finfo(np.float32).eps)

E_TOL = 1e-6  # eV/atom
F_TOL = 1e-5  # eV/Å
S_TOL = 1e-6  # eV/Å^3


def _ulp_tol(energies) -> float:
    """4 float32 ulps at the largest per-atom energy magnitude (eV)."""
    return 4.0 * EPS32 * 2.0 ** np.ceil(np.log2(np.max(np.abs(energies))))


def copper(seed=2, size=2):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((size,) * 3)
    atoms.rattle(0.05, seed=seed)
    return atoms


def slab(seed=3):
    from ase.build import fcc111

    atoms = fcc111("Cu", (3, 3, 3), vacuum=6.0)
    atoms.pbc = [True, True, False]
    atoms.rattle(0.05, seed=seed)
    return atoms


STRUCTURES = {"rutile_TiO2": sevenn_rutile, "cu_fcc": copper, "cu111_slab": slab}


@pytest.fixture(scope="module")
def model():
    return distmlip.load("sevennet-0")


_REF: dict = {}


def sevenn_reference(name: str, checkpoint: str = "7net-0", modal=None) -> dict:
    """SevenNet's own calculator on ``STRUCTURES[name]`` (cached)."""
    key = (name, checkpoint, modal)
    if key not in _REF:
        from sevenn.calculator import SevenNetCalculator

        calc = SevenNetCalculator(checkpoint, device="cpu", modal=modal)
        _REF[key] = evaluate(calc, STRUCTURES[name]())
    return _REF[key]


def assert_matches(result: dict, ref: dict, num_atoms: int, what: str):
    de = abs(result["energy"] - ref["energy"]) / num_atoms
    df = np.abs(result["forces"] - ref["forces"]).max()
    dei = np.abs(result["energies"] - ref["energies"]).max()
    ds = np.abs(result["stress"] - ref["stress"]).max()
    ei_tol = _ulp_tol(ref["energies"])
    assert de <= E_TOL, f"{what}: energy differs by {de:.2e} eV/atom > {E_TOL}"
    assert df <= F_TOL, f"{what}: forces differ by {df:.2e} eV/Å > {F_TOL}"
    assert dei <= ei_tol, f"{what}: per-atom energies differ by {dei:.2e} eV > {ei_tol:.1e}"
    assert ds <= S_TOL, f"{what}: stress differs by {ds:.2e} eV/Å^3 > {S_TOL}"


@pytest.fixture(scope="module")
def battery_source(model):
    return model.module


@pytest.fixture(scope="module")
def battery_model(model):
    return model


@pytest.fixture(params=list(STRUCTURES))
def battery_case(request):
    return request.param, STRUCTURES[request.param](), "grid"


@pytest.fixture(scope="module")
def battery_reference():
    return lambda name, atoms: sevenn_reference(name)


class TestSevenNetBattery(AdapterBattery):
    """The shared adapter battery: float32 (as shipped), 1, 2, 3 and 5 parts in both modes
    against SevenNet's calculator (tolerances in the module docstring); float64, 2, 3 and 5 parts
    in both modes against the unsplit model (1e-10 relative); finite-difference forces; the
    caller's module unchanged; an unknown option refused."""

    calculator_parts = PARTS
    calculator_modes = MODES
    tolerances = {"energy": E_TOL, "forces": F_TOL, "stress": S_TOL}
    min_reference_force = 0.0
    energies_sum_atol = None
    split_parts = (2, 3, 5)
    split_dtype = "float64"

    def tolerance(self, quantity, reference):
        if quantity == "energies":
            return _ulp_tol(reference["energies"])
        return self.tolerances[quantity]

    def small_structure(self):
        from distmlip.testing import small_triclinic

        return small_triclinic()

    def check_run(self, calc, model, parts, mode):
        assert calc.last_plan.num_parts == parts
        if mode == "halo" and parts > 1:
            # one exchange before each convolution but the first
            assert calc.runner.last_exchange_calls == model.num_layers - 1 == 4

    def check_split_report(self, report, model):
        assert len(report) == 6


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_float64_matches_sevennet(model, name):
    atoms = STRUCTURES[name]()
    result = evaluate(DistributedCalculator(model, num_parts=3, dtype="float64"), atoms)
    assert_matches(result, sevenn_reference(name), len(atoms), f"{name}, float64, 3 parts")


def test_partitioners_float64(model):
    """slab and METIS partitions of the oxide too (grid is covered above)."""
    assert_partition_invariant(model, sevenn_rutile(), num_parts=(4,), partitioners=("slab", "metis"),
                               modes=("halo",), dtype="float64", rtol=1e-10)


@pytest.mark.parametrize("name", ["small_triclinic", "multi_element_isolated"])
def test_awkward_structures(model, name):
    """A 3-atom cell smaller than the cutoff (atoms bonded to their own images; 7 parts, so some
    are empty) and three elements plus an atom without neighbours."""
    from sevenn.calculator import SevenNetCalculator

    from distmlip.testing import awkward_structures

    atoms = awkward_structures()[name]
    ref = evaluate(SevenNetCalculator("7net-0", device="cpu"), atoms)
    for parts, mode in [(7, "halo"), (2, "extended")]:
        result = evaluate(DistributedCalculator(model, num_parts=parts, mode=mode), atoms)
        assert_matches(result, ref, len(atoms), f"{name}, {mode}, {parts} parts")


def _count_rows(wrapped: SevenNetModel):
    """Forward hooks on every SevenNet module the adapter runs: ``{name: [rows of the output
    it wrote, per call]}`` (the runner deep-copies the model, hooks and the dict's lists go along)."""
    import sevenn._keys as KEY

    rows = {name: [] for name, _ in wrapped._plan}
    for name, _ in wrapped._plan:
        sub = wrapped.module._modules[name]
        written = getattr(sub, "key_output", None) or getattr(sub, "key_x", None) or KEY.SELF_CONNECTION_TEMP

        def hook(mod, inputs, out, name=name, written=written):
            rows[name].append(int(out[written].shape[0]) if written in out else None)

        sub.register_forward_hook(hook)
    return rows


class _RecordExchange(RecordExchange, SevenNetModel):
    """Records the rows given to and returned by each halo exchange, and each graph's rows."""


@pytest.mark.parametrize("workers", [1, 4])
def test_node_work_only_on_owned_rows(workers):
    """Halo mode, 4 parts (one worker, or 4 threads): every node-wise module after the first
    convolution (self-interactions, self-connections, gates, readout, shift/scale) and the first
    self-connection residual compute exactly the owned rows, N over all parts, but the
    pre-convolution ``{i}_self_interaction_1`` of the blocks after the first, which runs on the
    exchanged node features of every row (as the layer protocol's steps, whose state is h alone);
    the convolutions and the modules feeding the first one compute every local row (owned + halo);
    each exchange gets the owned rows and returns every row; float64 results equal 1 part to
    1e-10. In extended mode every module computes every local row."""
    from sevenn.util import load_checkpoint

    from distmlip.testing import rel_err

    atoms = sevenn_rutile()
    n_atoms = len(atoms)
    ref = evaluate(DistributedCalculator(distmlip.load("sevennet-0"), dtype="float64"), atoms)
    for mode in ("halo", "extended"):
        wrapped = _RecordExchange(load_checkpoint("7net-0").build_model())
        rows = _count_rows(wrapped)
        calc = DistributedCalculator(wrapped, num_parts=4, mode=mode, dtype="float64",
                                     device=["cpu"] * workers)
        result = evaluate(calc, atoms)
        for quantity in ("energy", "forces", "stress", "energies"):
            assert rel_err(result[quantity], ref[quantity]) <= 1e-10, (mode, quantity)
        graphs = calc.runner.replicas[torch.device("cpu")].graphs
        assert len(graphs) == workers
        local_rows = sum(n for _, _, n in graphs)
        assert local_rows > n_atoms  # the parts do have halos
        first_conv = next(i for i, (_, role) in enumerate(wrapped._plan) if role == "conv")
        every_row = {name for block in wrapped._layers["blocks"][1:] for name, _ in block[1]}
        assert every_row == {f"{i}_self_interaction_1" for i in range(1, wrapped.num_layers)}
        for i, (name, role) in enumerate(wrapped._plan):
            if name == "edge_embedding":
                continue
            seen = rows[name]
            assert len(seen) == workers, name
            if mode == "halo" and role != "conv" and name not in every_row \
                    and (i > first_conv or role == "intro"):
                assert sum(seen) == n_atoms, (name, seen)
            else:
                assert sum(seen) == local_rows, (mode, name, seen)
        calls = calc.runner.replicas[torch.device("cpu")].calls
        assert len(calls) == 4 * workers
        if mode == "halo":
            assert all(given == owned and back == n for owned, n, given, back in calls), calls
            assert all(needed == owned for owned, needed, _ in graphs)
        else:  # the no-op exchange, given every row
            assert all(given == back == n for _, n, given, back in calls), calls
            assert all(needed == n for _, needed, n in graphs)


class _NoExchange(SevenNetModel):
    def forward(self, graph):
        return super().forward(dataclasses.replace(graph, halo_exchange=no_exchange,
                                                   num_needed=graph.num_nodes))


def test_exchange_is_needed(model):
    """Negative control: without the halo exchange a split system gives wrong forces."""
    broken = _NoExchange(model.module, name="no-exchange")
    atoms = sevenn_rutile()
    ref = sevenn_reference("rutile_TiO2")
    result = evaluate(DistributedCalculator(broken, num_parts=3, mode="halo"), atoms)
    assert np.abs(result["forces"] - ref["forces"]).max() > 1e-2
    # the same model unsplit is right (the exchange is a no-op there)
    assert_matches(evaluate(DistributedCalculator(broken, num_parts=1), atoms), ref,
                   len(atoms), "no-exchange, 1 part")


def test_load_metadata_and_registry(model):
    assert isinstance(model, SevenNetModel)
    assert model.cutoff == 5.0
    assert model.num_layers == 5
    assert model.dtype == torch.float32
    assert {"sevennet-0", "sevennet-l3i5", "sevennet-mf-0"} <= set(distmlip.models.available_models())
    assert isinstance(distmlip.models.load("SevenNet-0"), SevenNetModel)


def test_wrap_raw_module_unmodified():
    """wrap() takes SevenNet's AtomGraphSequential as built from a checkpoint (batch mode) and as
    held by SevenNetCalculator (single mode); neither module is changed."""
    from sevenn.calculator import SevenNetCalculator
    from sevenn.util import load_checkpoint

    raw = load_checkpoint("7net-0").build_model()
    names = list(raw._modules)
    flags = [getattr(m, "_is_batch_data", None) for m in raw._modules.values()]
    wrapped = distmlip.wrap(raw)
    assert isinstance(wrapped, SevenNetModel) and wrapped.module is raw
    atoms = slab()
    ref = sevenn_reference("cu111_slab")
    assert_matches(evaluate(DistributedCalculator(wrapped, num_parts=2), atoms), ref,
                   len(atoms), "wrap(build_model())")
    assert list(raw._modules) == names
    assert [getattr(m, "_is_batch_data", None) for m in raw._modules.values()] == flags
    single = SevenNetCalculator("7net-0", device="cpu").model  # set_is_batch_data(False)
    assert_matches(evaluate(DistributedCalculator(distmlip.wrap(single), num_parts=2), atoms),
                   ref, len(atoms), "wrap(SevenNetCalculator.model)")


def test_l3i5_matches():
    atoms = slab()
    result = evaluate(DistributedCalculator(distmlip.load("sevennet-l3i5"), num_parts=2), atoms)
    assert_matches(result, sevenn_reference("cu111_slab", "7net-l3i5"), len(atoms), "l3i5")


def test_multi_fidelity_modal():
    atoms = slab()
    default = distmlip.load("sevennet-mf-0")
    assert default.modal == "PBE"
    pbe = evaluate(DistributedCalculator(default, num_parts=2), atoms)
    assert_matches(pbe, sevenn_reference("cu111_slab", "7net-mf-0", "PBE"), len(atoms), "mf-0 PBE")
    r2scan = distmlip.load("sevennet-mf-0", modal="r2scan")
    assert r2scan.modal == "R2SCAN"
    result = evaluate(DistributedCalculator(r2scan, num_parts=2), atoms)
    assert_matches(result, sevenn_reference("cu111_slab", "7net-mf-0", "R2SCAN"), len(atoms), "mf-0 R2SCAN")
    assert abs(result["energy"] - pbe["energy"]) > 1e-2  # the fidelity is really applied
    with pytest.raises(ValueError, match="modal: expected one of"):
        distmlip.load("sevennet-mf-0", modal="hse")


def test_errors(model):
    with pytest.raises(ValueError, match="name: expected one of"):
        distmlip.models.sevenn.load("sevennet-7")
    with pytest.raises(ValueError, match="modal: .*single fidelity"):
        distmlip.load("sevennet-0", modal="PBE")
    with pytest.raises(TypeError, match="module: expected a sevenn"):
        SevenNetModel(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unexpected keyword"):
        distmlip.load("sevennet-0", cutoff=6.0)
    from ase import Atoms

    atoms = Atoms("CuAm", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[8, 8, 8], pbc=True)
    atoms.calc = DistributedCalculator(model)
    with pytest.raises(ValueError,
                       match=r"numbers: sevennet-0 has no parameters for atomic number\(s\) \[95\]"):
        atoms.get_potential_energy()


# ---------------------------------------------------------------- the layer protocol
def make_small_sevenn(seed: int = 0, layers: int = 3):
    """A small SevenNet with random weights: SevenNet-0's configuration with 8 channels, l <= 2,
    ``layers`` convolutions (built by sevenn's own builder, so the module structure is SevenNet's)."""
    import copy

    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.util import load_checkpoint

    config = copy.deepcopy(load_checkpoint("7net-0").config)
    config.update(irreps_manual=["8x0e"] + ["8x0e+4x1e+2x2e"] * (layers - 1) + ["8x0e"], channel=8,
                  num_convolution_layer=layers, weight_nn_hidden_neurons=[8],
                  conv_denominator=[20.0] * layers, avg_num_neigh=[20.0] * layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_E3_equivariant_model(config)


_CountedSevenNet = counted(SevenNetModel)


@pytest.fixture(scope="module")
def small_module():
    return make_small_sevenn()


def _steps_model(which, model, small_module, cls=SevenNetModel):
    return cls(small_module if which == "small" else model.module, name=which)


@pytest.mark.parametrize("which", ["small", "sevennet-0"])
def test_steps_compose_to_forward(model, small_module, which):
    """The layer protocol (embed, one step per interaction block, the readout as energies)
    composes to forward in float64: per-atom energies, their edge gradient and every exchanged
    state (the node features h entering each block but the first) within 1e-10."""
    wrapped = _steps_model(which, model, small_module)
    assert wrapped.exchanged == (0,) and has_steps(wrapped)
    report = check_steps(wrapped, sevenn_rutile(), dtype=torch.float64)
    assert report["ok"] and len(report["levels"]) == wrapped.num_layers - 1, report["message"]
    assert max(report["energies"], report["gradient"], *report["levels"]) <= 1e-10, report


@pytest.mark.parametrize("which", ["small", "sevennet-0"])
def test_stored_state_is_one_feature_row(model, small_module, which):
    """The steps' state between blocks is the node features h alone (exchanged; each step runs
    its block's self_interaction_1 on every row itself): the bounded-memory mode stores one row of
    features per atom and level, the width of h (SevenNet-0: 480 floats, 1,920 bytes in float32;
    with x = self_interaction_1(h) beside it, as before, twice that)."""
    from distmlip.graph import NeighborGraph
    from distmlip.runtime.memory import _state_widths

    wrapped = _steps_model(which, model, small_module)
    atoms = sevenn_rutile()
    widths, edge_widths = _state_widths(wrapped, NeighborGraph.from_atoms(atoms, wrapped.cutoff),
                                        wrapped.dtype, torch.device("cpu"))
    size = torch.finfo(wrapped.dtype).bits // 8
    # block i + 1's input features: the output of block i, the state of level i
    h = [wrapped.module._modules[f"{i}_self_interaction_1"].linear.irreps_in.dim
         for i in range(1, wrapped.num_layers)]
    assert widths == tuple(d * size for d in h) and edge_widths == (), (widths, h)
    if which == "sevennet-0":
        assert wrapped.dtype == torch.float32 and widths == (1920,) * 4, widths


def test_steps_refused_for_other_structures(small_module):
    """A structure the steps do not describe (here a block without its self-connection intro)
    keeps the generic path: exchanged = None."""
    import copy

    broken = copy.deepcopy(small_module)
    del broken._modules["1_self_connection_intro"]
    wrapped = SevenNetModel(broken)
    assert wrapped.exchanged is None and not has_steps(wrapped)


@pytest.mark.parametrize("which", ["small", "sevennet-0"])
def test_bounded_steps_equal_unbounded(model, small_module, which, own_cache):
    """float64, 4 parts one at a time (halo mode; the path a tight max_memory takes): the steps
    path (step calls, forward only on the runtime's probe) equals the unbounded evaluation and the
    generic replay (layer_steps=False) within 1e-10 in energy, forces, stress and per-atom
    energies."""
    wrapped = _steps_model(which, model, small_module, _CountedSevenNet)
    atoms = sevenn_rutile()
    ref = evaluate(DistributedCalculator(wrapped, 1, dtype="float64"), atoms)
    CALLS.clear()
    calc = one_at_a_time(wrapped, 4, dtype="float64")  # the probe: when it is built
    got = evaluate(calc, atoms)
    assert_close(got, ref, 1e-10, f"{which}: steps")
    assert calc.runner.sequential and calc.last_plan.num_parts == 4 and uses_steps(calc.runner)
    # 4 parts: L - 1 steps forward and L backward each, plus the probe's L (when the calculator
    # is built); forward on the probe
    assert CALLS == {"forward": 1, "step": 4 * (2 * wrapped.num_layers - 1) + wrapped.num_layers}, CALLS
    assert calc.runner.last_exchange_calls == wrapped.num_layers - 1
    generic = one_at_a_time(wrapped, 4, dtype="float64")
    generic.runner.layer_steps = False
    CALLS.clear()
    assert_close(evaluate(generic, atoms), got, 1e-10, f"{which}: generic vs steps")
    assert not uses_steps(generic.runner) and CALLS["step"] == 0 and CALLS["forward"] > 4, CALLS


def test_max_memory_budget_takes_the_steps(small_module):
    """A max_memory budget of 0.4 x the estimate (864 Cu atoms: in a small cell the floor, one
    atom's neighbourhood, is close to the whole need) splits the system into several parts
    evaluated one at a time through the steps, within 1e-10 of the unbounded result (float64)."""
    from distmlip import estimate_memory

    wrapped = _CountedSevenNet(small_module)
    atoms = copper(size=6)
    ref = evaluate(DistributedCalculator(wrapped, 1, dtype="float64"), atoms)
    budget = int(0.4 * estimate_memory(wrapped, atoms, dtype="float64"))
    calc = DistributedCalculator(wrapped, max_memory=budget, dtype="float64")
    CALLS.clear()
    assert_close(evaluate(calc, atoms), ref, 1e-10, "budget")
    assert calc.runner.sequential and calc.last_plan.num_parts > 1 and uses_steps(calc.runner)
    assert CALLS["step"] > 0 and CALLS["forward"] <= 1, CALLS


def test_multi_fidelity_steps():
    """SevenNet-MF-0 with a fidelity chosen (the modality rides in the data dict, its one-hot
    is rebuilt in every step) has steps that compose to forward; once prepare_modal_deploy fixed
    the fidelity inside the module it keeps the generic path."""
    import copy

    wrapped = distmlip.load("sevennet-mf-0", modal="r2scan")
    assert wrapped.exchanged == (0,)
    report = check_steps(wrapped, sevenn_rutile(), dtype=torch.float64)
    assert report["ok"], report["message"]
    assert max(report["energies"], report["gradient"], *report["levels"]) <= 1e-10, report
    deployed = copy.deepcopy(wrapped.module)
    deployed.prepare_modal_deploy("R2SCAN")
    assert SevenNetModel(deployed).exchanged is None


@pytest.mark.slow
@pytest.mark.mpi
def test_multi_process_matches_sevennet(tmp_path):
    """One part per rank under the venv's mpirun (3 ranks, gloo), both modes (~40 s):
    tests/mpi/scripts/sevennet.py."""
    import json

    from support import BIN, launch

    if not (BIN / "mpirun").exists():
        pytest.skip(f"{BIN / 'mpirun'} is missing")
    out = tmp_path / "out.json"
    proc, _ = launch("mpirun", 3, "sevennet.py", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    ref = sevenn_reference("rutile_TiO2")
    for mode, res in results.items():
        assert res.pop("world") == 3
        res = {k: np.asarray(v) for k, v in res.items()}
        assert_matches(res, ref, len(res["forces"]), f"mpirun -n 3, {mode}")
