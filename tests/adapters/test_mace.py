"""MACE through ``distmlip.wrap``: equal to MACE's own ASE calculator, whatever the split.

The model is a randomly initialised ``ScaleShiftMACE`` of MACE-MP-medium width (128x0e+128x1o
hidden irreps, 2 interactions, r_max 6 Å, correlation 3, max_ell 3, 10 Bessel functions) in
float64: foundation checkpoints are downloaded at run time and cannot be used here. Its
interaction scale is 40 so that forces are ~0.1-1 eV/Å rather than ~0.01 eV/Å, and the
partition-invariance errors (relative to max(max|ref|, 1)) measure forces at their own scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distmlip
from distmlip import DistributedCalculator
from distmlip.models.base import has_steps
from distmlip.models.mace import MACEModel
from distmlip.testing import check_steps, evaluate, rel_err
from distmlip.testing.adapters import metal, oxide, slab
from distmlip.testing.battery import AdapterBattery

from support import CALLS, assert_close, counted, one_at_a_time
from support.adapters import (
    MACE_ELEMENTS,
    WithoutExchange,
    float64_mace,
    make_mace,
    split_row_counts,
)


def surface():
    """Al(100) slab 2x2x4 (16 atoms), periodic in x, y only, 5 Å of vacuum each side."""
    return slab(vacuum=5.0)


STRUCTURES = {"oxide": (oxide, "grid"), "metal": (metal, "grid"), "surface": (surface, "metis")}


@pytest.fixture(autouse=True)
def _keep_default_dtype():
    # MACE's calculator sets torch's default dtype globally; other tests must not see that
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def mace_setup(tmp_path_factory):
    """(raw module, path of its saved copy, wrapped model)."""
    model = make_mace()
    path = tmp_path_factory.mktemp("mace") / "random_scaleshift_mace.model"
    torch.save(model, path)
    return model, str(path), distmlip.wrap(model)


@pytest.fixture(scope="module")
def mace_calc(mace_setup):
    from mace.calculators import MACECalculator

    previous = torch.get_default_dtype()
    try:
        calc = MACECalculator(model_paths=mace_setup[1], device="cpu", default_dtype="float64")
    finally:
        torch.set_default_dtype(previous)
    return calc


def _mace_volume(atoms, cutoff: float = 6.0) -> float:
    """The cell volume MACE divides the virial by: along non-periodic directions MACE replaces
    the lattice vector by a long one ((max|position| + 1) * 5 * cutoff), so a slab's MACE stress
    is its virial over a larger volume than the ASE cell's."""
    from mace.data.neighborhood import get_neighborhood

    cell = get_neighborhood(atoms.positions, cutoff, tuple(bool(p) for p in atoms.pbc),
                            np.array(atoms.cell))[3]
    return abs(float(np.linalg.det(cell)))


def _mace_reference(calc, atoms) -> dict:
    """MACE's results, its stress rescaled to the ASE cell's volume (see ``_mace_volume``)."""
    previous = torch.get_default_dtype()
    try:
        work = atoms.copy()
        work.calc = calc
        stress = work.get_stress(voigt=True) * _mace_volume(atoms) / atoms.cell.volume
        out = {"energy": work.get_potential_energy(), "forces": work.get_forces(),
               "stress": stress,
               # MACECalculator: "energies" are the full per-atom energies (E0s included),
               # "node_energy" the same minus the E0s
               "energies": np.array(calc.results["energies"])}
    finally:
        torch.set_default_dtype(previous)
    return out


def test_wrap_gives_mace_model(mace_setup):
    model, _, wrapped = mace_setup
    assert isinstance(wrapped, MACEModel)
    assert wrapped.module is not model  # the adapter hooks its own copy (the copy policy)
    assert wrapped.cutoff == pytest.approx(6.0)
    assert wrapped.num_layers == 2
    assert distmlip.wrap(wrapped) is wrapped


@pytest.fixture(scope="module")
def battery_source(mace_setup):
    return mace_setup[0]


@pytest.fixture(scope="module")
def battery_model(mace_setup):
    return mace_setup[2]


@pytest.fixture(params=list(STRUCTURES))
def battery_case(request):
    build, partitioner = STRUCTURES[request.param]
    return request.param, build(), partitioner


@pytest.fixture(scope="module")
def battery_reference(mace_calc):
    return lambda name, atoms: _mace_reference(mace_calc, atoms)


