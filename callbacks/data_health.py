"""Make skipped data visible: corrupt shard members are counted, never silently dropped."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class CorruptSampleMonitor(Callback):
    """Log ``data/corrupt_skipped``, the running count of corrupt members the DataModule skipped,
    summed over all ranks (and, within each, over all loader workers), every
    ``log_every_n_steps`` steps and at the end of each epoch, to the progress bar and the loggers.

    The count lives on the DataModule (``ShardDataModule.corrupt_skipped``), fed by every loader
    worker through the batches and kept in checkpoints, so it is exact with any ``num_workers``
    and across resumes.
    """

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:  # the same steps on every rank
            self._log_total(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_total(trainer, pl_module)

    @staticmethod
    def _log_total(trainer: Trainer, pl_module: LightningModule) -> None:
        """A collective: every rank calls it at the same point."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "corrupt_skipped"):
            return
        local = torch.tensor(float(datamodule.corrupt_skipped), device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        pl_module.log("data/corrupt_skipped", total, prog_bar=True, rank_zero_only=True)
