"""The webdataset sample schema of layerdiff shards (schema version 1).

A shard is a plain POSIX tar file. Its members are grouped into samples by
webdataset's rule: the member name up to the first ``.`` is the sample's
``__key__``, the rest is the field name. Keys therefore contain no ``.``; we also
keep them to ``[A-Za-z0-9_-]``. One sample per key, with these fields:

``fg.png`` (required)
    The transparent foreground: an 8-bit RGBA PNG, straight (not premultiplied)
    colour. Colour under ``alpha == 0`` is already *padded*
    (``layerdiff.rgba.pad_transparent_rgb``, LayerDiffusion Appendix A): the
    padding is done once, when shards are written, never in the training loop.
    Alpha is stored exactly as trained on; a sample has at least one transparent
    and one visible pixel (LayerDiffusion sec. 3.4).
``txt`` (required)
    The caption, UTF-8. May be empty (e.g. for unconditional training).
``json`` (required)
    UTF-8 JSON object:

    * ``width``, ``height``: size of ``fg.png`` in pixels;
    * ``original_size``: ``[h, w]`` of the source image before resizing;
    * ``crop_top_left``: ``[top, left]`` of the crop in the resized image (SDXL's
      micro-conditioning uses both);
    * ``alpha_coverage``: fraction of pixels with ``alpha > 0``;
    * ``source``: where the sample came from (file path relative to the input
      folder, or a demo id such as ``openmoji:1F600``);
    * ``license``, ``attribution``: present when the source requires them;
    * ``sampling_weight`` (optional, default 1.0): how often a training stream draws the sample
      per epoch (0 drops it, 2 twice, 0.5 half the epochs; LayerDiffusion sec. 3.4's rounds);
      read with ``sampling_weight``, any other value than a finite number >= 0 is a schema mismatch;
    * ``scores`` (optional): ``{filter name: value}`` recorded by ``python -m data filter``
      (``data.filters``), ``captioned_by``: the model folder that wrote ``txt`` (``data.captions``);
    * any further fields are free-form provenance and are ignored by readers.
``bg.png``, ``blend.png`` (optional, together)
    Multi-layer samples (LayerDiffusion sec. 3.3): an 8-bit RGB background the
    size of ``fg.png`` and the blend, i.e. ``fg.png`` composited over ``bg.png``.
``bg.txt``, ``blend.txt`` (optional)
    Captions of the background and of the blended image; empty when absent.
Readers ignore every field they do not know.

**Cached samples** replace the pixels by latents (and optionally text embeddings) computed
from them; their fields are described in ``data.cached``.

The *kind* of a sample (``sample_kind``) is ``image`` or the set of cached fields it has;
one stream (and one run: training and validation) reads one kind, since a batch cannot
mix them and the objective must know which path it is on. Which base model, transparent
VAE and dtype made a cache is recorded in ``latent_cache.json`` beside its shards.

Errors are of two kinds. A *corrupt member* (PNG bytes that do not decode, a
truncated file, invalid JSON or UTF-8, JSON values of an impossible type or size, an
image over ``MAX_PIXELS``: a decompression bomb) is damage to one sample: readers skip
it and count it (``CorruptMemberError``). A *schema mismatch* (a required field
missing, a foreground without alpha, layers missing where they are required,
sizes that disagree) means the shards were not written for this purpose: readers
stop with a ``SchemaError`` that names the shard, the key, the field and the fix.

``encode_sample`` turns a ``LayerSample`` into the member dict a shard stores;
``decode_sample`` turns such a dict, as webdataset yields it, back into a
``LayerSample``.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from layerdiff.rgba import encode_png

SCHEMA_VERSION = 1

FOREGROUND = "fg.png"
CAPTION = "txt"
METADATA = "json"
BACKGROUND = "bg.png"
BLEND = "blend.png"
BACKGROUND_CAPTION = "bg.txt"
BLEND_CAPTION = "blend.txt"
LATENT = "latent.npy"
PROMPT_HIDDEN = "prompt_hidden.npy"
PROMPT_POOLED = "prompt_pooled.npy"
CACHED_FIELDS = (LATENT, PROMPT_HIDDEN, PROMPT_POOLED)

REQUIRED_METADATA = ("width", "height", "original_size", "crop_top_left")
SAMPLING_WEIGHT = "sampling_weight"
SCORES = "scores"
_SAMPLE_METADATA = REQUIRED_METADATA + ("alpha_coverage", "source", "license", "attribution")

# Larger images are damage (or a decompression bomb), never decoded: 8192 x 8192 is 256 MiB as RGBA.
MAX_PIXELS = 8192 * 8192

_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk that ends every PNG

REWRITE_HINT = "re-write the shards with `python -m data write SRC_DIR OUT_DIR ...`"
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


class SchemaError(ValueError):
    """A sample does not follow the shard schema; training on it would be wrong, so stop.

    Constructed from one message (so the type survives DataLoader worker processes);
    ``schema_error`` writes that message.
    """


class CorruptMemberError(ValueError):
    """One member of a sample cannot be decoded (damaged bytes); readers skip and count it."""


def schema_error(url: str | None, key: str | None, field_name: str, problem: str, fix: str) -> SchemaError:
    """A ``SchemaError`` naming the shard, the key, the field, the problem and the fix."""
    where = f"shard {url or '<unknown>'}, key {key or '<unknown>'}, field {field_name!r}"
    return SchemaError(f"{where}: {problem}. Fix: {fix}.")


def corrupt_member(url: str | None, key: str | None, field_name: str, problem: str) -> CorruptMemberError:
    """A ``CorruptMemberError`` naming the shard, the key, the field and the damage."""
    return CorruptMemberError(f"shard {url or '<unknown>'}, key {key or '<unknown>'}, field {field_name!r}: {problem}")


@dataclass
class LayerSample:
    """One training sample in memory.

    Images are ``H x W x C`` arrays: ``foreground`` RGBA (colour padded under zero
    alpha), ``background`` and ``blend`` RGB. ``decode_sample`` returns ``uint8``
    arrays, the stored precision (the loader converts whole batches to float);
    ``encode_sample`` accepts ``uint8`` or float in [0, 1].
    """

    key: str
    foreground: np.ndarray
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    source: str = ""
    background: np.ndarray | None = None
    blend: np.ndarray | None = None
    background_caption: str = ""
    blend_caption: str = ""
    license: str | None = None
    attribution: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # further json fields, kept as they are
    url: str | None = None  # the shard it was read from

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the foreground."""
        return self.foreground.shape[0], self.foreground.shape[1]

    @property
    def has_layers(self) -> bool:
        """Whether background and blend are present."""
        return self.background is not None and self.blend is not None


