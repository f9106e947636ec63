"""Where layerdiff keeps things it builds for you (the embedded tiny model, demo shards)."""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"


def cache_dir() -> Path:
    """``$LAYERDIFF_CACHE`` or ``~/.cache/layerdiff``: built artefacts, never committed."""
    root = os.environ.get("LAYERDIFF_CACHE") or Path.home() / ".cache" / "layerdiff"
    return Path(root).expanduser()


def is_embedded(name: str) -> bool:
    """Names like ``embedded:tiny-sdxl`` refer to artefacts the project builds locally."""
    return isinstance(name, str) and name.startswith(EMBEDDED_PREFIX)
