"""Workers: run the model on each shard with the halo exchange between layers, then gather."""

from .exchange import CommunicationError, LocalExchange, P2PExchange
from .launch import Launch, detect_launch, init_distributed
from .runner import Evaluation, Runner
from .shards import Shard, build_shard

__all__ = [
    "CommunicationError",
    "Evaluation",
    "Launch",
    "LocalExchange",
    "P2PExchange",
    "Runner",
    "Shard",
    "build_shard",
    "detect_launch",
    "init_distributed",
]