class TestMACEBattery(AdapterBattery):
    """The shared adapter battery: unsplit vs MACE's calculator (1e-6 eV/atom, 1e-5 eV/Å,
    1e-6 eV/Å^3, 1e-6 eV per atom), 2, 3 and 5 parts in both modes vs unsplit (float64, 1e-10
    relative), finite-difference forces, the caller's module unchanged (no hooks added to it),
    an unknown option refused."""

    def small_structure(self):
        return oxide()

    def check_split_report(self, report, model):
        for row in report:
            if row["mode"] == "halo" and row["nonempty_parts"] > 1:
                assert row["exchange_calls"] == 1  # before the second interaction only
            if row["mode"] == "extended":
                assert row["exchange_calls"] == 0


def test_halo_exchange_is_needed(mace_setup):
    """Without the exchange before the second interaction the split result is wrong: the hook
    is what makes the invariance above hold."""
    atoms = metal()
    wrapped = mace_setup[2]

    broken = WithoutExchange(wrapped)
    one = evaluate(DistributedCalculator(wrapped, num_parts=1), atoms)
    split = evaluate(DistributedCalculator(broken, num_parts=3), atoms)
    assert np.abs(split["forces"] - one["forces"]).max() > 1e-6


def test_threaded_workers(mace_setup):
    """Three worker threads share one replica of the module: the exchange each hook calls is the
    one of the worker running it (a context variable, not module state)."""
    atoms = metal()
    wrapped = mace_setup[2]
    one = evaluate(DistributedCalculator(wrapped, num_parts=1), atoms)
    calc = DistributedCalculator(wrapped, num_parts=3, device=["cpu"] * 3)
    split = evaluate(calc, atoms)
    assert calc.runner.last_exchange_calls == 1
    for q in one:
        assert rel_err(split[q], one[q]) <= 1e-10, q


def test_unknown_element_and_head_are_rejected(mace_setup):
    from ase import Atoms

    wrapped = mace_setup[2]
    atoms = Atoms("CuAu", positions=[[0, 0, 0], [2.5, 0, 0]], cell=np.eye(3) * 12, pbc=True)
    with pytest.raises(ValueError, match=r"^numbers: this MACE model has no parameters for atomic "
                                         r"number\(s\) \[79\] \(Au\); it knows [A-Za-z, ]*\bCu\b"):
        DistributedCalculator(wrapped).get_potential_energy(atoms)
    with pytest.raises(ValueError, match="head"):
        MACEModel(mace_setup[0], head="nonexistent")


def _count_rows(replica) -> dict:
    """Forward pre-hooks (after distmlip's slicing hooks, so they see what each block computes
    on) counting the rows given to MACE's node-wise blocks: {block name: [rows per call]}."""
    rows: dict = {}

    def counter(name):
        def hook(module, args, kwargs):
            x = kwargs["node_feats"] if "node_feats" in kwargs else args[0]
            rows.setdefault(name, []).append(int(x.shape[0]))
        return hook

    mace = replica.module
    for i, block in enumerate(mace.products):
        block.register_forward_pre_hook(counter(f"products.{i}"), with_kwargs=True)
    for i, block in enumerate(mace.readouts):
        block.register_forward_pre_hook(counter(f"readouts.{i}"), with_kwargs=True)
    for i, block in enumerate(mace.interactions):
        for name in ("skip_tp", "linear", "linear_up"):
            getattr(block, name).register_forward_pre_hook(
                counter(f"interactions.{i}.{name}"), with_kwargs=True)
    return rows


@pytest.mark.parametrize("threads", [False, True])
def test_node_work_only_on_owned_rows(mace_setup, threads):
    """4 parts in halo mode: the product basis, the readouts and the node-wise maps inside the
    interactions compute exactly the owned rows, whose total over the parts is the number of
    atoms (before: every local row, halo included). Only the first interaction's ``linear_up``
    maps the halo rows too: its messages read the element embedding on senders. Results equal
    the unsplit model's at 1e-10; extended mode still computes (and needs) every local row."""
    from ase.build import bulk

    wrapped = mace_setup[2]
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # 32 atoms
    atoms.rattle(0.08, seed=4)
    n = len(atoms)
    for mode, calc, rows, local in split_row_counts(wrapped, atoms, _count_rows, threads=threads):
        assert len(rows["products.0"]) == (4 if threads else 1)  # one call per worker
        for name, counts in rows.items():
            computed = sum(counts)
            if mode == "extended" or name == "interactions.0.linear_up":
                assert computed == local, (mode, name)
            else:
                assert computed == n, (mode, name, computed, local)
        assert calc.runner.last_exchange_calls == (1 if mode == "halo" else 0)


