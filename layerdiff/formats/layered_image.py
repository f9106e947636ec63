"""The layered image file written per sample by joint multi-layer generation.

LayerDiffusion (arXiv:2402.17113) generates a transparent foreground, a background and their
blend jointly; a user wants them as the layers of one file to edit, not as loose PNGs.
Two formats, one layer model:

* **PSD** (:func:`write_psd`): 8-bit RGB, one pixel layer per entry with its own transparency
  channel (channel -1, no layer masks), normal blending at full opacity, Unicode names: the
  plain subset of the format that Photoshop, GIMP and Krita all read. It carries the merged image
  (what viewers without layer support and thumbnailers show): the visible layers composited
  "over" each other and then over white (Photoshop's convention: that section has no alpha).
* **OpenRaster** (:func:`write_openraster`): the open format GIMP, Krita and MyPaint read and
  write natively; a zip holding ``mimetype`` (first, stored), ``stack.xml``, one straight-RGBA
  PNG per layer under ``data/``, ``mergedimage.png`` (the composite, with its alpha) and
  ``Thumbnails/thumbnail.png`` (at most 256 pixels a side). Why both: Photoshop reads no
  OpenRaster, while OpenRaster is openly specified and keeps the merged image's alpha.

:func:`write_layered` picks the format by suffix. Layers are given **top first**, as the layer
panels of these apps list them; hidden layers are stored but left out of the merged image.
:func:`foreground_background_stack` is the stack joint generation writes: the generated blend
as a hidden reference on top (switching it on shows it in place of the composite), then the
foreground, then the background, so the file opens showing foreground over background.

Both writers go through :func:`layerdiff.files.atomic_write`: a failure leaves no partial file.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer

from layerdiff.files import atomic_write

# PSD version 1 stops at 30,000 pixels a side; beyond is PSB, another format with its own suffix.
PSD_MAX_SIDE = 30000
# Layer names are Pascal strings of at most 255 bytes in PSD; one limit keeps both formats alike.
MAX_NAME_LENGTH = 255
ORA_MIMETYPE = b"image/openraster"
ORA_THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class Layer:
    """One layer: ``pixels`` is ``H x W x 4`` straight (not premultiplied) RGBA or ``H x W x 3``
    opaque RGB, ``uint8`` or floating point in [0, 1]."""

    name: str
    pixels: np.ndarray
    visible: bool = True


def foreground_background_stack(
    foreground: np.ndarray, background: np.ndarray, blend: np.ndarray | None = None
) -> list[Layer]:
    """The joint-generation stack, top first: hidden ``blend`` reference, ``foreground`` (RGBA)
    and ``background`` (RGB), so the file shows the foreground over the background."""
    if getattr(foreground, "ndim", None) == 3 and foreground.shape[2] != 4:
        raise ValueError(f"the foreground must be H x W x 4 RGBA (an opaque one hides the background), got {foreground.shape}")
    stack = [Layer("foreground", foreground), Layer("background", background)]
    if blend is not None:
        stack.insert(0, Layer("blend (generated)", blend, visible=False))
    return stack


def validate_layers(layers: Sequence[Layer]) -> list[np.ndarray]:
    """Every layer's pixels as ``H x W x 4`` ``uint8`` straight RGBA, top first, after checking
    the stack: at least one layer, unique printable names, one size for all."""
    if len(layers) == 0:
        raise ValueError("a layered image needs at least one layer; got an empty list")
    seen: set[str] = set()
    for index, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"layer {index} is a {type(layer).__name__}; pass layered_image.Layer(name, pixels)")
        if not isinstance(layer.name, str) or not layer.name or not layer.name.isprintable():
            raise ValueError(f"layer {index}: name {layer.name!r} must be a non-empty printable string")
        if len(layer.name) > MAX_NAME_LENGTH:
            raise ValueError(f"layer {index}: name is {len(layer.name)} characters long; the limit is {MAX_NAME_LENGTH}")
        if layer.name in seen:
            raise ValueError(f"two layers are named {layer.name!r}; layer names must be unique (apps select layers by name)")
        seen.add(layer.name)
    pixels = [_to_rgba8(layer) for layer in layers]
    sizes = {layer.name: array.shape[:2] for layer, array in zip(layers, pixels)}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name!r} {height}x{width}" for name, (height, width) in sizes.items())
        raise ValueError(f"all layers must have one size (height x width); got {listed}. Resize or crop them first.")
    return pixels


def _to_rgba8(layer: Layer) -> np.ndarray:
    array = layer.pixels
    where = f"layer {layer.name!r}"
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{where}: pixels are a {type(array).__name__}; pass a numpy array (e.g. layerdiff.rgba.to_uint8_hwc)")
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where}: pixels must be H x W x 4 (RGBA) or H x W x 3 (RGB), got shape {array.shape}")
    if array.dtype == np.uint8:
        rgba8 = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: pixels contain NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{where}: float pixels must lie in [0, 1], got [{low:.4g}, {high:.4g}]; clamp them first")
        rgba8 = np.rint(array * 255.0).astype(np.uint8)
    else:
        raise TypeError(f"{where}: pixels have dtype {array.dtype}; use uint8 or float in [0, 1]")
    if rgba8.shape[2] == 3:
        rgba8 = np.concatenate([rgba8, np.full(rgba8.shape[:2] + (1,), 255, dtype=np.uint8)], axis=2)
    return np.ascontiguousarray(rgba8)


def merge(layers: Sequence[Layer], pixels: Sequence[np.ndarray]) -> np.ndarray:
    """The visible layers composited with Porter-Duff "over" onto a transparent canvas:
    ``H x W x 4`` float straight RGBA in [0, 1]. ``pixels`` are :func:`validate_layers`'."""
    height, width = pixels[0].shape[:2]
    premultiplied = np.zeros((height, width, 3), dtype=np.float64)
    coverage = np.zeros((height, width, 1), dtype=np.float64)
    for layer, rgba8 in zip(reversed(layers), reversed(pixels)):  # bottom to top
        if not layer.visible:
            continue
        rgba = rgba8.astype(np.float64) / 255.0
        alpha = rgba[..., 3:]
        premultiplied = rgba[..., :3] * alpha + premultiplied * (1.0 - alpha)
        coverage = alpha + coverage * (1.0 - alpha)
    colour = np.divide(premultiplied, coverage, out=np.zeros_like(premultiplied), where=coverage > 0)
    return np.concatenate([colour, coverage], axis=2)


