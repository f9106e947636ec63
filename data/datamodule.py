"""``ShardDataModule``: batches of transparent (and optionally layered) samples from shards.

The pipeline in each DataLoader worker, top to bottom:

1. pick this consumer's shards (consumer = rank x worker): a seeded per-epoch
   shard order split between consumers, or, with ``resample``, an endless
   seeded draw with replacement. When there are fewer shards than consumers the
   samples are split instead, so small validation sets still work on many GPUs;
2. shuffle the still-encoded samples in a buffer (cheap: PNG bytes, not pixels);
3. decode (``data.schema.decode_sample``, or ``decode_cached_sample`` for shards
   written by ``python -m data cache-latents``); corrupt members are skipped and
   counted, schema mismatches (a sample of another kind than the first one included)
   stop training;
4. group samples by image size and emit a batch whenever a size has
   ``batch_size`` samples, so aspect buckets never mix in a batch.

Batches are built in the worker (the DataLoader's own batching is off), which is
how the per-worker count of skipped corrupt members reaches the main process.
Their images stay uint8 until they reach the training process, where the loader
turns them into float (``to_unit_float``).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from data.schema import (
    IMAGE_KIND,
    CachedSample,
    CorruptMemberError,
    LayerSample,
    SampleKind,
    SchemaError,
    decode_cached_sample,
    decode_sample,
    kind_mismatch,
    sample_kind,
)
from data.shards import ShardSpecError, iter_shard_samples, resolve_shards

log = logging.getLogger(__name__)

CORRUPT_MEMBERS = "corrupt_members"
IMAGE_KEYS = ("rgb", "alpha", "background", "blend")
WARN_FIRST_CORRUPT = 5
# The corrupt fraction is judged only after this many samples, so one bad file
# early in a stream does not stop training; the end of a stream is always judged.
MIN_SAMPLES_FOR_CORRUPT_CHECK = 100

Item = TypeVar("Item")


class TooManyCorruptMembersError(RuntimeError):
    """More than ``max_corrupt_fraction`` of the samples a worker read were corrupt."""


@dataclass
class _CorruptTracker:
    """Counts samples read and corrupt members skipped by one worker in one epoch."""

    max_fraction: float
    seen: int = 0
    corrupt: int = 0
    latest: str = ""
    pending: list[str] = field(default_factory=list)  # not yet reported in a batch

    def record(self, error: CorruptMemberError) -> None:
        self.corrupt += 1
        self.latest = str(error)
        self.pending.append(self.latest)
        if self.seen >= MIN_SAMPLES_FOR_CORRUPT_CHECK:
            self.check()

    def check(self) -> None:
        if self.corrupt > self.max_fraction * self.seen or (self.corrupt and self.corrupt == self.seen):
            raise TooManyCorruptMembersError(
                f"{self.corrupt} of {self.seen} samples read by one data worker were corrupt, more than "
                f"max_corrupt_fraction={self.max_fraction}; latest: {self.latest}. "
                "Fix: list them with `python -m data validate SHARDS`, re-write the damaged shards, "
                "or raise `max_corrupt_fraction` if losing these samples is acceptable."
            )

    def take_pending(self) -> list[str]:
        pending, self.pending = self.pending, []
        return pending


def detect_sample_kind(shards: list[str]) -> SampleKind:
    """The kind of the first sample the shards hold (the image kind when none can be read).

    Reads one sample's member names; every stream compares its samples with this kind.
    """
    samples = iter_shard_samples(shards, lambda error: None)
    try:
        return sample_kind(next(samples, {}))
    finally:
        samples.close()  # closes the shard file now


def batches_by_size(
    items: Iterable[Item], batch_size: int, size: Callable[[Item], tuple[int, int]]
) -> Iterator[list[Item]]:
    """Group ``items`` by ``size(item)``; a group is emitted when it holds ``batch_size``
    items, the rest at the end (smallest size first). Order within a group is kept."""
    buckets: dict[tuple[int, int], list[Item]] = {}
    for item in items:
        bucket = buckets.setdefault(size(item), [])
        bucket.append(item)
        if len(bucket) == batch_size:
            yield buckets.pop(size(item))
    for remaining in sorted(buckets):
        yield buckets[remaining]


class ShardStream(IterableDataset):
    """The per-worker pipeline of the module docstring; yields batch dicts with uint8 images.

    ``kind`` is the kind of sample every sample must be; by default that of the first sample
    of ``shards`` (``detect_sample_kind``).
    """

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        shuffle: bool,
        shuffle_buffer: int,
        seed: int,
        resample: bool,
        require_layers: bool,
        rank: int,
        world_size: int,
        max_corrupt_fraction: float,
        kind: SampleKind | None = None,
    ):
        self.shards = list(shards)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resample = resample
        self.require_layers = require_layers
        self.rank = rank
        self.world_size = world_size
        self.max_corrupt_fraction = max_corrupt_fraction
        self.kind = kind if kind is not None else detect_sample_kind(self.shards)
        if self.kind.cached and require_layers:
            raise SchemaError(
                f"require_layers is true, but {self.shards[0]} holds samples of kind {self.kind}, which have "
                "no layers. Fix: pass `require_layers: false`, or train this objective on image shards."
            )
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        consumer, consumers = self.rank * num_workers + worker_id, self.world_size * num_workers
        tracker = _CorruptTracker(self.max_corrupt_fraction)
        members = self._assigned_members(consumer, consumers, tracker)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, self.epoch, consumer, 1])
            members = _shuffled(members, self.shuffle_buffer, rng)
        samples = self._decoded(members, tracker)
        for batch in batches_by_size(samples, self.batch_size, lambda sample: sample.size):
            yield self._collate(batch, tracker)
        tracker.check()

    def _decoded(
        self, members: Iterator[dict[str, Any]], tracker: _CorruptTracker
    ) -> Iterator[LayerSample | CachedSample]:
        for sample_members in members:
            tracker.seen += 1
            if sample_kind(sample_members) != self.kind:
                raise kind_mismatch(sample_members, self.kind, f"the first sample of {self.shards[0]}")
            try:
                if self.kind.cached:
                    sample = decode_cached_sample(sample_members)
                else:
                    sample = decode_sample(
                        sample_members, decode_layers=self.require_layers, require_layers=self.require_layers
                    )
            except CorruptMemberError as error:
                tracker.record(error)
                continue
            yield sample

    def _assigned_members(self, consumer: int, consumers: int, tracker: _CorruptTracker) -> Iterator[dict[str, Any]]:
        def shard_damaged(error: CorruptMemberError) -> None:
            tracker.seen += 1
            tracker.record(error)

        if self.resample:
            rng = np.random.default_rng([self.seed, self.epoch, consumer, 0])
            endless = (self.shards[rng.integers(len(self.shards))] for _ in itertools.count())
            yield from iter_shard_samples(endless, shard_damaged)
            return
        order = self.shards
        if self.shuffle:  # the same order on every consumer, so that splitting it is a partition
            order = [order[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        if len(order) >= consumers:
            yield from iter_shard_samples(order[consumer::consumers], shard_damaged)
            return
        # Every consumer reads every shard; damage to a whole shard is reported by consumer 0 only.
        on_damage = shard_damaged if consumer == 0 else lambda error: None
        for index, members in enumerate(iter_shard_samples(order, on_damage)):
            if index % consumers == consumer:
                yield members

    def _collate(self, samples: list[LayerSample] | list[CachedSample], tracker: _CorruptTracker) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "caption": [sample.caption for sample in samples],
            "key": [sample.key for sample in samples],
            "original_size": torch.tensor([sample.original_size for sample in samples], dtype=torch.int64),
            "crop_top_left": torch.tensor([sample.crop_top_left for sample in samples], dtype=torch.int64),
        }
        if self.kind.cached:
            # Each cached field is present in every sample of this kind (checked in _decoded).
            for name, arrays in (("latent", [sample.latent for sample in samples]),
                                 ("prompt_hidden", [sample.prompt_hidden for sample in samples]),
                                 ("prompt_pooled", [sample.prompt_pooled for sample in samples])):
                if arrays[0] is not None:
                    batch[name] = _stacked(arrays).float()
        else:
            foreground = _channels_first([sample.foreground for sample in samples])
            batch["rgb"], batch["alpha"] = foreground[:, :3], foreground[:, 3:]
        if self.require_layers:
            batch["background"] = _channels_first([sample.background for sample in samples])
            batch["blend"] = _channels_first([sample.blend for sample in samples])
            batch["background_caption"] = [sample.background_caption for sample in samples]
            batch["blend_caption"] = [sample.blend_caption for sample in samples]
        skipped = tracker.take_pending()
        batch["corrupt_skipped"] = torch.tensor(len(skipped), dtype=torch.int64)
        batch[CORRUPT_MEMBERS] = skipped
        return batch


def _shuffled(items: Iterator[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.integers(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    for index in rng.permutation(len(buffer)):
        yield buffer[index]


def _channels_first(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``H x W x C`` images to one contiguous ``B x C x H x W`` tensor."""
    return _stacked([image.transpose(2, 0, 1) for image in images])


