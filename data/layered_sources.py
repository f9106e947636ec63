"""Layered sources for ``python -m data write``: foreground, background and blend of one scene.

Any ``*.fg.png``, ``*.bg.png``, ``*.blend.png`` or ``*.psd`` under the source folder puts the
writer in layered mode, where every sample has the three layers of LayerDiffusion sec. 3.3;
plain ``NAME.png`` cut-outs in the same folder are then an error (one run writes one kind of
shard). Two layouts are accepted, side by side, in any subfolder:

**Folder triplets**, per sample ``NAME``:

* ``NAME.fg.png``: the foreground, RGBA with straight alpha -> ``fg.png``;
* ``NAME.bg.png``: the background, RGB or fully opaque RGBA -> ``bg.png``;
* ``NAME.blend.png`` (optional): the whole image, RGB -> ``blend.png``; without it the blend
  is the foreground composited over the background (``layerdiff.rgba.composite``);
* captions ``NAME.fg.txt`` -> ``txt`` (the sample's caption), ``NAME.bg.txt`` -> ``bg.txt``,
  ``NAME.txt`` (the whole image) -> ``blend.txt``.

**Layered PSD files**, ``NAME.psd`` (read with psd-tools), with the same captions beside it:

* the foreground is the topmost visible top-level layer or group that has pixels
  (adjustment layers have none), with the layers clipped to it; hidden layers are ignored;
* the background is every visible layer below it, composited; it must cover the canvas;
* the blend is the PSD's own composite of all visible layers (the merged image Photoshop
  stores, or psd-tools' composite where the file has none). Effects, blend modes or
  adjustment layers that make it differ from foreground over background fail the check below.

**Blend check.** A given blend must equal foreground over background, computed from the files
at their own size, up to ``BLEND_MEAN_TOLERANCE`` mean absolute error and
``BLEND_QUANTILE_TOLERANCE`` at the ``BLEND_QUANTILE`` quantile, in 8-bit levels over all
pixels and channels. 8-bit rounding costs about 1 level; re-saving the blend as JPEG (quality
80 to 95) costs at most 7 levels mean and 35 at the 99th percentile, measured on 64 to 512 px
emoji-over-photo composites. A different background, a layer moved by 3 px or a "multiply"
blend mode exceeds 50 at the 99th percentile in those measurements, and a global colour
shift of more than 8 levels fails the mean. A stored blend is written as given (resized and
cropped like the layers); a composited one is computed after resizing, from the stored layers.

Per-file problems (missing or extra layer files, sizes that differ, an RGB foreground, a
background that is not opaque, a blend that does not match, a single-layer PSD) raise
``LayerProblem`` naming the file and the fix; the writer drops and counts them. A mismatch
never becomes a training sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from psd_tools import PSDImage

from layerdiff.rgba import MissingAlphaError, composite, load_rgba

FG_SUFFIX = ".fg.png"
BG_SUFFIX = ".bg.png"
BLEND_SUFFIX = ".blend.png"
PSD_SUFFIX = ".psd"
LAYER_SUFFIXES = (FG_SUFFIX, BG_SUFFIX, BLEND_SUFFIX)

BLEND_MEAN_TOLERANCE = 8.0
BLEND_QUANTILE = 0.99
BLEND_QUANTILE_TOLERANCE = 40.0

NO_BACKGROUND = "foreground without background"
NO_FOREGROUND = "layer file without foreground"
SIZE_MISMATCH = "layers differ in size"
NOT_OPAQUE = "background or blend not opaque"
BLEND_MISMATCH = "blend is not foreground over background"
SINGLE_LAYER_PSD = "PSD has a single layer"


class LayerProblem(ValueError):
    """One layered source cannot become a sample; ``reason`` groups it, the message says why and how to fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class UnreadableLayerError(ValueError):
    """A layer file that does not decode; the message names the file and the decoder's error."""


@dataclass(frozen=True)
class LayeredSource:
    """The files of one layered sample: ``foreground`` and ``background`` (and maybe ``blend``),
    or one ``psd``. ``stem`` is the path without the layer suffix (``dir/NAME``)."""

    stem: Path
    foreground: Path | None = None
    background: Path | None = None
    blend: Path | None = None
    psd: Path | None = None

    @property
    def main(self) -> Path:
        """The file a sample is named after: the PSD or the foreground."""
        return self.psd or self.foreground

    def caption_paths(self) -> tuple[Path, Path, Path]:
        """``(foreground, background, whole image)`` caption files: ``NAME.fg.txt``, ``NAME.bg.txt``, ``NAME.txt``."""
        return (self.stem.with_name(self.stem.name + ".fg.txt"), self.stem.with_name(self.stem.name + ".bg.txt"),
                self.stem.with_name(self.stem.name + ".txt"))


