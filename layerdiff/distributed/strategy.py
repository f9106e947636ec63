"""The Lightning side of sharded training: :class:`FSDP2Strategy` and the modules'
``configure_model`` hook :func:`shard_trained_parts`, which checks the trainer's settings
against what the sharding plan supports and applies the plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from layerdiff.compat import attached_trainer, data_parallel_size, set_data_parallel_size
from layerdiff.distributed.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from layerdiff.distributed.construction import is_deferred, materialize
from layerdiff.distributed.plan import ShardingSettings, parallelize

# Precisions whose compute FSDP2 can take over: bf16-mixed all-gathers bf16 parameters on CUDA.
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed")
STRATEGY_OPTION = "--trainer.strategy layerdiff.distributed.FSDP2Strategy"


def shard_trained_parts(
    module: LightningModule, parts: Sequence[nn.Module], own_dtype: Sequence[nn.Module] = ()
) -> None:
    """``configure_model`` of the layerdiff modules: :func:`parallelize` their trained parts
    when the trainer runs a ``ModelParallelStrategy`` (settings from :class:`FSDP2Strategy`,
    defaults for Lightning's own class), then give the parts built on the meta device (see
    ``layerdiff.distributed.construction``) their shards' values. Nothing under other
    strategies, when the parts are sharded already (``configure_model`` runs again for every
    fit/validate call) or when no trainer is attached."""
    from torch.distributed.fsdp import FSDPModule

    # load_from_checkpoint calls configure_model with no trainer attached
    trainer = attached_trainer(module)
    strategy = trainer.strategy if trainer is not None else None
    if not isinstance(strategy, ModelParallelStrategy):
        deferred = [part for part in parts if is_deferred(part)]
        if deferred:
            for part in deferred:
                part.to_empty(device="cpu")  # Lightning's teardown moves the model, which meta tensors refuse
            raise ValueError(
                f"{', '.join(type(part).__name__ for part in deferred)} were built on the meta device for sharded "
                f"training, but the trainer's strategy is {type(strategy).__name__}; train them with "
                f"{STRATEGY_OPTION}, or build the module outside layerdiff.distributed.sharded_construction."
            )
        return
    if any(isinstance(part, FSDPModule) for part in parts):
        return
    precision = trainer.precision
    if precision not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"trainer.precision {precision!r} is not supported with sharded training; use 'bf16-mixed' "
            "(bf16 compute, float32 master weights and gradient reduction) or '32-true'."
        )
    mesh = module.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"{type(strategy).__name__} here has a tensor-parallel size of {mesh['tensor_parallel'].size()}, but "
            f"layerdiff models shard data-parallel only; use {STRATEGY_OPTION}, or set its init_args "
            "data_parallel_size: <world size> and tensor_parallel_size: 1."
        )
    checkpointed = [type(part).__name__ for part in parts if _uses_own_checkpointing(part)]
    settings = strategy.sharding_settings() if isinstance(strategy, FSDP2Strategy) else ShardingSettings()
    if checkpointed and settings.activation_checkpointing:
        raise ValueError(
            f"{', '.join(checkpointed)} already recompute activations (the model's gradient_checkpointing) and the "
            "strategy's activation_checkpointing would recompute them again; set "
            "--model.init_args.gradient_checkpointing false or --trainer.strategy.init_args.activation_checkpointing "
            "false."
        )
    if precision == "bf16-mixed" and strategy.root_device.type == "cuda":
        settings = dataclasses.replace(settings, param_dtype=torch.bfloat16)
    # Parts built on the meta device anywhere: every process takes part in filling them from rank 0's,
    # whole ones before sharding (which then frees them unit by unit), empty ones after (shards only).
    empty_here = any(is_deferred(part) for part in parts)
    fill = strategy.reduce_boolean_decision(empty_here, all=False)
    if fill and not empty_here:
        materialize(parts, strategy.root_device)
    parallelize(parts, mesh["data_parallel"], settings, own_dtype)
    if fill and empty_here:
        materialize(parts, strategy.root_device)


def _uses_own_checkpointing(part: nn.Module) -> bool:
    # diffusers blocks carry a ``gradient_checkpointing`` flag (enable_gradient_checkpointing)
    return any(getattr(submodule, "gradient_checkpointing", False) is True for submodule in part.modules())


def is_sharding_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` (an instance, a class or a class path) shards with FSDP2, as
    :func:`shard_trained_parts` does under it."""
    if isinstance(strategy, str):
        if "." not in strategy:
            return False  # a Lightning registry name ("ddp", "auto"): none of them is a ModelParallelStrategy
        import importlib

        module, _, name = strategy.rpartition(".")
        strategy = getattr(importlib.import_module(module), name)
    cls = strategy if isinstance(strategy, type) else type(strategy)
    return issubclass(cls, ModelParallelStrategy)


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel training (FSDP2) over all devices of all nodes.

    Lightning's ``ModelParallelStrategy`` with the tensor-parallel size fixed to 1, the
    sharding settings that :func:`parallelize` applies, and sharded checkpoint folders that
    are written atomically and carry sharded callback state (``layerdiff.distributed.checkpoint``).
    Resume with ``--ckpt_path <folder>``; the folder may come from another world size.

    Args:
        activation_checkpointing: recompute each block's activations in backward
            (instead of the model's own ``gradient_checkpointing``, which must then be off).
        compile: ``torch.compile`` each block.
        reshard_after_forward: free gathered parameters after forward and gather again in
            backward (less memory); ``False`` keeps them until backward (less communication).
        process_group_backend: ``nccl``/``gloo``; by default the device's.
        timeout: collective timeout (saving a large checkpoint takes a while).
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        compile: bool = False,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile
        self.reshard_after_forward = reshard_after_forward

    def sharding_settings(self) -> ShardingSettings:
        return ShardingSettings(self.activation_checkpointing, self.compile, self.reshard_after_forward)

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the node count (tensor
        # parallelism within nodes); with tensor-parallel size 1 it is every process.
        if data_parallel_size(self) == "auto":
            set_data_parallel_size(self, self.num_nodes * self.num_processes)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options.")
        save_sharded_checkpoint(self, checkpoint, filepath)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        return load_sharded_checkpoint(self, checkpoint_path, weights_only)
