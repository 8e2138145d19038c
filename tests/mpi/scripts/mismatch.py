"""Run under a 2-process launcher: asking for 3 partitions (not a multiple of 2) is a clear error."""

from distmlip import DistributedCalculator
from distmlip.models import LennardJones

DistributedCalculator(LennardJones(), num_parts=3)
