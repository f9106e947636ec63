"""Test instrumentation for ``train.py`` runs in other processes (importable there through
``PYTHONPATH=tests``): records the step each run starts at and the checkpoint it resumed from,
and holds training at one step until rank 0 has received a signal, so that a test signals a
run at a known step instead of racing it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks import Preemption


class StepProbe(Callback):
    """Writes ``start-rank<r>-run<n>.txt`` (the global step at train start; ``n`` is SLURM's
    restart count, 0 outside SLURM) into ``directory``; on rank 0 also a copy of the checkpoint
    the run resumed from (``resumed-from-run<n>.ckpt``, before training overwrites it), and at
    ``hold_at_step`` touches ``holding`` and waits until the run's Preemption callback has a
    signal. Listed after Preemption, it still runs first (Lightning runs checkpoint callbacks
    last), so the run stops at exactly ``hold_at_step``."""

    def __init__(self, directory: str, hold_at_step: int | None = None, timeout: float = 120.0) -> None:
        self.directory = Path(directory)
        self.hold_at_step = hold_at_step
        self.timeout = timeout

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        run = os.environ.get("SLURM_RESTART_COUNT", "0")
        (self.directory / f"start-rank{trainer.global_rank}-run{run}.txt").write_text(str(trainer.global_step))
        if trainer.ckpt_path and trainer.is_global_zero:
            shutil.copy(trainer.ckpt_path, self.directory / f"resumed-from-run{run}.ckpt")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self.hold_at_step or not trainer.is_global_zero:
            return
        preemption = next(callback for callback in trainer.callbacks if isinstance(callback, Preemption))
        (self.directory / "holding").touch()
        deadline = time.monotonic() + self.timeout
        while preemption.signal_received is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"StepProbe: no signal within {self.timeout:.0f} s at step {self.hold_at_step}")
            time.sleep(0.05)