def write_psd(path: str | os.PathLike, layers: Sequence[Layer]) -> Path:
    """Write ``layers`` (top first) as an 8-bit RGB Photoshop file; returns the path."""
    pixels = validate_layers(layers)
    height, width = pixels[0].shape[:2]
    if max(height, width) > PSD_MAX_SIDE:
        raise ValueError(f"{path}: {height}x{width} exceeds the PSD limit of {PSD_MAX_SIDE} pixels a side; write .ora instead")
    document = PSDImage.new("RGB", (width, height))
    for layer, rgba8 in zip(reversed(layers), reversed(pixels)):  # psd-tools appends at the top
        written = PixelLayer.fromarray(rgba8, document, name=layer.name)
        written.name = layer.name  # the setter also stores the Unicode name block Photoshop reads
        written.visible = layer.visible
    merged = merge(layers, pixels)
    on_white = merged[..., :3] * merged[..., 3:] + (1.0 - merged[..., 3:])
    planes = [np.rint(on_white[..., channel] * 255.0).astype(np.uint8).tobytes() for channel in range(3)]
    record = document._record  # psd-tools' documented low-level structure
    record.image_data.set_data(planes, record.header)
    path = Path(path)
    with atomic_write(path) as handle:
        # Not document.save(): it re-renders the merged image with psd-tools' compositor, which
        # keeps the un-matted colour of transparent pixels where Photoshop stores them over white.
        record.write(handle)
    return path


def write_openraster(path: str | os.PathLike, layers: Sequence[Layer]) -> Path:
    """Write ``layers`` (top first) as an OpenRaster ``.ora`` file; returns the path."""
    pixels = validate_layers(layers)
    height, width = pixels[0].shape[:2]
    merged = Image.fromarray(np.rint(merge(layers, pixels) * 255.0).astype(np.uint8))
    thumbnail = merged.copy()
    thumbnail.thumbnail((ORA_THUMBNAIL_SIDE, ORA_THUMBNAIL_SIDE))

    image = ElementTree.Element("image", {"version": "0.0.5", "w": str(width), "h": str(height)})
    stack = ElementTree.SubElement(image, "stack")
    sources = [f"data/layer{index:03d}.png" for index in range(len(layers))]
    for layer, source in zip(layers, sources):  # the first element of a stack is its top
        attributes = {"name": layer.name, "src": source, "x": "0", "y": "0", "opacity": "1.0"}
        attributes |= {"visibility": "visible" if layer.visible else "hidden", "composite-op": "svg:src-over"}
        ElementTree.SubElement(stack, "layer", attributes)
    stack_xml = ElementTree.tostring(image, encoding="UTF-8", xml_declaration=True)

    path = Path(path)
    with atomic_write(path) as handle, zipfile.ZipFile(handle, "w") as archive:
        # The spec's magic number: "mimetype" first, uncompressed, so `file` can sniff it at offset 38.
        archive.writestr(zipfile.ZipInfo("mimetype"), ORA_MIMETYPE, compress_type=zipfile.ZIP_STORED)
        archive.writestr("stack.xml", stack_xml, compress_type=zipfile.ZIP_DEFLATED)
        # PNG is compressed already; storing it spares a second deflate pass.
        for source, rgba8 in zip(sources, pixels):
            archive.writestr(source, _png(Image.fromarray(rgba8)), compress_type=zipfile.ZIP_STORED)
        archive.writestr("mergedimage.png", _png(merged), compress_type=zipfile.ZIP_STORED)
        archive.writestr("Thumbnails/thumbnail.png", _png(thumbnail), compress_type=zipfile.ZIP_STORED)
    return path


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


WRITERS = {".psd": write_psd, ".ora": write_openraster}


def write_layered(path: str | os.PathLike, layers: Sequence[Layer]) -> Path:
    """Write ``layers`` (top first) in the format ``path``'s suffix names: ``.psd`` or ``.ora``."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITERS:
        raise ValueError(
            f"{path}: unknown layered image suffix {suffix or '(none)'!r}; use .psd (Photoshop, GIMP, Krita) "
            "or .ora (OpenRaster: GIMP, Krita, MyPaint)"
        )
    return WRITERS[suffix](path, layers)
