"""Callbacks the tests add to ``train.py`` runs (``PYTHONPATH=tests``) to see what training saw."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback


class BatchKeyRecorder(Callback):
    """Appends ``{"step": global_step, "keys": [...]}`` per training batch to a JSON-lines file;
    a resumed run appends to the same file, so a step trained twice is listed twice."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.is_global_zero:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": trainer.global_step, "keys": list(batch.key)}) + "\n")


def steps_seen(path: Path) -> dict[int, list[str]]:
    """Step -> the keys it trained on; for a step trained twice (before a crash and again after
    the resume) the later one."""
    seen: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        seen[record["step"]] = record["keys"]
    return seen
