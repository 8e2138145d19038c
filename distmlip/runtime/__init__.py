"""Workers: run the model on each shard with the halo exchange between layers, then gather."""

from .distributed import DistributedRunner, Launch, detect_launch, init_distributed
from .local import Evaluation, InProcessRunner, ShardExchange, assemble
from .shards import Shard, build_shards

__all__ = [
    "DistributedRunner",
    "Launch",
    "detect_launch",
    "init_distributed",
   "Evaluation", "InProcessRunner", "Shard", "ShardExchange", "assemble", "build_shards"]
