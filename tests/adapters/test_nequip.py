"""NequIP and Allegro through ``distmlip.wrap``: equal to NequIP's own ASE calculator, whatever
the split.

Small randomly initialised float64 models built with the public builders
(``nequip.model.NequIPGNNModel``, ``allegro.model.AllegroModel``): pretrained NequIP models are
downloaded at run time and cannot be used here. Per-type energy scales of 20-30 make forces
~0.1-1 eV/Å, so that the partition-invariance errors (relative to max(max|ref|, 1)) measure
forces at their own scale.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import distmlip
from distmlip import DistributedCalculator
from distmlip.models.base import has_steps
from distmlip.models.nequip import NequIPModel
from distmlip.runtime.steps import uses_steps
from distmlip.testing import adapters as adapters
from distmlip.testing import assert_partition_invariant, check_steps, evaluate, format_report, rel_err
from distmlip.testing.battery import AdapterBattery

from support import CALLS, assert_close, counted, one_at_a_time
from support.adapters import (
    NEQUIP_R_MAX,
    NEQUIP_TYPES,
    WithoutExchange,
    make_allegro,
    make_nequip,
    nequip_build,
    nequip_common,
    nequip_metal,
    nequip_oxide,
    split_row_counts,
)


def surface():
    """Al(100) slab 3x3x4 (36 atoms), periodic in x, y only, 5 Å of vacuum each side."""
    return adapters.slab(size=(3, 3, 4), vacuum=5.0)


STRUCTURES = {"oxide": (nequip_oxide, "grid"), "metal": (nequip_metal, "grid"),
              "surface": (surface, "metis")}
BUILDERS = {"nequip": make_nequip, "allegro": make_allegro}


@pytest.fixture(autouse=True)
def _keep_default_dtype():
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module", params=list(BUILDERS))
def setup(request):
    """(architecture name, raw model, wrapped model, NequIP's calculator)."""
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms

    if request.param == "allegro":
        pytest.importorskip("allegro.model",
                            reason="nequip-allegro is not installed (pip install distmlip[nequip])")
    model = BUILDERS[request.param]()
    calc = NequIPCalculator(
        model, device="cpu",
        transforms=basic_transforms(model.metadata, NEQUIP_R_MAX, NEQUIP_TYPES, {t: t for t in NEQUIP_TYPES}),
    )
    return request.param, model, distmlip.wrap(model), calc


def _reference(calc, atoms) -> dict:
    """NequIP's calculator's results. It builds its input tensors in torch's default dtype, which
    nequip's global state sets to float64 (restored afterwards for the other tests)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        work = atoms.copy()
        work.calc = calc
        out = {"energy": work.get_potential_energy(), "forces": work.get_forces(),
               "stress": work.get_stress(voigt=True), "energies": work.get_potential_energies()}
    finally:
        torch.set_default_dtype(previous)
    assert out["forces"].dtype == np.float64
    return out


def test_wrap_infers_cutoff_and_receptive_field(setup):
    name, model, wrapped, _ = setup
    assert isinstance(wrapped, NequIPModel)
    assert wrapped.module is not model  # the adapter hooks its own copy (the copy policy)
    assert wrapped.cutoff == pytest.approx(NEQUIP_R_MAX)
    # NequIP: one hop per interaction block; Allegro: strictly local whatever its layers
    assert wrapped.num_layers == {"nequip": 3, "allegro": 1}[name]
    assert distmlip.wrap(wrapped) is wrapped


@pytest.fixture(scope="module")
def battery_source(setup):
    return setup[1]


@pytest.fixture(scope="module")
def battery_model(setup):
    return setup[2]


@pytest.fixture(params=list(STRUCTURES))
def battery_case(request):
    build, partitioner = STRUCTURES[request.param]
    return request.param, build(), partitioner


@pytest.fixture(scope="module")
def battery_reference(setup):
    return lambda name, atoms: _reference(setup[3], atoms)


class TestNequIPBattery(AdapterBattery):
    """The shared adapter battery, for NequIP and Allegro: unsplit vs NequIP's calculator
    (1e-6 eV/atom, 1e-5 eV/Å, 1e-6 eV/Å^3, 1e-6 eV per atom), 2, 3 and 5 parts in both modes vs
    unsplit (float64, 1e-10 relative), finite-difference forces, the caller's module unchanged
    (no hooks added to it), an unknown option refused."""

    def small_structure(self):
        return adapters.oxide()  # one cell, 12 atoms

    def check_split_report(self, report, model):
        for row in report:
            expected = model.num_layers - 1 if row["mode"] == "halo" else 0
            assert row["exchange_calls"] == expected


def test_nequip_needs_the_exchange(setup):
    """NequIP split without the ghost-exchange hook gives wrong forces: the hook is what makes
    the invariance above hold."""
    name, _, wrapped, _ = setup
    if name != "nequip":
        pytest.skip("Allegro exchanges nothing")
    atoms = nequip_metal()
    one = evaluate(DistributedCalculator(wrapped, num_parts=1), atoms)
    split = evaluate(DistributedCalculator(WithoutExchange(wrapped), num_parts=3), atoms)
    assert np.abs(split["forces"] - one["forces"]).max() > 1e-6


def test_threaded_workers(setup):
    """Three worker threads share one replica: each hook calls its own worker's exchange."""
    _, _, wrapped, _ = setup
    atoms = nequip_metal()
    one = evaluate(DistributedCalculator(wrapped, num_parts=1), atoms)
    calc = DistributedCalculator(wrapped, num_parts=3, device=["cpu"] * 3)
    split = evaluate(calc, atoms)
    assert calc.runner.last_exchange_calls == wrapped.num_layers - 1
    for q in one:
        assert rel_err(split[q], one[q]) <= 1e-10, q


def test_receptive_field(setup):
    """Moving an atom that is between one and two cutoffs away from atom 0 leaves Allegro's
    energy of atom 0 unchanged (one hop) but changes NequIP's (several hops)."""
    from ase import Atoms

    name, _, wrapped, _ = setup
    # a chain along x, 3 Å apart: atom 3 is 9 Å from atom 0 (within 2 cutoffs, not 1)
    atoms = Atoms("Cu4", positions=[[0, 0, 0], [3, 0, 0], [6, 0, 0], [9, 0, 0]], pbc=False)
    calc = DistributedCalculator(wrapped)
    before = evaluate(calc, atoms)["energies"][0]
    atoms.positions[3] += [0.2, 0.3, 0.0]
    after = evaluate(calc, atoms)["energies"][0]
    if name == "allegro":
        assert abs(after - before) <= 1e-12
    else:
        assert abs(after - before) > 1e-8


def test_bad_arguments(setup):
    _, model, wrapped, _ = setup
    from ase import Atoms

    atoms = Atoms("CuAu", positions=[[0, 0, 0], [2.5, 0, 0]], cell=np.eye(3) * 12, pbc=True)
    with pytest.raises(Exception, match=r"\[79\]"):
        DistributedCalculator(wrapped).get_potential_energy(atoms)
    with pytest.raises(ValueError, match="chemical_species_to_atom_type_map"):
        NequIPModel(model, chemical_species_to_atom_type_map={"Xx": "Cu"})
    with pytest.raises(ValueError, match="num_layers"):
        NequIPModel(model, num_layers=0)
    with pytest.raises(ValueError, match="dtype"):  # would break NequIP's float64 geometry
        DistributedCalculator(wrapped, dtype="float32")


def test_float32_model_keeps_nequip_mixed_precision():
    """A model built with model_dtype="float32" runs as NequIP runs it (geometry and per-type
    scale/shift in float64, layers in float32): it matches NequIP's calculator up to float32
    rounding of differently ordered sums (~1e-7 relative), and splitting changes nothing beyond
    that either."""
    from nequip.integrations.ase import NequIPCalculator
    from nequip.integrations.utils import basic_transforms
    from nequip.model import NequIPGNNModel

    kwargs = nequip_common(0)
    kwargs["model_dtype"] = "float32"
    model = nequip_build(NequIPGNNModel, num_layers=3, l_max=2, num_features=16, **kwargs)
    calc = NequIPCalculator(model, device="cpu", transforms=basic_transforms(
        model.metadata, NEQUIP_R_MAX, NEQUIP_TYPES, {t: t for t in NEQUIP_TYPES}))
    atoms = nequip_metal()
    ref = _reference(calc, atoms)
    wrapped = distmlip.wrap(model)
    assert wrapped.dtype == torch.float64  # edge vectors in float64, as NequIP's own pipeline
    # float32 layers: no layer-protocol steps (float32 rounding exceeds the probe's 1e-10)
    assert wrapped.exchanged is None and not has_steps(wrapped)
    for parts in (1, 3):
        ours = evaluate(DistributedCalculator(wrapped, num_parts=parts), atoms)
        assert abs(ours["energy"] - ref["energy"]) / len(atoms) <= 2e-6
        assert np.abs(ours["forces"] - ref["forces"]).max() <= 1e-4


def _count_rows(energy_net) -> dict:
    """Forward pre-hooks counting the rows given to NequIP's node-wise maps: every interaction
    block's second linear map and self-connection, the first linear map of the blocks after the
    first, and the readout: {name: [rows per call]}."""
    from nequip.nn.interaction_block import InteractionBlock

    rows: dict = {}

    def counter(name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if isinstance(x, dict):
                x = x["node_features"]
            rows.setdefault(name, []).append(int(x.shape[0]))
        return hook

    blocks = [m for m in energy_net.modules() if isinstance(m, InteractionBlock)]
    for i, block in enumerate(blocks):
        for name in ("linear_2", "sc") + (("linear_1",) if i > 0 else ()):
            if getattr(block, name, None) is not None:
                getattr(block, name).register_forward_pre_hook(counter(f"{i}.{name}"),
                                                               with_kwargs=True)
    energy_net.per_atom_energy_readout.register_forward_pre_hook(counter("readout"),
                                                                 with_kwargs=True)
    return rows


@pytest.mark.parametrize("threads", [False, True])
def test_nequip_node_work_only_on_owned_rows(threads):
    """4 parts in halo mode: NequIP's node-wise maps (second linear map and self-connection of
    every block, first linear map of the later blocks, readout) compute exactly the owned rows,
    whose total over the parts is the number of atoms (before: every local row). Results equal
    the unsplit model's at 1e-10; extended mode still computes every local row."""
    from ase.build import bulk

    wrapped = distmlip.wrap(make_nequip())
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 2))  # 72 atoms
    atoms.rattle(0.08, seed=4)
    n = len(atoms)
    for mode, calc, rows, local in split_row_counts(wrapped, atoms, lambda r: _count_rows(r.energy),
                                                    threads=threads):
        assert len(rows["readout"]) == (4 if threads else 1)
        assert "2.linear_1" in rows and "1.sc" in rows
        for name, counts in rows.items():
            assert sum(counts) == (n if mode == "halo" else local), (mode, name)
        assert calc.runner.last_exchange_calls == (2 if mode == "halo" else 0)


