"""Bad input, tried systematically: structures, options, models and multi-process misuse.

Every case must raise an error of the right type whose message names the problem, quickly (no
hang), and leave the calculator that saw it giving the right results on its next good call.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import distmlip.calculators.distributed as calculator_module
from distmlip import DistributedCalculator
from distmlip.models import DistributableModel, SchNet

#: Seconds any bad input may take to be refused (the slowest here take ~0.1 s).
QUICK = 20.0


def good_atoms() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=4)
    return atoms


def make_model() -> SchNet:
    return SchNet(cutoff=4.0, num_interactions=2, hidden_channels=8, num_gaussians=10, seed=3)


@pytest.fixture(scope="module")
def reference():
    """Energy, forces and stress of the good structure, unsplit, from a fresh calculator."""
    calc = DistributedCalculator(make_model())
    atoms = good_atoms()
    return (calc.get_potential_energy(atoms), calc.get_forces(atoms), calc.get_stress(atoms))


def assert_good(calc, reference):
    """The calculator's next call on the good structure gives the reference results."""
    atoms = good_atoms()
    energy, forces, stress = reference
    assert abs(calc.get_potential_energy(atoms) - energy) <= 1e-10 * max(abs(energy), 1)
    assert np.abs(calc.get_forces(atoms) - forces).max() <= 1e-10 * max(np.abs(forces).max(), 1)
    assert np.abs(calc.get_stress(atoms) - stress).max() <= 1e-10 * max(np.abs(stress).max(), 1)


def refused(exc, match, action):
    t0 = time.perf_counter()
    with pytest.raises(exc, match=match) as err:
        action()
    assert time.perf_counter() - t0 < QUICK
    assert type(err.value) is exc or issubclass(type(err.value), exc)
    return err.value


# --------------------------------------------------------------------------- structures
def _with(**changes):
    def make():
        atoms = good_atoms()
        for key, value in changes.items():
            if key == "position":
                index, axis, v = value
                atoms.positions[index, axis] = v
            elif key == "same":
                i, j = value
                atoms.positions[i] = atoms.positions[j]
            elif key == "number":
                atoms.numbers[value[0]] = value[1]
            elif key == "cell":
                atoms.set_cell(value, scale_atoms=False)
        return atoms
    return make


def _tiny_image():
    # a lattice vector of 1e-4 Å: the atom sits on its own periodic image
    return Atoms("Cu", positions=[[0, 0, 0]], cell=[[1e-4, 0, 0], [0, 3, 0], [0, 0, 3]], pbc=True)


def _pymatgen_like():
    return {"positions": [[0, 0, 0]], "numbers": [29]}


def _nearly_coincident():
    atoms = good_atoms()
    atoms.positions[9] = atoms.positions[3] + [2e-4, 0, 0]
    return atoms


STRUCTURES = [
    ("nan-position", _with(position=(5, 1, np.nan)), ValueError, r"^positions: expected finite.*\[5\]"),
    ("inf-position", _with(position=(7, 0, np.inf)), ValueError, r"^positions: expected finite.*\[7\]"),
    ("minus-inf-position", _with(position=(0, 2, -np.inf)), ValueError,
     r"^positions: expected finite.*\[0\]"),
    ("coincident-atoms", _with(same=(3, 9)), ValueError,
     r"^positions: expected atoms at least 0.001 Å apart, got atoms 3 and 9 0 Å apart \(coincident\)"),
    ("nearly-coincident-atoms", _nearly_coincident, ValueError,
     r"^positions: .*got atoms 3 and 9 0.0002 Å apart"),
    ("atom-on-own-image", _tiny_image, ValueError,
     r"^positions: .*got atom 0 and its own periodic image 0.0001 Å apart"),
    ("singular-cell", _with(cell=[[3.6, 0, 0], [7.2, 0, 0], [0, 0, 7.2]]), ValueError,
     r"^cell: expected linearly independent.*singular"),
    ("zero-cell-with-pbc", _with(cell=np.zeros((3, 3))), ValueError, r"^cell: expected linearly independent"),
    ("nan-cell", _with(cell=[[np.nan, 0, 0], [0, 7.2, 0], [0, 0, 7.2]]), ValueError,
     r"^cell: expected finite lattice vectors"),
    ("empty-system", lambda: Atoms(cell=np.eye(3) * 5, pbc=True), ValueError,
     r"^atoms: expected at least one atom, got an empty system"),
    ("unknown-element", _with(number=(4, 118)), ValueError,
     r"^numbers: SchNet has no parameters for atomic number\(s\) \[118\] \(Og\); "
     r"it knows atomic numbers 0-100"),
    ("not-a-structure", _pymatgen_like, TypeError,
     r"^atoms: expected ase.Atoms or a pymatgen Structure/Molecule, got dict"),
    ("a-string", lambda: "Cu32.cif", TypeError, r"^atoms: expected ase.Atoms .* got str"),
]


