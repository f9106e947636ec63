"""Faults: non-finite losses are skipped, counted and, when they persist, stop training with a
message that names the step, the loss term and the last checkpoint; outputs that cannot be
written are reported before training starts; corrupt members are counted over workers and ranks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import OutputDirectoryCheck, OutputDirectoryError
from data import ShardDataModule
from data.schema import FOREGROUND
from layerdiff.modules.base import FrozenBaseModule, NonFiniteLossError, TrainedParts
from support.shards import write_tiny_shards
from support.trainers import quiet_trainer
from train import LayerdiffCLI

REPO = Path(__file__).resolve().parents[1]


class Regression(FrozenBaseModule):
    """Fits one weight; its loss is NaN at the steps in ``nan_at``."""

    trained = TrainedParts(exported=("weight",))

    def __init__(self, nan_at: set[int], max_non_finite_steps: int = 3):
        super().__init__(max_non_finite_steps=max_non_finite_steps)
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.nan_at = nan_at
        self.weights_after: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = (batch.rgb.mean() - self.weight) ** 2
        if batch_idx in self.nan_at:
            loss = loss * float("nan")
        if self.skip_non_finite({"regression": loss}):
            return None
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.weights_after.append(float(self.weight))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def shards(tmp_path) -> str:
    write_tiny_shards(tmp_path / "shards", 16, per_shard=8)
    return str(tmp_path / "shards")


def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(shards, tmp_path):
    module = Regression(nan_at={2, 3})
    quiet_trainer(tmp_path, max_steps=6).fit(
        module, datamodule=ShardDataModule(shards, batch_size=2, num_workers=0))
    weights = module.weights_after
    assert weights[2] == weights[1] and weights[3] == weights[1]  # no update in the skipped steps
    assert weights[4] != weights[3] and module.non_finite_skipped == 2


def test_persistent_non_finite_losses_stop_with_step_term_and_checkpoint(shards, tmp_path):
    module = Regression(nan_at=set(range(3, 100)), max_non_finite_steps=3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_last=True)
    with pytest.raises(NonFiniteLossError) as raised:
        quiet_trainer(tmp_path, max_steps=20, enable_checkpointing=True, callbacks=[checkpoints]).fit(
            module, datamodule=ShardDataModule(shards, batch_size=2, num_workers=0))
    message = str(raised.value)
    assert "regression = nan" in message and "3 steps in a row" in message and "max_non_finite_steps=3" in message
    assert f"{tmp_path / 'checkpoints'}" in message and "--ckpt_path" in message
    assert module.non_finite_skipped == 3


def test_a_nan_producing_learning_rate_stops_train_py_with_the_promised_message(tiny_sdxl, tmp_path):
    """The real recipe: an absurd learning rate blows the transparency decoder up within steps."""
    write_tiny_shards(tmp_path / "train", 8, per_shard=8, sizes=((64, 64),))
    arguments = [
        "fit", "-c", "configs/transparent_vae.yaml", "-c", "configs/demo/transparent_vae.yaml",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=40", "--trainer.logger=false",
        "--trainer.callbacks=[]", "--trainer.limit_val_batches=0",
        f"--model.init_args.base_model={tiny_sdxl}", "--model.init_args.learning_rate=1e30",
        "--model.init_args.decoder_block_out_channels=[8, 8, 16, 16, 16, 16, 16]",
        "--model.init_args.gradient_clip_norm=null", "--model.init_args.max_non_finite_steps=2",
        f"--data.init_args.train_shards={tmp_path / 'train'}", "--data.init_args.val_shards=null",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
    ]
    with pytest.raises(NonFiniteLossError, match=r"step \d+: .*(reconstruction|identity|gradients) = .*2 steps in a row"):
        LayerdiffCLI(args=arguments)


def test_an_unwritable_output_directory_is_reported_before_training(shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    module = Regression(nan_at=set())
    with pytest.raises(OutputDirectoryError, match=r"a-file/run cannot be created.*default_root_dir"):
        quiet_trainer(blocker / "run", max_steps=1, callbacks=[OutputDirectoryCheck()]).fit(
            module, datamodule=ShardDataModule(shards, num_workers=0))
    assert module.weights_after == []  # not one step was trained


def test_a_full_output_directory_is_reported_before_training(shards, tmp_path):
    module = Regression(nan_at=set())
    free_checkpoints = 10 * torch.finfo(torch.float32).max  # more room than any disk has
    with pytest.raises(OutputDirectoryError, match=r"GiB free, but this run's checkpoints need about"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[OutputDirectoryCheck(free_checkpoints=free_checkpoints)]).fit(
            module, datamodule=ShardDataModule(shards, num_workers=0))
    assert module.weights_after == []


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_count_every_corrupt_member_once(tiny_sdxl, tmp_path):
    """DDP on two CPU processes: 8 shards, one corrupt member in each, 2 shards per (rank, worker);
    the logged count is the sum over ranks and workers, and throughput and memory are logged."""
    damage = {index: {FOREGROUND: b"not a png"} for index in range(0, 32, 4)}
    write_tiny_shards(tmp_path / "train", 32, per_shard=4, sizes=((64, 64),), damage=damage)
    command = [
        sys.executable, "train.py", "fit", "-c", "configs/transparent_vae.yaml", "-c", "configs/demo/transparent_vae.yaml",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.devices=2",
        "--trainer.strategy=ddp_find_unused_parameters_true",
        "--trainer.max_steps=6", "--trainer.log_every_n_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'run'}",
        "--trainer.callbacks=[callbacks.CorruptSampleMonitor, callbacks.TrainingThroughput]",
        f"--model.init_args.base_model={tiny_sdxl}",
        "--model.init_args.decoder_block_out_channels=[8, 8, 16, 16, 16, 16, 16]",
        f"--data.init_args.train_shards={tmp_path / 'train'}", "--data.init_args.val_shards=null",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=2", "--data.init_args.resample=false",
        "--data.init_args.max_corrupt_fraction=0.5",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    logged = [row for row in rows if row.get("data/corrupt_skipped")]
    assert float(logged[-1]["data/corrupt_skipped"]) == 8  # 6 steps x 2 ranks x 2 samples: the whole epoch
    performance = [row for row in rows if row.get("perf/samples_per_sec")]
    assert performance and all(float(row["perf/samples_per_sec"]) > 0 for row in performance)
    assert all(float(row["perf/peak_memory_gib_rank0"]) > 0 and float(row["perf/peak_memory_gib_rank1"]) > 0
               for row in performance)
    assert all(float(row["perf/tflops_per_sec"]) > 0 for row in performance)
