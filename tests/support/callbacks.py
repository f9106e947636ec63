"""Callbacks that instrument training runs, in process or in ``train.py`` subprocesses."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import Callback


class StopAfterStep(Callback):
    """Ends training after optimizer step ``step``, as an interruption would (checkpoint
    callbacks due at that step still run: they come after this one)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class PoisonBatch(Callback):
    """Fills every floating-point tensor of training batch ``batch_idx`` with NaN, in place."""

    def __init__(self, batch_idx: int = 0) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            apply_to_collection(batch, torch.Tensor, lambda tensor: tensor.fill_(float("nan"))
                                if tensor.is_floating_point() else tensor)


class GradientRecorder(Callback):
    """The gradients every optimizer step sees, in order: ``steps[i][parameter name]``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        stepped = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
        self.steps.append({
            name: parameter.grad.detach().clone()
            for name, parameter in pl_module.named_parameters()
            if id(parameter) in stepped and parameter.grad is not None
        })


class TrainedWeightsAfterBatch(Callback):
    """A copy of the module's trainable parameters after training batch ``batch_idx``."""

    def __init__(self, batch_idx: int = 0) -> None:
        self.batch_idx = batch_idx
        self.weights: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            self.weights = trainable_weights(pl_module)


def trainable_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in module.named_parameters() if parameter.requires_grad}
