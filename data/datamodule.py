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
how the per-worker count of skipped corrupt members, and each training batch's stream
position (so that a resumed run continues exactly; see "where a worker's stream stands"
below), reach the main process. Their images stay uint8 until they reach the training
process, where the loader turns them into float (``to_unit_float``).
"""

from __future__ import annotations

import logging
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
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
from layerdiff.resume import gather_from_ranks

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


class ShardsChangedError(RuntimeError):
    """A resumed stream's saved position names samples the shards no longer hold."""


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
    buckets = _SizeBuckets(batch_size)
    for item in items:
        full = buckets.add(size(item), item)
        if full is not None:
            yield full
    yield from buckets.drain()


class _SizeBuckets:
    """Items grouped by image size until a group holds ``batch_size`` (``batches_by_size``)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.groups: dict[tuple[int, int], list] = {}

    def add(self, size: tuple[int, int], item: Item) -> list[Item] | None:
        group = self.groups.setdefault(size, [])
        group.append(item)
        return self.groups.pop(size) if len(group) == self.batch_size else None

    def drain(self) -> Iterator[list[Item]]:
        while self.groups:
            yield self.groups.pop(min(self.groups))


# -- where a worker's stream stands, so that a resumed run continues from there --------------
#
# A worker's pipeline has three stateful stages: the shard cursor (which shard, how far into it),
# the shuffle buffer (its samples and its random generator) and the size buckets. After every
# batch it emits, the worker records their state in the batch (``POSITION``); the DataModule keeps
# the position of the last batch training consumed from each worker, and a checkpoint stores it.
# Samples held in the buffer and buckets are recorded by reference (shard, key) and read again on
# restore, so a position is small and restoring it reads about one shard per buffered shard,
# however far into the epoch the run was.

POSITION = "stream_position"
WORKER = "stream_worker"
SampleRef = tuple[str, str]  # (shard url, sample key)


def _ref(members: dict[str, Any]) -> SampleRef:
    return members["__url__"], members["__key__"]


def pack_refs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """References to ``samples`` in a compact form: a shuffle buffer's thousand references go
    with every batch, and each shard's URL once (with an index per sample) costs half as much
    to build and pass between processes as a list of (url, key) tuples. Only lists, strings and
    ints, which ``torch.load(weights_only=True)`` accepts in checkpoints."""
    urls: dict[str, int] = {}
    url_of = [urls.setdefault(sample["__url__"], len(urls)) for sample in samples]
    return {"urls": list(urls), "url_of": url_of, "keys": [sample["__key__"] for sample in samples]}


def unpack_refs(packed: dict[str, Any]) -> list[SampleRef]:
    return [(packed["urls"][index], key) for index, key in zip(packed["url_of"], packed["keys"])]


class _ShardCursor:
    """The raw samples (member dicts) of one consumer's shard sequence, in order.

    ``shards`` is the sequence: a list, or with ``draw`` an endless seeded draw with
    replacement. With ``keep`` only every ``consumers``-th sample, counted over all shards, is
    this consumer's (fewer shards than consumers). ``state()`` / ``restore()`` save and restore
    the place after the last sample yielded.
    """

    def __init__(
        self,
        shards: list[str],
        on_damage: Callable[[CorruptMemberError], None],
        *,
        draw: np.random.Generator | None = None,
        keep: tuple[int, int] | None = None,
    ):
        self.shards = shards
        self.on_damage = on_damage
        self.draw = draw
        self.keep = keep
        self.shard_index = -1  # position in the sequence (draws so far, minus one)
        self.url: str | None = None
        self.read_in_shard = 0  # raw samples read from ``url``
        self.read_total = 0  # raw samples read from all shards, for ``keep``
        self._skip = 0

    def state(self) -> dict[str, Any]:
        return {
            "shard_index": self.shard_index,
            "url": self.url,
            "read_in_shard": self.read_in_shard,
            "read_total": self.read_total,
            "draw": self.draw.bit_generator.state if self.draw is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue after the saved sample: the current shard is read again up to there."""
        self.shard_index, self.url = state["shard_index"], state["url"]
        self._skip, self.read_total = state["read_in_shard"], state["read_total"]
        if self.draw is not None:
            self.draw.bit_generator.state = state["draw"]

    def _next_url(self) -> str | None:
        if self._skip:  # restored in the middle of a shard: finish that one first
            return self.url
        self.shard_index += 1
        if self.draw is not None:
            return self.shards[self.draw.integers(len(self.shards))]
        return self.shards[self.shard_index] if self.shard_index < len(self.shards) else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (url := self._next_url()) is not None:
            self.url, skip, self._skip = url, self._skip, 0
            self.read_in_shard = 0
            for members in iter_shard_samples([url], self.on_damage):
                self.read_in_shard += 1
                if self.read_in_shard <= skip:
                    continue  # read before the checkpoint
                self.read_total += 1
                if self.keep is None or (self.read_total - 1) % self.keep[1] == self.keep[0]:
                    yield members


