"""The cached-sample schema of layerdiff shards (part of schema version 1; see ``data.schema``).

**Cached samples** (``python -m data cache-latents``, ``data.latent_cache``) replace
the pixels by what the diffusion objectives compute from them, so training skips the
frozen VAE, the transparency encoder and, optionally, the text encoders. One cached shard
per image shard, with the same keys, and these fields (the layers ``bg.png``/``blend.png``
are not carried over: the cache serves single-layer latent diffusion):

``txt``, ``json`` (required)
    Copied unchanged from the image sample: ``width`` and ``height`` are still the pixel
    size the latent was encoded from (SDXL's target size), and the provenance, license
    and attribution travel with the sample.
``latent.npy`` (required)
    The adjusted latent ``x_a`` (LayerDiffusion sec. 3.1) at the UNet's scale
    (``layerdiff.models.codec.diffusion_latent``): a ``.npy`` array ``[4, H/8, W/8]``,
    float32 or float16. No ``fg.png``: a sample with both is an image sample.
``prompt_hidden.npy``, ``prompt_pooled.npy`` (optional, from ``--text-embeddings``)
    The caption's ``PromptEmbeddings`` (``layerdiff.models.text``): hidden states
    ``[77, D]`` and, for SDXL, the pooled embedding ``[P]``, in the latent's dtype.


Errors are of the same two kinds as for image samples (``data.schema``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from data.schema import (
    CAPTION,
    LATENT,
    METADATA,
    PROMPT_HIDDEN,
    PROMPT_POOLED,
    corrupt_member,
    decode_metadata,
    decode_text,
    field_names,
    metadata_pair,
    schema_error,
)

RECACHE_HINT = "re-cache the image shards with `python -m data cache-latents SHARDS OUT_DIR ...` into an empty OUT_DIR"


@dataclass
class CachedSample:
    """One cached sample in memory (see the module docstring).

    Arrays keep their stored dtype (float32 or float16); the loader converts whole
    batches to float32. ``size`` is the ``(height, width)`` in pixels of the image the
    latent was encoded from.
    """

    key: str
    latent: np.ndarray
    caption: str
    size: tuple[int, int]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    prompt_hidden: np.ndarray | None = None
    prompt_pooled: np.ndarray | None = None
    url: str | None = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays present, by field name (``latent.npy``, ...)."""
        arrays = {LATENT: self.latent, PROMPT_HIDDEN: self.prompt_hidden, PROMPT_POOLED: self.prompt_pooled}
        return {name: array for name, array in arrays.items() if array is not None}


def encode_cached_sample(
    image_members: Mapping[str, Any],
    latent: np.ndarray,
    prompt_hidden: np.ndarray | None = None,
    prompt_pooled: np.ndarray | None = None,
) -> dict[str, Any]:
    """The member dict of the cached sample made from an image sample's members.

    Key, ``txt`` and ``json`` are kept byte for byte; the arrays are stored as ``.npy``
    in their own dtype.
    """
    if prompt_pooled is not None and prompt_hidden is None:
        raise ValueError(f"{image_members['__key__']}: prompt_pooled comes with prompt_hidden")
    members = {name: image_members[name] for name in ("__key__", CAPTION, METADATA)}
    for name, array in ((LATENT, latent), (PROMPT_HIDDEN, prompt_hidden), (PROMPT_POOLED, prompt_pooled)):
        if array is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
            members[name] = buffer.getvalue()
    return members


def decode_cached_sample(members: Mapping[str, Any]) -> CachedSample:
    """Decode the member dict of one cached sample to a ``CachedSample``.

    Raises ``SchemaError`` for schema mismatches (a missing field, arrays of the wrong
    rank, a latent that does not fit the image size) and ``CorruptMemberError`` for
    undecodable bytes.
    """
    url, key = members.get("__url__"), members.get("__key__")
    for name in (LATENT, CAPTION, METADATA):
        if name not in members:
            present = ", ".join(field_names(members)) or "nothing"
            raise schema_error(url, key, name, f"required field missing (the sample has {present})", RECACHE_HINT)
    metadata = decode_metadata(members, url, key)
    height, width = metadata["height"], metadata["width"]
    latent = _decode_array(members, LATENT, 3, url, key)
    _, latent_height, latent_width = latent.shape
    factor = height // latent_height if latent_height else 0
    if not factor or (latent_height * factor, latent_width * factor) != (height, width):
        raise schema_error(
            url, key, LATENT,
            f"latent {list(latent.shape)} does not fit the {width}x{height} image (one downscale factor for "
            "both sides)", RECACHE_HINT,
        )
    prompt_hidden = _decode_array(members, PROMPT_HIDDEN, 2, url, key) if PROMPT_HIDDEN in members else None
    prompt_pooled = _decode_array(members, PROMPT_POOLED, 1, url, key) if PROMPT_POOLED in members else None
    if prompt_pooled is not None and prompt_hidden is None:
        raise schema_error(url, key, PROMPT_POOLED, f"present without {PROMPT_HIDDEN}", RECACHE_HINT)
    return CachedSample(
        key=key,
        latent=latent,
        caption=decode_text(members, CAPTION, url, key),
        size=(height, width),
        original_size=metadata_pair(metadata, "original_size", url, key),
        crop_top_left=metadata_pair(metadata, "crop_top_left", url, key),
        prompt_hidden=prompt_hidden,
        prompt_pooled=prompt_pooled,
        url=url,
    )


def _decode_array(members: Mapping[str, Any], name: str, rank: int, url: str | None, key: str | None) -> np.ndarray:
    # As for PNGs: whatever np.load raises on these bytes (ValueError, EOFError, OSError, ...) is damage.
    try:
        array = np.load(io.BytesIO(members[name]), allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - see the comment above
        raise corrupt_member(url, key, name, f"not a .npy array: {type(error).__name__}: {error}") from error
    if array.ndim != rank or array.dtype.kind != "f":
        problem = f"must be a {rank}-D float array, got {array.ndim}-D {array.dtype} {list(array.shape)}"
        raise schema_error(url, key, name, problem, RECACHE_HINT)
    return array

