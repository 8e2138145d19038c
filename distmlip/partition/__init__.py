"""NeighborGraph -> PartitionPlan: owners (slab, grid, METIS), halos, local edges, exchange maps.

The partitioners' names are ``distmlip.typing.Partitioner``; the building blocks the runtime uses
(``build_parts``, ``owned_rows``, the single partitioners) are imported from
``distmlip.partition.plan`` and ``distmlip.partition.assign``.
"""

from .assign import assign_owners
from .plan import PartitionPlan, PartPlan

__all__ = ["PartPlan", "PartitionPlan", "assign_owners"]