@pytest.mark.parametrize("name,make,exc,match", STRUCTURES, ids=[c[0] for c in STRUCTURES])
@pytest.mark.parametrize("parts", [1, 3])
def test_bad_structure(name, make, exc, match, parts, reference):
    calc = DistributedCalculator(make_model(), num_parts=parts)
    calc.get_potential_energy(good_atoms())  # a built calculator: the bad call must not corrupt it
    for prop in ("energy", "forces"):
        refused(exc, match, lambda: calc.get_property(prop, make()))
    assert_good(calc, reference)


@pytest.mark.slow  # calibrates the memory model (~5 s)
def test_bad_structure_with_bounded_memory(reference):
    """One part at a time (max_memory) checks the edges of each part it evaluates."""
    calc = DistributedCalculator(make_model(), num_parts=3, max_memory="2GB")
    calc.runner._sequential = True
    refused(ValueError, r"^positions: .*atoms 3 and 9 0 Å apart",
            lambda: calc.get_forces(_with(same=(3, 9))()))
    assert calc.runner.sequential
    assert_good(calc, reference)


def test_chgnet_unknown_element():
    pytest.importorskip("chgnet")
    import distmlip

    calc = DistributedCalculator(distmlip.load("chgnet-0.3.0"), num_parts=2)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    good = calc.get_potential_energy(atoms)
    atoms.numbers[2] = 100
    refused(ValueError, r"^numbers: CHGNet has no parameters for atomic number\(s\) \[100\] \(Fm\); "
                        r"it knows atomic numbers 1-94 \(H-Pu\)", lambda: calc.get_potential_energy(atoms))
    atoms.numbers[2] = 29
    assert calc.get_potential_energy(atoms) == pytest.approx(good, rel=1e-12)


# --------------------------------------------------------------------------- options
OPTIONS = [
    ({"num_parts": 0}, ValueError, r"^num_parts: expected an integer >= 1, got 0"),
    ({"num_parts": -2}, ValueError, r"^num_parts: expected an integer >= 1, got -2"),
    ({"num_parts": 2.5}, TypeError, r"^num_parts: expected an integer >= 1 or 'auto', got 2.5"),
    ({"num_parts": "4"}, TypeError, r"^num_parts: expected .* got '4'"),
    ({"num_parts": True}, TypeError, r"^num_parts: expected .* got True"),
    ({"partitioner": "kmeans"}, ValueError,
     r"^partitioner: expected one of \['grid', 'slab', 'metis'\], got 'kmeans'"),
    ({"partitioner": None}, ValueError, r"^partitioner: expected one of .* got None"),
    ({"mode": "ghost"}, ValueError, r"^mode: expected one of \['halo', 'extended'\], got 'ghost'"),
    ({"mode": 1}, ValueError, r"^mode: expected one of .* got 1"),
    ({"device": "tpu"}, ValueError, r"^device: expected a torch device .* got 'tpu'"),
    ({"device": []}, ValueError, r"^device: expected a device or a non-empty list of devices, got \[\]"),
    ({"device": 3.5}, ValueError, r"^device: expected a torch device .* got 3.5"),
    ({"device": ["cpu", "gpu:0"]}, ValueError, r"^device: expected a torch device .* got 'gpu:0'"),
    ({"dtype": "float16"}, ValueError,
     r"^dtype: expected None, torch.float32/torch.float64 .* got 'float16'"),
    ({"dtype": torch.int32}, ValueError, r"^dtype: expected .* got torch.int32"),
    ({"backend": "mpi"}, ValueError, r"^backend: expected one of \['auto', 'local', 'torch'\], got 'mpi'"),
    ({"backend": "torch"}, ValueError, r"^backend: 'torch' needs a multi-process launch .* got none"),
    ({"timeout": 0}, ValueError, r"^timeout: expected a positive, finite number of seconds, got 0"),
    ({"timeout": -1.0}, ValueError, r"^timeout: expected a positive.* got -1.0"),
    ({"timeout": "10"}, ValueError, r"^timeout: expected a positive.* got '10'"),
    ({"timeout": math.inf}, ValueError, r"^timeout: expected a positive, finite.* got inf"),
    ({"num_threads": 0}, ValueError, r"^num_threads: expected None or an integer >= 1 .* got 0"),
    ({"num_threads": -2}, ValueError, r"^num_threads: expected None or an integer >= 1 .* got -2"),
    ({"num_threads": 1.5}, TypeError, r"^num_threads: expected None or an integer >= 1 .* got 1.5"),
    ({"skin": -0.1}, ValueError, r"^skin: expected a finite number of Å >= 0 .* got -0.1"),
    ({"skin": math.nan}, ValueError, r"^skin: expected .* got nan"),
    ({"skin": "0.5"}, ValueError, r"^skin: expected .* got '0.5'"),
    ({"max_memory": -1}, ValueError, r"^max_memory: expected None, a number of bytes .* got -1"),
    ({"max_memory": "lots"}, ValueError, r"^max_memory: expected .* got 'lots'"),
    ({"max_memory": 1.5}, ValueError, r"^max_memory: expected .* fraction .* got 1.5"),
    ({"num_partitons": 4}, TypeError,
     r"^num_partitons: expected a keyword of DistributedCalculator .* got the unknown keyword "
     r"'num_partitons'; did you mean 'num_parts'\?"),
    ({"partitoner": "slab"}, TypeError, r"^partitoner: .* did you mean 'partitioner'\?"),
    ({"zzz": 1}, TypeError, r"^zzz: expected a keyword of DistributedCalculator \(one of \[.*'mode'.*\]\), "
                            r"got the unknown keyword 'zzz'$"),
]
if not torch.cuda.is_available():
    OPTIONS.append(({"device": "cuda"}, ValueError,
                    r"^device: expected a device this torch can use, got 'cuda', but "
                    r"torch.cuda.is_available\(\) is False"))