@pytest.mark.parametrize("l_max", [0, 1])
def test_nequip_first_layer_self_connection_and_residual(l_max):
    """With ``learnable_shift`` the first block has a self-connection on the embedding (every
    row), and with l_max 0 and ``convnet_resnet`` every layer adds a residual, the first one the
    embedding: the spots NequIP's local-row path leaves to the caller. Both stay exact."""
    from nequip.model import NequIPGNNModel

    model = nequip_build(NequIPGNNModel, num_layers=2, l_max=l_max, num_features=8, parity=l_max > 0,
                   learnable_shift=True, convnet_resnet=True, **nequip_common(1))
    wrapped = distmlip.wrap(model)
    layers = [m for m in wrapped.energy.modules() if type(m).__name__ == "ConvNetLayer"]
    assert layers[0].conv.sc is not None
    assert layers[0].resnet == (l_max == 0)
    atoms = nequip_oxide()
    one = evaluate(DistributedCalculator(wrapped, num_parts=1), atoms)
    assert np.abs(one["forces"]).max() > 0.05
    report = assert_partition_invariant(wrapped, atoms, num_parts=(3,),
                                        partitioners=("grid",), modes=("halo", "extended"),
                                        rtol=1e-10)
    print(format_report(report))


def test_unknown_element_is_rejected(setup):
    """An element outside the model's type names: a ValueError listing the elements it knows."""
    from ase import Atoms

    _, _, wrapped, _ = setup
    atoms = Atoms("CuAu", positions=[[0, 0, 0], [2.5, 0, 0]], cell=np.eye(3) * 12, pbc=True)
    with pytest.raises(ValueError, match=r"^numbers: this NequIP model has no parameters for atomic "
                                         r"number\(s\) \[79\] \(Au\); it knows [A-Za-z, ]*\bCu\b"):
        DistributedCalculator(wrapped, num_parts=2).get_potential_energy(atoms)


