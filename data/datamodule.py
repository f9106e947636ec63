"""``ShardDataModule``: typed batches of transparent (or layered, or cached) samples from shards.

The pipeline per worker is ``data.stream``, its resumable stages ``data.stages``, the batch
types ``layerdiff.batches`` (collated by ``data.batches``) and the loader ``data.loader``;
this module wires them to Lightning: shard discovery, one stream per split, the position
each training batch brings along, the running count of corrupt members, and checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from data.loader import EpochDataLoader, StreamProgress
from data.schema import IMAGE_KIND, SampleKind, SchemaError
from data.spec import ShardSpecError, resolve_shards
from data.stream import BatchTransform, SampleTransform, ShardStream, Tagged, detect_sample_kind
from layerdiff.resume import save_per_rank, saved_states

log = logging.getLogger(__name__)

WARN_FIRST_CORRUPT = 5
DATA_POSITION_KEY = "data"  # the per-rank entry (layerdiff.resume) of each rank's stream progress


class ShardDataModule(pl.LightningDataModule):
    """Training and validation batches from webdataset shards in the ``data.schema`` format.

    Batches are ``layerdiff.batches.ImageBatch``es, with ``require_layers``
    ``LayeredBatch``es (foreground, background, blend), and from cached shards
    ``CachedBatch``es; all images in a batch have one size. The loaders yield
    ``Tagged(batch, position)``; ``on_before_batch_transfer`` keeps the position (which
    worker, the corrupt members it skipped, where its stream stands) and passes the batch on.

    Checkpoints hold every rank's ``StreamProgress`` (``state_dict``), so a run resumed
    with the same devices and ``num_workers`` continues with exactly the batches the
    interrupted one would have trained on next, mid-epoch too.

    The kind of shards (image or cached by ``python -m data cache-latents``) is read off
    the first sample; training and validation shards must be of one kind.

    Args:
        train_shards: Shards spec for training: a directory of ``*.tar``, a brace
            pattern ``dir/shard-{000000..000009}.tar``, a glob, a file, a
            comma-separated list, or ``embedded:openmoji-demo-<size>/train``.
        val_shards: Shards spec for validation (same forms, e.g.
            ``embedded:openmoji-demo-64/val``); ``None`` disables validation.
        batch_size: Samples per training batch (per device).
        val_batch_size: Samples per validation batch; defaults to ``batch_size``.
        num_workers: DataLoader worker processes per device; 0 decodes in the
            training process.
        shuffle_buffer: Encoded samples held for shuffling in each worker; 0 or 1
            only shuffles the shard order.
        seed: Seed of shard order, shuffle buffer and resampling; combined with
            epoch, rank and worker so every consumer and epoch differs reproducibly.
        resample: Draw training shards with replacement, endlessly (bound the run
            with ``max_steps`` and epochs with ``limit_train_batches``). Without it
            ranks given unequal sample counts finish an epoch at different steps.
        require_layers: Decode the layers and return ``LayeredBatch``es (multi-layer
            objectives); samples without them raise ``SchemaError``.
        max_corrupt_fraction: Stop with ``TooManyCorruptMembersError`` when more
            than this fraction of the samples a worker reads are corrupt.
        ignore_sampling_weights: Draw every training sample once per epoch, whatever its
            ``sampling_weight``. By default a sample of weight ``w`` comes ``floor(w)`` times per
            epoch and once more with probability ``frac(w)`` (0 leaves it out; ``data.schema``),
            as LayerDiffusion sec. 3.4 draws a new round's samples twice as often. Validation
            is never weighted.
        sample_transform: Applied to every decoded sample (``LayerSample`` or
            ``CachedSample``) in the worker, training and validation alike, before
            batching, e.g. ``data.transforms.OverSolidColour``. It must be picklable and a
            function of the sample alone, so that a resumed run repeats it exactly.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resample: bool = False,
        require_layers: bool = False,
        max_corrupt_fraction: float = 0.01,
        ignore_sampling_weights: bool = False,
        sample_transform: SampleTransform | None = None,
    ):
        super().__init__()
        if not train_shards or not str(train_shards).strip():
            raise ShardSpecError(
                "train_shards is empty: give a shards spec, e.g. `train_shards: /data/shards/train` or "
                "`train_shards: embedded:openmoji-demo-64/train`"
            )
        for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                     ("shuffle_buffer", shuffle_buffer, 0), ("val_batch_size", val_batch_size or 1, 1)):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if not 0.0 <= max_corrupt_fraction <= 1.0:
            raise ValueError(f"max_corrupt_fraction must be in [0, 1], got {max_corrupt_fraction}")
        # A transform is an object of any class: checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["sample_transform"])
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resample = resample
        self.require_layers = require_layers
        self.max_corrupt_fraction = max_corrupt_fraction
        self.ignore_sampling_weights = ignore_sampling_weights
        self.sample_transform = sample_transform
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None
        self._train_kind = self._val_kind = IMAGE_KIND
        self._train_loader: EpochDataLoader | None = None
        self._resume: StreamProgress | None = None
        self._corrupt_skipped = 0

    @property
    def corrupt_skipped(self) -> int:
        """Corrupt members skipped so far, summed over all workers (as batches arrived)."""
        return self._corrupt_skipped

    def prepare_data(self) -> None:
        """Build embedded demo shards once per node, before the other ranks look for them."""
        resolve_shards(self.train_shards)
        if self.val_shards:
            resolve_shards(self.val_shards)

    def setup(self, stage: str | None = None) -> None:
        self._train_urls = resolve_shards(self.train_shards)
        self._train_kind = detect_sample_kind(self._train_urls)
        self._val_urls = resolve_shards(self.val_shards) if self.val_shards else None
        if self._val_urls is not None:
            self._val_kind = detect_sample_kind(self._val_urls)
            if self._val_kind != self._train_kind:
                raise SchemaError(
                    f"train_shards {self.train_shards!r} hold samples of kind {self._train_kind} but val_shards "
                    f"{self.val_shards!r} of kind {self._val_kind}; one run reads one kind. Fix: cache both splits "
                    "with one `python -m data cache-latents` setting, or give image shards for both."
                )

    def train_dataloader(self) -> DataLoader:
        if self._train_urls is None:
            self.setup("fit")
        stream = self._stream(self._train_urls, self._train_kind, self.batch_size, training=True)
        # A new loader continues where the last one (or the restored checkpoint) stopped.
        resume = self._train_loader.progress if self._train_loader is not None else self._resume
        self._train_loader = EpochDataLoader(
            stream,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            fit_epoch=self._fit_epoch,
            resume=resume,
        )
        self._resume = None
        return self._train_loader

    def _fit_epoch(self) -> int | None:
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            return trainer.current_epoch
        return None

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shards:
            return []
        if self._val_urls is None:
            self.setup("validate")
        stream = self._stream(self._val_urls, self._val_kind, self.val_batch_size, training=False)
        return EpochDataLoader(stream, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Unwrap a loader's ``Tagged`` item: record a training batch's stream position, add the
        corrupt members skipped before it to the running total (warning about the first few),
        and return the batch alone.

        Lightning calls this for the batch a step is about to train on (after any prefetch),
        so the recorded positions are exactly what training consumed.
        """
        if not isinstance(batch, Tagged):
            return batch
        batch, position = batch
        if position.state is not None:
            self._train_loader.consume(position)
        for description in position.corrupt_members:
            self._corrupt_skipped += 1
            if self._corrupt_skipped <= WARN_FIRST_CORRUPT:
                log.warning("skipped %s", description)
            if self._corrupt_skipped == WARN_FIRST_CORRUPT:
                log.warning(
                    "further corrupt members are skipped without a warning; ShardDataModule.corrupt_skipped "
                    "counts them and `python -m data validate SHARDS` lists them"
                )
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's ``StreamProgress`` and corrupt count (a collective: every rank calls it when
        a checkpoint is written, rank 0 writes them all)."""
        progress = self._train_loader.progress if self._train_loader is not None else self._resume
        local = {
            "progress": (progress or StreamProgress(complete=True, epoch=-1)).to_state(),
            "num_workers": self.num_workers,
            "corrupt_skipped": self._corrupt_skipped,
        }
        state: dict[str, Any] = {}
        save_per_rank(state, DATA_POSITION_KEY, local)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world_size = self._rank_and_world_size()
        ranks = saved_states(state_dict, DATA_POSITION_KEY)
        if ranks is None:
            raise ValueError(f"the checkpoint's {type(self).__name__} state has no data position ({DATA_POSITION_KEY!r}); "
                             "it was written by another version of layerdiff: resume without it by removing that entry")
        saved = ranks[rank] if rank < len(ranks) else ranks[0]
        self._corrupt_skipped = int(saved["corrupt_skipped"])
        self._resume = StreamProgress.from_checkpoint(saved["progress"], (len(ranks), saved["num_workers"]),
                                                      (world_size, self.num_workers), warn=rank == 0)
        self._train_loader = None

    def _stream(self, urls: list[str], kind: SampleKind, batch_size: int, *, training: bool) -> ShardStream:
        rank, world_size = self._rank_and_world_size()
        return ShardStream(
            urls,
            batch_size=batch_size,
            shuffle=training,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            resample=training and self.resample,
            require_layers=self.require_layers,
            rank=rank,
            world_size=world_size,
            max_corrupt_fraction=self.max_corrupt_fraction,
            kind=kind,
            track_position=training,
            weighted=training and not self.ignore_sampling_weights,
            transform=self.sample_transform,
            batch_transform=self._batch_transform(),
        )

    def _batch_transform(self) -> BatchTransform | None:
        """The trained module's ``loader_batch_transform()``, when it has one, for the workers to run."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        hook = getattr(module, "loader_batch_transform", None)
        return hook() if callable(hook) else None

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