def _stacked(arrays: list[np.ndarray]) -> torch.Tensor:
    """Arrays of one shape to one contiguous tensor ``[B, ...]``.

    Inside a worker, default_collate stacks straight into shared memory, which saves a
    copy on the way to the training process. In the training process itself numpy
    does it: torch's thread team ran this copy 3x slower on a busy 2-core machine.
    """
    if get_worker_info() is None:
        return torch.from_numpy(np.stack(arrays))
    with warnings.catch_warnings():
        # Pillow's arrays are read-only; torch warns about wrapping them, but they are only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return default_collate([torch.from_numpy(array) for array in arrays])


def to_unit_float(batch: dict[str, Any], *, pin_memory: bool = False) -> dict[str, Any]:
    """Convert a ``ShardStream`` batch's uint8 images to contiguous float32 in [0, 1], in place.

    Done in the training process, not the workers: float images are four times the
    bytes to pass between processes; sending uint8 doubled the throughput of one worker
    at 256 px on a 2-core machine. numpy rather than torch: torch's thread team made
    this conversion 8x slower there.
    The cast and the multiply by 1/255 are within one float32 ulp of x / 255; 255 -> 1.0.
    """
    for name in IMAGE_KEYS:
        if name in batch:
            unit = torch.empty(batch[name].shape, dtype=torch.float32, pin_memory=pin_memory)
            array = unit.numpy()
            np.copyto(array, batch[name].numpy())
            array *= np.float32(1.0 / 255.0)
            batch[name] = unit
    return batch


