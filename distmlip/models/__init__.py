"""Models: the DistributableModel contract, reference models, adapters for third-party models."""

from .base import DistributableModel, LocalGraph, no_exchange
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
    "no_exchange",
    "wrap",
]
