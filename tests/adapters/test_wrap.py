"""``distmlip.wrap``: what it accepts, what it refuses, and the custom-model example."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import distmlip
from distmlip.models import DistributableModel, LennardJones, SchNet
from distmlip.models.registry import ADAPTER_TABLE

from support import ROOT

EXAMPLE = ROOT / "examples" / "wrap_custom_model.py"


def test_distributable_model_is_returned_as_is():
    for model in (LennardJones(), SchNet(num_interactions=1, hidden_channels=4)):
        assert distmlip.wrap(model) is model


@pytest.mark.parametrize("obj", [torch.nn.Linear(3, 1), torch.nn.Sequential(), object(), "mace", None],
                         ids=["Linear", "Sequential", "object", "str", "None"])
def test_anything_else_is_a_type_error_naming_what_is_supported(obj):
    with pytest.raises(TypeError) as info:
        distmlip.wrap(obj)
    message = str(info.value)
    assert message.startswith("obj:")
    assert "DistributableModel" in message
    for name in ("mace-torch", "nequip", "sevenn", "chgnet"):
        assert name in message
    assert "wrap_custom_model.py" in message or "docs/wrapping.md" in message  # the guide
    assert type(obj).__name__ in message


def test_mace_modules_that_are_not_models_are_refused():
    pytest.importorskip("mace.modules", reason="mace-torch is not installed")
    from e3nn import o3
    from mace.modules.blocks import LinearReadoutBlock

    block = LinearReadoutBlock(o3.Irreps("4x0e"), o3.Irreps("1x0e"))
    with pytest.raises(TypeError, match="LinearReadoutBlock"):
        distmlip.wrap(block)


def test_mace_model_is_wrapped():
    pytest.importorskip("mace.modules", reason="mace-torch is not installed")
    import numpy as np
    from e3nn import o3
    from mace.modules import blocks
    from mace.modules.models import MACE

    from distmlip.models.mace import MACEModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = MACE(
            r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=1,
            interaction_cls=blocks.RealAgnosticInteractionBlock,
            interaction_cls_first=blocks.RealAgnosticInteractionBlock, num_interactions=3,
            num_elements=2, hidden_irreps=o3.Irreps("4x0e+4x1o"), MLP_irreps=o3.Irreps("4x0e"),
            atomic_energies=np.array([-1.0, -2.0]), avg_num_neighbors=8.0, atomic_numbers=[1, 8],
            correlation=2, gate=torch.nn.functional.silu,
        )
    finally:
        torch.set_default_dtype(previous)
    wrapped = distmlip.wrap(model)
    assert isinstance(wrapped, MACEModel) and isinstance(wrapped, DistributableModel)
    assert (wrapped.cutoff, wrapped.num_layers) == (4.0, 3)


def test_nequip_model_is_wrapped():
    pytest.importorskip("nequip.model", reason="nequip is not installed")
    from nequip.model import NequIPGNNModel

    from distmlip.models.nequip import NequIPModel

    from support.adapters import nequip_build  # undoes nequip's global changes

    model = nequip_build(NequIPGNNModel, seed=0, model_dtype="float64", type_names=["H", "O"],
                         r_max=4.0, num_layers=2, l_max=1, num_features=4, avg_num_neighbors=5.0)
    wrapped = distmlip.wrap(model)
    assert isinstance(wrapped, NequIPModel) and isinstance(wrapped, DistributableModel)
    assert (wrapped.cutoff, wrapped.num_layers) == (4.0, 2)
    # the inner ForceStressOutput is accepted too
    assert isinstance(distmlip.wrap(model.model), NequIPModel)


def _run_example(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env=env)


def test_custom_model_example_passes_its_checks():
    proc = _run_example()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all checks passed" in proc.stdout
    for name in ("fcc_bulk", "small_triclinic", "slab_vacuum", "molecule", "multi_element_isolated"):
        assert f"{name}: partition invariant" in proc.stdout


def test_custom_model_example_fails_without_the_exchange():
    proc = _run_example("--without-exchange")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CHECK FAILED" in proc.stderr
    assert "all checks passed" not in proc.stdout


# ---------------------------------------------------------------- the adapter protocol
ADAPTER_NAMES = [info.name for info in ADAPTER_TABLE]


def _adapter_module(name):
    import importlib

    return importlib.import_module(f"distmlip.models.{name}")


def test_adapter_table_is_the_one_source():
    """ADAPTERS and the CLI's package table derive from ADAPTER_TABLE."""
    from distmlip.cli.commands import _DISTRIBUTIONS
    from distmlip.models.registry import ADAPTER_TABLE, ADAPTERS, AdapterInfo, adapter_info

    assert all(isinstance(info, AdapterInfo) for info in ADAPTER_TABLE)
    assert list(ADAPTERS) == [info.name for info in ADAPTER_TABLE]
    assert len(set(ADAPTERS)) == len(ADAPTER_TABLE)
    assert all(adapter_info(name) is info for name, info in ADAPTERS.items())
    assert _DISTRIBUTIONS == {info.name: info.distribution for info in ADAPTER_TABLE}
    with pytest.raises(KeyError, match="name: expected one of"):
        adapter_info("nope")
    owned = {info.name for info in ADAPTER_TABLE if info.owned_rows_only}
    assert owned == {"sevenn", "chgnet", "mace", "nequip", "matgl", "orb", "mattersim", "fairchem"}


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_module_follows_the_protocol(name):
    """Each adapter module agrees with its table row and provides PACKAGES, OPTIONS, supports,
    wrap, PRETRAINED and load; its model class is ``XModel(module, *, ...)``."""
    import inspect

    from distmlip.models._adapter import Adapter
    from distmlip.models.registry import ADAPTERS

    info = ADAPTERS[name]
    module = _adapter_module(name)
    assert isinstance(module, Adapter)
    assert module.PACKAGES == info.packages
    assert tuple(module.PRETRAINED) == info.pretrained
    assert all(isinstance(d, str) and d for d in module.PRETRAINED.values())
    assert isinstance(module.OPTIONS, tuple)
    assert list(inspect.signature(module.wrap).parameters) == ["obj", "options"]
    assert list(inspect.signature(module.load).parameters) == ["name", "options"]
    classes = [getattr(module, n) for n in module.__all__ if n.endswith("Model")]
    assert classes and all(issubclass(c, DistributableModel) for c in classes)
    for cls in classes:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert params[0].name == "module", cls
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), cls
        options = {p.name for p in params[1:]}
        assert set(module.OPTIONS) <= options | {"modal"}, (cls, options)
    assert module.supports(object()) is False
    assert module.supports(torch.nn.Linear(2, 2)) is False


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_unknown_option_and_name(name):
    """One unknown-option error (``"<option>: expected ..."``, the closest valid one suggested),
    raised before anything is imported; ``load`` of an unknown name is a ValueError."""
    module = _adapter_module(name)
    with pytest.raises(TypeError, match=r"^not_an_option: expected (one of \[.*\]|no options) for "
                                        r".*got an unexpected keyword argument 'not_an_option'"):
        module.wrap(object(), not_an_option=1)
    with pytest.raises(TypeError, match=r"^not_an_option: expected"):
        module.load("whatever", not_an_option=1)
    for option in module.OPTIONS:
        typo = option[:-1]
        with pytest.raises(TypeError, match=rf"^{typo}: .*did you mean {option}=\.\.\.\?"):
            module.wrap(object(), **{typo: 1})
    with pytest.raises(ValueError, match=r"^name: expected"):
        module.load("no-such-model")


def test_rejecting_a_foreign_object_imports_no_model_package():
    """``wrap`` asks only the adapters whose packages match the object's module: refusing a
    torch module imports none of the packages in the table."""
    from distmlip.models.registry import ADAPTER_TABLE

    roots = sorted({p for info in ADAPTER_TABLE for p in info.packages})
    code = ("import sys, torch, distmlip\n"
            "try:\n    distmlip.wrap(torch.nn.Linear(2, 2))\nexcept TypeError:\n    pass\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r}))")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_check_options_message():
    from distmlip.models._adapter import check_options

    check_options({"head": 1}, ("head",), "MACE models")
    with pytest.raises(TypeError) as info:
        check_options({"haed": 1}, ("head",), "MACE models")
    assert str(info.value) == ("haed: expected one of ['head'] for MACE models, got an unexpected "
                               "keyword argument 'haed'; did you mean head=...?")
    with pytest.raises(TypeError, match=r"^x: expected no options for Y models, .*remove it"):
        check_options({"x": 1}, (), "Y models")
