"""What every layerdiff export writes into its safetensors metadata, and reading it back.

safetensors metadata is a flat ``str -> str`` mapping. Ours holds ``component`` (which part of
the model the file is), ``format_version``, ``layerdiff_version`` and, when known,
``layerdiff_config``: the training hyper-parameters as JSON. Each format adds its own keys
(e.g. the transparent VAE's ``decoder_config``); the released files have none of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from os import PathLike
from typing import Any

import torch
from safetensors import safe_open

# 2: transparent encoder files record offset_scale and input_convention (1 had neither: x300, straight).
FORMAT_VERSION = "2"


def layerdiff_version() -> str:
    try:
        return version("layerdiff")
    except PackageNotFoundError:  # running from a source checkout
        return "unknown"


def provenance(component: str, training_config: Mapping[str, Any] | None) -> dict[str, str]:
    """Provenance strings for an exported file's safetensors metadata.

    ``training_config`` (e.g. the training hyper-parameters) is stored as JSON under
    ``layerdiff_config``; values JSON cannot encode are written as their ``str()``.
    """
    metadata = {"component": component, "format_version": FORMAT_VERSION, "layerdiff_version": layerdiff_version()}
    if training_config is not None:
        metadata["layerdiff_config"] = json.dumps(training_config, default=str, sort_keys=True)
    return metadata


def tensors_for_file(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies in ``dtype``, as safetensors writes them."""
    return {key: value.detach().to("cpu", dtype).contiguous() for key, value in state_dict.items()}


def read_metadata(path: str | PathLike) -> dict[str, str]:
    """The safetensors metadata of a file (empty for the released LayerDiffuse files)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
