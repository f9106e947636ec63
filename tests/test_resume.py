"""Exact resume: a run stopped mid-epoch (by SIGKILL, even) and resumed from its last checkpoint
ends with the weights of an uninterrupted run and has trained on the same samples in the same
order; checkpoints are complete or absent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from data import ShardDataModule
from data.schema import FOREGROUND
from layerdiff.checkpointing import AtomicCheckpointIO
from layerdiff.modules.base import FrozenBaseModule, TrainedParts
from support.shards import truncated_foreground, write_tiny_shards
from support.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]


class DropoutRegression(FrozenBaseModule):
    """A tiny model whose every step draws from the global RNG (dropout), and whose validation
    draws from it too, as sampling callbacks or stochastic metrics might."""

    trained = TrainedParts(exported=("layers",))

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
        self.keys: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.keys.append(list(batch.key))
        features = batch.rgb.mean(dim=(2, 3))
        return (self.layers(features).squeeze(1) - batch.alpha.mean(dim=(1, 2, 3))).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        torch.rand(7)  # moves the global RNG

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit(module, data, root: Path, max_steps: int, ckpt_path=None) -> Trainer:
    trainer = quiet_trainer(
        root,
        max_steps=max_steps,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        enable_checkpointing=True,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=4, save_top_k=-1)],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_data_dropout_and_optimizer_resume_exactly_mid_epoch(tmp_path):
    damage = {6: {FOREGROUND: truncated_foreground()}}
    write_tiny_shards(tmp_path / "train", 40, per_shard=5, sizes=((32, 32), (32, 48)), damage=damage)
    write_tiny_shards(tmp_path / "val", 4, per_shard=4)

    def data():
        return ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), batch_size=3, num_workers=2,
                               shuffle_buffer=6, max_corrupt_fraction=0.5)

    # 13 batches per epoch: the checkpoint at step 4 (where validation also runs) is mid-epoch,
    # and the run goes on into the second epoch.
    uninterrupted = DropoutRegression()
    fit(uninterrupted, data(), tmp_path / "a", max_steps=18)

    interrupted = DropoutRegression()
    fit(interrupted, data(), tmp_path / "b", max_steps=6)  # runs past the checkpoint, then "dies"
    resumed = DropoutRegression()
    resumed_data = data()
    fit(resumed, resumed_data, tmp_path / "b", max_steps=18, ckpt_path=tmp_path / "b/checkpoints/epoch=0-step=4.ckpt")

    for name, weight in uninterrupted.state_dict().items():
        assert torch.equal(weight, resumed.state_dict()[name]), name
    assert interrupted.keys[:4] + resumed.keys == uninterrupted.keys
    assert interrupted.keys[4:6] == resumed.keys[:2]  # the steps lost with the crash are redone as they were
    assert resumed_data.corrupt_skipped == 2  # one per epoch, counted once across the resume
    # What the resume state adds (positions, RNG states) loads as LightningModule.load_from_checkpoint loads
    torch.load(tmp_path / "b/checkpoints/epoch=0-step=4.ckpt", weights_only=True)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.ones(4)}, path)
    # A child process dies in the middle of writing the next checkpoint under the same name.
    script = (
        "import os, torch\n"
        "from layerdiff.checkpointing import AtomicCheckpointIO\n"
        "class DiesWhilePickled:\n"
        "    def __reduce__(self):\n"
        "        os._exit(9)\n"
        f"AtomicCheckpointIO().save_checkpoint({{'weights': torch.zeros(1_000_000), 'x': DiesWhilePickled()}}, "
        f"{str(path)!r})\n"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == 9
    survivor = torch.load(path, weights_only=True)
    assert survivor["step"] == 1 and torch.equal(survivor["weights"], torch.ones(4))
    assert [file.name for file in tmp_path.iterdir() if file.suffix == ".ckpt"] == ["last.ckpt"]
    # The next save replaces the file whole and clears what the crashed one left behind.
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert sorted(file.name for file in tmp_path.iterdir()) == ["last.ckpt"]


def run_train_py(root: Path, shards: Path, tiny_sdxl: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable, "train.py", "fit",
        "-c", "configs/transparent_vae.yaml", "-c", "configs/demo/transparent_vae.yaml",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=12",
        "--trainer.val_check_interval=6",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks+=support.recorders.BatchKeyRecorder",
        f"--trainer.callbacks.path={root / 'batches.jsonl'}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'every-3'}",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=-1",
        f"--model.init_args.base_model={tiny_sdxl}",
        "--model.init_args.discriminator_start_step=2",
        "--model.init_args.decoder_block_out_channels=[8, 8, 16, 16, 16, 16, 16]",
        f"--data.init_args.train_shards={shards / 'train'}",
        f"--data.init_args.val_shards={shards / 'val'}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=2",
        "--data.init_args.shuffle_buffer=8",
        "--data.init_args.resample=false",
        *extra,
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def trained_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_train_py_killed_mid_epoch_and_resumed_ends_as_if_never_stopped(tiny_sdxl, tmp_path):
    shards = tmp_path / "shards"
    write_tiny_shards(shards / "train", 36, per_shard=6, sizes=((64, 64),))
    write_tiny_shards(shards / "val", 2, per_shard=2, sizes=((64, 64),))

    finish(run_train_py(tmp_path / "uninterrupted", shards, tiny_sdxl))

    killed_root = tmp_path / "killed"
    process = run_train_py(killed_root, shards, tiny_sdxl)
    deadline = time.monotonic() + 300
    while not list((killed_root / "every-3").glob("*step=3.ckpt")):
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted((killed_root / "every-3").glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    assert checkpoints and max(int(path.stem.split("step=")[1]) for path in checkpoints) < 12
    finish(run_train_py(killed_root, shards, tiny_sdxl, f"--ckpt_path={checkpoints[-1]}"))

    expected = trained_weights(tmp_path / "uninterrupted/every-3/epoch=0-step=12.ckpt")
    actual = trained_weights(killed_root / "every-3/epoch=0-step=12.ckpt")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name

    def steps(root: Path) -> list[tuple[int, list[str]]]:
        return [tuple(json.loads(line).values()) for line in (root / "batches.jsonl").read_text().splitlines()]

    uninterrupted, with_crash = steps(tmp_path / "uninterrupted"), steps(killed_root)
    assert len(uninterrupted) == 12 and len({key for _, keys in uninterrupted for key in keys}) == 24
    last_saved = int(checkpoints[-1].stem.split("step=")[1])
    # every step either run trained (before the kill, and again after the resume) saw what the
    # uninterrupted run saw at that step, and after the resume every step from the checkpoint on came, in order
    assert all(record == uninterrupted[record[0]] for record in with_crash)
    assert with_crash[-(12 - last_saved):] == uninterrupted[last_saved:]


def test_counting_flops_leaves_the_step_bit_for_bit_unchanged():
    """The throughput callback counts FLOPs on a run's first step: a resumed run counts a step
    the uninterrupted run did not, so counting must not change what the step computes (torch's
    FlopCounterMode does: it decomposes group norm and CPU attention into other kernels)."""
    from callbacks.throughput import CountingFlops
    from layerdiff.models.transparency import TransparencyDecoder

    torch.manual_seed(0)
    decoder = TransparencyDecoder(block_out_channels=(8, 8, 16, 16, 16, 16, 16))
    pixels, latent = torch.rand(2, 3, 64, 64), torch.randn(2, 4, 8, 8)

    def gradients():
        decoder.zero_grad(set_to_none=True)
        decoder(pixels, latent).square().mean().backward()
        return [parameter.grad.clone() for parameter in decoder.parameters()]

    plain = gradients()
    with CountingFlops() as counter:
        counted = gradients()
    assert counter.flops > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, counted))
