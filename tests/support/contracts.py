"""The contract every objective module passes, in the style of diffusers' tester mixins.

A test class subclasses :class:`ObjectiveContract`, names its module class and recipe, and
says how to build the module on the tiny models; pytest then runs every ``test_*`` below
for it. What is checked is what the base module promises (``layerdiff.modules.base``): only
the declared parts train, runs are deterministic, gradient checkpointing changes nothing but
memory, checkpoints are lean and load back exactly, a non-finite step is skipped, and a run
interrupted and resumed through ``train.py`` ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer

from data import ShardDataModule
from layerdiff.modules.base import FrozenBaseModule
from support.callbacks import (
    GradientRecorder,
    PoisonBatch,
    TrainedWeightsAfterBatch,
    trainable_weights,
)
from support.launch import run_train_py
from support.shards import write_tiny_shards
from support.trainers import quiet_trainer

TRAIN_SAMPLES = 8  # four batches of two: the resume test stops mid-epoch
VAL_SAMPLES = 2


@dataclass(frozen=True)
class TinyParts:
    """What a tiny objective is built from: base model, transparent VAE export, shards."""

    sdxl: Path
    transparent_vae: Path
    train_shards: str
    val_shards: str


def assert_identical(actual: Any, expected: Any, where: str) -> None:
    """Nested dicts/lists/tuples of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (left, right) in enumerate(zip(actual, expected)):
            assert_identical(left, right, f"{where}[{index}]")
    else:
        assert actual == expected, where


def init_arg(value: Any) -> str:
    """A constructor argument as ``train.py`` reads it on the command line (YAML flow)."""
    return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)


