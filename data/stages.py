"""The stateful stages of a worker's sample stream, each able to say where it stands and to go back there.

A worker's pipeline (``data.stream``) has four stateful stages: the shard cursor (which shard,
how far into it), the weighted repeats (the copies of the last sample still to come), the
shuffle buffer (its samples and its random generator) and the size buckets; a
``CorruptTracker`` counts what it read and skipped. After every batch the worker
records their state (the stream position, which travels beside the batch); a checkpoint
stores the position of the last batch training consumed from each worker. Samples held in the
buffer and buckets are recorded by reference (shard, key) and read again on restore, so a
position is small and restoring it reads about one shard per buffered shard, however far into
the epoch the run was.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from data.schema import CorruptMemberError
from data.shards import iter_shard_samples

# The corrupt fraction is judged only after this many samples, so one bad file
# early in a stream does not stop training; the end of a stream is always judged.
MIN_SAMPLES_FOR_CORRUPT_CHECK = 100

Item = TypeVar("Item")
SampleRef = tuple[str, str]  # (shard url, sample key)


class TooManyCorruptMembersError(RuntimeError):
    """More than ``max_corrupt_fraction`` of the samples a worker read were corrupt."""


class ShardsChangedError(RuntimeError):
    """A resumed stream's saved position names samples the shards no longer hold."""


@dataclass
class CorruptTracker:
    """Counts samples read and corrupt members skipped by one worker in one epoch."""

    max_fraction: float
    seen: int = 0
    corrupt: int = 0
    latest: str = ""
    pending: list[str] = field(default_factory=list)  # not yet reported beside a batch

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

    def state(self) -> dict[str, int]:
        return {"seen": self.seen, "corrupt": self.corrupt}

    def restore(self, state: dict[str, int]) -> None:
        self.seen, self.corrupt = state["seen"], state["corrupt"]


def batches_by_size(
    items: Iterable[Item], batch_size: int, size: Callable[[Item], tuple[int, int]]
) -> Iterator[list[Item]]:
    """Group ``items`` by ``size(item)``; a group is emitted when it holds ``batch_size``
    items, the rest at the end (smallest size first). Order within a group is kept."""
    buckets = SizeBuckets(batch_size)
    for item in items:
        full = buckets.add(size(item), item)
        if full is not None:
            yield full
    yield from buckets.drain()


class SizeBuckets:
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

    def state(self) -> list[list]:
        """The grouped samples (which have ``url`` and ``key``) by reference, per size."""
        return [[list(size), [(item.url, item.key) for item in group]] for size, group in self.groups.items()]

    @staticmethod
    def refs(state: list[list]) -> list[tuple[tuple[int, int], list[SampleRef]]]:
        return [(tuple(size), [tuple(ref) for ref in refs]) for size, refs in state]


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


class ShardCursor:
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

    @property
    def draw_number(self) -> int:
        """Which draw of the current shard this is: its place in an endless resampled sequence, else 0
        (a sequence that holds each shard once, so that draws keyed by it do not depend on the workers)."""
        return self.shard_index if self.draw is not None else 0

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


def unit_draw(*parts: object) -> float:
    """A number in [0, 1) that is a fixed, uniformly spread function of ``parts`` (a seeded draw
    that needs no generator, so no state to save: a resumed stream draws it again alike)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class WeightedRepeats:
    """Each sample of a ``ShardCursor`` ``floor(w)`` times in a row and once more with probability
    ``frac(w)``, ``w = weight_of(members)``: ``w`` copies per epoch on average, 0 drops it.

    The extra copy is drawn from (seed, epoch, the shard's draw number and file name, key) by
    ``unit_draw``. The state is the copies of the cursor's last sample still to come: the cursor
    has passed that sample, and downstream stages (a shuffle buffer, the buckets) hold its earlier
    copies by reference, each copy once.
    """

    def __init__(self, weight_of: Callable[[dict[str, Any]], float], seed: int, epoch: int):
        self.weight_of = weight_of
        self.seed = seed
        self.epoch = epoch
        self.pending: dict[str, Any] | None = None
        self.left = 0

    def copies(self, members: dict[str, Any], draw_number: int) -> int:
        weight = self.weight_of(members)
        whole = math.floor(weight)
        if weight == whole:
            return whole
        where = (self.seed, self.epoch, draw_number, os.path.basename(members["__url__"]), members["__key__"])
        return whole + (unit_draw(*where) < weight - whole)

    def state(self) -> dict[str, Any]:
        return {"pending": list(_ref(self.pending)) if self.left else None, "left": self.left}

    @staticmethod
    def refs(state: dict[str, Any] | None) -> list[SampleRef]:
        return [tuple(state["pending"])] if state is not None and state["pending"] is not None else []

    def restore(self, state: dict[str, Any] | None, pending: dict[str, Any] | None) -> None:
        self.pending, self.left = (pending, state["left"]) if pending is not None else (None, 0)

    def __call__(self, cursor: ShardCursor) -> Iterator[dict[str, Any]]:
        if self.left:  # restored between the copies of one sample
            yield from self._repeat()
        for members in cursor:
            self.pending, self.left = members, self.copies(members, cursor.draw_number)
            yield from self._repeat()

    def _repeat(self) -> Iterator[dict[str, Any]]:
        while self.left:
            self.left -= 1  # before the yield: a batch made while this copy is out counts it as given
            yield self.pending


class ShuffleBuffer:
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

