"""Per-sample transforms for ``ShardDataModule(sample_transform=...)``, applied in the data workers.

A transform takes a decoded ``LayerSample`` (or ``CachedSample``) and returns one; it runs
before batching, on uint8 pixels, and must be a function of the sample alone (randomness,
if any, seeded from ``sample.key``) so that a resumed run sees the same samples. In a
config it is a ``class_path`` with ``init_args``, e.g.
``sample_transform: {class_path: data.transforms.OverSolidColour}``.
"""

from __future__ import annotations

import re
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


class GreenScreen(OverSolidColour):
    """DiffuMatting's training sample (arXiv:2403.06168 sec. 3.2): the object over a key colour
    (pure green by default), its alpha kept as the matte ``M``, and a caption that names the
    background, so the green-background loss knows which token to supervise.

    ``caption_template`` (``"green background, {caption}"`` by default: at the start, so that a
    long caption cut at the text encoder's 77 tokens keeps it) is applied to every caption that
    does not already contain its words; the loss reads the keyword's first occurrence, the
    template's. With ``caption_template: null`` the captions must name
    ``keyword`` themselves, and one that does not is an error naming the sample.
    """

    def __init__(self, colour: tuple[int, int, int] = (0, 255, 0), keyword: str = "green",
                 caption_template: str | None = "green background, {caption}"):
        super().__init__(colour)
        if not keyword.strip() or " " in keyword.strip():
            raise ValueError(f"keyword must be one word, got {keyword!r}")
        if caption_template is not None and ("{caption}" not in caption_template
                                             or not _has_word(caption_template.replace("{caption}", ""), keyword)):
            raise ValueError(f"caption_template must hold '{{caption}}' and the keyword {keyword!r}, got {caption_template!r}")
        self.keyword = keyword.strip()
        self.caption_template = caption_template

    def __call__(self, sample: LayerSample) -> LayerSample:
        sample = super().__call__(sample)
        if self.caption_template is not None:
            # The template's own words ("green background"): kept if the caption already has them,
            # added otherwise, also to "a green apple", whose green is not the background's.
            fixed = self.caption_template.replace("{caption}", "").strip(" ,").lower()
            if fixed in sample.caption.lower():
                return sample
            return replace(sample, caption=self.caption_template.format(caption=sample.caption))
        if not _has_word(sample.caption, self.keyword):
            raise ValueError(f"sample {sample.key} ({sample.url or 'no shard'}): its caption {sample.caption!r} does not "
                             f"name the {self.keyword!r} background the green-background loss supervises; add it to the "
                             "captions, or set GreenScreen's caption_template (e.g. 'green background, {caption}')")
        return sample


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None
