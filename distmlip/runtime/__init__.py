"""Workers: run the model on each shard with the halo exchange between layers, then gather.

``Runner`` is the calculator's engine without ASE (positions, cell, pbc, numbers -> ``Evaluation``);
``CommunicationError`` is what a rank raises when a peer fails, dies or hangs. Shards, exchanges and
launch detection are internal: import them from their modules (``distmlip.runtime.shards``, ...).

Modules, low to high (each imports only those before it): ``shards``, ``exchange`` (halo
exchanges), ``launch``, ``local`` (per-part helpers, the one ``LocalGraph`` assembly), ``comm``
(in-process and torch.distributed communication), ``build`` (build and reuse), ``memory`` (the
calibrated memory model), ``budget`` (predictions, the within-budget search, ``estimate_memory``),
``parallel`` (all parts at once), ``progress``, ``sequential`` (one part at a time, its level
exchange), ``runner`` (the orchestration).
"""

from ..errors import CommunicationError
from .budget import RunInfo, estimate_memory, minimum_memory
from .runner import Evaluation, Runner

__all__ = ["CommunicationError", "Evaluation", "RunInfo", "Runner", "estimate_memory", "minimum_memory"]