@dataclass(frozen=True)
class SampleKind:
    """What a sample holds: pixels (no ``cached_fields``) or which cached fields."""

    cached_fields: tuple[str, ...] = ()

    @property
    def cached(self) -> bool:
        return bool(self.cached_fields)

    def __str__(self) -> str:
        return f"cached ({', '.join(self.cached_fields)})" if self.cached else f"image ({FOREGROUND})"


IMAGE_KIND = SampleKind()


def sample_kind(members: Mapping[str, Any]) -> SampleKind:
    """The kind of one sample's member dict, from its field names alone (nothing is decoded).

    A sample with ``fg.png`` is an image sample even if it also has a latent, and so is one
    with neither (``decode_sample`` then reports the missing ``fg.png``).
    """
    if FOREGROUND in members or LATENT not in members:
        return IMAGE_KIND
    return SampleKind(tuple(name for name in CACHED_FIELDS if name in members))


def kind_mismatch(members: Mapping[str, Any], expected: SampleKind, expected_from: str) -> SchemaError:
    """The error for a sample whose kind differs from the ``expected`` kind set by ``expected_from``."""
    found = sample_kind(members)
    differing = sorted(set(found.cached_fields) ^ set(expected.cached_fields))
    return schema_error(
        members.get("__url__"), members.get("__key__"), differing[0] if found.cached else FOREGROUND,
        f"sample kind {found}, but {expected_from} is of kind {expected}; one run reads one kind",
        "give only image shards or only shards cached by one `python -m data cache-latents` run "
        "(same options), for training and validation alike",
    )


def alpha_coverage(foreground: np.ndarray) -> float:
    """Fraction of visible pixels (``alpha > 0``) of an RGBA image, uint8 or float."""
    return float(np.count_nonzero(foreground[..., 3]) / foreground[..., 3].size)