class _ShuffleBuffer:
    """Reservoir-style shuffling of still-encoded samples in a buffer of ``size``; at the end
    of the input the rest comes out in a random order. ``state()`` records the buffered samples
    by reference and the generator; ``restore`` takes the samples read back."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.rng = rng
        self.items: list[dict[str, Any]] = []
        self.draining: list[dict[str, Any]] | None = None  # the rest, in reverse output order

    def state(self) -> dict[str, Any]:
        if self.draining is not None:
            return {"draining": pack_refs(self.draining)}
        return {"items": pack_refs(self.items), "rng": self.rng.bit_generator.state}

    def refs(self, state: dict[str, Any]) -> list[SampleRef]:
        return unpack_refs(state.get("draining", state.get("items")))

    def restore(self, state: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        if "draining" in state:
            self.draining = samples
        else:
            self.items = samples
            self.rng.bit_generator.state = state["rng"]

    def __call__(self, items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.draining is None:
            for item in items:
                if len(self.items) < self.size:
                    self.items.append(item)
                    continue
                index = self.rng.integers(self.size)
                self.items[index], item = item, self.items[index]
                yield item
            self.draining = [self.items[index] for index in self.rng.permutation(len(self.items))][::-1]
            self.items = []
        while self.draining:
            yield self.draining.pop()


def read_samples(refs: Iterable[SampleRef]) -> dict[SampleRef, dict[str, Any]]:
    """The member dicts of the referenced samples, reading each shard they are in once."""
    wanted: dict[str, set[str]] = {}
    for url, key in refs:
        wanted.setdefault(url, set()).add(key)
    found: dict[SampleRef, dict[str, Any]] = {}
    for url, keys in wanted.items():
        for members in iter_shard_samples([url], lambda error: None):
            if members["__key__"] in keys:
                found[_ref(members)] = members
    return found


class ShardStream(IterableDataset):
    """The per-worker pipeline of the module docstring; yields batch dicts with uint8 images.

    ``kind`` is the kind of sample every sample must be; by default that of the first sample
    of ``shards`` (``detect_sample_kind``). With ``track_position`` every batch carries its
    worker (``WORKER``, the logical worker index) and the stream's position after it
    (``POSITION``); ``resume_from`` maps logical workers to such positions to continue from,
    and ``worker_offset`` rotates which DataLoader worker plays which logical worker, so that
    the DataLoader's round-robin continues with the worker that was next (see
    ``_EpochDataLoader``).
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
        track_position: bool = False,
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
        self.track_position = track_position
        self.epoch = 0
        self.resume_from: dict[int, dict[str, Any]] = {}
        self.worker_offset = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        logical_worker = (worker_id + self.worker_offset) % num_workers
        consumer, consumers = self.rank * num_workers + logical_worker, self.world_size * num_workers
        tracker = _CorruptTracker(self.max_corrupt_fraction)
        cursor = self._cursor(consumer, consumers, tracker)
        shuffler = None
        if self.shuffle and self.shuffle_buffer > 1:
            shuffler = _ShuffleBuffer(self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, consumer, 1]))
        buckets = _SizeBuckets(self.batch_size)
        position = self.resume_from.get(logical_worker)
        if position is not None:
            self._restore(position, cursor, shuffler, buckets, tracker)

        def emit(samples: list) -> dict[str, Any]:
            batch = self._collate(samples, tracker)
            if self.track_position:
                batch[WORKER] = logical_worker
                batch[POSITION] = {
                    "cursor": cursor.state(),
                    "shuffle": shuffler.state() if shuffler is not None else None,
                    "buckets": [[list(size), [(sample.url, sample.key) for sample in group]]
                                for size, group in buckets.groups.items()],
                    "seen": tracker.seen,
                    "corrupt": tracker.corrupt,
                }
            return batch

        members = shuffler(cursor) if shuffler is not None else iter(cursor)
        for sample in self._decoded(members, tracker):
            full = buckets.add(sample.size, sample)
            if full is not None:
                yield emit(full)
        for rest in buckets.drain():
            yield emit(rest)
        tracker.check()

    def _cursor(self, consumer: int, consumers: int, tracker: _CorruptTracker) -> _ShardCursor:
        def shard_damaged(error: CorruptMemberError) -> None:
            tracker.seen += 1
            tracker.record(error)

        if self.resample:
            draw = np.random.default_rng([self.seed, self.epoch, consumer, 0])
            return _ShardCursor(self.shards, shard_damaged, draw=draw)
        order = self.shards
        if self.shuffle:  # the same order on every consumer, so that splitting it is a partition
            order = [order[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        if len(order) >= consumers:
            return _ShardCursor(order[consumer::consumers], shard_damaged)
        # Every consumer reads every shard; damage to a whole shard is reported by consumer 0 only.
        return _ShardCursor(order, shard_damaged if consumer == 0 else lambda error: None, keep=(consumer, consumers))

    def _restore(
        self,
        position: dict[str, Any],
        cursor: _ShardCursor,
        shuffler: _ShuffleBuffer | None,
        buckets: _SizeBuckets,
        tracker: _CorruptTracker,
    ) -> None:
        """Put the pipeline where it was after the batch ``position`` was recorded with."""
        buffered = shuffler.refs(position["shuffle"]) if shuffler is not None else []
        bucketed = [(tuple(size), [tuple(ref) for ref in refs]) for size, refs in position["buckets"]]
        wanted = buffered + [ref for _, refs in bucketed for ref in refs]
        samples = read_samples(wanted)
        missing = [ref for ref in wanted if ref not in samples]
        if missing:
            raise ShardsChangedError(
                f"cannot resume the data stream: sample {missing[0][1]!r} of shard {missing[0][0]} (and "
                f"{len(missing) - 1} more) is gone: the shards changed since the checkpoint was written. Resume "
                "with the shards it was trained on (same train_shards, same files)."
            )
        if shuffler is not None:
            shuffler.restore(position["shuffle"], [samples[ref] for ref in buffered])
        for size, refs in bucketed:
            buckets.groups[size] = [self._decode(samples[ref]) for ref in refs]
        cursor.restore(position["cursor"])
        tracker.seen, tracker.corrupt = position["seen"], position["corrupt"]

    def _decode(self, members: dict[str, Any]) -> LayerSample | CachedSample:
        if self.kind.cached:
            return decode_cached_sample(members)
        return decode_sample(members, decode_layers=self.require_layers, require_layers=self.require_layers)

    def _decoded(
        self, members: Iterator[dict[str, Any]], tracker: _CorruptTracker
    ) -> Iterator[LayerSample | CachedSample]:
        for sample_members in members:
            tracker.seen += 1
            if sample_kind(sample_members) != self.kind:
                raise kind_mismatch(sample_members, self.kind, f"the first sample of {self.shards[0]}")
            try:
                sample = self._decode(sample_members)
            except CorruptMemberError as error:
                tracker.record(error)
                continue
            yield sample

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


@dataclass
class StreamProgress:
    """How far one rank's training stream got in an epoch, as far as training consumed it.

    ``positions`` maps each logical worker to its stream's position after the last batch
    training took from it; ``last_worker`` produced the last of those batches; ``complete``
    says every batch of the epoch was consumed.
    """

    epoch: int = 0
    positions: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_worker: int | None = None
    complete: bool = False

    def to_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "positions": self.positions, "last_worker": self.last_worker,
                "complete": self.complete}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StreamProgress:
        return cls(int(state["epoch"]), {int(worker): position for worker, position in state["positions"].items()},
                   state["last_worker"], bool(state["complete"]))


def _outlast_sigterm(worker_id: int) -> None:
    """SLURM sends SIGTERM to every process of a job, these workers included, while the training
    process saves at its next step (``callbacks.Preemption``), for which it still needs batches.
    Workers end anyway when the loader shuts them down or the training process exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _EpochDataLoader(DataLoader):
    """Runs a ``ShardStream`` one epoch per pass; images arrive as float.

    Each pass tells the stream its epoch, so shuffling differs per epoch: the trainer's
    ``current_epoch`` while fitting (``fit_epoch``), else the next in this loader's own count.
    Workers are not persistent, so each pass pickles the dataset afresh with that epoch.
    Images cross from the workers as uint8 and become float here (``to_unit_float``), in pinned
    memory when ``pin_memory``.

    A training loader also keeps the ``StreamProgress`` of its pass (``consume`` records each
    batch training takes). A pass over the epoch of ``resume`` continues from there: every
    worker from its position, and worker indices rotated so that torch's round-robin over the
    workers asks the one that was next first. The DataLoader draws worker seeds from its own
    generator, never from the global RNG, so starting a pass does not move training's streams.
    """

    def __init__(
        self,
        dataset: ShardStream,
        *,
        num_workers: int,
        pin_memory: bool,
        fit_epoch: Callable[[], int | None] = lambda: None,
        resume: StreamProgress | None = None,
    ):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         generator=torch.Generator().manual_seed(dataset.seed), worker_init_fn=_outlast_sigterm)
        self.pin_float_images = pin_memory
        self.fit_epoch = fit_epoch
        self.resume = resume
        self.progress = resume if resume is not None else StreamProgress(complete=True, epoch=-1)
        self._yielded = self._consumed = 0
        self._exhausted = False

    def _start_pass(self) -> int:
        """The epoch of the pass now starting; sets up resuming when it is the saved one."""
        epoch = self.fit_epoch()
        if epoch is None:
            epoch = self.progress.epoch + 1 if self.progress.complete else self.progress.epoch
        resume, self.resume = self.resume, None
        self.dataset.resume_from, self.dataset.worker_offset = {}, 0
        if resume is not None and resume.epoch == epoch:
            self.dataset.resume_from = resume.positions
            if resume.last_worker is not None:
                self.dataset.worker_offset = (resume.last_worker + 1) % max(self.num_workers, 1)
            self.progress = resume
        else:
            self.progress = StreamProgress(epoch)
        self.dataset.epoch = epoch
        self._yielded = self._consumed = 0
        self._exhausted = False
        return epoch

    def consume(self, worker: int, position: dict[str, Any]) -> None:
        self.progress.positions[worker] = position
        self.progress.last_worker = worker
        self._consumed += 1
        self._mark_complete()

    def _mark_complete(self) -> None:
        if self._exhausted and self._consumed == self._yielded:
            self.progress.complete = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._start_pass()
        if self.progress.complete:  # resumed after the epoch's last batch: nothing is left of it
            return
        batches = super().__iter__()
        try:
            for batch in batches:
                self._yielded += 1
                yield to_unit_float(batch, pin_memory=self.pin_float_images)
            self._exhausted = True
            self._mark_complete()
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
    descriptions), which ``on_before_batch_transfer`` removes and logs, and training
    batches their stream position, which it removes and records.

    Checkpoints hold every rank's ``StreamProgress`` (``state_dict``), so a run resumed
    with the same devices and ``num_workers`` continues with exactly the batches the
    interrupted one would have trained on next, mid-epoch too.

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
        self._train_loader = _EpochDataLoader(
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
        return _EpochDataLoader(stream, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record a training batch's stream position; add its skipped corrupt members to the
        running total and warn about the first few.

        Lightning calls this for the batch a step is about to train on (after any prefetch),
        so the recorded positions are exactly what training consumed.
        """
        if isinstance(batch, dict) and POSITION in batch:
            self._train_loader.consume(batch.pop(WORKER), batch.pop(POSITION))
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
        """Every rank's ``StreamProgress`` and corrupt count (a collective: every rank calls it when
        a checkpoint is written, rank 0 writes them all)."""
        progress = self._train_loader.progress if self._train_loader is not None else self._resume
        local = {
            "progress": (progress or StreamProgress(complete=True, epoch=-1)).to_state(),
            "num_workers": self.num_workers,
            "corrupt_skipped": self._corrupt_skipped,
        }
        return {"ranks": gather_from_ranks(local)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world_size = self._rank_and_world_size()
        ranks = state_dict["ranks"]
        saved = ranks[rank] if rank < len(ranks) else ranks[0]
        self._corrupt_skipped = int(saved["corrupt_skipped"])
        progress = StreamProgress.from_state(saved["progress"])
        if (len(ranks), saved["num_workers"]) != (world_size, self.num_workers) and progress.positions:
            if rank == 0:
                warnings.warn(
                    f"The checkpoint's data position was recorded with {len(ranks)} rank(s) x "
                    f"{saved['num_workers']} worker(s), this run has {world_size} x {self.num_workers}: the shards "
                    f"split differently, so epoch {progress.epoch} restarts from its beginning (samples already "
                    "seen in it are seen again). Resume with the same devices, nodes and num_workers to continue "
                    "exactly where the run stopped.",
                    stacklevel=2,
                )
            progress = StreamProgress(progress.epoch)
        self._resume = progress
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
        )

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
