"""Per-sample transforms for ``ShardDataModule(sample_transform=...)``, applied in the data workers.

A transform takes a decoded ``LayerSample`` (or ``CachedSample``) and returns one; it runs
before batching, on uint8 pixels, and must be a function of the sample alone (randomness,
if any, seeded from ``sample.key``) so that a resumed run sees the same samples. In a
config it is a ``class_path`` with ``init_args``, e.g.
``sample_transform: {class_path: data.transforms.OverSolidColour}``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from data.schema import LayerSample


class OverSolidColour:
    """Composite the transparent foreground over a solid colour (pure green by default): the
    green-screen image a matting objective trains on (DiffuMatting, arXiv:2403.06168).

    The foreground's colour becomes ``rgb * alpha + colour * (1 - alpha)`` (Porter-Duff over,
    rounded to uint8); its alpha is kept, as the matte to predict.
    """

    def __init__(self, colour: tuple[int, int, int] = (0, 255, 0)):
        if len(colour) != 3 or not all(0 <= value <= 255 for value in colour):
            raise ValueError(f"colour must be three integers in [0, 255], got {colour!r}")
        self.colour = tuple(int(value) for value in colour)

    def __call__(self, sample: LayerSample) -> LayerSample:
        if not isinstance(sample, LayerSample):
            raise TypeError(f"OverSolidColour composites image samples, got a {type(sample).__name__} ({sample.key}); "
                            "use it with image shards, not cached latents")
        foreground = sample.foreground.astype(np.float32)
        alpha = foreground[..., 3:] / 255.0
        colour = np.asarray(self.colour, np.float32)
        over = np.rint(foreground[..., :3] * alpha + colour * (1.0 - alpha)).astype(np.uint8)
        return replace(sample, foreground=np.concatenate([over, sample.foreground[..., 3:]], axis=-1))
