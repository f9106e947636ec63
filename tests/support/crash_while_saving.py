"""A test-only callback that hard-kills a training run in the middle of writing a checkpoint.

``train.py`` runs in ``tests/test_fsdp.py`` load it from ``tests/`` (on ``PYTHONPATH``) as
``support.crash_while_saving.CrashWhileSaving``.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class _KillWhenPickled:
    """Pickling this SIGKILLs the process: no exception handler or cleanup code runs."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


class CrashWhileSaving(Callback):
    """On rank 0, die while the ``save_number``-th checkpoint of ``step`` is being written.

    The checkpoint dict gets an entry whose pickling kills the process, so the crash comes
    while ``meta.pt`` is written: after every rank's shards are on disk, the moment at which
    a save into the checkpoint folder itself would leave new shards under an old or
    truncated ``meta.pt``.

    Args:
        step: the global step whose save crashes.
        save_number: which save at that step (ModelCheckpoint writes the step's checkpoint,
            then ``last.ckpt``).
    """

    def __init__(self, step: int, save_number: int = 1) -> None:
        self.step = step
        self.save_number = save_number
        self._saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        self._saves += 1
        if self._saves == self.save_number:
            checkpoint["crash_while_pickled"] = _KillWhenPickled()
