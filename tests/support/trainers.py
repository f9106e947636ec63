"""The quiet Lightning trainer of the in-process tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer


def quiet_trainer(root: Path, **overrides: Any) -> Trainer:
    """CPU, one device, two steps, no logger, checkpoints, progress bar, summary or sanity
    check; ``overrides`` are Trainer arguments."""
    arguments = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
        **overrides,
    }
    return Trainer(**arguments)