def make_small_mace(first: str, later: str, seed: int = 1):
    """A small float64 ScaleShiftMACE with the given interaction block classes."""
    from e3nn import o3
    from mace.modules import blocks

    return float64_mace(
        seed, r_max=4.5, num_bessel=6, max_ell=2, interaction_cls=getattr(blocks, later),
        interaction_cls_first=getattr(blocks, first), num_interactions=3,
        hidden_irreps=o3.Irreps("16x0e+16x1o"), MLP_irreps=o3.Irreps("8x0e"),
        atomic_energies=np.linspace(-6.0, -2.0, len(MACE_ELEMENTS)), avg_num_neighbors=30.0,
        correlation=2, radial_MLP=[16, 16], atomic_inter_scale=40.0)


@pytest.mark.parametrize("first,later", [
    ("RealAgnosticInteractionBlock", "RealAgnosticResidualInteractionBlock"),
    ("RealAgnosticDensityInteractionBlock", "RealAgnosticDensityResidualInteractionBlock"),
    ("RealAgnosticResidualNonLinearInteractionBlock",
     "RealAgnosticResidualNonLinearInteractionBlock"),
    ("RealAgnosticAttResidualInteractionBlock", "RealAgnosticAttResidualInteractionBlock"),
])
def test_interaction_classes_are_sliced_exactly(first, later):
    """Every interaction block class the adapter slices inside (three interactions: the first
    block, and the later ones with the moved exchange) gives the unsplit result in halo and
    extended mode, with the product and readout blocks on the owned rows only."""
    from ase.build import bulk

    wrapped = distmlip.wrap(make_small_mace(first, later))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.numbers[::5] = 13  # some Al
    atoms.rattle(0.08, seed=5)
    one = evaluate(DistributedCalculator(wrapped, num_parts=1), atoms)
    assert np.abs(one["forces"]).max() > 0.05
    for mode in ("halo", "extended"):
        calc = DistributedCalculator(wrapped, num_parts=3, mode=mode)
        mace = next(iter(calc.runner.replicas.values())).module
        rows = []
        for block in list(mace.products) + list(mace.readouts):
            block.register_forward_pre_hook(
                lambda m, a, kw: rows.append((kw["node_feats"] if "node_feats" in kw else a[0])
                                             .shape[0]), with_kwargs=True)
        split = evaluate(calc, atoms)
        for q in one:
            assert rel_err(split[q], one[q]) <= 1e-10, (mode, q)
        if mode == "halo":
            assert rows == [len(atoms)] * len(rows)
            assert calc.runner.last_exchange_calls == 2


# ---------------------------------------------------------------- the layer protocol
CountedMACE = counted(MACEModel)