@dataclass
class Layers:
    """A layered source as read: float ``foreground`` RGBA, ``background`` RGB, ``blend`` RGB or
    ``None`` (to be composited), all at the source's size; ``provenance`` says where each came from."""

    foreground: np.ndarray
    background: np.ndarray
    blend: np.ndarray | None
    provenance: dict[str, str]


def layer_suffix(path: Path) -> str | None:
    """The layered-source suffix of ``path`` (``.fg.png``, ``.bg.png``, ``.blend.png``, ``.psd``), or ``None``."""
    name = path.name.lower()
    return next((suffix for suffix in LAYER_SUFFIXES + (PSD_SUFFIX,) if name.endswith(suffix)), None)


def find_layered_sources(paths: list[Path]) -> tuple[list[LayeredSource], list[tuple[Path, str]]]:
    """Group layered files (sorted ``paths``) into sources; return them and the orphans.

    An orphan is a background or blend file without its ``NAME.fg.png``, returned with the
    message the writer reports for it.
    """
    groups: dict[Path, dict[str, Path]] = {}
    sources: list[LayeredSource] = []
    for path in paths:
        suffix = layer_suffix(path)
        stem = path.with_name(path.name[: -len(suffix)])
        if suffix == PSD_SUFFIX:
            sources.append(LayeredSource(stem, psd=path))
        else:
            groups.setdefault(stem, {})[suffix] = path
    orphans = []
    for stem, files in groups.items():
        if FG_SUFFIX in files:
            sources.append(LayeredSource(stem, files[FG_SUFFIX], files.get(BG_SUFFIX), files.get(BLEND_SUFFIX)))
            continue
        for path in files.values():
            orphans.append((path, f"no {stem.name}{FG_SUFFIX} beside it: add the RGBA foreground, or move the file "
                                  "out of the source folder"))
    return sorted(sources, key=lambda source: source.main), orphans


def read_layers(source: LayeredSource, root: Path) -> Layers:
    """Read and check the layers of ``source`` (paths in messages relative to ``root``).

    Raises ``LayerProblem`` for layered-data problems, ``UnreadableLayerError`` for files that
    do not decode and ``layerdiff.rgba.MissingAlphaError`` for a foreground without alpha.
    """
    layers = _read_psd(source.psd, root) if source.psd else _read_folder_triplet(source, root)
    if source.psd:
        fix = ("give the foreground layer normal blend mode, full fill and no effects, and put no adjustment layer "
               "above it (or merge them into it)")
        check_blend(layers.foreground, layers.background, layers.blend, _relative(source.psd, root), fix)
    elif layers.blend is not None:
        fix = (f"check that {source.stem.name}{FG_SUFFIX} and {source.stem.name}{BG_SUFFIX} are the layers of this "
               "image and aligned, or delete the blend to have it composited")
        check_blend(layers.foreground, layers.background, layers.blend, _relative(source.blend, root), fix)
    return layers


def check_blend(foreground: np.ndarray, background: np.ndarray, blend: np.ndarray, name: str, fix: str) -> None:
    """Raise ``LayerProblem`` unless float ``blend`` is ``foreground`` over ``background`` within the tolerances."""
    expected = composite(foreground[..., :3], foreground[..., 3:], background)
    error = np.abs(blend - expected) * 255.0
    mean, quantile = float(error.mean()), float(np.quantile(error, BLEND_QUANTILE))
    if mean > BLEND_MEAN_TOLERANCE or quantile > BLEND_QUANTILE_TOLERANCE:
        raise LayerProblem(BLEND_MISMATCH, (
            f"{name}: the blend differs from foreground over background by {mean:.1f} levels mean, "
            f"{quantile:.1f} at the {BLEND_QUANTILE:.0%} quantile (tolerance {BLEND_MEAN_TOLERANCE:g} and "
            f"{BLEND_QUANTILE_TOLERANCE:g} of 0..255); {fix}"))


