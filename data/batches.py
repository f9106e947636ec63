"""Collate decoded samples into the typed batches of ``layerdiff.batches``, and make their images float.

Batches are collated in the DataLoader worker with their images still uint8: float images
are four times the bytes to pass between processes (sending uint8 doubled the throughput of
one worker at 256 px on a 2-core machine). The training process then converts them
(``to_unit_float``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

from data.cached import CachedSample
from data.schema import LayerSample
from layerdiff.batches import Batch, CachedBatch, ImageBatch, Layer, LayeredBatch

# The layers of a LayerDiffusion sample, top first (sec. 3.3): the foreground over the background.
FOREGROUND_LAYER, BACKGROUND_LAYER, BLEND_LAYER = "foreground", "background", "blend"


def collate_images(samples: Sequence[LayerSample]) -> ImageBatch:
    foreground = channels_first([sample.foreground for sample in samples])
    return ImageBatch(rgb=foreground[:, :3], alpha=foreground[:, 3:], **_common(samples))


def collate_cached(samples: Sequence[CachedSample]) -> CachedBatch:
    """Each cached field is present in every sample of a stream (one kind per stream)."""
    def stacked_field(name: str) -> torch.Tensor | None:
        arrays = [getattr(sample, name) for sample in samples]
        return stacked(arrays).float() if arrays[0] is not None else None

    return CachedBatch(latent=stacked_field("latent"), prompt_hidden=stacked_field("prompt_hidden"),
                       prompt_pooled=stacked_field("prompt_pooled"), **_common(samples))


def collate_layers(samples: Sequence[LayerSample]) -> LayeredBatch:
    """Foreground (RGBA), background and blend (RGB) of multi-layer samples."""
    layers = [
        Layer(FOREGROUND_LAYER, channels_first([s.foreground for s in samples]), [s.caption for s in samples]),
        Layer(BACKGROUND_LAYER, channels_first([s.background for s in samples]),
              [s.background_caption for s in samples]),
        Layer(BLEND_LAYER, channels_first([s.blend for s in samples]), [s.blend_caption for s in samples]),
    ]
    return LayeredBatch(layers=layers, **_common(samples))


def _common(samples: Sequence[LayerSample] | Sequence[CachedSample]) -> dict:
    return {
        "caption": [sample.caption for sample in samples],
        "key": [sample.key for sample in samples],
        "original_size": torch.tensor([sample.original_size for sample in samples], dtype=torch.int64),
        "crop_top_left": torch.tensor([sample.crop_top_left for sample in samples], dtype=torch.int64),
    }


def channels_first(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``H x W x C`` images to one contiguous ``B x C x H x W`` tensor."""
    return stacked([image.transpose(2, 0, 1) for image in images])


def stacked(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Arrays of one shape to one contiguous tensor ``[B, ...]``.

    Inside a worker, default_collate stacks straight into shared memory, which saves a
    copy on the way to the training process. In the training process itself numpy
    does it: torch's thread team ran this copy 3x slower on a busy 2-core machine.
    """
    if get_worker_info() is None:
        return torch.from_numpy(np.stack(arrays))
    with warnings.catch_warnings():
        # Pillow's arrays are read-only; torch warns about wrapping them, but they are only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return default_collate([torch.from_numpy(array) for array in arrays])


def unit_float(images: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
    """uint8 images to contiguous float32 in [0, 1].

    numpy rather than torch: torch's thread team made this conversion 8x slower on a busy
    2-core machine. The cast and the multiply by 1/255 are within one float32 ulp of x / 255;
    255 -> 1.0.
    """
    if images.dtype != torch.uint8:  # converting twice would silently darken every image 255x
        raise TypeError(f"unit_float converts uint8 images; these are already {images.dtype}")
    unit = torch.empty(images.shape, dtype=torch.float32, pin_memory=pin_memory)
    array = unit.numpy()
    np.copyto(array, images.numpy())
    array *= np.float32(1.0 / 255.0)
    return unit


def to_unit_float(batch: Batch, *, pin_memory: bool = False) -> Batch:
    """Convert a batch's uint8 images to float32 in [0, 1] (``unit_float``), in place."""
    if isinstance(batch, ImageBatch):
        batch.rgb = unit_float(batch.rgb, pin_memory=pin_memory)
        batch.alpha = unit_float(batch.alpha, pin_memory=pin_memory)
    elif isinstance(batch, LayeredBatch):
        for layer in batch.layers:
            layer.pixels = unit_float(layer.pixels, pin_memory=pin_memory)
    return batch
