"""Workers: run the model on each shard with the halo exchange between layers, then gather."""

from .local import Evaluation, InProcessRunner, ShardExchange, assemble
from .shards import Shard, build_shards

__all__ = ["Evaluation", "InProcessRunner", "Shard", "ShardExchange", "assemble", "build_shards"]
