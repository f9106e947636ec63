import numpy as np
import png
import pytest
import torch
from PIL import Image

from layerdiff.rgba import (
    MissingAlphaError,
    checkerboard,
    composite,
    encode_png,
    image_grid,
    load_rgba,
    pad_transparent_rgb,
    premultiply_on_grey,
    preview_on_checkerboard,
)


def soft_disc(size: int = 64) -> np.ndarray:
    """A red disc whose alpha falls off smoothly to zero, on undefined (black) colour."""
    ys, xs = np.mgrid[:size, :size]
    radius = np.hypot(ys - size / 2, xs - size / 2)
    alpha = np.clip((size / 4 - radius) / 6 + 0.5, 0, 1).astype(np.float32)
    rgba = np.zeros((size, size, 4), np.float32)
    rgba[..., 0] = 1.0
    rgba[..., 1] = np.linspace(0, 1, size)[None, :]
    rgba[..., :3] *= (alpha > 0)[..., None]
    rgba[..., 3] = alpha
    return rgba


def test_padding_keeps_visible_colour_and_composites():
    rgba = soft_disc()
    padded = pad_transparent_rgb(rgba)
    visible = rgba[..., 3] > 0
    np.testing.assert_allclose(padded[visible], rgba[..., :3][visible], atol=1e-6)
    rgb, alpha = torch.from_numpy(padded), torch.from_numpy(rgba[..., 3:])
    background = torch.rand(64, 64, 3)
    np.testing.assert_allclose(
        composite(rgb, alpha, background).numpy(),
        composite(torch.from_numpy(rgba[..., :3]), alpha, background).numpy(),
        atol=1e-6,
    )


def test_padding_fills_without_hard_edges():
    rgba = soft_disc()
    padded = pad_transparent_rgb(rgba)
    invisible = rgba[..., 3] == 0
    # the fill continues the visible colour: mostly red, never the black that was stored
    assert padded[invisible][:, 0].min() > 0.5
    step_y = np.abs(np.diff(padded, axis=0)).max(axis=2)
    step_x = np.abs(np.diff(padded, axis=1)).max(axis=2)
    both_invisible_y = invisible[1:] & invisible[:-1]
    both_invisible_x = invisible[:, 1:] & invisible[:, :-1]
    assert step_y[both_invisible_y].max() < 0.1
    assert step_x[both_invisible_x].max() < 0.1


def test_padding_edge_cases():
    opaque = np.random.default_rng(0).random((16, 24, 4), dtype=np.float32)
    opaque[..., 3] = 1.0
    np.testing.assert_array_equal(pad_transparent_rgb(opaque), opaque[..., :3])
    empty = np.zeros((16, 16, 4), np.float32)
    padded = pad_transparent_rgb(empty)
    assert np.isfinite(padded).all() and np.allclose(padded, 0.5)
    one_pixel = np.zeros((9, 7, 4), np.float32)
    one_pixel[4, 3] = [0.2, 0.4, 0.6, 1.0]
    np.testing.assert_allclose(pad_transparent_rgb(one_pixel), np.broadcast_to([0.2, 0.4, 0.6], (9, 7, 3)), atol=1e-5)
    with pytest.raises(ValueError, match="H x W x 4"):
        pad_transparent_rgb(np.zeros((4, 4, 3), np.float32))


def test_load_rgba_modes(tmp_path):
    rgba = (np.random.default_rng(1).random((8, 8, 4)) * 255).astype(np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    np.testing.assert_allclose(load_rgba(path), rgba / 255.0, atol=1e-6)

    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = 0
    palette_path = tmp_path / "palette.png"
    palette.save(palette_path, transparency=0)
    assert load_rgba(palette_path).shape == (8, 8, 4)

    opaque = tmp_path / "opaque.png"
    Image.fromarray(rgba[..., :3]).save(opaque)
    with pytest.raises(MissingAlphaError, match="opaque.png.*no alpha"):
        load_rgba(opaque)


def test_load_rgba_16_bit(tmp_path):
    values = np.random.default_rng(2).integers(0, 65536, (8, 8, 4), dtype=np.uint16)
    path = tmp_path / "deep.png"
    with open(path, "wb") as handle:
        png.Writer(8, 8, alpha=True, greyscale=False, bitdepth=16).write(handle, values.reshape(8, 32).tolist())
    loaded = load_rgba(path)
    np.testing.assert_allclose(loaded, values / 65535.0, atol=1 / 255 + 1e-6)


def test_encode_png_round_trip():
    image = np.random.default_rng(3).random((5, 6, 4)).astype(np.float32)
    decoded = load_rgba(encode_png(image))
    np.testing.assert_allclose(decoded, image, atol=0.5 / 255 + 1e-6)


def test_premultiply_composite_and_previews():
    rgb = torch.tensor([1.0, 0.0, 0.5]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    alpha = torch.tensor([[0.0, 1.0], [0.5, 0.25]]).view(1, 1, 2, 2)
    premultiplied = premultiply_on_grey(rgb, alpha)
    assert torch.equal(premultiplied[..., 0, 0], torch.zeros(1, 3))
    assert torch.allclose(premultiplied[..., 0, 1], torch.tensor([[1.0, -1.0, 0.0]]))
    board = checkerboard(16, 16, cell=4)
    assert board.shape == (1, 3, 16, 16) and torch.allclose(board.unique(), torch.tensor([0.8, 1.0]))
    preview = preview_on_checkerboard(rgb, alpha, cell=1)
    assert torch.allclose(preview[..., 0, 1], rgb[..., 0, 1])
    assert torch.allclose(preview[..., 0, 0], board[..., 0, 0])
    grid = image_grid([torch.zeros(3, 3, 4, 5), torch.ones(3, 3, 4, 5)], padding=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 6 + 1)
