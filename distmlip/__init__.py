"""distmlip: exact distributed inference of message-passing interatomic potentials.

Atoms -> NeighborGraph -> PartitionPlan -> workers (model + halo exchange) -> gathered results.
"""

from .calculators import DistributedCalculator
from .graph import NeighborGraph
from .models import DistributableModel, LocalGraph, load, wrap
from .partition import PartitionPlan
from .runtime.memory import estimate_memory

__all__ = ["DistributableModel", "DistributedCalculator", "LocalGraph", "NeighborGraph", "PartitionPlan",
           "estimate_memory", "load", "wrap"]
__version__ = "0.1.0"
