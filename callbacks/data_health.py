"""Make skipped data visible: corrupt shard members are counted, never silently dropped."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class CorruptSampleMonitor(Callback):
    """Log the running count of corrupt members the DataModule skipped as ``data/corrupt_skipped``.

    The count lives on the DataModule (``ShardDataModule.corrupt_skipped``), fed by every
    loader worker through the batches, so it is exact with any ``num_workers``.
    """

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "corrupt_skipped"):
            pl_module.log("data/corrupt_skipped", float(datamodule.corrupt_skipped), prog_bar=True)
