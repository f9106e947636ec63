"""``ShardStream``: the pipeline in each DataLoader worker, from shards to typed batches.

Top to bottom:

1. pick this consumer's shards (consumer = rank x worker): a seeded per-epoch
   shard order split between consumers, or, with ``resample``, an endless
   seeded draw with replacement. When there are fewer shards than consumers the
   samples are split instead, so small validation sets still work on many GPUs;
2. repeat each sample by its ``sampling_weight`` (``data.schema``; weighted streams only):
   ``floor(w)`` copies and one more with probability ``frac(w)`` (``data.stages.WeightedRepeats``);
   shuffle the still-encoded samples in a buffer (cheap: PNG bytes, not pixels);
3. decode (``data.schema.decode_sample``, or ``data.cached.decode_cached_sample`` for shards
   written by ``python -m data cache-latents``); corrupt members are skipped and
   counted, schema mismatches (a sample of another kind than the first one included)
   stop training;
4. apply the per-sample ``transform``, if any (e.g. ``data.transforms.OverSolidColour``);
5. group samples by image size and emit a batch whenever a size has
   ``batch_size`` samples, so aspect buckets never mix in a batch (``data.batches``);
6. apply the ``batch_transform``, if any (the module's: a diffusion objective's tokenizes the
   captions here, as diffusers' training scripts do, so the training step only encodes them).

Batches are built in the worker (the DataLoader's own batching is off). Each comes as a
``Tagged(batch, position)``: the ``StreamPosition`` beside it says which worker made it, the
corrupt members that worker skipped since its previous batch and, for training, where the
stream stands after it (``data.stages``), so that a resumed run continues exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data.batches import collate_cached, collate_images, collate_layers
from data.cached import CachedSample, decode_cached_sample
from data.schema import (
    METADATA,
    CorruptMemberError,
    LayerSample,
    SampleKind,
    SchemaError,
    decode_sample,
    kind_mismatch,
    sample_kind,
    sampling_weight,
)
from data.shards import iter_shard_samples
from data.stages import (
    CorruptTracker,
    ShardCursor,
    ShardsChangedError,
    ShuffleBuffer,
    SizeBuckets,
    WeightedRepeats,
    read_samples,
)
from layerdiff.batches import Batch

Sample = LayerSample | CachedSample
# Applied to each decoded sample in the worker; must be picklable (a module-level function or
# a class instance) and a function of the sample alone, so that a resumed stream repeats it.
SampleTransform = Callable[[Sample], Sample]
# Applied to each collated batch in the worker, under the same rules; the objective module
# gives it (``loader_batch_transform``: tokenizing the captions, for a diffusion objective).
BatchTransform = Callable[[Batch], Batch]


@dataclass
class StreamPosition:
    """What travels beside a batch: the logical ``worker`` that made it, the ``corrupt_members``
    (their descriptions) it skipped since its previous batch, and, for a training stream, its
    ``state`` after the batch (``ShardStream``; ``None`` otherwise)."""

    worker: int
    corrupt_members: list[str] = field(default_factory=list)
    state: dict[str, Any] | None = None


class Tagged(NamedTuple):
    """One item a ``ShardStream`` yields (a named tuple, which DataLoaders pass through as one)."""

    batch: Batch
    position: StreamPosition


def member_sampling_weight(members: dict[str, Any]) -> float:
    """The ``sampling_weight`` of an undecoded sample; 1.0 when its JSON is missing or damaged,
    which decoding then reports. A weight that is no number >= 0 raises ``SchemaError``."""
    try:
        metadata = json.loads(members[METADATA])
    except (KeyError, TypeError, ValueError):
        return 1.0
    if not isinstance(metadata, dict):
        return 1.0
    return sampling_weight(metadata, members.get("__url__"), members.get("__key__"))


def detect_sample_kind(shards: list[str]) -> SampleKind:
    """The kind of the first sample the shards hold (the image kind when none can be read).

    Reads one sample's member names; every stream compares its samples with this kind.
    """
    samples = iter_shard_samples(shards, lambda error: None)
    try:
        return sample_kind(next(samples, {}))
    finally:
        samples.close()  # closes the shard file now


class ShardStream(IterableDataset):
    """The per-worker pipeline of the module docstring; yields ``Tagged`` batches with uint8 images.

    ``kind`` is the kind of sample every sample must be; by default that of the first sample
    of ``shards`` (``detect_sample_kind``). ``require_layers`` gives ``LayeredBatch``es (samples
    without layers raise ``SchemaError``), else image or cached batches by ``kind``. With
    ``track_position`` every ``StreamPosition`` carries the stream's state; ``weighted`` draws each sample
    by its ``sampling_weight`` (a repeated sample is decoded, and counted if corrupt, per copy); ``resume_from``
    maps logical workers to such states to continue from, and ``worker_offset`` rotates which
    DataLoader worker plays which logical worker, so that the DataLoader's round-robin
    continues with the worker that was next (see ``data.loader.EpochDataLoader``).
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
        weighted: bool = False,
        transform: SampleTransform | None = None,
        batch_transform: BatchTransform | None = None,
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
        self.weighted = weighted
        self.transform = transform
        self.batch_transform = batch_transform
        self.collate = collate_layers if require_layers else collate_cached if self.kind.cached else collate_images
        self.epoch = 0
        self.resume_from: dict[int, dict[str, Any]] = {}
        self.worker_offset = 0

    def __iter__(self) -> Iterator[Tagged]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        logical_worker = (worker_id + self.worker_offset) % num_workers
        consumer, consumers = self.rank * num_workers + logical_worker, self.world_size * num_workers
        tracker = CorruptTracker(self.max_corrupt_fraction)
        cursor = self._cursor(consumer, consumers, tracker)
        repeats = WeightedRepeats(member_sampling_weight, self.seed, self.epoch) if self.weighted else None
        shuffler = None
        if self.shuffle and self.shuffle_buffer > 1:
            shuffler = ShuffleBuffer(self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, consumer, 1]))
        buckets = SizeBuckets(self.batch_size)
        state = self.resume_from.get(logical_worker)
        if state is not None:
            self._restore(state, cursor, repeats, shuffler, buckets, tracker)

        def emit(samples: list[Sample]) -> Tagged:
            position = StreamPosition(logical_worker, tracker.take_pending())
            if self.track_position:
                position.state = {
                    "cursor": cursor.state(),
                    "repeats": repeats.state() if repeats is not None else None,
                    "shuffle": shuffler.state() if shuffler is not None else None,
                    "buckets": buckets.state(),
                    **tracker.state(),
                }
            batch = self.collate(samples)
            if self.batch_transform is not None:
                batch = self.batch_transform(batch)
            return Tagged(batch, position)

        drawn = repeats(cursor) if repeats is not None else iter(cursor)
        members = shuffler(drawn) if shuffler is not None else drawn
        for sample in self._decoded(members, tracker):
            full = buckets.add(sample.size, sample)
            if full is not None:
                yield emit(full)
        for rest in buckets.drain():
            yield emit(rest)
        tracker.check()

    def _cursor(self, consumer: int, consumers: int, tracker: CorruptTracker) -> ShardCursor:
        def shard_damaged(error: CorruptMemberError) -> None:
            tracker.seen += 1
            tracker.record(error)

        if self.resample:
            draw = np.random.default_rng([self.seed, self.epoch, consumer, 0])
            return ShardCursor(self.shards, shard_damaged, draw=draw)
        order = self.shards
        if self.shuffle:  # the same order on every consumer, so that splitting it is a partition
            order = [order[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        if len(order) >= consumers:
            return ShardCursor(order[consumer::consumers], shard_damaged)
        # Every consumer reads every shard; damage to a whole shard is reported by consumer 0 only.
        return ShardCursor(order, shard_damaged if consumer == 0 else lambda error: None, keep=(consumer, consumers))

    def _restore(
        self,
        state: dict[str, Any],
        cursor: ShardCursor,
        repeats: WeightedRepeats | None,
        shuffler: ShuffleBuffer | None,
        buckets: SizeBuckets,
        tracker: CorruptTracker,
    ) -> None:
        """Put the pipeline where it was after the batch ``state`` was recorded with."""
        pending = WeightedRepeats.refs(state.get("repeats")) if repeats is not None else []  # older states have none
        buffered = shuffler.refs(state["shuffle"]) if shuffler is not None else []
        bucketed = SizeBuckets.refs(state["buckets"])
        wanted = pending + buffered + [ref for _, refs in bucketed for ref in refs]
        samples = read_samples(wanted)
        missing = [ref for ref in wanted if ref not in samples]
        if missing:
            raise ShardsChangedError(
                f"cannot resume the data stream: sample {missing[0][1]!r} of shard {missing[0][0]} (and "
                f"{len(missing) - 1} more) is gone: the shards changed since the checkpoint was written. Resume "
                "with the shards it was trained on (same train_shards, same files)."
            )
        if shuffler is not None:
            shuffler.restore(state["shuffle"], [samples[ref] for ref in buffered])
        for size, refs in bucketed:
            buckets.groups[size] = [self._decode(samples[ref]) for ref in refs]
        if repeats is not None:
            repeats.restore(state.get("repeats"), samples[pending[0]] if pending else None)
        cursor.restore(state["cursor"])
        tracker.restore(state)

    def _decode(self, members: dict[str, Any]) -> Sample:
        """Decode one sample and apply the transform (also to samples read again on restore)."""
        if self.kind.cached:
            sample = decode_cached_sample(members)
        else:
            sample = decode_sample(members, decode_layers=self.require_layers, require_layers=self.require_layers)
        return self.transform(sample) if self.transform is not None else sample

    def _decoded(self, members: Iterator[dict[str, Any]], tracker: CorruptTracker) -> Iterator[Sample]:
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
