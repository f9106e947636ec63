"""Sharded training with FSDP2, applied from outside the model code.

* :mod:`~layerdiff.distributed.plan`: which submodules of the trained parts become FSDP2
  units (:func:`parallelize`); frozen weights stay whole on every rank.
* :mod:`~layerdiff.distributed.construction`: building the trained parts without a whole
  copy in every process (meta device, then each rank's shard filled from rank 0).
* :mod:`~layerdiff.distributed.strategy`: :class:`FSDP2Strategy` (Lightning's
  ``ModelParallelStrategy`` for pure data-parallel FSDP2, the settings as its typed
  arguments) and :func:`shard_trained_parts`, which the modules call from
  ``configure_model``: under DDP or on one device nothing changes.
* :mod:`~layerdiff.distributed.checkpoint`: crash-safe sharded checkpoint folders that carry
  sharded callback state, read whole or consolidated into one ``.ckpt`` file.
"""

from layerdiff.distributed.checkpoint import (
    SHARDED_ENTRIES,
    SHARDED_PLACEHOLDER,
    consolidate_checkpoint,
    is_sharded_checkpoint,
    read_sharded_checkpoint,
)
from layerdiff.distributed.construction import is_deferred, sharded_construction, trained_part
from layerdiff.distributed.plan import ShardingSettings, parallelize, reshard
from layerdiff.distributed.strategy import FSDP2Strategy, is_sharding_strategy, shard_trained_parts

__all__ = [
    "FSDP2Strategy",
    "SHARDED_ENTRIES",
    "SHARDED_PLACEHOLDER",
    "ShardingSettings",
    "consolidate_checkpoint",
    "is_deferred",
    "is_sharded_checkpoint",
    "is_sharding_strategy",
    "parallelize",
    "read_sharded_checkpoint",
    "reshard",
    "shard_trained_parts",
    "sharded_construction",
    "trained_part",
]
