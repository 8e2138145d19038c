"""ASE calculators."""

from .distributed import DistributedCalculator

__all__ = ["DistributedCalculator"]
