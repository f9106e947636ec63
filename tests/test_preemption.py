"""The Preemption callback: a signal is acted on at the next optimizer step, with one
checkpoint that resumes there, a clean stop and its exit code; in-process on a tiny
regression, and through ``train.py fit`` on two CPU ranks where only rank 0 is signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import Preemption
from callbacks.preemption import slurm_job_id
from support.runs import run_environment, saved_step, tiny_fit_arguments
from support.toys import Regression, loader
from support.trainers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.filterwarnings("ignore:.*(num_workers|does not have many workers|LightningModule.lr_scheduler):")


class SendSignal(Callback):
    """Signals this process at the end of batch ``at_batch`` (after the optimizer step, if any)."""

    def __init__(self, signum: signal.Signals, at_batch: int) -> None:
        self.signum, self.at_batch = signum, at_batch
        self.batches = 0
        self.validated_after_signal = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        if self.batches == self.at_batch:
            preemption = next(callback for callback in trainer.callbacks if isinstance(callback, Preemption))
            # would end pytest itself without the callback's handler
            assert signal.getsignal(self.signum) == preemption._record, "Preemption's handler is not installed"
            os.kill(os.getpid(), self.signum)

    def on_validation_start(self, trainer, pl_module):
        self.validated_after_signal |= self.batches >= self.at_batch


def fit(tmp_path: Path, callbacks: list[Callback], ckpt_path: str | None = None, **trainer_args) -> Trainer:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    settings = dict(enable_checkpointing=True, max_steps=8, val_check_interval=2, check_val_every_n_epoch=None,
                    limit_val_batches=1)  # fmt: skip
    trainer = quiet_trainer(tmp_path, callbacks=[checkpoint, *callbacks], **{**settings, **trainer_args})
    trainer.fit(Regression(), train_dataloaders=loader(4), val_dataloaders=loader(1), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def outside_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def test_sigterm_saves_the_step_it_arrived_in_stops_without_validating_and_resumes_there(tmp_path, outside_slurm):
    original = signal.getsignal(signal.SIGTERM)
    preemption, sender = Preemption(), SendSignal(signal.SIGTERM, at_batch=3)
    trainer = fit(tmp_path, [preemption, sender])
    assert trainer.global_step == 3 and preemption.stopped_by == signal.SIGTERM
    assert preemption.exit_code == 128 + signal.SIGTERM
    assert not sender.validated_after_signal, "the stop skips the validation Lightning runs before an early stop"
    assert signal.getsignal(signal.SIGTERM) is original, "handlers are put back after fit"
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert saved_step(last) == 3, "nothing after the stop overwrote the preemption checkpoint"

    resumed = Preemption()
    trainer = fit(tmp_path, [resumed], ckpt_path="last")
    assert trainer.global_step == 8 and resumed.exit_code == 0
    assert saved_step(last) == 8


def test_requeue_signal_outside_slurm_saves_stops_and_says_nothing_was_requeued(tmp_path, outside_slurm):
    preemption = Preemption()
    with pytest.warns(UserWarning, match="outside a SLURM job: nothing to requeue"):
        trainer = fit(tmp_path, [preemption, SendSignal(signal.SIGUSR1, at_batch=2)])
    assert trainer.global_step == 2 and preemption.stopped_by == signal.SIGUSR1
    assert preemption.exit_code == 128 + signal.SIGUSR1
    assert saved_step(tmp_path / "checkpoints" / "last.ckpt") == 2


def test_a_signal_inside_gradient_accumulation_waits_for_the_optimizer_step(tmp_path, outside_slurm):
    # batch 3 is the first half of optimizer step 2
    trainer = fit(tmp_path, [Preemption(), SendSignal(signal.SIGTERM, at_batch=3)], accumulate_grad_batches=2)
    assert trainer.global_step == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == 4


def test_min_steps_does_not_keep_a_signalled_run_going(tmp_path, outside_slurm):
    trainer = fit(tmp_path, [Preemption(), SendSignal(signal.SIGTERM, at_batch=2)], min_steps=6)
    assert trainer.global_step == 2


def test_slurm_job_id_names_array_tasks_as_scontrol_takes_them(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "1200_7"


@pytest.mark.parametrize(
    "checkpoint,message",
    [
        (None, "no ModelCheckpoint with save_last"),
        (ModelCheckpoint(save_last=False), "no ModelCheckpoint with save_last"),
        (ModelCheckpoint(save_last="link"), "save_last='link'"),
        (ModelCheckpoint(save_last=True, save_weights_only=True), "save_weights_only=True"),
    ],
    ids=["no checkpoint", "no last", "linked last", "weights only"],
)
def test_a_checkpoint_that_cannot_resume_is_refused(tmp_path, checkpoint, message):
    callbacks = [Preemption()] if checkpoint is None else [checkpoint, Preemption()]
    trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=callbacks)
    with pytest.raises(ValueError, match=message):
        trainer.fit(Regression(), train_dataloaders=loader(1))


def test_preemption_listed_before_the_model_checkpoint_is_refused(tmp_path):
    callbacks = [Preemption(), ModelCheckpoint(save_last=True)]
    trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=callbacks)
    with pytest.raises(ValueError, match="after the ModelCheckpoint"):
        trainer.fit(Regression(), train_dataloaders=loader(1))


def test_unknown_or_reserved_requeue_signals_are_refused():
    with pytest.raises(ValueError, match="not a signal name"):
        Preemption(requeue_signal="USR1")
    with pytest.raises(ValueError, match="cannot be SIGTERM"):
        Preemption(requeue_signal="SIGTERM")


# -- train.py fit on two CPU ranks -----------------------------------------------------------


def wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            output = process.stdout.read()[-4000:]
            raise AssertionError(f"train.py ended ({process.returncode}) before {path.name} appeared:\n{output}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path.name} did not appear within {timeout:.0f} s:\n{process.stdout.read()[-4000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_to_rank_0_of_a_two_rank_train_py_saves_once_and_exits_143(tiny_sdxl, tiny_vae_shards, tmp_path):
    """Lightning launches rank 1 as a child of rank 0; only rank 0 gets the SIGTERM (a local
    ``kill``), so rank 1 learns of it from the all-reduce and both stop at the same step.
    (Resuming from the checkpoint is tested in-process above and through SLURM.)"""
    root = tmp_path / "run"
    arguments = tiny_fit_arguments(tiny_sdxl, tiny_vae_shards, root, max_steps=5, hold_at_step=3)
    command = [sys.executable, "train.py", "fit", *arguments, "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    process = subprocess.Popen(
        command, cwd=REPO, env=run_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(root / "probe" / "holding", process, timeout=240)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert "Preemption: SIGTERM received; saved step 3" in output
    assert saved_step(root / "checkpoints" / "last.ckpt") == 3
    (wandb_run,) = (root / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("run-*.wandb")), "the offline W&B run has its data file"
    assert "finishing run" in (wandb_run / "logs" / "debug.log").read_text(), "the W&B run was finished"