# ---------------------------------------------------------------- the layer protocol
_CountedNequIP = counted(NequIPModel)


@pytest.fixture(scope="module")
def nequip_raw():
    return make_nequip()


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_steps_compose_to_forward(nequip_raw, structure):
    """NequIP's layer protocol (embed, one step per ConvNetLayer, the readout with the per-type
    scale and shift as energies) composes to forward in float64: per-atom energies, their edge
    gradient and every exchanged state (each block's normalised linear_1 output but the first's)
    within 1e-10."""
    wrapped = distmlip.wrap(nequip_raw)
    assert wrapped.exchanged == (1,) and has_steps(wrapped) and wrapped.num_steps == 3
    report = check_steps(wrapped, STRUCTURES[structure][0](), dtype=torch.float64)
    assert report["ok"] and len(report["levels"]) == wrapped.num_steps - 1, report["message"]
    assert max(report["energies"], report["gradient"], *report["levels"]) <= 1e-10, report


@pytest.mark.parametrize("l_max", [0, 1])
def test_steps_first_layer_self_connection_and_residual(l_max):
    """The layouts forward covers with extra hooks (a first block with a self-connection,
    ``learnable_shift``; residuals in every layer with l_max 0) have steps that compose too."""
    from nequip.model import NequIPGNNModel

    model = nequip_build(NequIPGNNModel, num_layers=2, l_max=l_max, num_features=8, parity=l_max > 0,
                         learnable_shift=True, convnet_resnet=True, **nequip_common(1))
    wrapped = distmlip.wrap(model)
    assert wrapped.exchanged == (1,)
    report = check_steps(wrapped, nequip_oxide(), dtype=torch.float64)
    assert max(report["energies"], report["gradient"], *report["levels"]) <= 1e-10, report