class _EpochDataLoader(DataLoader):
    """Runs a ``ShardStream``; each pass starts the next epoch and images arrive as float.

    Each pass tells the stream its epoch, so shuffling differs per epoch; workers
    are not persistent, so each pass pickles the dataset afresh with that epoch.
    Images cross from the workers as uint8 and become float here (``to_unit_float``),
    in pinned memory when ``pin_memory``.
    """

    def __init__(self, dataset: ShardStream, *, first_epoch: int, num_workers: int, pin_memory: bool):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.epoch = first_epoch
        self.pin_float_images = pin_memory

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.epoch = self.epoch
        self.epoch += 1
        batches = super().__iter__()
        try:
            for batch in batches:
                yield to_unit_float(batch, pin_memory=self.pin_float_images)
        finally:
            # A worker's exception leaves torch's iterator in a reference cycle, so its workers
            # would be shut down only by a later garbage collection, which then stalls ~5 s.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


class ShardDataModule(pl.LightningDataModule):
    """Training and validation batches from webdataset shards in the ``data.schema`` format.

    Each batch is a dict: ``rgb`` float32 ``[B, 3, H, W]`` in [0, 1] (straight colour,
    padded under zero alpha), ``alpha`` ``[B, 1, H, W]``, ``caption`` and ``key``
    (lists of str), ``original_size`` and ``crop_top_left`` int64 ``[B, 2]``,
    ``corrupt_skipped`` (int64 scalar: corrupt members the producing worker skipped
    since its previous batch) and, with ``require_layers``, ``background``, ``blend``
    ``[B, 3, H, W]``, ``background_caption``, ``blend_caption``. All images in a
    batch have one size. Loader batches also carry ``corrupt_members`` (their
    descriptions), which ``on_before_batch_transfer`` removes and logs.

    Shards written by ``python -m data cache-latents`` give the same batches with
    ``latent`` float32 ``[B, 4, H/8, W/8]`` (the adjusted latent at the UNet's scale)
    instead of ``rgb`` and ``alpha``, plus ``prompt_hidden`` ``[B, 77, D]`` and
    ``prompt_pooled`` ``[B, P]`` when the cache holds text embeddings. The kind is read
    off the first sample; training and validation shards must be of one kind.

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
        require_layers: Decode and return ``background`` / ``blend`` (multi-layer
            objectives); samples without them raise ``SchemaError``.
        max_corrupt_fraction: Stop with ``TooManyCorruptMembersError`` when more
            than this fraction of the samples a worker reads are corrupt.
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
        self.save_hyperparameters()
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
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None
        self._train_kind = self._val_kind = IMAGE_KIND
        self._train_loader: _EpochDataLoader | None = None
        self._next_epoch = 0
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
        self._train_loader = _EpochDataLoader(
            stream, first_epoch=self._next_epoch, num_workers=self.num_workers, pin_memory=torch.cuda.is_available()
        )
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shards:
            return []
        if self._val_urls is None:
            self.setup("validate")
        stream = self._stream(self._val_urls, self._val_kind, self.val_batch_size, training=False)
        return _EpochDataLoader(
            stream, first_epoch=0, num_workers=self.num_workers, pin_memory=torch.cuda.is_available()
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Add the batch's skipped corrupt members to the running total; warn about the first few."""
        if isinstance(batch, dict) and CORRUPT_MEMBERS in batch:
            for description in batch.pop(CORRUPT_MEMBERS):
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
        epoch = self._train_loader.epoch if self._train_loader is not None else self._next_epoch
        return {"epoch": epoch, "corrupt_skipped": self._corrupt_skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._next_epoch = int(state_dict.get("epoch", 0))
        self._corrupt_skipped = int(state_dict.get("corrupt_skipped", 0))
        if self._train_loader is not None:
            self._train_loader.epoch = self._next_epoch

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
        )

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
