"""Models: the DistributableModel contract, reference models, adapters for third-party models.

``load(name)`` and ``wrap(module)`` return the adapters (``distmlip.models.sevenn``,
``distmlip.models.mace``, ...); model authors' helpers (``check_numbers``, ``unknown_elements``)
live in ``distmlip.models.base``.
"""

from .base import DistributableModel, LocalGraph
from .lj import LennardJones
from .registry import available_models, load, wrap
from .schnet import SchNet

__all__ = [
    "DistributableModel",
    "LennardJones",
    "LocalGraph",
    "SchNet",
    "available_models",
    "load",
    "wrap",
]
