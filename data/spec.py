"""Shards specs: the one string that names a set of shards.

A *shards spec* is one string naming a set of shards (the form configs use):

* a directory: every ``*.tar`` directly inside it, sorted;
* a brace pattern: ``/data/train-{000000..000009}.tar``;
* a glob: ``/data/train-*.tar``;
* a single ``.tar`` file, or a URL webdataset can open (``pipe:``, ``http(s)://``, ...);
* a comma-separated list of any of the above;
* ``embedded:openmoji-demo-<size>/train`` (or ``/val``): the demo shards, built into
  the cache on first use (see ``data.demo``).

``resolve_shards`` expands a spec into shard paths or URLs.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import braceexpand

from data.demo import ensure_demo_shards
from layerdiff.paths import EMBEDDED_PREFIX

_DEMO_SPEC = re.compile(r"^openmoji-demo-(?P<size>\d+)/(?P<split>train|val)$")
_URL_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://")
_SPEC_HELP = (
    "a shards spec is a directory of *.tar files, a brace pattern like shards/train-{000000..000009}.tar, "
    "a glob, a .tar file, a comma-separated list of these, or embedded:openmoji-demo-64/train; "
    "write shards with `python -m data write SRC_DIR OUT_DIR` or `python -m data demo OUT_DIR`"
)


class ShardSpecError(ValueError):
    """A shards spec names no shards, or names files that do not exist."""


def resolve_shards(spec: str) -> list[str]:
    """Expand a shards spec (see the module docstring) into a list of shard paths or URLs."""
    if not isinstance(spec, str) or not spec.strip():
        raise ShardSpecError(f"empty shards spec {spec!r}: {_SPEC_HELP}")
    shards: list[str] = []
    for part in (piece.strip() for piece in spec.split(",")):
        if part:
            shards.extend(_resolve_one(part, spec))
    if not shards:
        raise ShardSpecError(f"shards spec {spec!r} names no shards: {_SPEC_HELP}")
    return shards


def _resolve_one(part: str, spec: str) -> list[str]:
    if part.startswith(EMBEDDED_PREFIX):
        match = _DEMO_SPEC.match(part[len(EMBEDDED_PREFIX):])
        if not match:
            raise ShardSpecError(
                f"unknown embedded shards {part!r} in spec {spec!r}: the embedded data sets are "
                "embedded:openmoji-demo-<size>/train and embedded:openmoji-demo-<size>/val"
            )
        return _resolve_one(str(ensure_demo_shards(int(match["size"])) / match["split"]), spec)
    if part.startswith(_URL_SCHEMES):
        return list(braceexpand.braceexpand(part))
    if "{" in part:
        paths = list(braceexpand.braceexpand(part))
    elif any(char in part for char in "*?["):
        paths = sorted(glob.glob(part))
    elif Path(part).is_dir():
        paths = sorted(str(path) for path in Path(part).glob("*.tar"))
        if not paths:
            raise ShardSpecError(f"directory {part!r} (from spec {spec!r}) contains no *.tar shards: {_SPEC_HELP}")
    else:
        paths = [part]
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise ShardSpecError(
            f"shards spec {spec!r}: {len(missing)} of {len(paths)} shard(s) do not exist, "
            f"e.g. {missing[0]!r}: {_SPEC_HELP}"
        )
    return paths