def _steps_cu_al(repeat: int = 2):
    """fcc Cu with every fifth atom Al, ``repeat``^3 conventional cells, rattled."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((repeat,) * 3)
    atoms.numbers[::5] = 13
    atoms.rattle(0.08, seed=5)
    return atoms


def _bounded_three_ways(model, atoms, make_calc) -> None:
    """The bounded evaluation of ``make_calc()`` through the steps (forward only on the runtime's
    probe, 2L - 1 steps per part and its probe's L) and through the generic replay (no step) both
    equal the unbounded one (float64, 1e-10 relative: energy, forces, stress, per-atom energies)."""
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    for generic in (False, True):
        calc = make_calc()
        if generic:
            calc.runner.layer_steps = False
        CALLS.clear()
        assert_close(evaluate(calc, atoms), ref, 1e-10, "replay" if generic else "steps")
        parts = calc.last_plan.num_parts
        assert calc.runner.sequential and parts > 1
        if generic:
            assert CALLS["step"] == 0 and CALLS["forward"] > parts * model.num_layers, CALLS
        else:
            # the probe (forward once, L steps) runs unless a passed one is in the cache
            assert CALLS["forward"] <= 1 and set(CALLS) <= {"forward", "step"}, CALLS
            assert CALLS["step"] == (2 * model.num_layers - 1) * parts \
                + model.num_layers * CALLS["forward"], CALLS
        assert calc.runner.last_exchange_calls == model.num_layers - 1


def test_steps_compose_to_forward(mace_setup):
    """The MACE-MP-medium-width model's steps (embed, one per interaction, energies) compose to its
    forward: per-atom energies, edge gradients and the exchanged state (linear_up's output of the
    second interaction) within 1e-10 (float64)."""
    wrapped = mace_setup[2]
    assert has_steps(wrapped) and wrapped.exchanged == (1,)
    for atoms in (oxide(), surface()):
        report = check_steps(wrapped, atoms)
        assert report["steps"] and report["ok"], report["message"]
        assert len(report["levels"]) == 1 and max(report["energies"], report["gradient"]) <= 1e-10


def _plain_mace(**options):
    """A small float64 ``MACE`` (not ScaleShift: E0s summed with the readouts)."""
    from e3nn import o3
    from mace.modules import blocks, models

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            model = models.MACE(
                r_max=4.5, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
                interaction_cls=blocks.RealAgnosticResidualInteractionBlock,
                interaction_cls_first=blocks.RealAgnosticResidualInteractionBlock,
                num_interactions=3, num_elements=len(MACE_ELEMENTS),
                hidden_irreps=o3.Irreps("16x0e+16x1o"), MLP_irreps=o3.Irreps("8x0e"),
                atomic_energies=np.linspace(-6.0, -2.0, len(MACE_ELEMENTS)),
                avg_num_neighbors=30.0, atomic_numbers=list(MACE_ELEMENTS), correlation=2,
                gate=torch.nn.functional.silu, radial_MLP=[16, 16], **options)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.float64).eval()


STEP_VARIANTS = {
    "residual": lambda: make_small_mace("RealAgnosticInteractionBlock",
                                        "RealAgnosticResidualInteractionBlock"),
    "density": lambda: make_small_mace("RealAgnosticDensityInteractionBlock",
                                       "RealAgnosticDensityResidualInteractionBlock"),
    "nonlinear": lambda: make_small_mace("RealAgnosticResidualNonLinearInteractionBlock",
                                         "RealAgnosticResidualNonLinearInteractionBlock"),
    # the exchange is not moved onto linear_up: the exchanged entry is the node features
    "attention": lambda: make_small_mace("RealAgnosticAttResidualInteractionBlock",
                                         "RealAgnosticAttResidualInteractionBlock"),
    "plain-pair-last-readout": lambda: _plain_mace(pair_repulsion=True, use_last_readout_only=True),
}


@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_steps_of_every_variant(variant):
    """Three interactions of each block class the adapter knows, and a plain MACE with ZBL pair
    repulsion and one readout: the steps compose to forward, and 4 parts one at a time through the
    steps and through the generic replay equal the unbounded result (1e-10)."""
    model = CountedMACE(STEP_VARIANTS[variant]())
    atoms = _steps_cu_al()
    assert check_steps(model, atoms)["ok"]
    _bounded_three_ways(model, atoms, lambda: one_at_a_time(model, 4))


def test_steps_with_empty_parts_and_two_workers():
    """A Cu-Al-O cluster (no cell) in more parts than atoms, and in 4 parts over two worker
    threads: empty parts run their empty steps and take part in every level exchange; the steps
    equal the unbounded result (1e-10)."""
    from ase import Atoms

    model = CountedMACE(STEP_VARIANTS["residual"]())
    atoms = Atoms("Cu2AlO", positions=[[0, 0, 0], [2.4, 0.1, 0], [1.2, 2.1, 0.2], [1.1, 0.9, 1.8]],
                  pbc=False)
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    for parts, device in ((6, "cpu"), (4, ["cpu", "cpu"])):
        CALLS.clear()
        assert_close(evaluate(one_at_a_time(model, parts, device=device), atoms), ref, 1e-10,
                     f"{parts} parts on {device}")
        assert CALLS["step"] > 0 and CALLS["forward"] <= 1, CALLS


def test_max_memory_budget_takes_the_steps():
    """A budget of 0.4x the unbounded need (108 atoms, three interactions) splits the system into
    parts evaluated one at a time: through the steps and through the generic replay, both equal to
    the unbounded result (1e-10)."""
    from distmlip import estimate_memory

    model = CountedMACE(STEP_VARIANTS["residual"]())
    atoms = _steps_cu_al(3)
    budget = int(0.4 * estimate_memory(model, atoms))
    _bounded_three_ways(model, atoms, lambda: DistributedCalculator(model, 1, max_memory=budget))


def test_other_forward_keeps_the_generic_path():
    """A MACE subclass with its own forward (as mace's MACELES and PolarMACE have) is not described
    by the steps: no layer protocol, and its bounded evaluation (the generic replay) stays exact."""
    from mace.modules.models import ScaleShiftMACE

    class OwnForward(ScaleShiftMACE):
        def forward(self, data, **kwargs):
            return super().forward(data, **kwargs)

    OwnForward.__module__ = "mace.modules.extensions"  # a class of the package, as the adapter takes

    module = STEP_VARIANTS["residual"]()
    module.__class__ = OwnForward
    model = CountedMACE(module)
    assert model.exchanged is None and not has_steps(model)
    atoms = _steps_cu_al()
    ref = evaluate(DistributedCalculator(model, 1), atoms)
    CALLS.clear()
    assert_close(evaluate(one_at_a_time(model, 3), atoms), ref, 1e-10, "generic")
    assert CALLS["step"] == 0 and CALLS["forward"] > 3
