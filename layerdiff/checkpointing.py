"""Checkpoint files that are either complete or absent."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from layerdiff.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, flushes it to disk and renames it
    into place, so a crash while saving never leaves a checkpoint that looks valid but is not:
    the previous file under that name (``last.ckpt``) stays intact until the new one is whole.

    Lightning's own save stages the file in the system temp directory and then moves it, which
    is a copy (and not atomic) when that directory is on another file system, and it holds the
    whole checkpoint in memory first; this streams it to the same directory instead. Remote
    paths (``s3://`` ...) go to Lightning's writer. Select it with
    ``trainer.plugins: [layerdiff.checkpointing.AtomicCheckpointIO]`` (the recipes do).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        filesystem, _ = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(filesystem, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            leftover.unlink(missing_ok=True)  # of a save that crashed; only one process writes a path
        with atomic_write(path) as handle:
            torch.save(checkpoint, handle)
