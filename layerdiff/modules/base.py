"""Plumbing shared by every layerdiff LightningModule: lean checkpoints, exact resume, and
training that survives (and reports) non-finite losses."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.distributed.tensor import DTensor
from lightning.pytorch.trainer.states import TrainerFn

from layerdiff.compat import attached_trainer, foreach_norm
from layerdiff.resume import capture_rng_states, gather_from_ranks, restore_rng_states

log = logging.getLogger(__name__)

RNG_STATES_KEY = "rng_states"
NON_FINITE_SKIPPED_KEY = "non_finite_skipped"
GRADIENTS_TERM = "gradients"
WARN_FIRST_NON_FINITE = 5


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses (or gradients) for too many steps in a row."""


class FrozenBaseModule(LightningModule):
    """A LightningModule that wraps frozen pretrained parts (a base VAE, text encoders, the
    base weights under a LoRA), resumes exactly and skips non-finite steps.

    **Lean checkpoints.** Frozen weights are re-loaded from the base model on construction, so
    writing them into every checkpoint would only multiply checkpoint size (the SDXL UNet alone
    is 10 GB in fp32, the VAE 335 MB). Two kinds of keys are dropped on save and taken from the
    freshly loaded model on load, while every other key is still loaded strictly:

    * everything under the attribute prefixes a subclass names in ``frozen_prefixes``
      (parameters and buffers of wholly frozen parts);
    * every parameter with ``requires_grad=False`` elsewhere (e.g. a UNet's base weights
      when only its LoRA trains). Buffers of trained parts (BatchNorm statistics) are kept.

    **Exact resume.** Every checkpoint holds every rank's global random generators
    (``rng_states``); a resumed run restores them when training starts, so dropout and anything
    else drawing from them continues the uninterrupted run's streams. Validation inside ``fit``
    runs on a copy of those streams and puts them back after, so whether or when it ran (a
    resumed run skips the validation due at its checkpoint step) does not change training.

    **Non-finite steps.** Subclasses pass their loss terms through ``skip_non_finite`` before
    backward; gradients are checked before every optimizer step. A step with a NaN or inf on
    any rank is skipped on every rank (no update) and counted (``train/non_finite_skipped``,
    kept across resumes); ``max_non_finite_steps`` such steps in a row stop training with a
    ``NonFiniteLossError`` naming the step, the term and the last checkpoint written.

    Args:
        max_non_finite_steps: consecutive skipped steps after which training stops.
    """

    frozen_prefixes: tuple[str, ...] = ()

    def __init__(self, max_non_finite_steps: int = 5) -> None:
        super().__init__()
        if max_non_finite_steps < 1:
            raise ValueError(f"max_non_finite_steps must be >= 1; got {max_non_finite_steps}")
        self.max_non_finite_steps = max_non_finite_steps
        self.non_finite_skipped = 0  # training steps with a skipped update
        self._non_finite_in_a_row = 0
        self._non_finite_in_this_step = False
        self._training_rng_states: dict[str, Any] | None = None  # held while validation runs in fit
        self._rng_states_to_restore: dict[str, Any] | None = None

    # -- lean checkpoints -------------------------------------------------------------------

    def _frozen_keys(self, keys) -> set[str]:
        frozen_parameters = {name for name, parameter in self.named_parameters() if not parameter.requires_grad}
        return {key for key in keys if key.startswith(self.frozen_prefixes) or key in frozen_parameters}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.state_dict()
        merged = {key: own[key] for key in self._frozen_keys(own)}
        merged.update(state_dict)
        return super().load_state_dict(merged, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state_dict = checkpoint["state_dict"]
        frozen = self._frozen_keys(state_dict)
        checkpoint["state_dict"] = {key: value for key, value in state_dict.items() if key not in frozen}
        checkpoint[RNG_STATES_KEY] = gather_from_ranks(self._training_rng_states or capture_rng_states())
        checkpoint[NON_FINITE_SKIPPED_KEY] = self.non_finite_skipped

    # -- exact resume -----------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.non_finite_skipped = int(checkpoint.get(NON_FINITE_SKIPPED_KEY, 0))
        states = checkpoint.get(RNG_STATES_KEY)
        world_size = self.trainer.world_size if attached_trainer(self) is not None else 1
        if states is not None and len(states) == world_size:
            self._rng_states_to_restore = states[self.global_rank]

    def on_train_start(self) -> None:
        # Now, not on load: the sanity check and loader start-up before this may draw numbers.
        if self._rng_states_to_restore is not None:
            restore_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._training_rng_states = capture_rng_states()

    def on_validation_end(self) -> None:
        if self._training_rng_states is not None:
            restore_rng_states(self._training_rng_states)
            self._training_rng_states = None

    # -- non-finite steps -------------------------------------------------------------------

    def skip_non_finite(self, terms: Mapping[str, torch.Tensor]) -> bool:
        """Whether any of ``terms`` is non-finite on any rank, so every rank skips this step.
        A collective when distributed; call it on every rank with the same term names."""
        finite = torch.stack([term.detach().isfinite().all() for term in terms.values()])
        if self.trainer.world_size > 1:
            finite = self.all_gather(finite).reshape(self.trainer.world_size, -1).all(dim=0)
        finite = finite.tolist()
        if all(finite):
            return False
        bad = {name: terms[name].detach().float() for name, ok in zip(terms, finite) if not ok}
        self._record_non_finite(", ".join(f"{name} = {_describe(value)}" for name, value in bad.items()))
        return True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's gradient scaler skips steps with inf gradients itself, and expects to see them
        gradients = [
            parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
            for group in optimizer.param_groups
            for parameter in group["params"]
            if parameter.grad is not None
        ]
        if not gradients:
            return
        # Of this rank's gradients (its shards, when sharded): a NaN anywhere shows on some rank.
        norm = torch.linalg.vector_norm(torch.stack([norm.float() for norm in foreach_norm(gradients)]))
        if self.skip_non_finite({GRADIENTS_TERM: norm}):
            optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._non_finite_in_this_step = False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._non_finite_in_this_step:
            self._non_finite_in_a_row = 0

    def _record_non_finite(self, what: str) -> None:
        """Count the step once, however many of its checks failed (a GAN step has several)."""
        step = self.global_step
        if not self._non_finite_in_this_step:
            self._non_finite_in_this_step = True
            self.non_finite_skipped += 1
            self._non_finite_in_a_row += 1
        self.log("train/non_finite_skipped", float(self.non_finite_skipped), prog_bar=True, rank_zero_only=True)
        if self._non_finite_in_a_row >= self.max_non_finite_steps:
            raise NonFiniteLossError(
                f"step {step}: {what} on rank {self.global_rank}, {self._non_finite_in_a_row} steps in a row "
                f"(max_non_finite_steps={self.max_non_finite_steps}; {self.non_finite_skipped} skipped in all). "
                f"{self._last_checkpoint_note()} Typical causes: a learning rate too high for this model and batch "
                "size, fp16 overflow (use bf16-mixed or 32-true precision), or non-finite inputs (check the shards "
                "with `python -m data validate`)."
            )
        if self.non_finite_skipped <= WARN_FIRST_NON_FINITE and self.global_rank == 0:
            log.warning("step %d: skipped (no update): %s", step, what)

    def _last_checkpoint_note(self) -> str:
        written = [
            Path(path)
            for callback in self.trainer.checkpoint_callbacks
            for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", ""))
            if path and Path(path).exists()
        ]
        if self.trainer.ckpt_path:
            written.append(Path(self.trainer.ckpt_path))
        if not written:
            return "No checkpoint was written in this run yet."
        latest = max(written, key=lambda path: path.stat().st_mtime)
        return (f"The last checkpoint written is {latest} (skipped steps leave the weights unchanged, so it is "
                "sound): resume from it with `--ckpt_path` after fixing the cause.")


def _describe(value: torch.Tensor) -> str:
    if value.numel() == 1:
        return str(value.item())
    return f"{int((~value.isfinite()).sum())} non-finite of {value.numel()} values"
