"""``load(name)`` for shipped pretrained models, ``wrap(obj)`` for third-party modules, and
``load_spec(spec)`` for what a user types where a model is asked for (the CLI's ``--model``,
LAMMPS's ``pair_style distmlip``): a name, a reference model with options, or a saved model file.

Adapters live in their own modules (``sevenn.py``, ``chgnet.py``, ``mace.py``, ...), one row of
``ADAPTER_TABLE`` each, and import their package lazily, so distmlip imports without any of them
installed.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

from ..typing import PretrainedName
from ._adapter import optional_import
from .base import DistributableModel
from .lj import LennardJones
from .schnet import SchNet

__all__ = ["ADAPTERS", "ADAPTER_TABLE", "REFERENCE_MODELS", "AdapterInfo", "ModelSpecError",
           "adapter_info", "available_models", "load", "load_spec", "wrap"]


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter of a third-party package (a row of ``ADAPTER_TABLE``).

    Attributes:
        name: the adapter module, ``distmlip.models.<name>``.
        packages: the top-level packages whose objects it may accept (its module's ``PACKAGES``;
            listed here so that rejecting an object imports nothing).
        distribution: the pip distribution that brings the package (for its version).
        extra: the ``distmlip[...]`` extra that installs it.
        no_deps: whether that distribution is installed with ``pip install --no-deps`` after the
            extra (its own requirements conflict with the other packages').
        description: what ``wrap`` accepts, one line.
        pretrained: the names ``load`` accepts (its module's ``PRETRAINED``; empty when the
            package's weights download at run time).
        dtype: the precision the wrapped model runs in: ``"parameters"`` (the module's parameter
            dtype; ``DistributedCalculator(dtype=...)`` casts it) or ``"as built"`` (NequIP's
            mixed precision: float64 geometry, ``model_dtype`` layers; casts refused).
        owned_rows_only: whether its node updates are restricted to owned rows in halo mode (no
            node-wise work on halo rows); ``False``: halo rows are computed and overwritten.
    """

    name: str
    packages: tuple[str, ...]
    distribution: str
    extra: str
    description: str
    pretrained: tuple[str, ...] = ()
    dtype: str = "parameters"
    owned_rows_only: bool = False
    no_deps: bool = False


#: Every adapter of a third-party package; ``ADAPTERS``, the CLI's package table and the protocol
#: test derive from it.
ADAPTER_TABLE: tuple[AdapterInfo, ...] = (
    AdapterInfo("sevenn", ("sevenn",), "sevenn", "sevenn",
                "SevenNet AtomGraphSequential models (sevenn)",
                ("sevennet-0", "sevennet-l3i5", "sevennet-mf-0"), owned_rows_only=True),
    AdapterInfo("chgnet", ("chgnet",), "chgnet", "chgnet", "CHGNet models (chgnet)",
                ("chgnet-0.3.0", "chgnet-0.2.0", "chgnet-r2scan"), owned_rows_only=True),
    AdapterInfo("mace", ("mace",), "mace-torch", "mace",
                "MACE / ScaleShiftMACE modules (mace-torch)", owned_rows_only=True, no_deps=True),
    AdapterInfo("nequip", ("nequip", "allegro"), "nequip", "nequip",
                "NequIP / Allegro models (nequip, nequip-allegro)", dtype="as built",
                owned_rows_only=True),
    # both matgl architectures compute owned rows only: TensorNet's blocks and M3GNet's are
    # composed from their sub-layers (M3GNet's three-body gate is exchanged with the node features)
    AdapterInfo("matgl", ("matgl",), "matgl", "matgl",
                "matgl TensorNet / M3GNet, or a matgl Potential holding one (matgl)",
                owned_rows_only=True),
    AdapterInfo("orb", ("orb_models",), "orb-models", "orb",
                "Orb v3 conservative regressors, or an ORBCalculator holding one (orb-models)",
                owned_rows_only=True),
    AdapterInfo("fairchem", ("fairchem",), "fairchem-core", "fairchem",
                "fairchem Hydra models with an eSCN-MD (UMA) backbone, mixture of experts "
                "included, or an MLIPPredictUnit / FAIRChemCalculator holding one (fairchem-core)",
                owned_rows_only=True),
    AdapterInfo("mattersim", ("mattersim",), "mattersim", "mattersim",
                "MatterSim M3Gnet, or a Potential / MatterSimCalculator holding one (mattersim)",
                owned_rows_only=True, no_deps=True),
)

#: adapter name -> its ``AdapterInfo`` (in ``ADAPTER_TABLE``'s order).
ADAPTERS: dict[str, AdapterInfo] = {info.name: info for info in ADAPTER_TABLE}


def adapter_info(name: str) -> AdapterInfo:
    """The ``AdapterInfo`` of adapter ``name`` (``KeyError`` naming the known ones)."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise KeyError(f"name: expected one of {sorted(ADAPTERS)}, got {name!r}") from None


_GUIDE = "see docs/wrapping.md and examples/wrap_custom_model.py"


def _adapter(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def available_models() -> dict[str, str]:
    """Names accepted by ``load`` with a one-line description each."""
    out: dict[str, str] = {}
    for name in ADAPTERS:
        try:
            out.update(getattr(_adapter(name), "PRETRAINED", {}))
        except ImportError:
            continue
    return out


def load(name: PretrainedName, **kwargs) -> DistributableModel:
    """A pretrained model shipped inside a PyPI package, by name (e.g. ``"sevennet-0"``).

    Nothing is downloaded: only weights inside installed packages are used.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model name (str), got {type(name).__name__}")
    key = name.lower()
    for info in ADAPTERS.values():
        if key in info.pretrained:
            return _adapter(info.name).load(key, **kwargs)
    known = sorted(available_models())
    raise ValueError(
        f"name: expected one of {known} (pretrained models shipped in installed packages), "
        f"got {name!r}"
    )


