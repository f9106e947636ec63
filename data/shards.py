"""Reading and atomically writing shard files (plain POSIX tar, grouped by webdataset's rule).

Which shards a run reads is given by a shards spec (``data.spec``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset
from webdataset.tariterators import base_plus_ext

from data.schema import METADATA, SCHEMA_VERSION, CorruptMemberError, corrupt_member
from layerdiff.files import fsync_directory, write_atomically

SHARD_NAME = "shard-{index:06d}.tar"
INDEX_NAME = "index.json"


def iter_shard_samples(
    urls: Iterable[str], on_damage: Callable[[CorruptMemberError], None]
) -> Iterator[dict[str, Any]]:
    """Yield the member dicts (with ``__key__`` and ``__url__``) of the shards, in order.

    Members are grouped into samples by webdataset's naming rule. A shard that
    cannot be read to its end (truncated or damaged tar) yields the samples before
    the damage; the sample being read when it happened is dropped, reported to
    ``on_damage``, and reading goes on with the next shard.
    """
    for url in urls:
        sample: dict[str, Any] | None = None
        try:
            with webdataset.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
                for info in archive:
                    key, name = base_plus_ext(info.name)
                    if not info.isfile() or key is None or key.startswith("__"):
                        continue
                    data = archive.extractfile(info).read()
                    if sample is None or sample["__key__"] != key:
                        if sample is not None:
                            yield sample
                        sample = {"__key__": key, "__url__": url}
                    sample[name.lower()] = data
            if sample is not None:
                yield sample
        except (tarfile.TarError, OSError, EOFError) as error:
            where = sample["__key__"] if sample is not None else None
            on_damage(corrupt_member(url, where, "<tar>", f"unreadable tar data ({type(error).__name__}: {error})"))


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int


@dataclass
class ShardManifest:
    """What a finished ``ShardWriter`` wrote; saved as ``index.json`` beside the shards."""

    shards: list[ShardInfo] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "sizes": dict(sorted(self.sizes.items())),
            "shards": [vars(shard) for shard in self.shards],
            **self.extra,
        }


@dataclass(frozen=True)
class TarSample:
    """One sample's tar members, already serialised (headers and payloads).

    Serialising is a good part of the cost of writing small samples, so worker
    processes do it and the process writing the shard only appends bytes.
    """

    key: str
    size: str
    data: bytes


def serialise_sample(members: Mapping[str, Any]) -> TarSample:
    """Turn ``encode_sample``'s member dict into tar blocks.

    Headers carry no time stamps or owners: the same sample always gives the same bytes.
    """
    key = members["__key__"]
    blocks = []
    for name, value in members.items():
        if name.startswith("__"):
            continue
        payload = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        info = tarfile.TarInfo(f"{key}.{name}")
        info.size, info.mode, info.mtime = len(payload), 0o644, 0
        blocks += [info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"), payload, _padding(len(payload))]
    return TarSample(key, _size_label(members), b"".join(blocks))


def _size_label(members: Mapping[str, Any]) -> str:
    # Damaged samples are written on purpose to test readers; the manifest counts them as "unknown".
    try:
        metadata = json.loads(members[METADATA])
        return f"{metadata['width']}x{metadata['height']}"
    except (KeyError, TypeError, ValueError):
        return "unknown"


class ShardWriter:
    """Write samples into ``shard-000000.tar``, ``shard-000001.tar``, ... atomically.

    Each shard is written as ``*.tar.tmp``, fsynced, then renamed into place, so an
    interrupted run never leaves a partial shard under a ``.tar`` name. ``index.json``
    is removed when writing starts and written last, so it marks a complete set.
    Shards left over from an earlier, larger run are removed on ``close``.

    Use as a context manager; an exception discards the shard in progress.
    """

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 1000):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.samples_per_shard = samples_per_shard
        self.manifest = ShardManifest()
        self._file: io.BufferedWriter | None = None
        self._in_shard = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob("*.tar.tmp"):
            stale.unlink()
        (self.out_dir / INDEX_NAME).unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:
            self._discard()

    def write(self, sample: TarSample | Mapping[str, Any]) -> None:
        """Append one sample: a ``TarSample`` or ``encode_sample``'s member dict."""
        if not isinstance(sample, TarSample):
            sample = serialise_sample(sample)
        if self._file is None:
            self._file = open(self._temporary_path(), "wb")
            self._in_shard = 0
        self._file.write(sample.data)
        self.manifest.sizes[sample.size] += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def close(self, **extra: Any) -> ShardManifest:
        """Finish the last shard, remove stale shards, write ``index.json`` (with ``extra``)."""
        if self._file is not None:
            self._finish_shard()
        written = {shard.name for shard in self.manifest.shards}
        for old in self.out_dir.glob("shard-*.tar"):
            if old.name not in written:
                old.unlink()
        self.manifest.extra.update(extra)
        write_atomically(self.out_dir / INDEX_NAME, json.dumps(self.manifest.to_json(), indent=2).encode("utf-8"))
        return self.manifest

    def _shard_path(self) -> Path:
        return self.out_dir / SHARD_NAME.format(index=len(self.manifest.shards))

    def _temporary_path(self) -> Path:
        return self._shard_path().with_suffix(".tar.tmp")

    def _finish_shard(self) -> None:
        # End of archive: two zero blocks, then zeros up to a whole record, as tarfile writes it.
        written = self._file.tell() + 2 * tarfile.BLOCKSIZE
        self._file.write(bytes(2 * tarfile.BLOCKSIZE + (-written) % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self._shard_path()
        os.replace(self._temporary_path(), final)
        fsync_directory(self.out_dir)
        self.manifest.shards.append(ShardInfo(final.name, self._in_shard, final.stat().st_size))

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._temporary_path().unlink(missing_ok=True)


def _padding(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)