def test_bounded_steps_equal_unbounded(nequip_raw, own_cache):
    """float64, 4 parts one at a time (halo mode; the path a tight max_memory takes): the steps
    path (step calls, forward only on the runtime's probe) equals the unbounded evaluation and the
    generic replay (layer_steps=False) within 1e-10 in energy, forces, stress and per-atom
    energies."""
    wrapped = _CountedNequIP(nequip_raw)
    atoms = nequip_metal()
    ref = evaluate(DistributedCalculator(wrapped, 1, dtype="float64"), atoms)
    CALLS.clear()
    calc = one_at_a_time(wrapped, 4, dtype="float64")  # the probe: when it is built
    got = evaluate(calc, atoms)
    assert_close(got, ref, 1e-10, "nequip: steps")
    assert calc.runner.sequential and calc.last_plan.num_parts == 4 and uses_steps(calc.runner)
    # 4 parts: L - 1 steps forward and L backward each, plus the probe's L (when the calculator
    # is built); forward on the probe
    layers = wrapped.num_steps
    assert CALLS == {"forward": 1, "step": 4 * (2 * layers - 1) + layers}, CALLS
    assert calc.runner.last_exchange_calls == layers - 1
    generic = one_at_a_time(wrapped, 4, dtype="float64")
    generic.runner.layer_steps = False
    CALLS.clear()
    assert_close(evaluate(generic, atoms), got, 1e-10, "nequip: generic vs steps")
    assert not uses_steps(generic.runner) and CALLS["step"] == 0 and CALLS["forward"] > 4, CALLS


def test_steps_only_for_layouts_they_describe():
    """Allegro exchanges nothing (strictly local): no steps. A NequIP model with a pair
    potential (ZBL, edge terms added after the readout, not rebuilt by the steps) keeps the
    generic path: exchanged = None."""
    from nequip.model import NequIPGNNModel

    if importlib.util.find_spec("allegro") is not None:
        allegro = distmlip.wrap(make_allegro())
        assert allegro.exchanged is None and not has_steps(allegro)
    zbl = {"_target_": "nequip.nn.pair_potential.ZBL", "units": "metal",
           "chemical_species": NEQUIP_TYPES}
    model = nequip_build(NequIPGNNModel, num_layers=2, l_max=1, num_features=8,
                         pair_potential=zbl, **nequip_common(1))
    wrapped = distmlip.wrap(model)
    assert any(type(m).__name__ == "ZBL" for m in wrapped.energy.modules())
    assert wrapped.exchanged is None and not has_steps(wrapped)
    assert wrapped.num_steps == wrapped.num_layers == 2
