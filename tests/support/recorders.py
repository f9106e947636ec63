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


class ConstructionRecorder(Callback):
    """Writes ``<path>/rank<N>.json``: the top-level submodules of the LightningModule with
    parameters on the meta device when training sets up, before ``configure_model`` shards and
    fills them (what sharded construction built without storage on that rank)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        empty = sorted({name.split(".")[0] for name, parameter in pl_module.named_parameters() if parameter.is_meta})
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(empty))
