"""``load(name)`` for shipped pretrained models and ``wrap(obj)`` for third-party modules.

Adapters live in their own modules (``sevenn.py``, ``chgnet.py``, ``mace.py``, ...), one row of
``ADAPTER_TABLE`` each, and import their package lazily, so distmlip imports without any of them
installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..typing import PretrainedName
from .base import DistributableModel

__all__ = ["ADAPTERS", "ADAPTER_TABLE", "AdapterInfo", "adapter_info", "available_models", "load",
           "wrap"]


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
