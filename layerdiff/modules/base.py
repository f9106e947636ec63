"""What every layerdiff LightningModule gets by declaring its parts: sharding, lean
checkpoints, exact resume, and training that survives (and reports) non-finite losses.

A new objective module subclasses :class:`FrozenBaseModule`, names its ``trained`` parts and
its per-rank random ``generators``, and writes only its objective (``training_step`` and
friends): no checkpoint hooks of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.tensor import DTensor

from layerdiff.compat import attached_trainer
from layerdiff.distributed import shard_trained_parts
from layerdiff.formats.checkpoints import TRAINED_PARTS_KEY
from layerdiff.resume import capture_rng_states, load_per_rank, rank_seed, restore_rng_states, save_per_rank

log = logging.getLogger(__name__)

RNG_STATES_KEY = "rng_states"
GENERATORS_KEY = "generators"
NON_FINITE_SKIPPED_KEY = "non_finite_skipped"
GRADIENTS_TERM = "gradients"
WARN_FIRST_NON_FINITE = 5


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses (or gradients) for too many steps in a row."""


@dataclass(frozen=True)
class TrainedParts:
    """The attributes of a module that train, the one list everything else reads.

    ``exported`` parts are the model: sharded, optimised, averaged by the EMA callback, kept in
    lean checkpoints and exported (only their parameters with ``requires_grad``: a LoRA's
    factors, not the base weights under it). ``auxiliary`` parts train too but are machinery
    (a GAN discriminator): sharded in their own dtype, optimised and checkpointed, never
    averaged or exported. Every other attribute is frozen and re-loaded from the base model.
    """

    exported: tuple[str, ...]
    auxiliary: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.exported + self.auxiliary

    def owns(self, key: str, names: tuple[str, ...] | None = None) -> bool:
        """Whether state-dict ``key`` belongs to one of ``names`` (default: every trained part)."""
        return any(key == name or key.startswith(f"{name}.") for name in (self.names if names is None else names))