class ObjectiveContract:
    module_class: ClassVar[type[FrozenBaseModule]]
    recipe: ClassVar[tuple[str, ...]]  # train.py's -c files: the recipe, then its demo overlay
    artefacts: ClassVar[tuple[str, ...]] = ()  # globs a recipe run must leave under its root
    layered: ClassVar[bool] = False  # trains on multi-layer samples (fg, bg, blend)

    def module_arguments(self, parts: TinyParts) -> dict[str, Any]:
        """Constructor arguments that build the module on the tiny parts."""
        raise NotImplementedError

    # -- building ---------------------------------------------------------------------------

    @pytest.fixture
    def parts(self, tiny_sdxl: Path, tiny_transparent_vae: Path, tmp_path: Path) -> TinyParts:
        train = write_tiny_shards(tmp_path / "shards" / "train", TRAIN_SAMPLES, per_shard=4, sizes=((64, 64),),
                                  layers=self.layered)
        val = write_tiny_shards(tmp_path / "shards" / "val", VAL_SAMPLES, sizes=((64, 64),), layers=self.layered)
        return TinyParts(tiny_sdxl, tiny_transparent_vae, ",".join(train), ",".join(val))

    def make_module(self, parts: TinyParts, **overrides: Any) -> FrozenBaseModule:
        torch.manual_seed(0)  # random initialisation of trained parts
        return self.module_class(**{**self.module_arguments(parts), **overrides})

    def make_data(self, parts: TinyParts) -> LightningDataModule:
        return ShardDataModule(parts.train_shards, parts.val_shards, batch_size=2, num_workers=0, shuffle_buffer=0,
                               require_layers=self.layered)

    def fit(self, module: FrozenBaseModule, parts: TinyParts, root: Path, callbacks=(), **trainer: Any) -> Trainer:
        trainer = quiet_trainer(root, callbacks=list(callbacks), inference_mode=False, **trainer)
        torch.manual_seed(1)  # the global streams training draws from (dropout)
        trainer.fit(module, datamodule=self.make_data(parts))
        return trainer

    # -- the contract -----------------------------------------------------------------------

    def test_two_steps_train_every_declared_part_and_nothing_else(self, parts, tmp_path):
        module = self.make_module(parts)
        before = {key: value.clone() for key, value in module.state_dict().items()}
        self.fit(module, parts, tmp_path, max_steps=2)
        changed = [key for key, value in module.state_dict().items() if not torch.equal(before[key], value)]
        assert [key for key in changed if not module.trained.owns(key)] == []
        for part in module.trained.names:
            if getattr(module, part) is not None:
                assert any(module.trained.owns(key, (part,)) for key in changed), f"{part} did not train"

    def test_the_same_seed_trains_the_same_weights(self, parts, tmp_path):
        runs = []
        for run in ("a", "b"):
            module = self.make_module(parts)
            self.fit(module, parts, tmp_path / run, max_steps=2)
            runs.append(trainable_weights(module))
        assert_identical(runs[1], runs[0], "trained weights")

    def test_gradient_checkpointing_gives_the_same_gradients(self, parts, tmp_path):
        recorded = []
        for checkpointing in (False, True):
            recorder = GradientRecorder()
            self.fit(self.make_module(parts, gradient_checkpointing=checkpointing), parts,
                     tmp_path / str(checkpointing), callbacks=[recorder], max_steps=1)
            recorded.append(recorder.steps)
        plain, checkpointed = recorded
        assert plain and len(plain) == len(checkpointed)
        for step, (expected, actual) in enumerate(zip(plain, checkpointed)):
            assert expected and expected.keys() == actual.keys(), step
            for name in expected:
                torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"{step}: {name}")

    def test_a_checkpoint_holds_only_trained_weights_and_loads_back_exactly(self, parts, tmp_path):
        module = self.make_module(parts)
        trainer = self.fit(module, parts, tmp_path, max_steps=1)
        path = tmp_path / "model.ckpt"
        trainer.save_checkpoint(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        frozen = {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
        saved = set(checkpoint["state_dict"])
        assert saved and all(module.trained.owns(key) and key not in frozen for key in saved)
        assert checkpoint["trained_parts"]["exported"] == list(module.trained.exported)
        restored = self.module_class.load_from_checkpoint(path)
        assert_identical(restored.state_dict(), module.state_dict(), "state_dict")
        for name in module.generators:
            assert torch.equal(restored.generator(name).get_state(), module.generator(name).get_state()), name

    def test_a_non_finite_step_is_skipped_without_an_update(self, parts, tmp_path):
        module = self.make_module(parts)
        initial, after_first = trainable_weights(module), TrainedWeightsAfterBatch(0)
        self.fit(module, parts, tmp_path, callbacks=[PoisonBatch(0), after_first], max_steps=2)
        assert module.non_finite_skipped == 1
        assert_identical(after_first.weights, initial, "weights after the poisoned batch")
        assert all(value.isfinite().all() for value in trainable_weights(module).values())

    @pytest.mark.slow
    def test_a_run_stopped_mid_epoch_and_resumed_through_train_py_ends_exactly_as_an_uninterrupted_one(
        self, parts, tmp_path
    ):
        def train(root: Path, *extra: str) -> None:
            model = [f"--model.init_args.{key}={init_arg(value)}" for key, value in self.module_arguments(parts).items()]
            run_train_py(
                "fit", *(argument for config in self.recipe for argument in ("-c", config)), *model,
                f"--trainer.default_root_dir={root}", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={root / 'every-2'}", "--trainer.callbacks.every_n_train_steps=2",
                "--trainer.callbacks.save_top_k=-1",
                f"--data.init_args.train_shards={parts.train_shards}", f"--data.init_args.val_shards={parts.val_shards}",
                "--data.init_args.batch_size=2", "--data.init_args.num_workers=1", "--data.init_args.shuffle_buffer=4",
                *extra,
            )  # fmt: skip

        train(tmp_path / "uninterrupted")
        stopped = tmp_path / "stopped"
        train(stopped, "--trainer.callbacks+=support.callbacks.StopAfterStep", "--trainer.callbacks.step=2")
        assert not list((stopped / "every-2").glob("*step=4.ckpt"))
        train(stopped, f"--ckpt_path={next((stopped / 'every-2').glob('*step=2.ckpt'))}")

        expected, actual = (
            torch.load(next((root / "every-2").glob("*step=4.ckpt")), map_location="cpu", weights_only=False)
            for root in (tmp_path / "uninterrupted", stopped)
        )
        for part in ("global_step", "state_dict", "optimizer_states", "per_rank", "ShardDataModule"):
            assert_identical(actual[part], expected[part], part)
        averages = [{key: state for key, state in checkpoint["callbacks"].items() if key.startswith("EMA")}
                    for checkpoint in (actual, expected)]
        assert_identical(averages[0], averages[1], "EMA")
        root = tmp_path / "uninterrupted"
        for pattern in ("config.yaml", "checkpoints/last.ckpt", "wandb/offline-run-*", *self.artefacts):
            assert list(root.glob(pattern)), f"{self.module_class.__name__}'s recipe left no {pattern} in {root}"