def _read_folder_triplet(source: LayeredSource, root: Path) -> Layers:
    fg_name = _relative(source.foreground, root)
    if source.background is None:
        raise LayerProblem(NO_BACKGROUND, (
            f"{fg_name} has no {source.stem.name}{BG_SUFFIX} beside it: add the background, or name the cut-out "
            f"{source.stem.name}.png and write the single-layer cut-outs to their own shards"))
    try:
        foreground = load_rgba(source.foreground, name=fg_name)
    except MissingAlphaError:
        raise  # the writer reports it as a foreground without alpha
    except Exception as error:  # noqa: BLE001 - any decode failure of one input file is reported, not fatal
        raise UnreadableLayerError(f"{fg_name}: {type(error).__name__}: {error}") from error
    background = _read_opaque(source.background, root, "background")
    blend = _read_opaque(source.blend, root, "blend") if source.blend else None
    for path, image in ((source.background, background), (source.blend, blend)):
        if image is not None and image.shape[:2] != foreground.shape[:2]:
            raise LayerProblem(SIZE_MISMATCH, (
                f"{fg_name} is {_size(foreground)} but {_relative(path, root)} is {_size(image)}: export all layers "
                "of a sample at the canvas size"))
    provenance = {"background": _relative(source.background, root),
                  "blend": _relative(source.blend, root) if source.blend else "composited"}
    return Layers(foreground, background, blend, provenance)


def _read_opaque(path: Path, root: Path, role: str) -> np.ndarray:
    name = _relative(path, root)
    try:
        with Image.open(path) as image:
            image.load()
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    except Exception as error:  # noqa: BLE001 - see _read_folder_triplet
        raise UnreadableLayerError(f"{name}: {type(error).__name__}: {error}") from error
    _require_opaque(rgba, name, role)
    return rgba[..., :3]


def _require_opaque(rgba: np.ndarray, name: str, role: str) -> None:
    translucent = int(np.count_nonzero(rgba[..., 3] < 1.0))
    if translucent:
        raise LayerProblem(NOT_OPAQUE, (
            f"{name}: {translucent} of {rgba[..., 3].size} pixels of the {role} are not fully opaque; the {role} "
            "must cover the whole canvas: flatten it onto a solid colour (a cut-out belongs in NAME.fg.png)"))


def _read_psd(path: Path, root: Path) -> Layers:
    name = _relative(path, root)
    try:
        psd = PSDImage.open(path)
        top_level = list(psd)
        # A clipped layer belongs to the layer below it, whose composite includes it.
        visible = [layer for layer in top_level
                   if layer.is_visible() and not layer.clipping and (layer.is_group() or layer.has_pixels())]
        if len(visible) < 2:
            listed = ", ".join(repr(layer.name) for layer in visible) or "none"
            raise LayerProblem(SINGLE_LAYER_PSD, (
                f"{name} has {len(visible)} visible layer(s) with pixels ({listed}), so nothing to take as the "
                "background: put the cut-out on its own layer above the background layer(s), or export it as an "
                "RGBA NAME.png and write it with the single-layer cut-outs"))
        foreground_layer = visible[-1]
        below = top_level[: next(i for i, layer in enumerate(top_level) if layer is foreground_layer)]
        # psd-tools calls the filter on every layer it descends into; refusing a group skips its children.
        allowed = {id(layer) for top in below for layer in (top, *(top.descendants() if top.is_group() else ()))}
        background = psd.composite(layer_filter=lambda layer: id(layer) in allowed and layer.is_visible())
        foreground = foreground_layer.composite(viewport=psd.viewbox)
        blend = psd.composite()
    except LayerProblem:
        raise
    except Exception as error:  # noqa: BLE001 - see _read_folder_triplet
        raise UnreadableLayerError(f"{name}: {type(error).__name__}: {error}") from error
    if foreground is None:  # a layer with no pixels inside the canvas
        foreground = Image.new("RGBA", psd.size)
    background_rgba = _float_rgba(background)
    _require_opaque(background_rgba, f"{name} (the layers below {foreground_layer.name!r})", "background")
    blend_rgba = _float_rgba(blend)
    _require_opaque(blend_rgba, f"{name} (its composite)", "blend")
    provenance = {"foreground": f"{name}: layer {foreground_layer.name!r}",
                  "background": f"{name}: {len(below)} layer(s) below it", "blend": f"{name}: composite"}
    return Layers(_float_rgba(foreground), background_rgba[..., :3], blend_rgba[..., :3], provenance)


def _float_rgba(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0


def _size(image: np.ndarray) -> str:
    return f"{image.shape[1]}x{image.shape[0]}"


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