class FrozenBaseModule(LightningModule):
    """A LightningModule that wraps frozen pretrained parts (a base VAE, text encoders, the
    base weights under a LoRA) around the ``trained`` parts it declares, resumes exactly and
    skips non-finite steps.

    **Sharding.** Under a sharded strategy, ``configure_model`` shards the trained parts
    (``layerdiff.distributed``); frozen parts stay whole.

    **Lean checkpoints.** Frozen weights are re-loaded from the base model on construction, so
    writing them into every checkpoint would only multiply checkpoint size (the SDXL UNet alone
    is 10 GB in fp32, the VAE 335 MB). Two kinds of keys are dropped on save and taken from the
    freshly loaded model on load, while every other key is still loaded strictly: everything
    outside the trained parts, and every parameter with ``requires_grad=False`` inside them
    (a UNet's base weights when only its LoRA trains). Buffers of trained parts (BatchNorm
    statistics) are kept. The checkpoint records the declaration (``trained_parts``).

    **Exact resume.** Every checkpoint holds, per rank (``layerdiff.resume``), the global random
    generators and each generator named in ``generators`` (``self.generator("noise")``: seeded
    from ``seed`` and the rank on the first fit, continued on resume). Global streams are
    restored when training starts, so dropout and anything else drawing from them continues the
    uninterrupted run's streams. Validation inside ``fit`` runs on a copy of those streams and
    puts them back after, so whether or when it ran (a resumed run skips the validation due at
    its checkpoint step) does not change training.

    **Non-finite steps.** Subclasses pass their loss terms through ``skip_non_finite`` before
    backward; gradients are checked before every optimizer step. A step with a NaN or inf on
    any rank is skipped on every rank (no update) and counted (``train/non_finite_skipped``,
    kept across resumes); ``max_non_finite_steps`` such steps in a row stop training with a
    ``NonFiniteLossError`` naming the step, the term and the last checkpoint written.

    Args:
        max_non_finite_steps: consecutive skipped steps after which training stops.
        seed: base seed of the named generators; each rank derives its own from it.
    """

    trained: TrainedParts = TrainedParts(())
    generators: tuple[str, ...] = ()

    def __init__(self, max_non_finite_steps: int = 5, seed: int = 0) -> None:
        super().__init__()
        if max_non_finite_steps < 1:
            raise ValueError(f"max_non_finite_steps must be >= 1; got {max_non_finite_steps}")
        self.max_non_finite_steps = max_non_finite_steps
        self.seed = seed
        self._generators = {name: torch.Generator() for name in self.generators}
        self._generators_restored = False
        self.non_finite_skipped = 0  # training steps with a skipped update
        self._non_finite_in_a_row = 0
        self._non_finite_in_this_step = False
        self._gradient_norm: tuple[torch.optim.Optimizer, torch.Tensor] | None = None  # of the step under way
        self._training_rng_states: dict[str, Any] | None = None  # held while validation runs in fit
        self._rng_states_to_restore: dict[str, Any] | None = None

    # -- the declared parts -----------------------------------------------------------------

    def trained_modules(self, names: tuple[str, ...] | None = None) -> list[nn.Module | nn.Parameter]:
        """The trained parts named (default: all), skipping those switched off (``None``)."""
        if not self.trained.names:
            raise TypeError(
                f"{type(self).__name__} declares no trained parts, so every weight would count as frozen and be "
                "left out of its checkpoints: set the class attribute `trained = TrainedParts(exported=(...))` "
                "to the attribute names of the modules it trains."
            )
        missing = [name for name in (names or ()) + self.trained.names if not hasattr(self, name)]
        if missing:
            raise AttributeError(f"{type(self).__name__}.trained names {missing}, which it does not have")
        found = [getattr(self, name) for name in (self.trained.names if names is None else names)]
        return [module for module in found if module is not None]

    def trained_parameters(self, names: tuple[str, ...] | None = None) -> Iterator[nn.Parameter]:
        """Parameters with ``requires_grad`` of the parts named: what an optimizer steps."""
        for part in self.trained_modules(names):
            parameters = [part] if isinstance(part, nn.Parameter) else part.parameters()
            yield from (parameter for parameter in parameters if parameter.requires_grad)

    def configure_model(self) -> None:
        # Sharding units are modules; a trained bare parameter stays whole.
        exported, auxiliary = ([part for part in self.trained_modules(names) if isinstance(part, nn.Module)]
                               for names in (self.trained.exported, self.trained.auxiliary))
        shard_trained_parts(self, exported + auxiliary, own_dtype=auxiliary)

    def generator(self, name: str) -> torch.Generator:
        """This rank's generator ``name`` (declared in ``generators``), on the CPU so that a seed
        gives the same numbers on any device."""
        return self._generators[name]

    # -- lean checkpoints -------------------------------------------------------------------

    def _frozen_keys(self, keys) -> set[str]:
        self.trained_modules()  # a module without a declaration would lose its weights here
        frozen_parameters = {name for name, parameter in self.named_parameters() if not parameter.requires_grad}
        return {key for key in keys if not self.trained.owns(key) or key in frozen_parameters}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.state_dict()
        merged = {key: own[key] for key in self._frozen_keys(own)}
        merged.update(state_dict)
        return super().load_state_dict(merged, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state_dict = checkpoint["state_dict"]
        frozen = self._frozen_keys(state_dict)
        checkpoint["state_dict"] = {key: value for key, value in state_dict.items() if key not in frozen}
        checkpoint[TRAINED_PARTS_KEY] = {"exported": list(self.trained.exported), "auxiliary": list(self.trained.auxiliary)}
        checkpoint[NON_FINITE_SKIPPED_KEY] = self.non_finite_skipped
        save_per_rank(checkpoint, RNG_STATES_KEY, self._training_rng_states or capture_rng_states())
        save_per_rank(checkpoint, GENERATORS_KEY, {name: g.get_state() for name, g in self._generators.items()})

    # -- exact resume -----------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.non_finite_skipped = int(checkpoint.get(NON_FINITE_SKIPPED_KEY, 0))
        world_size = self.trainer.world_size if attached_trainer(self) is not None else 1
        self._rng_states_to_restore = load_per_rank(checkpoint, RNG_STATES_KEY, self.global_rank, world_size)
        generators = load_per_rank(checkpoint, GENERATORS_KEY, self.global_rank, world_size)
        if generators is not None and set(generators) == set(self._generators):
            for name, state in generators.items():
                self._generators[name].set_state(state.clone())
            self._generators_restored = True

    def on_fit_start(self) -> None:
        # Seeded here, not in __init__, because the rank is known only now; a restored stream continues.
        if not self._generators_restored:
            for stream, generator in enumerate(self._generators.values()):
                generator.manual_seed(rank_seed(self.seed, self.global_rank, stream))

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
        norm = torch.nn.utils.get_total_norm(gradients)
        if self.skip_non_finite({GRADIENTS_TERM: norm}):
            optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
        elif not isinstance(optimizer.param_groups[0]["params"][0], DTensor):
            self._gradient_norm = (optimizer, norm)  # the whole model's norm: clipping reuses it

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        cached, self._gradient_norm = self._gradient_norm, None
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and cached and cached[0] is optimizer:
            # Lightning would compute the norm the non-finite check just computed a second time.
            parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
            torch.nn.utils.clip_grads_with_norm_(parameters, gradient_clip_val, cached[1])
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

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
