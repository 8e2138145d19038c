"""The public surface: what ``import distmlip`` and its subpackages export (as README.md's "Public
API" section promises), the version, ``py.typed`` in the built package, the ``Literal`` aliases of
the string options and the deprecated ``owned`` names."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import typing
import warnings
import zipfile

import numpy as np
import pytest
import torch

import distmlip
import distmlip.typing as dt
from distmlip import DistributedCalculator, NeighborGraph, PartitionPlan
from distmlip.models import LennardJones
from distmlip.runtime import Runner
from distmlip.testing import fcc_bulk

from support import ROOT

#: the subpackages whose ``__all__`` README.md lists in full
LISTED = ("distmlip.models", "distmlip.partition", "distmlip.runtime", "distmlip.graph",
          "distmlip.calculators", "distmlip.md", "distmlip.drivers")


def _public_api_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Public API\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, "README.md has no '## Public API' section"
    return match.group(1)


def _names(text: str) -> set[str]:
    return set(re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", text))


def test_top_level_all_is_what_the_readme_promises():
    section = _public_api_section()
    first = section.split("`distmlip.__version__`")[0]
    promised = _names(first) - {"distmlip"}
    assert promised == set(distmlip.__all__), (sorted(promised), sorted(distmlip.__all__))
    assert "CommunicationError" in distmlip.__all__
    exchange = importlib.import_module("distmlip.runtime.exchange")
    assert distmlip.CommunicationError is exchange.CommunicationError


@pytest.mark.parametrize("package", LISTED + ("distmlip.typing",))
def test_subpackage_all_is_what_the_readme_promises(package):
    section = _public_api_section()
    match = re.search(rf"^- `{re.escape(package)}` \((.*?)\)(?=\n- |\n\n|\Z)", section, flags=re.S | re.M)
    assert match, f"README.md's Public API section does not list {package}"
    promised = _names(match.group(1))
    exported = set(importlib.import_module(package).__all__)
    if package in LISTED:
        assert promised == exported, (package, sorted(promised), sorted(exported))
    else:  # distmlip.typing also exports the tuples of allowed values
        assert promised <= exported, (package, sorted(promised - exported))


@pytest.mark.parametrize("package", ("distmlip", "distmlip.testing", "distmlip.typing") + LISTED)
def test_every_exported_name_is_importable(package):
    module = importlib.import_module(package)
    assert len(set(module.__all__)) == len(module.__all__), f"{package}.__all__ repeats a name"
    for name in module.__all__:
        namespace: dict = {}
        exec(f"from {package} import {name}", namespace)
        assert namespace[name] is getattr(module, name)


def test_internals_are_not_exported():
    """Subpackages export what users need only: the shard layout, the exchanges and the launch
    helpers stay importable from their modules, not from the subpackage."""
    import distmlip.graph
    import distmlip.partition
    import distmlip.runtime

    for package, internal in ((distmlip.runtime, ("Shard", "build_shard", "P2PExchange", "LocalExchange",
                                                  "init_distributed", "detect_launch")),
                              (distmlip.partition, ("build_parts", "owned_rows", "MODES", "PARTITIONERS")),
                              (distmlip.graph, ("as_ase_atoms", "validate_system", "atoms_near"))):
        for name in internal:
            assert name not in package.__all__
            assert not hasattr(package, name), f"{package.__name__}.{name} is internal"
    from distmlip.runtime.shards import Shard, build_shard  # noqa: F401 - importable from the module


def test_version_comes_from_the_package_metadata(monkeypatch):
    assert distmlip.__version__ == importlib.metadata.version("distmlip")
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert distmlip.__version__ == declared
    source = (ROOT / "distmlip" / "__init__.py").read_text()
    assert declared not in source, "the version is written in __init__.py too"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    try:
        assert importlib.reload(distmlip).__version__ == "0+unknown"
    finally:
        monkeypatch.undo()
        importlib.reload(distmlip)
    assert distmlip.__version__ == declared


def test_py_typed_ships_in_the_wheel(tmp_path):
    assert (ROOT / "distmlip" / "py.typed").is_file()
    src = tmp_path / "src"
    shutil.copytree(ROOT / "distmlip", src / "distmlip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
               "-w", str(tmp_path / "dist"), str(src)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("distmlip-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "distmlip/py.typed" in names
    assert "distmlip/typing.py" in names


# ---------------------------------------------------------------- Literal aliases

def _model():
    return LennardJones(epsilon=0.01, sigma=2.3, cutoff=4.0)


#: calculator option -> (its alias, a value outside it)
OPTIONS = {"mode": (dt.Mode, "ghost"), "partitioner": (dt.Partitioner, "kmeans"),
           "backend": (dt.Backend, "nccl"), "dtype": (dt.DTypeName, "float16"),
           "neighbors": (dt.Neighbors, "cuda")}


def test_the_aliases_and_their_tuples_agree():
    assert dt.MODES == typing.get_args(dt.Mode) == ("halo", "extended")
    assert dt.PARTITIONERS == typing.get_args(dt.Partitioner) == ("grid", "slab", "metis")
    assert dt.BACKENDS == typing.get_args(dt.Backend) == ("auto", "local", "torch")
    assert dt.NEIGHBORS == typing.get_args(dt.Neighbors) == ("auto", "vesin", "vesin-torch")
    assert dt.DTYPE_NAMES == typing.get_args(dt.DTypeName) == ("float32", "float64")
    for name in dt.DTYPE_NAMES:
        assert isinstance(getattr(torch, name), torch.dtype)
    hints = typing.get_type_hints(DistributedCalculator.__init__)
    for option, (alias, _) in OPTIONS.items():
        assert set(typing.get_args(alias)) <= set(_flatten_literals(hints[option])), option


def _flatten_literals(hint) -> list:
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [v for arg in typing.get_args(hint) for v in _flatten_literals(arg)]


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_calculator_rejects_a_value_outside_each_alias(option):
    alias, bad = OPTIONS[option]
    allowed = list(typing.get_args(alias))
    with pytest.raises(ValueError) as err:
        DistributedCalculator(_model(), **{option: bad})
    message = str(err.value)
    assert message.startswith(f"{option}: expected ")
    assert f"one of {allowed}" in message and message.endswith(f"got {bad!r}"), message
    for good in allowed:
        if option == "backend" and good == "torch":
            continue  # needs a multi-process launch: refused for that reason (tests/unit/test_bad_input.py)
        calc = DistributedCalculator(_model(), **{option: good})
        assert calc.parameters[option] == good


@pytest.mark.parametrize("option", ["mode", "partitioner"])
def test_plan_and_runner_reject_the_same_values(option):
    alias, bad = OPTIONS[option]
    expected = f"{option}: expected one of {list(typing.get_args(alias))}, got {bad!r}"
    atoms = fcc_bulk(size=2)
    graph = NeighborGraph.from_atoms(atoms, 4.0)
    with pytest.raises(ValueError, match=re.escape(expected)):
        PartitionPlan.build(graph, 2, **{option: bad})
    with pytest.raises(ValueError, match=re.escape(expected)):
        Runner(_model(), [torch.device("cpu")], **{option: bad})


def test_load_knows_exactly_the_pretrained_names():
    from distmlip.models.registry import ADAPTERS, _adapter

    shipped: set[str] = set()
    for name in ADAPTERS:
        try:
            shipped |= set(getattr(_adapter(name), "PRETRAINED", {}))
        except ImportError:
            pytest.skip(f"adapter {name} does not import here: cannot list every pretrained name")
    assert shipped == set(typing.get_args(dt.PretrainedName))
    with pytest.raises(ValueError, match=r"^name: expected one of \[.*'sevennet-0'.*\].*got 'sevennet-9'"):
        distmlip.load("sevennet-9")


# ---------------------------------------------------------------- owned: ids vs mask

def test_owned_ids_and_owned_mask_and_their_deprecated_aliases():
    atoms = fcc_bulk(size=2)
    calc = DistributedCalculator(_model(), num_parts=3)
    atoms.calc = calc
    atoms.get_potential_energy()
    plan = calc.last_plan
    for p in plan.parts:
        assert np.array_equal(p.owned_ids, p.atoms[: p.num_owned])
        assert np.array_equal(p.halo_ids, p.atoms[p.num_owned:])
        assert np.all(plan.owner[p.owned_ids] == p.index)
        with pytest.warns(DeprecationWarning, match="owned_ids"):
            assert np.array_equal(p.owned, p.owned_ids)
        with pytest.warns(DeprecationWarning, match="halo_ids"):
            assert np.array_equal(p.halo, p.halo_ids)
    shard = calc.runner.last_shards[0]
    assert shard.owned_mask.dtype == bool and shard.owned_mask.sum() == shard.num_owned
    assert shard.owned_mask[: shard.num_owned].all()

    from distmlip import LocalGraph

    graph = LocalGraph.single(torch.tensor([29, 29]), torch.tensor([[0, 1], [1, 0]]),
                              torch.tensor([[2.5, 0.0, 0.0], [-2.5, 0.0, 0.0]], dtype=torch.float64))
    assert graph.owned_mask.tolist() == [True, True] and graph.num_owned == 2
    with pytest.warns(DeprecationWarning, match="owned_mask"):
        assert graph.owned is graph.owned_mask
    with pytest.warns(DeprecationWarning, match="owned_mask"):
        old = LocalGraph(graph.numbers, graph.edge_index, graph.edge_vec, graph.halo_exchange,
                         owned=graph.owned_mask, atom_ids=graph.atom_ids, cell=graph.cell)
    assert old.owned_mask is graph.owned_mask and old.num_owned == 2
    with pytest.raises(TypeError, match="owned_mask only"):
        LocalGraph(graph.numbers, graph.edge_index, graph.edge_vec, graph.halo_exchange,
                   owned=graph.owned_mask, owned_mask=graph.owned_mask, atom_ids=graph.atom_ids,
                   cell=graph.cell)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph.owned_mask  # noqa: B018 - the new name does not warn