@pytest.mark.parametrize("options,exc,match", OPTIONS,
                         ids=[next(iter(c[0])) + "=" + repr(next(iter(c[0].values()))) for c in OPTIONS])
def test_bad_option(options, exc, match, reference):
    """Refused by the constructor, and by ``set`` on a working calculator, which stays as it was."""
    refused(exc, match, lambda: DistributedCalculator(make_model(), **options))
    calc = DistributedCalculator(make_model(), num_parts=2, mode="halo")
    calc.get_potential_energy(good_atoms())
    before, runner = calc.todict(), calc.runner
    refused(exc, match, lambda: calc.set(**options))
    assert calc.todict() == before and calc.runner is runner
    assert_good(calc, reference)


def test_budget_below_one_neighbourhood(reference):
    """A memory budget too small for any split: refused at the first call, naming what works;
    the same calculator works once the budget is raised with set()."""
    calc = DistributedCalculator(make_model(), num_parts=2, max_memory=1000)
    refused(ValueError, r"^max_memory: expected at least .* got 1 kB; raise max_memory",
            lambda: calc.get_potential_energy(good_atoms()))
    calc.set(max_memory="2GB")
    assert_good(calc, reference)


# --------------------------------------------------------------------------- models
class _Declared(DistributableModel):
    """A model whose declarations are set per case."""

    def __init__(self, **declared):
        super().__init__()
        for key, value in declared.items():
            setattr(self, key, value)

    def forward(self, graph):  # pragma: no cover - never reached
        return torch.zeros(graph.num_nodes, dtype=torch.float64)


class _NoForward(DistributableModel):
    cutoff = 4.0
    num_layers = 1


MODELS = [
    ("no-cutoff", lambda: _Declared(num_layers=2), TypeError,
     r"^model: _Declared.cutoff: expected a positive number .* got no attribute 'cutoff'; set self.cutoff"),
    ("negative-cutoff", lambda: _Declared(cutoff=-1.0, num_layers=2), ValueError,
     r"^model: _Declared.cutoff: expected a positive, finite number of Å, got -1.0"),
    ("nan-cutoff", lambda: _Declared(cutoff=math.nan, num_layers=2), ValueError,
     r"^model: _Declared.cutoff: expected a positive, finite number of Å, got nan"),
    ("string-cutoff", lambda: _Declared(cutoff="5", num_layers=2), TypeError,
     r"^model: _Declared.cutoff: expected a positive number of Å, got str '5'"),
    ("no-num-layers", lambda: _Declared(cutoff=4.0), TypeError,
     r"^model: _Declared.num_layers: expected an integer >= 1 .* got no attribute 'num_layers'"),
    ("zero-num-layers", lambda: _Declared(cutoff=4.0, num_layers=0), ValueError,
     r"^model: _Declared.num_layers: expected an integer >= 1 .* got 0"),
    ("float-num-layers", lambda: _Declared(cutoff=4.0, num_layers=2.0), TypeError,
     r"^model: _Declared.num_layers: expected an integer >= 1 .* got float 2.0"),
    ("no-forward", _NoForward, TypeError, r"^model: _NoForward.forward: expected an implementation"),
    ("plain-module", lambda: torch.nn.Linear(3, 1), TypeError,
     r"^model: expected a distmlip.models.DistributableModel, got Linear; wrap .* distmlip.wrap"),
    ("not-a-model", lambda: "sevennet-0", TypeError,
     r"^model: expected a distmlip.models.DistributableModel, got str"),
]


