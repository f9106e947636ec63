"""Helpers shared by the ``test_data_*`` files: tiny samples and shards written into ``tmp_path``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.schema import FOREGROUND, LayerSample, encode_sample
from data.shards import ShardWriter


def tiny_rgba(height: int = 32, width: int = 32, seed: int = 0) -> np.ndarray:
    """A uint8 RGBA image: random colour, a soft-edged visible blob, transparent corners."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    radius = np.hypot((ys - height / 2) / height, (xs - width / 2) / width)
    alpha = np.clip((0.35 - radius) * 8, 0.0, 1.0)
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[..., :3] = rng.integers(0, 256, size=(height, width, 3))
    rgba[..., 3] = np.rint(alpha * 255)
    return rgba


def tiny_sample(index: int, height: int = 32, width: int = 32, *, layers: bool = False) -> LayerSample:
    """A valid ``LayerSample`` with key ``sample-<index>``; with ``layers``, also bg / blend."""
    rng = np.random.default_rng(1000 + index)
    sample = LayerSample(
        key=f"sample-{index:04d}",
        foreground=tiny_rgba(height, width, seed=index),
        caption=f"caption {index}",
        original_size=(2 * height, 2 * width),
        crop_top_left=(index % 3, index % 5),
        source=f"test/{index}.png",
    )
    if layers:
        sample.background = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        sample.blend = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        sample.background_caption = f"background {index}"
        sample.blend_caption = f"blend {index}"
    return sample


def write_tiny_shards(
    out_dir: Path,
    count: int,
    *,
    per_shard: int = 4,
    sizes: tuple[tuple[int, int], ...] = ((32, 32),),
    layers: bool = False,
    damage: dict[int, dict[str, bytes | None]] | None = None,
    metadata: dict[int, dict[str, Any]] | None = None,
) -> list[str]:
    """Write ``count`` tiny samples (sizes cycling through ``sizes``) and return the shard paths.

    ``damage`` maps a sample index to member replacements: bytes replace a member,
    ``None`` removes it. ``metadata`` maps a sample index to further JSON fields
    (e.g. ``{"sampling_weight": 2}``).
    """
    with ShardWriter(out_dir, per_shard) as writer:
        for index in range(count):
            height, width = sizes[index % len(sizes)]
            sample = tiny_sample(index, height, width, layers=layers)
            sample.provenance = dict((metadata or {}).get(index, {}))
            members = encode_sample(sample)
            for name, replacement in (damage or {}).get(index, {}).items():
                if replacement is None:
                    del members[name]
                else:
                    members[name] = replacement
            writer.write(members)
        writer.close()
    return sorted(str(path) for path in Path(out_dir).glob("*.tar"))


def truncated_foreground(index: int = 0) -> bytes:
    """The first half of a valid ``fg.png``: a truncated file."""
    data = encode_sample(tiny_sample(index))[FOREGROUND]
    return data[: len(data) // 2]


def rgb_png(height: int = 32, width: int = 32) -> bytes:
    """A valid PNG without alpha."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
