"""Data for layerdiff: the shard schema, shard writer/validator CLI, demo data and DataModules.

``python -m data --help`` lists the command-line tools. Imports are lazy so that
``import data`` (e.g. by a config parser) does not pull in Lightning or Pillow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardDataModule": "data.datamodule",
    "PromptDataModule": "data.prompts",
    "SchemaError": "data.schema",
    "CorruptMemberError": "data.schema",
    "ShardSpecError": "data.spec",
    "resolve_shards": "data.spec",
    "ensure_demo_shards": "data.demo",
    "OverSolidColour": "data.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