def wrap(obj, **kwargs) -> DistributableModel:
    """Return ``obj`` as a ``DistributableModel``.

    Accepts a ``DistributableModel`` (returned as is) and the third-party modules listed in
    ``ADAPTERS``; anything else raises ``TypeError``.
    """
    if isinstance(obj, DistributableModel):
        return obj
    root = type(obj).__module__.split(".")[0]
    for info in ADAPTERS.values():
        if root not in info.packages:
            continue
        module = _adapter(info.name)
        if module.supports(obj):
            return module.wrap(obj, **kwargs)
    supported = "; ".join(info.description for info in ADAPTERS.values())
    raise TypeError(
        f"obj: expected a DistributableModel or one of: {supported}; got {type(obj).__module__}."
        f"{type(obj).__name__}. To run another architecture, implement the DistributableModel "
        f"contract ({_GUIDE})."
    )


# ----------------------------------------------------------------------------- model specs
#: Reference models built here (not pretrained: for tests and examples), ``lj`` or with options
#: ``lj:epsilon=0.0104,sigma=3.4,cutoff=8.5``.
REFERENCE_MODELS = {
    "lj": "Lennard-Jones (distmlip.models.LennardJones); options epsilon (eV), sigma (Å), cutoff (Å)",
    "schnet": "SchNet with random weights (distmlip.models.SchNet), for testing; options cutoff, "
              "num_interactions, hidden_channels, num_gaussians, seed",
}


class ModelSpecError(ValueError):
    """A model spec that names no model (its message starts with the option that gave it)."""


def load_spec(spec: str, option: str = "model") -> DistributableModel:
    """The model a user named: a name ``load`` accepts, ``lj``/``schnet`` (reference models, with
    ``:key=value,...`` options), or a path to a saved model file of a supported package (a
    SevenNet checkpoint, a CHGNet file, a ``torch.save``-d module). ``ModelSpecError`` (its
    message starting with ``option``, e.g. ``--model``) for a spec that names none."""
    if Path(spec).is_file():
        return _model_from_file(Path(spec), option)
    if _looks_like_path(spec):
        where = "a directory" if Path(spec).is_dir() else "which does not exist"
        raise ModelSpecError(f"{option}: expected a model name or a saved model file, got {spec!r}, "
                             f"{where}; check the path, or see `distmlip models` for the names")
    if spec.split(":")[0].lower() in REFERENCE_MODELS:
        return _reference_model(spec, option)
    try:
        return load(spec)
    except ValueError as exc:
        if not str(exc).startswith("name:"):
            raise
        known = sorted(available_models()) + sorted(REFERENCE_MODELS)
        raise ModelSpecError(f"{option}: expected one of {known} (see `distmlip models`) or a path "
                             f"to a saved model file, got {spec!r}") from None


def _reference_model(spec: str, option: str) -> DistributableModel:
    name, _, rest = spec.partition(":")
    cls = {"lj": LennardJones, "schnet": SchNet}[name.lower()]
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        number = _number(value.strip())
        if not eq or number is None:
            raise ModelSpecError(f"{option}: expected {name}:key=number,..., got {spec!r}; pass "
                                 f"e.g. {name}:cutoff=5.0")
        options[key.strip()] = number
    valid = [k for k in inspect.signature(cls).parameters if k not in ("self", "args", "kwargs")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ModelSpecError(f"{option}: {name} has no option {unknown[0]!r}, got {spec!r}; "
                             f"expected {name}:key=number,... with keys from {valid}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(f"{option}: {exc} (model {spec!r}); options of {name}: {valid}") from None


def _number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def _looks_like_path(spec: str) -> bool:
    """A spec that names a file, not a model: a path separator or a model file's suffix."""
    return ("/" in spec or os.sep in spec or spec.startswith(".")
            or Path(spec).suffix.lower() in (".pth", ".pt", ".pkl", ".ckpt", ".model", ".tar", ".json"))


def _model_from_file(path: Path, option: str) -> DistributableModel:
    """A model from a file: a SevenNet checkpoint (``.pth`` with its config), a CHGNet file, or any
    ``torch.save``-d module that ``wrap`` accepts."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - not a torch file at all
        raise ModelSpecError(f"{option}: expected a model name or a saved model file, got "
                             f"{str(path)!r}, which torch.load cannot read "
                             f"({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and "config" in obj and "model_state_dict" in obj:  # SevenNet
        util = optional_import("sevenn.util", "sevenn", "load a SevenNet checkpoint")
        module = util.load_checkpoint(str(path)).build_model()
        module.eval()
        return wrap(module)
    if isinstance(obj, dict) and "model" in obj and "state_dict" in obj.get("model", {}):  # CHGNet
        chgnet = optional_import("chgnet.model.model", "chgnet", "load a CHGNet file")
        return wrap(chgnet.CHGNet.from_file(str(path)))
    if isinstance(obj, torch.nn.Module):
        obj.eval()
        try:
            return wrap(obj)
        except TypeError as exc:
            raise ModelSpecError(f"{option}: {exc}") from None
    raise ModelSpecError(f"{option}: expected a SevenNet checkpoint, a CHGNet file or a torch.save-d "
                         f"model in {str(path)!r}, got a {type(obj).__name__}")
