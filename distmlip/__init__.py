"""distmlip: exact distributed inference of message-passing interatomic potentials.

Atoms -> NeighborGraph -> PartitionPlan -> workers (model + halo exchange) -> gathered results.
"""

from importlib.metadata import PackageNotFoundError, version

from .calculators import DistributedCalculator
from .errors import CommunicationError
from .graph import NeighborGraph
from .models import DistributableModel, LocalGraph, load, wrap
from .partition import PartitionPlan
from .runtime import estimate_memory, minimum_memory

__all__ = ["CommunicationError", "DistributableModel", "DistributedCalculator", "LocalGraph", "NeighborGraph",
           "PartitionPlan", "estimate_memory", "load", "minimum_memory", "wrap"]

try:
    __version__ = version("distmlip")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
