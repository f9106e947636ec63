"""RGBA image helpers shared by data preparation, training and previews.

Conventions: numpy images are ``float32`` ``H x W x C`` in [0, 1]; torch images are
``B x C x H x W`` in [0, 1] unless a name says otherwise. Alpha ``a`` is a separate
one-channel image. Colour is *straight* (not premultiplied) everywhere except in
``premultiply_on_grey``.
"""

from __future__ import annotations

import io
from os import PathLike
from typing import BinaryIO, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class MissingAlphaError(ValueError):
    """An image that must be transparent has no alpha channel."""


def load_rgba(source: str | PathLike | BinaryIO | bytes, *, name: str | None = None) -> np.ndarray:
    """Decode a PNG (8- or 16-bit; RGBA, LA or palette with transparency) to float RGBA.

    Pillow reads 16-bit RGBA/LA files as 8-bit, which is the precision our shards store.
    Raises ``MissingAlphaError`` for images without any alpha information, naming the
    file, because training on an opaque image as if it were a cut-out is silent garbage.
    """
    name = name or (str(source) if not isinstance(source, (bytes, io.IOBase)) else "<bytes>")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        image.load()
        has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        if not has_alpha:
            raise MissingAlphaError(
                f"{name}: image mode {image.mode!r} has no alpha channel. Transparent training "
                "data must be RGBA PNGs (or palette PNGs with transparency); export the cut-out "
                "with its alpha, or drop this file."
            )
        if image.mode in ("I;16", "I;16B", "I"):
            raise MissingAlphaError(f"{name}: 16-bit greyscale without alpha is not supported.")
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    return rgba


