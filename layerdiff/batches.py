"""The typed batches objective modules train on: the contract between data loading and modules.

Three kinds, one per path through the data (``data.batches`` builds them from decoded samples):

* ``ImageBatch``: transparent foregrounds, the pixels the transparency codec encodes;
* ``CachedBatch``: what ``python -m data cache-latents`` computed from such pixels (the adjusted
  latent and optionally the caption's text embeddings), so training skips the frozen encoders;
* ``LayeredBatch``: several images of one scene, each with its caption (foreground, background,
  blend for LayerDiffusion sec. 3.3's joint layers).

Every batch has one image size, and ``key``, ``caption``, ``original_size`` and
``crop_top_left`` (SDXL micro-conditioning) per sample, and optionally the captions'
token ids. They are plain, mutable dataclasses,
so Lightning moves them to the device field by field (``move_data_to_device``); they live
here, below the modules, so that a module can tell them apart with ``isinstance``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The captions' token ids, one int64 [B, 77] per tokenizer, when the loader's workers tokenized
# them (``layerdiff.models.text.CaptionTokenizer``); ``None`` and the module tokenizes itself.
TokenIds = tuple[torch.Tensor, ...]


@dataclass
class ImageBatch:
    """``rgb`` ``[B, 3, H, W]`` straight colour (padded under zero alpha) and ``alpha``
    ``[B, 1, H, W]``, float32 in [0, 1] (uint8 while inside the loader); ``original_size``
    and ``crop_top_left`` int64 ``[B, 2]`` as ``(height, width)`` and ``(top, left)``."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    caption: list[str]
    key: list[str]
    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    token_ids: TokenIds | None = None

    def __len__(self) -> int:
        return len(self.key)


@dataclass
class CachedBatch:
    """``latent`` float32 ``[B, 4, H/8, W/8]``: the adjusted latent at the UNet's scale; with
    cached text embeddings also ``prompt_hidden`` ``[B, 77, D]`` and (SDXL) ``prompt_pooled``
    ``[B, P]``, else the module encodes ``caption`` itself."""

    latent: torch.Tensor
    caption: list[str]
    key: list[str]
    original_size: torch.Tensor
    crop_top_left: torch.Tensor
    prompt_hidden: torch.Tensor | None = None
    prompt_pooled: torch.Tensor | None = None
    token_ids: TokenIds | None = None

    def __len__(self) -> int:
        return len(self.key)


@dataclass
class Layer:
    """One layer of a ``LayeredBatch``: ``pixels`` ``[B, C, H, W]`` (C = 4 for straight RGBA,
    3 for opaque RGB), float32 in [0, 1] (uint8 inside the loader), and its captions."""

    name: str
    pixels: torch.Tensor
    caption: list[str]
    token_ids: TokenIds | None = None

    @property
    def rgb(self) -> torch.Tensor:
        return self.pixels[:, :3]

    @property
    def alpha(self) -> torch.Tensor | None:
        """The alpha channel ``[B, 1, H, W]``, or ``None`` for an opaque layer."""
        return self.pixels[:, 3:] if self.pixels.shape[1] == 4 else None


@dataclass
class LayeredBatch:
    """``layers`` of one scene per sample, all of one size, top layer first; ``caption`` is the
    caption of the whole sample (the foreground's for LayerDiffusion's fg / bg / blend)."""

    layers: list[Layer]
    caption: list[str]
    key: list[str]
    original_size: torch.Tensor
    crop_top_left: torch.Tensor

    def __len__(self) -> int:
        return len(self.key)

    def layer(self, name: str) -> Layer:
        """The layer called ``name``; a ``KeyError`` lists the names there are."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in this batch; it has {[layer.name for layer in self.layers]}")


Batch = ImageBatch | CachedBatch | LayeredBatch