def encode_sample(sample: LayerSample) -> dict[str, Any]:
    """The member dict a shard stores for ``sample`` (``__key__`` plus bytes per field)."""
    if not _KEY_PATTERN.match(sample.key):
        raise ValueError(f"sample key {sample.key!r} must match {_KEY_PATTERN.pattern} (webdataset splits keys at '.')")
    if sample.foreground.ndim != 3 or sample.foreground.shape[2] != 4:
        raise ValueError(f"{sample.key}: foreground must be H x W x 4 RGBA, got shape {sample.foreground.shape}")
    if (sample.background is None) != (sample.blend is None):
        raise ValueError(f"{sample.key}: background and blend come together; got only one of them")
    height, width = sample.size
    metadata = {
        **sample.provenance,
        "width": width,
        "height": height,
        "original_size": [int(v) for v in sample.original_size],
        "crop_top_left": [int(v) for v in sample.crop_top_left],
        "alpha_coverage": round(alpha_coverage(sample.foreground), 6),
        "source": sample.source,
    }
    if sample.license is not None:
        metadata["license"] = sample.license
    if sample.attribution is not None:
        metadata["attribution"] = sample.attribution
    members: dict[str, Any] = {
        "__key__": sample.key,
        FOREGROUND: _encode_image(sample.foreground),
        CAPTION: sample.caption.encode("utf-8"),
        METADATA: json.dumps(metadata, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }
    if sample.has_layers:
        for name, image in ((BACKGROUND, sample.background), (BLEND, sample.blend)):
            if image.shape != (height, width, 3):
                raise ValueError(f"{sample.key}: {name} must be {height} x {width} x 3 RGB, got {image.shape}")
            members[name] = _encode_image(image)
        members[BACKGROUND_CAPTION] = sample.background_caption.encode("utf-8")
        members[BLEND_CAPTION] = sample.blend_caption.encode("utf-8")
    return members


def decode_sample(
    members: Mapping[str, Any], *, decode_layers: bool = False, require_layers: bool = False
) -> LayerSample:
    """Decode the member dict of one sample (as webdataset yields it) to a ``LayerSample``.

    ``decode_layers`` also decodes ``bg.png``/``blend.png`` when present;
    ``require_layers`` demands them. Raises ``SchemaError`` for schema mismatches
    and ``CorruptMemberError`` for undecodable bytes.
    """
    url, key = members.get("__url__"), members.get("__key__")
    for name in (FOREGROUND, CAPTION, METADATA):
        if name not in members:
            present = ", ".join(field_names(members)) or "nothing"
            raise schema_error(url, key, name, f"required field missing (the sample has {present})", REWRITE_HINT)
    metadata = decode_metadata(members, url, key)
    foreground = _decode_png(members[FOREGROUND], url, key, FOREGROUND, want_alpha=True)
    height, width = foreground.shape[:2]
    if (metadata["height"], metadata["width"]) != (height, width):
        raise schema_error(
            url, key, METADATA,
            f"json says {metadata['width']}x{metadata['height']} but fg.png is {width}x{height}", REWRITE_HINT,
        )
    sample = LayerSample(
        key=key,
        foreground=foreground,
        caption=decode_text(members, CAPTION, url, key),
        original_size=metadata_pair(metadata, "original_size", url, key),
        crop_top_left=metadata_pair(metadata, "crop_top_left", url, key),
        source=str(metadata.get("source", "")),
        license=metadata.get("license"),
        attribution=metadata.get("attribution"),
        provenance={k: v for k, v in metadata.items() if k not in _SAMPLE_METADATA},
        url=url,
    )
    if not (decode_layers or require_layers):
        return sample
    present = [name for name in (BACKGROUND, BLEND) if name in members]
    if require_layers and len(present) < 2:
        missing = next(name for name in (BACKGROUND, BLEND) if name not in members)
        raise schema_error(
            url, key, missing,
            "required because require_layers is true, but these shards have no multi-layer samples",
            "pass `require_layers: false`, or re-write the shards from a layered source (`python -m data write` of "
            "NAME.fg.png + NAME.bg.png files or layered .psd files, see its --help; or `python -m data demo`)",
        )
    if len(present) == 1:
        problem = "bg.png and blend.png come together; only one is present"
        raise schema_error(url, key, present[0], problem, REWRITE_HINT)
    if present:
        sample.background = _decode_png(members[BACKGROUND], url, key, BACKGROUND, want_alpha=False)
        sample.blend = _decode_png(members[BLEND], url, key, BLEND, want_alpha=False)
        for name, image in ((BACKGROUND, sample.background), (BLEND, sample.blend)):
            if image.shape[:2] != (height, width):
                problem = f"size {image.shape[1]}x{image.shape[0]} differs from fg.png {width}x{height}"
                raise schema_error(url, key, name, problem, REWRITE_HINT)
        sample.background_caption = decode_text(members, BACKGROUND_CAPTION, url, key, default="")
        sample.blend_caption = decode_text(members, BLEND_CAPTION, url, key, default="")
    return sample


def _encode_image(image: np.ndarray) -> bytes:
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return encode_png(image)


def field_names(members: Mapping[str, Any]) -> list[str]:
    return sorted(name for name in members if not name.startswith("__"))


def _decode_png(data: bytes, url: str | None, key: str | None, name: str, *, want_alpha: bool) -> np.ndarray:
    # Pillow signals damaged files with many exception types (OSError, SyntaxError,
    # zlib.error, struct.error, ...); anything raised while only decoding bytes is damage.
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            if image.format == "PNG" and bytes(data[-len(_PNG_END):]) != _PNG_END:  # Pillow would decode it
                raise corrupt_member(url, key, name, f"truncated PNG: {len(data)} bytes, no IEND chunk at the end")
            if image.width * image.height > MAX_PIXELS:
                problem = f"{image.width}x{image.height} pixels, over MAX_PIXELS={MAX_PIXELS} (a decompression bomb?)"
                raise corrupt_member(url, key, name, problem)
            image.load()
            mode, has_transparency = image.mode, "transparency" in image.info
            if want_alpha:
                if mode not in ("RGBA", "LA", "PA") and not has_transparency:
                    raise schema_error(
                        url, key, name,
                        f"foreground has no alpha channel (PNG mode {mode!r})",
                        "foregrounds must be RGBA; " + REWRITE_HINT + " from RGBA sources",
                    )
                return np.asarray(image if mode == "RGBA" else image.convert("RGBA"))
            return np.asarray(image if mode == "RGB" else image.convert("RGB"))
    except (SchemaError, CorruptMemberError):
        raise
    except Exception as error:  # noqa: BLE001 - see the comment above
        raise corrupt_member(url, key, name, f"{type(error).__name__}: {error}") from error


def decode_text(
    members: Mapping[str, Any], name: str, url: str | None, key: str | None, default: str | None = None
) -> str:
    if name not in members and default is not None:
        return default
    value = members[name]
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as error:
        raise corrupt_member(url, key, name, f"not UTF-8: {error}") from error


def decode_metadata(members: Mapping[str, Any], url: str | None, key: str | None) -> dict[str, Any]:
    try:
        metadata = json.loads(decode_text(members, METADATA, url, key))
    except json.JSONDecodeError as error:
        raise corrupt_member(url, key, METADATA, f"invalid JSON: {error}") from error
    if not isinstance(metadata, dict):
        raise corrupt_member(url, key, METADATA, f"must be a JSON object, got {type(metadata).__name__}")
    missing = [name for name in REQUIRED_METADATA if name not in metadata]
    if missing:
        raise schema_error(url, key, METADATA, f"missing {', '.join(missing)}", REWRITE_HINT)
    width, height = metadata["width"], metadata["height"]
    if not all(_is_int(side) and side > 0 for side in (width, height)) or width * height > MAX_PIXELS:
        problem = f"width and height must be positive integers of at most {MAX_PIXELS} pixels, got {width!r}x{height!r}"
        raise corrupt_member(url, key, METADATA, problem)
    return metadata


def sampling_weight(metadata: Mapping[str, Any], url: str | None, key: str | None) -> float:
    """The sample's ``sampling_weight`` (1.0 when absent); ``SchemaError`` unless a finite number >= 0."""
    weight = metadata.get(SAMPLING_WEIGHT, 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise schema_error(url, key, METADATA, f"{SAMPLING_WEIGHT} must be a finite number >= 0, got {weight!r}",
                           "write a number (0 drops the sample, 2 draws it twice per epoch) or leave the field out, "
                           "or train with `ignore_sampling_weights: true`")
    return float(weight)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def metadata_pair(metadata: Mapping[str, Any], name: str, url: str | None, key: str | None) -> tuple[int, int]:
    value = metadata[name]
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v >= 0 for v in value)):
        raise corrupt_member(url, key, METADATA, f"{name} must be a list of two non-negative integers, got {value!r}")
    return value[0], value[1]
