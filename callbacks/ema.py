"""Exponential moving average of the trained weights, for validation, sampling and export."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from layerdiff.compat import foreach_lerp_
from layerdiff.distributed import reshard
from layerdiff.formats.checkpoints import EMA_AVERAGES_KEY
from layerdiff.modules.base import TrainedParts

NUM_UPDATES_KEY = "num_updates"


class EMA(Callback):
    """Keeps ``average = decay * average + (1 - decay) * weight`` for every trained parameter.

    * Updated after every ``update_every``-th optimizer step (not per batch, so gradient
      accumulation does not repeat updates on unchanged weights). With ``warmup`` the decay of
      the n-th update is ``min(decay, (1 + n) / (10 + n))``, so early averages are not dominated
      by the initial weights.
    * Averages are fp32 on each parameter's device. Every data-parallel rank holds the same
      weights, so each averages its own copy with no communication; under sharded training
      (FSDP2) each rank averages its own shard, and the sharded checkpoint stores the shards.
    * Validation runs on the averages: they are copied into the model from
      ``on_validation_start`` to ``on_validation_end``, so other callbacks that sample during
      validation see them (checkpoint callbacks, which Lightning runs last, see the raw weights).
      Anything else (e.g. sampling at train end) can use :meth:`averaged_weights` or
      :func:`averaged_weights_of`.
    * The averages are saved with the callback's state in every checkpoint and restored on
      resume; ``python -m layerdiff.export`` exports them instead of the raw weights.

    Args:
        decay: the average's decay per update.
        warmup: ramp the decay up from 0.1 as ``(1 + n) / (10 + n)``.
        update_every: optimizer steps between updates.
        exclude: parameter-name prefixes not averaged, beyond what the module declares:
            a module with ``trained`` parts (``layerdiff.modules.base.TrainedParts``) has only
            its exported parts averaged (not a GAN discriminator, which is training machinery).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every: int = 1,
        exclude: tuple[str, ...] = (),
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1; got {update_every}")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.exclude = tuple(exclude)
        self.num_updates = 0
        self._module: LightningModule | None = None
        self._parameters: dict[str, torch.nn.Parameter] = {}
        self._averages: dict[str, torch.Tensor] = {}
        self._restored: Mapping[str, Any] | None = None  # state loaded before the averages exist
        self._raw_weights: dict[str, torch.Tensor] | None = None  # held while the averages are swapped in
        self._last_step: int | None = None

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @property
    def averages(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its average (fp32); empty before training starts."""
        return self._averages

    # -- lifecycle -------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._module = pl_module
        declared = getattr(pl_module, "trained", None)
        exported = declared.exported if isinstance(declared, TrainedParts) else None
        self._parameters = {
            name: parameter
            for name, parameter in pl_module.named_parameters()
            if parameter.requires_grad
            and (exported is None or declared.owns(name, exported))
            and not name.startswith(self.exclude)
        }
        if not self._parameters:
            raise ValueError(
                f"EMA: {type(pl_module).__name__} has no trainable parameters in its exported parts "
                f"{list(exported or ['(all)'])} outside {list(self.exclude)}"
            )
        self._averages = {
            name: parameter.detach().to(torch.float32, copy=True) for name, parameter in self._parameters.items()
        }
        if self._restored is not None:
            self._apply_state(self._restored)
            self._restored = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The step is restored only now when resuming, after on_fit_start.
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if step % self.update_every:
            return
        names = list(self._averages)
        weights = [self._parameters[name].detach().to(torch.float32) for name in names]
        foreach_lerp_([self._averages[name] for name in names], weights, 1.0 - self.current_decay())
        self.num_updates += 1

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._averages:  # only once training has started; a plain `validate` has no averages
            self._swap_in()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._raw_weights is not None:
            self._swap_out()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._raw_weights is not None:
            self._swap_out()

    # -- swapping ----------------------------------------------------------------------------

    @torch.no_grad()
    def _swap_in(self) -> None:
        reshard(self._module)  # sharded (FSDP2) units must not keep gathered copies of what changes here
        self._raw_weights = {name: parameter.detach().clone() for name, parameter in self._parameters.items()}
        for name, parameter in self._parameters.items():
            parameter.copy_(self._averages[name])

    @torch.no_grad()
    def _swap_out(self) -> None:
        reshard(self._module)
        for name, parameter in self._parameters.items():
            parameter.copy_(self._raw_weights[name])
        self._raw_weights = None

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Run a block with the averages in the model, then put the raw weights back. Inside
        validation, where they are in place already, and before training, a no-op."""
        if self._raw_weights is not None or not self._averages:
            yield
            return
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    # -- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written while the averages are swapped in must still hold the raw weights.
        if self._raw_weights is not None:
            checkpoint["state_dict"].update(
                {name: weight for name, weight in self._raw_weights.items() if name in checkpoint["state_dict"]}
            )

    def state_dict(self) -> dict[str, Any]:
        return {EMA_AVERAGES_KEY: self._averages, NUM_UPDATES_KEY: self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Strategies that restore after setup (FSDP, model parallel) call this after on_fit_start.
        if self._averages:
            self._apply_state(state_dict)
        else:
            self._restored = state_dict

    @torch.no_grad()
    def _apply_state(self, state: Mapping[str, Any]) -> None:
        saved = state[EMA_AVERAGES_KEY]
        if set(saved) != set(self._averages):
            missing, unexpected = sorted(set(self._averages) - set(saved)), sorted(set(saved) - set(self._averages))
            raise ValueError(
                "the checkpoint's EMA averages other parameters than this run trains "
                f"(not in the checkpoint: {missing[:3]}, not trained now: {unexpected[:3]}); "
                "resume with the same model settings and EMA exclude list, or remove the EMA state from the checkpoint."
            )
        for name, average in self._averages.items():
            average.copy_(saved[name])
        self.num_updates = int(state[NUM_UPDATES_KEY])


def averaged_weights_of(trainer: Trainer) -> contextlib.AbstractContextManager[None]:
    """``EMA.averaged_weights()`` of the trainer's EMA callback, or a no-op without one: for
    callbacks that sample outside validation (e.g. at train end) and want the averaged model."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA):
            return callback.averaged_weights()
    return contextlib.nullcontext()
