"""``load(name)`` for shipped pretrained models and ``wrap(obj)`` for third-party modules.

Adapters live in their own modules (``sevenn.py``, ``chgnet.py``, ``mace.py``, ``nequip.py``) and
import their package lazily, so distmlip imports without any of them installed.
"""

from __future__ import annotations

import importlib

from ..typing import PretrainedName
from .base import DistributableModel

__all__ = ["ADAPTERS", "available_models", "load", "wrap"]

# adapter module -> (pip extra, what it wraps). Each module follows the adapter protocol
# (``_adapter.Adapter``: PACKAGES, supports, wrap, PRETRAINED, load; see ``_adapter.py``).
ADAPTERS = {
    "sevenn": ("sevenn", "SevenNet AtomGraphSequential models (sevenn)"),
    "chgnet": ("chgnet", "CHGNet models (chgnet)"),
    "mace": ("mace", "MACE / ScaleShiftMACE modules (mace-torch)"),
    "nequip": ("nequip", "NequIP / Allegro models (nequip, nequip-allegro)"),
    "matgl": ("matgl", "matgl TensorNet / M3GNet, or a matgl Potential holding one (matgl)"),
    "orb": ("orb", "Orb v3 conservative regressors, or an ORBCalculator holding one (orb-models)"),
    "fairchem": ("fairchem", "fairchem Hydra models with an eSCN-MD (UMA) backbone, mixture of "
                             "experts included, or an MLIPPredictUnit / FAIRChemCalculator holding "
                             "one (fairchem-core)"),
    "mattersim": ("mattersim", "MatterSim M3Gnet, or a Potential / MatterSimCalculator holding one "
                               "(mattersim)"),
}

# top-level packages whose objects each adapter may accept (its ``PACKAGES``; listed here so that
# rejecting an object imports nothing)
_ROOTS = {"sevenn": ("sevenn",), "chgnet": ("chgnet",), "mace": ("mace",),
          "nequip": ("nequip", "allegro"), "matgl": ("matgl",),
          "orb": ("orb_models",), "mattersim": ("mattersim",),
          "fairchem": ("fairchem",)}

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
    for adapter in ADAPTERS:
        try:
            module = _adapter(adapter)
        except ImportError:
            continue
        if key in getattr(module, "PRETRAINED", {}):
            return module.load(key, **kwargs)
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
    for adapter in ADAPTERS:
        if type(obj).__module__.split(".")[0] not in _ROOTS[adapter]:
            continue
        module = _adapter(adapter)
        if module.supports(obj):
            return module.wrap(obj, **kwargs)
    supported = "; ".join(desc for _, desc in ADAPTERS.values())
    raise TypeError(
        f"obj: expected a DistributableModel or one of: {supported}; got {type(obj).__module__}."
        f"{type(obj).__name__}. To run another architecture, implement the DistributableModel "
        f"contract ({_GUIDE})."
    )