@pytest.mark.parametrize("name,make,exc,match", MODELS, ids=[c[0] for c in MODELS])
def test_bad_model_declarations(name, make, exc, match):
    """The contract is checked when the calculator is built, naming class, attribute, expectation."""
    err = refused(exc, match, lambda: DistributedCalculator(make(), num_parts=2))
    assert "num_hops" not in str(err)


class _Misbehaving(SchNet):
    """SchNet, except on structures holding helium (Z = 2), where it returns ``bad(energies)``."""

    def __init__(self, bad):
        super().__init__(cutoff=4.0, num_interactions=2, hidden_channels=8, num_gaussians=10, seed=3)
        self.bad = bad

    def forward(self, graph):
        energies = super().forward(graph)
        if bool((graph.numbers == 2).any()):
            return self.bad(energies)
        return energies


MISBEHAVIOURS = [
    ("column", lambda e: e.unsqueeze(-1), ValueError,
     r"^model: _Misbehaving.forward must return per-atom energies of shape \(\d+,\) .* got \(\d+, 1\)"),
    ("scalar", lambda e: e.sum(), ValueError, r"^model: _Misbehaving.forward must return .* got \(\)"),
    ("too-short", lambda e: e[:0] if len(e) else e, ValueError,
     r"^model: _Misbehaving.forward must return per-atom energies of shape"),
    ("integer", lambda e: e.round().to(torch.int64), ValueError,
     r"^model: _Misbehaving.forward must return per-atom energies as a floating tensor .* "
     r"got dtype torch.int64"),
    ("list", lambda e: e.tolist(), ValueError, r"^model: _Misbehaving.forward must return .* got list"),
    ("nan", lambda e: e * torch.nan, ValueError,
     r"^model: _Misbehaving returned NaN or inf energies for atoms \[\d+"),
    ("inf", lambda e: e + torch.inf, ValueError, r"^model: _Misbehaving returned NaN or inf energies"),
]


@pytest.mark.parametrize("name,bad,exc,match", MISBEHAVIOURS, ids=[c[0] for c in MISBEHAVIOURS])
@pytest.mark.parametrize("device", ["cpu", ["cpu", "cpu"]], ids=["one-worker", "two-threads"])
def test_model_misbehaving_at_run_time(name, bad, exc, match, device, reference):
    calc = DistributedCalculator(_Misbehaving(bad), num_parts=2, device=device)
    helium = good_atoms()
    helium.numbers[0] = 2
    refused(exc, match, lambda: calc.get_forces(helium))
    assert_good(calc, reference)  # the same weights on a structure where it behaves


def test_nan_gradient_named(reference):
    """Finite energies but NaN forces (a singular function of distances): named as forces."""

    class SqrtAtZero(SchNet):
        def forward(self, graph):
            energies = super().forward(graph)
            if bool((graph.numbers == 2).any()):
                r = graph.edge_vec.norm(dim=-1)
                energies = energies + 0.0 * torch.zeros_like(energies).index_add(
                    0, graph.edge_index[1], torch.sqrt(r - r.detach()))
            return energies

    calc = DistributedCalculator(SqrtAtZero(cutoff=4.0, num_interactions=2, hidden_channels=8,
                                            num_gaussians=10, seed=3), num_parts=2)
    helium = good_atoms()
    helium.numbers[0] = 2
    refused(ValueError, r"^model: SqrtAtZero gave NaN or inf forces on atoms \[",
            lambda: calc.get_forces(helium))
    assert_good(calc, reference)


# --------------------------------------------------------------------------- multi-process misuse
@pytest.fixture
def fake_launch(monkeypatch):
    """The environment of rank 0 of a 2-process MPICH launch (no process group is made: the cases
    are refused before)."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(calculator_module, "_warned_local_under_launch", False)
    return monkeypatch


@pytest.mark.parametrize("parts", [3, 5])
def test_num_parts_not_a_multiple_of_ranks(fake_launch, parts):
    refused(ValueError, rf"^num_parts: expected a multiple of the number of processes \(2\) .* "
                        rf"got {parts}; omit it",
            lambda: DistributedCalculator(make_model(), num_parts=parts))


def test_backend_local_under_launch_warns_once(fake_launch, reference):
    with pytest.warns(UserWarning, match=r"backend='local' under a multi-process launch \(mpich, 2 "
                                         r"processes\): every rank evaluates the whole system .* "
                                         r"backend='auto'"):
        calc = DistributedCalculator(make_model(), backend="local")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistributedCalculator(make_model(), backend="local")  # said once per process
    assert calc.world_size == 1 and calc.backend == "local"
    assert_good(calc, reference)


def test_set_backend_torch_in_one_process(reference):
    calc = DistributedCalculator(make_model(), num_parts=2)
    refused(ValueError, r"^backend: 'torch' needs a multi-process launch", lambda: calc.set(backend="torch"))
    assert calc.backend == "local" and calc.parameters["backend"] == "auto"
    assert_good(calc, reference)

