"""``distmlip.wrap``: what it accepts, what it refuses, and the custom-model example."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import distmlip
from distmlip.models import DistributableModel, LennardJones, SchNet

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
    import warnings

    import e3nn
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    from distmlip.models.nequip import NequIPModel

    previous = torch.get_default_dtype()
    e3nn_jit = e3nn.get_optimization_defaults()["jit_mode"]
    try:
        set_global_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = NequIPGNNModel(seed=0, model_dtype="float64", type_names=["H", "O"], r_max=4.0,
                                   num_layers=2, l_max=1, num_features=4, avg_num_neighbors=5.0)
    finally:  # undo nequip's global changes (see tests/test_nequip.py)
        torch.set_default_dtype(previous)
        e3nn.set_optimization_defaults(jit_mode=e3nn_jit)
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
