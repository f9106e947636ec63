"""Find out before training, not at the first checkpoint hours later, that outputs cannot be written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

GIB = 1024**3


class OutputDirectoryError(OSError):
    """A directory the run writes to cannot be created or written, or has too little free space."""


class OutputDirectoryCheck(Callback):
    """When ``fit`` starts, check every directory the run writes to: ``default_root_dir``, each
    checkpoint callback's ``dirpath`` and each logger's directory. Each must be creatable,
    writable (a probe file is written and removed) and have room for ``free_checkpoints``
    checkpoints of this run. Every rank checks the directories as it sees them, so a node whose
    local disk is full fails as clearly as a shared one.

    A checkpoint's size is estimated from the trained parameters: fp32 weights plus AdamW's two
    moments plus an EMA copy (four times their fp32 size); frozen weights are not saved.

    Args:
        free_checkpoints: checkpoints' worth of free space required; the default 2 is what an
            atomic save of a new checkpoint beside the previous one needs.
    """

    def __init__(self, free_checkpoints: float = 2.0) -> None:
        if free_checkpoints < 0:
            raise ValueError(f"free_checkpoints must be >= 0; got {free_checkpoints}")
        self.free_checkpoints = free_checkpoints

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        needed = self.free_checkpoints * checkpoint_bytes(pl_module)
        for directory in output_directories(trainer):
            check_directory(directory, needed, trainer.global_rank)


def checkpoint_bytes(module: LightningModule) -> int:
    trained = sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)
    return 4 * 4 * trained


def output_directories(trainer: Trainer) -> list[Path]:
    directories = [trainer.default_root_dir]
    directories += [callback.dirpath for callback in trainer.checkpoint_callbacks if getattr(callback, "dirpath", None)]
    directories += [logger.save_dir for logger in trainer.loggers if getattr(logger, "save_dir", None)]
    unique: dict[Path, None] = {}
    for directory in directories:
        unique.setdefault(Path(directory).expanduser().resolve(), None)
    return list(unique)


def check_directory(directory: Path, needed_bytes: float, rank: int) -> None:
    """Create ``directory`` if needed, write a probe file into it, and compare its free space
    with ``needed_bytes``; raise ``OutputDirectoryError`` saying what is wrong and how to fix it."""
    fix = "point trainer.default_root_dir (and the checkpoint and logger directories) at a writable disk"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirectoryError(f"Output directory {directory} cannot be created ({error}); {fix}.") from error
    probe = directory / f".layerdiff-write-probe-{rank}-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"layerdiff")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OutputDirectoryError(f"Output directory {directory} is not writable ({error}); {fix}.") from error
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise OutputDirectoryError(
            f"Output directory {directory} has {free / GIB:.2f} GiB free, but this run's checkpoints need about "
            f"{needed_bytes / GIB:.2f} GiB (trained weights, optimizer moments and EMA, with room to write the next "
            f"checkpoint beside the last). Free space there, {fix}, or lower "
            "OutputDirectoryCheck's free_checkpoints if you know better."
        )
