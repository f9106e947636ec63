"""Optimizer construction shared by every training objective."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch.distributed.tensor import DTensor

OptimizerName = Literal["adamw", "adamw8bit"]


ParameterGroup = dict  # {"params": [...], and optimizer settings of its own, e.g. "lr"}


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter] | Sequence[ParameterGroup],
    name: OptimizerName,
    learning_rate: float,
    betas: tuple[float, float],
    weight_decay: float,
) -> torch.optim.Optimizer:
    """AdamW (fused kernel on CUDA) or bitsandbytes' 8-bit AdamW, which stores both moments
    in 8 bits and so cuts optimizer memory by about 75 %. ``parameters`` are parameters, or
    parameter groups (dicts as torch takes them) whose own settings override the arguments;
    parameters without ``requires_grad`` are left out."""
    parameters = list(parameters)
    groups = parameters if parameters and isinstance(parameters[0], dict) else [{"params": parameters}]
    groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
    groups = [group for group in groups if group["params"]]
    parameters = [p for group in groups for p in group["params"]]
    if not parameters:
        raise ValueError("build_optimizer: no trainable parameters were given.")
    if name == "adamw":
        fused = all(p.is_cuda for p in parameters)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, weight_decay=weight_decay, fused=fused)
    if name == "adamw8bit":
        if any(isinstance(p, DTensor) for p in parameters):
            raise ValueError(
                "optimizer 'adamw8bit' cannot step sharded (FSDP2) parameters: bitsandbytes' kernels have no "
                "DTensor sharding rule. Use optimizer: adamw, whose state sharding already divides by the number "
                "of ranks, or train with the default DDP strategy."
            )
        try:
            import bitsandbytes as bnb
        except ImportError as error:  # pragma: no cover - bitsandbytes is a declared dependency
            raise ImportError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from error
        return bnb.optim.AdamW8bit(groups, lr=learning_rate, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of 'adamw', 'adamw8bit'.")


LearningRateSchedule = Literal["constant", "linear", "cosine"]


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, schedule: LearningRateSchedule, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant, linear decay or cosine decay to
    zero at ``total_steps`` (diffusers' schedules, stepped once per optimizer step)."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))
