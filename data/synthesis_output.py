"""The output folder of ``python -m data synthesize-layers``: settings, shards, their records, the manifest.

A run that is killed at any moment and started again writes every item exactly once:

* ``synthesis.json`` records the settings and the plan's digest; a run with others into the
  same folder stops with an error (finishing the folder needs the same command);
* output shard ``j`` is written whole into ``.staging/shard-<j>/`` (``ShardWriter``, fsynced) and
  renamed to ``shard-<j>.tar``; then ``records/shard-<j>.json`` is written atomically, saying
  which items the shard holds (by index and key) and which were dropped and why. A shard is
  finished when its record exists and its tar has the recorded size (a record of a shard with
  every item dropped names no tar). A restarted run skips finished shards and redoes the others
  from their first item, so a shard interrupted halfway is replaced, never appended to;
* ``index.json`` (the ``ShardWriter`` manifest, plus the settings and drop counts) is written
  last, when every shard is finished: it marks a complete set.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.schema import SCHEMA_VERSION
from data.shards import INDEX_NAME, SHARD_NAME, ShardInfo, ShardManifest, ShardWriter
from data.synthesis import Plan
from layerdiff.files import fsync_directory, write_atomically

SETTINGS_NAME = "synthesis.json"
SETTINGS_FORMAT = "layerdiff-layer-synthesis"
RECORDS_DIR = "records"
STAGING_DIR = ".staging"
CREATED_BY = "python -m data synthesize-layers"


class SynthesisFolderError(ValueError):
    """The output folder belongs to another synthesis run (other settings or inputs)."""


@dataclass
class ShardRecord:
    """What finished output shard ``index`` holds: items written (index -> key) and dropped (index -> reason, detail)."""

    index: int
    items: list[int]
    written: dict[int, str]
    dropped: dict[int, tuple[str, str]]
    sizes: dict[str, int]
    tar: str | None
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.index, "items": self.items, "tar": self.tar, "bytes": self.bytes, "sizes": self.sizes,
                "written": {str(index): key for index, key in self.written.items()},
                "dropped": {str(index): list(why) for index, why in self.dropped.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardRecord:
        return cls(data["shard"], list(data["items"]), {int(index): key for index, key in data["written"].items()},
                   {int(index): tuple(why) for index, why in data["dropped"].items()}, dict(data["sizes"]),
                   data["tar"], int(data["bytes"]))


class SynthesisFolder:
    """The output folder ``root`` of a run with ``settings`` (JSON-able) over ``plan``."""

    def __init__(self, root: str | os.PathLike, settings: dict[str, Any], plan: Plan) -> None:
        self.root = Path(root)
        self.settings = settings
        self.plan = plan

    def check(self) -> None:
        """Refuse a folder made by another run: other settings, another plan, or unknown shards."""
        path = self.root / SETTINGS_NAME
        if not path.is_file():
            existing = sorted(p.name for p in self.root.glob("*.tar")) if self.root.is_dir() else []
            if existing:
                raise SynthesisFolderError(f"{self.root} holds shards ({existing[0]}, ...) but no {SETTINGS_NAME}: it is "
                                           "not a synthesis output this command can resume; choose an empty or new folder")
            return
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SynthesisFolderError(f"{path} cannot be read ({error}); delete the folder and run again") from error
        if not isinstance(recorded, dict) or recorded.get("format") != SETTINGS_FORMAT:
            raise SynthesisFolderError(f"{path} is not a {SETTINGS_FORMAT} file; choose another output folder")
        now = self._description()
        differing = [f"{part}: {key}: {recorded.get(part, {}).get(key)!r} there, {value!r} now"
                     for part in ("settings", "plan") for key, value in now[part].items()
                     if recorded.get(part, {}).get(key) != value]
        if differing:
            raise SynthesisFolderError(
                f"{self.root} was made by a synthesis run with other settings or inputs ({'; '.join(differing)}). Run the "
                "command it was made with to finish it, or write into a new folder (or delete this one)"
            )

    def start(self) -> None:
        """Record the run (first time) and withdraw the manifest until every shard is finished; rank 0 only."""
        (self.root / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        if not (self.root / SETTINGS_NAME).is_file():
            write_atomically(self.root / SETTINGS_NAME, json.dumps(self._description(), indent=2).encode("utf-8"))
        (self.root / INDEX_NAME).unlink(missing_ok=True)

    def _description(self) -> dict[str, Any]:
        return {"format": SETTINGS_FORMAT, "schema_version": SCHEMA_VERSION, "settings": self.settings,
                "plan": {"items": len(self.plan.items), "shards": len(self.plan.shards),
                         "samples_per_shard": self.plan.samples_per_shard, "sha256": self.plan.sha256()}}

    def record(self, shard: int) -> ShardRecord | None:
        """The record of output shard ``shard`` if that shard is finished, else ``None``."""
        path = self.root / RECORDS_DIR / f"shard-{shard:06d}.json"
        try:
            record = ShardRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, or not written by this code: redo the shard
        if record.items != list(self.plan.shards[shard]):
            return None
        if record.tar is not None:
            tar = self.root / record.tar
            if not tar.is_file() or tar.stat().st_size != record.bytes:
                return None
        return record

    def finished(self) -> set[int]:
        return {shard for shard in range(len(self.plan.shards)) if self.record(shard) is not None}

    def open_shard(self, shard: int) -> ShardWriter:
        """A writer for output shard ``shard`` in its own staging folder (emptied of an earlier try)."""
        staging = self.root / STAGING_DIR / f"shard-{shard:06d}"
        shutil.rmtree(staging, ignore_errors=True)
        return ShardWriter(staging, samples_per_shard=sys.maxsize)

    def finish_shard(self, shard: int, writer: ShardWriter, written: dict[int, str],
                     dropped: dict[int, tuple[str, str]]) -> ShardRecord:
        """Move the staged tar into place, then write the record that makes the shard finished."""
        manifest = writer.close()
        name = SHARD_NAME.format(index=shard)
        final = self.root / name
        if manifest.shards:
            os.replace(writer.out_dir / manifest.shards[0].name, final)
            fsync_directory(self.root)
        else:
            final.unlink(missing_ok=True)  # every item dropped: no shard (a stale one would be read)
        shutil.rmtree(writer.out_dir, ignore_errors=True)
        record = ShardRecord(shard, list(self.plan.shards[shard]), written, dropped, dict(manifest.sizes),
                             name if manifest.shards else None, final.stat().st_size if manifest.shards else 0)
        path = self.root / RECORDS_DIR / f"shard-{shard:06d}.json"
        write_atomically(path, json.dumps(record.to_json(), indent=1).encode("utf-8"))
        return record

    def write_manifest(self, extra: dict[str, Any]) -> ShardManifest | None:
        """``index.json`` over every shard, if all are finished (else ``None``, nothing written); rank 0 only."""
        records = [self.record(shard) for shard in range(len(self.plan.shards))]
        if any(record is None for record in records):
            return None
        manifest = ShardManifest()
        for record in records:
            if record.tar is not None:
                manifest.shards.append(ShardInfo(record.tar, len(record.written), record.bytes))
            manifest.sizes.update(record.sizes)
        dropped = Counter(reason for record in records for reason, _ in record.dropped.values())
        manifest.extra.update(created_by=CREATED_BY, layered=True, synthesis=self.settings,
                              items=len(self.plan.items), dropped=dict(sorted(dropped.items())), **extra)
        write_atomically(self.root / INDEX_NAME, json.dumps(manifest.to_json(), indent=2).encode("utf-8"))
        shutil.rmtree(self.root / STAGING_DIR, ignore_errors=True)
        return manifest
