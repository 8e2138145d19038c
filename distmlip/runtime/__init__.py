"""Workers: run the model on each shard with the halo exchange between layers, then gather.

``Runner`` is the calculator's engine without ASE (positions, cell, pbc, numbers -> ``Evaluation``);
``CommunicationError`` is what a rank raises when a peer fails, dies or hangs. Shards, exchanges and
launch detection are internal: import them from their modules (``distmlip.runtime.shards``, ...).
"""

from ..errors import CommunicationError
from .budget import estimate_memory
from .runner import Evaluation, Runner

__all__ = ["CommunicationError", "Evaluation", "Runner", "estimate_memory"]
