"""NeighborGraph -> PartitionPlan: owners (slab, grid, METIS), halos, local edges, exchange maps."""

from .assign import PARTITIONERS, assign_owners, grid_owners, metis_owners, slab_owners
from .plan import MODES, PartitionPlan, PartPlan, build_part, build_parts, owned_rows

__all__ = [
    "MODES",
    "PARTITIONERS",
    "PartPlan",
    "PartitionPlan",
    "assign_owners",
    "build_part",
    "build_parts",
    "owned_rows",
    "grid_owners",
    "metis_owners",
    "slab_owners",
]
