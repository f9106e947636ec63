"""Reading a ``ShardDataModule``'s training batches as training takes them, to compare resumed streams."""

from __future__ import annotations

from data import ShardDataModule


def batches_from(module: ShardDataModule, count: int | None = None) -> list[list[str]]:
    """The keys of the next ``count`` batches training takes (all of the epoch when None); each
    batch passes ``on_before_batch_transfer``, which records the stream position as training does."""
    loader = module.train_dataloader()
    taken = []
    for batch in loader:
        taken.append(module.on_before_batch_transfer(batch, 0).key)
        if count is not None and len(taken) == count:
            break
    return taken