def encode_png(image: np.ndarray) -> bytes:
    """Encode a float [0, 1] ``H x W x {1,3,4}`` image as an 8-bit PNG."""
    array = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def resize_and_crop(rgba: np.ndarray, width: int, height: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Scale float RGBA to cover ``width x height``, centre-crop; return it and ``(top, left)``.

    Resampling works on premultiplied colour so the (undefined) colour of
    invisible pixels cannot bleed into the edges. Shrinking averages areas (a box
    filter), which keeps alpha inside its input range: Lanczos rings by about 10 %
    at hard matte edges, a visible halo. Enlarging uses Lanczos.
    """
    source_height, source_width = rgba.shape[:2]
    scale = max(width / source_width, height / source_height)
    scaled_width = max(width, round(source_width * scale))
    scaled_height = max(height, round(source_height * scale))
    if (scaled_width, scaled_height) != (source_width, source_height):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
        alpha = rgba[..., 3]
        planes = [rgba[..., channel] * alpha for channel in range(3)] + [alpha]
        resized = [
            np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
                (scaled_width, scaled_height), resample))
            for plane in planes
        ]
        alpha = np.clip(resized[3], 0.0, 1.0)
        safe_alpha = np.maximum(alpha, 1e-6)
        colour = [np.clip(plane / safe_alpha, 0.0, 1.0) for plane in resized[:3]]
        rgba = np.stack(colour + [alpha], axis=-1).astype(np.float32)
    top, left = (scaled_height - height) // 2, (scaled_width - width) // 2
    return rgba[top:top + height, left:left + width], (top, left)


def pad_transparent_rgb(rgba: np.ndarray, shrink: float = 1.2) -> np.ndarray:
    """Fill colour under zero alpha with a smooth extension of the visible colour.

    LayerDiffusion Appendix A pads the undefined colour of invisible pixels so the
    encoder never sees hard edges. We use the released code's alpha pyramid: premultiplied
    colour and alpha are shrunk by ``shrink`` per level down to one pixel, then rebuilt
    upward with ``fill = colour_l + fill * (1 - alpha_l)``.

    Unlike the released code we keep the original colour wherever ``alpha > 0``: blending
    the fill into semi-transparent pixels would change ``alpha * rgb`` and therefore every
    composite of the layer. A fully transparent image is filled with 50 % grey.
    """
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"pad_transparent_rgb expects H x W x 4, got shape {rgba.shape}")
    rgb = torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(2, 0, 1)[None]
    alpha = torch.from_numpy(np.ascontiguousarray(rgba[..., 3:])).permute(2, 0, 1)[None]
    if float(alpha.max()) <= 0.0:
        return np.full(rgba.shape[:2] + (3,), 0.5, dtype=np.float32)

    fill = pyramid_fill(rgb, alpha, shrink)
    padded = torch.where(alpha > 0, rgb, fill.clamp(0.0, 1.0))
    return padded[0].permute(1, 2, 0).numpy()


def prepare_foreground(rgba: np.ndarray) -> np.ndarray:
    """Make a float RGBA image storable as ``fg.png``: 8-bit alpha, padded colour.

    Alpha is quantised first so that the pixels padded are exactly those stored
    with zero alpha (a resampled alpha of 1e-4 would otherwise keep its colour,
    then round to 0 in the PNG).
    """
    alpha = np.rint(np.clip(rgba[..., 3:], 0.0, 1.0) * 255.0) / 255.0
    quantised = np.concatenate([rgba[..., :3], alpha], axis=-1).astype(np.float32)
    return np.concatenate([pad_transparent_rgb(quantised), alpha.astype(np.float32)], axis=-1)


def pyramid_fill(
    rgb: torch.Tensor, alpha: torch.Tensor, shrink: float = 1.2, *, stop: Literal["both_sides", "shorter_side"] = "both_sides"
) -> torch.Tensor:
    """The released code's padding pyramid on ``[B, 3, H, W]`` colour and ``[B, 1, H, W]`` alpha:
    ``colour * alpha + fill * (1 - alpha)`` in every pixel.

    Premultiplied colour and alpha shrink by ``shrink`` per level (area averaging) until both
    sides (ours) or the shorter side (the released ``pad_rgb``) reach one pixel; from the
    alpha-weighted mean colour there, each level upsamples the fill bilinearly and sets
    ``fill = colour_l * alpha_l + fill * (1 - alpha_l)``. Colour under zero alpha never enters.
    """
    levels = [(rgb * alpha, alpha)]
    height, width = alpha.shape[-2:]
    while (min(height, width) if stop == "shorter_side" else max(height, width)) > 1:
        height, width = max(1, int(height / shrink)), max(1, int(width / shrink))
        premultiplied, coverage = levels[-1]
        levels.append(tuple(F.interpolate(image, size=(height, width), mode="area") for image in (premultiplied, coverage)))
    coarsest_colour, coarsest_alpha = levels[-1]
    fill = coarsest_colour.sum(dim=(2, 3), keepdim=True) / coarsest_alpha.sum(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    for premultiplied, coverage in reversed(levels):
        fill = F.interpolate(fill, size=premultiplied.shape[2:], mode="bilinear", align_corners=False)
        fill = premultiplied + fill * (1.0 - coverage)
    return fill


def premultiply_on_grey(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The image the frozen SD VAE encodes: colour premultiplied onto 50 % grey, in [-1, 1].

    ``I_p = (2 * rgb - 1) * alpha`` (LayerDiffusion sec. 3.1, as in the released code).
    """
    return (rgb * 2.0 - 1.0) * alpha


def composite(rgb: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Porter-Duff "over": straight colour ``rgb`` with ``alpha`` over ``background``."""
    return rgb * alpha + background * (1.0 - alpha)


def checkerboard(height: int, width: int, cell: int = 8, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """A light/dark grey checkerboard ``1 x 3 x H x W``, the usual backdrop for transparency."""
    ys = torch.arange(height, device=device) // cell
    xs = torch.arange(width, device=device) // cell
    board = ((ys[:, None] + xs[None, :]) % 2).to(dtype)
    board = 0.8 + 0.2 * board
    return board.expand(1, 3, height, width)


def preview_on_checkerboard(rgb: torch.Tensor, alpha: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """Composite a transparent image over a checkerboard so its alpha is visible."""
    board = checkerboard(rgb.shape[-2], rgb.shape[-1], cell, device=rgb.device, dtype=rgb.dtype)
    return composite(rgb, alpha, board)


def preview_layers(layers: list[torch.Tensor]) -> torch.Tensor:
    """A layer set (top first; ``4 x H x W`` RGBA or ``3 x H x W`` RGB each) as one row to look
    at: each layer (RGBA on a checkerboard), then all of them composited, top over bottom,
    ``[L + 1, 3, H, W]``."""
    tiles, stack = [], None
    for layer in reversed(layers):  # bottom first, so each layer goes over what is below it
        rgb, alpha = layer[:3], layer[3:] if layer.shape[0] == 4 else torch.ones_like(layer[:1])
        tiles.append(preview_on_checkerboard(rgb[None], alpha[None])[0])
        stack = preview_on_checkerboard(rgb[None], alpha[None])[0] if stack is None else composite(rgb, alpha, stack)
    return torch.stack(tiles[::-1] + [stack])


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """``C x H x W`` float [0, 1] tensor to an ``H x W x C`` uint8 array for saving."""
    array = image.detach().float().clamp(0, 1).mul(255).round().byte().cpu()
    return array.permute(1, 2, 0).numpy()


def image_grid(rows: list[torch.Tensor], padding: int = 2) -> torch.Tensor:
    """Lay out equally shaped ``B x 3 x H x W`` batches as rows of a ``3 x H' x W'`` grid
    on a white background (one row per tensor, one column per batch element)."""
    batch, channels, height, width = rows[0].shape
    grid = torch.ones(
        channels,
        len(rows) * (height + padding) + padding,
        batch * (width + padding) + padding,
        dtype=rows[0].dtype,
        device=rows[0].device,
    )
    for row_index, row in enumerate(rows):
        top = padding + row_index * (height + padding)
        for column in range(batch):
            left = padding + column * (width + padding)
            grid[:, top : top + height, left : left + width] = row[column]
    return grid
