"""The layered files of joint generation, read back with independent readers: psd-tools for
PSD, zipfile + ElementTree + Pillow for OpenRaster; never through our own code."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import psd_tools.psd.document
import pytest
import torch
from PIL import Image
from psd_tools import PSDImage

from layerdiff.formats.layered_image import (
    Layer,
    foreground_background_stack,
    write_layered,
    write_openraster,
    write_psd,
)
from layerdiff.rgba import composite

HEIGHT, WIDTH = 24, 40
# 8-bit storage: a float written is read back within half a step, composites within a step.
STEP = 1.0 / 255.0


def sample(seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A uint8 RGBA foreground with every alpha from 0 to 255 (rows of fully transparent and
    opaque pixels included), and float RGB background and blend."""
    rng = np.random.default_rng(seed)
    foreground = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    foreground[0, :, 3] = 0
    foreground[1, :, 3] = 255
    foreground[..., 3].flat[2 * width : 2 * width + 256] = np.arange(256)
    assert set(np.unique(foreground[..., 3])) == set(range(256))
    background = rng.random((height, width, 3), dtype=np.float32)
    blend = rng.random((height, width, 3), dtype=np.float32)
    return foreground, background, blend


def over_opaque(foreground_uint8: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The reference composite: layerdiff.rgba.composite of the 8-bit foreground over ``background``."""
    rgba = torch.from_numpy(foreground_uint8.astype(np.float32) / 255.0)
    return composite(rgba[..., :3], rgba[..., 3:], torch.from_numpy(np.asarray(background, np.float32))).numpy()


def quantised(image: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(image, np.float64) * 255.0) / 255.0


def psd_layers_top_first(document: PSDImage) -> list:
    return list(reversed(list(document)))  # psd-tools iterates bottom to top


def test_psd_round_trip_layers_visibility_and_composite(tmp_path: Path) -> None:
    foreground, background, blend = sample()
    path = write_psd(tmp_path / "sample.psd", foreground_background_stack(foreground, background, blend))

    document = PSDImage.open(path)
    assert (document.width, document.height, document.depth, document.channels) == (WIDTH, HEIGHT, 8, 3)
    assert document.color_mode.name == "RGB"
    layers = psd_layers_top_first(document)
    assert [layer.name for layer in layers] == ["blend (generated)", "foreground", "background"]
    assert [layer.visible for layer in layers] == [False, True, True]
    for layer in layers:
        assert layer.kind == "pixel" and layer.bbox == (0, 0, WIDTH, HEIGHT)
        assert not layer.has_mask()  # transparency is the layer's own channel -1, not a mask
        assert layer.opacity == 255 and layer.blend_mode.name == "NORMAL"
        assert -1 in [info.id for info in layer._record.channel_info]

    read_blend, read_foreground, read_background = (layer.numpy() for layer in layers)
    np.testing.assert_array_equal(np.rint(read_foreground * 255).astype(np.uint8), foreground)
    np.testing.assert_allclose(read_background[..., :3], background, atol=STEP / 2 + 1e-6)
    np.testing.assert_allclose(read_blend[..., :3], blend, atol=STEP / 2 + 1e-6)
    assert read_background[..., 3].min() == 1.0 and read_blend[..., 3].min() == 1.0

    # The merged image stored in the file (psd-tools returns it as is for an unedited file).
    assert document.has_preview()
    stored = np.asarray(document.composite(), np.float64) / 255.0
    assert stored.shape == (HEIGHT, WIDTH, 3)
    expected = over_opaque(foreground, quantised(background))
    np.testing.assert_allclose(stored, expected, atol=STEP + 1e-6)
    # The hidden blend is no part of it: it differs from the blend by far more than rounding.
    assert np.abs(stored - blend).mean() > 0.1


def test_psd_merged_image_and_layer_list_read_by_pillow(tmp_path: Path) -> None:
    """Pillow is a second, unrelated PSD reader. Its layer pixels are not compared: it takes a
    layer's channel data in R, G, B, A order whatever the channel ids say, while psd-tools (like
    Photoshop) writes the transparency channel first."""
    foreground, background, blend = sample()
    write_psd(tmp_path / "sample.psd", foreground_background_stack(foreground, background, blend))
    with Image.open(tmp_path / "sample.psd") as image:
        assert image.format == "PSD" and image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
        merged = np.asarray(image, np.float64) / 255.0
        bottom_first = [(name, mode, bbox) for name, mode, bbox, _ in image.layers]
    np.testing.assert_allclose(merged, over_opaque(foreground, quantised(background)), atol=STEP + 1e-6)
    whole = (0, 0, WIDTH, HEIGHT)
    assert bottom_first == [("background", "RGBA", whole), ("foreground", "RGBA", whole), ("blend (generated)", "RGBA", whole)]


def test_psd_of_transparent_layers_flattens_over_white(tmp_path: Path) -> None:
    # Odd sides: PSD rows are not padded, RLE rows are counted one by one.
    height, width = 23, 41
    top, bottom = sample(1, height, width)[0], sample(2, height, width)[0]
    write_psd(tmp_path / "two.psd", [Layer("top", top), Layer("bottom", bottom)])

    document = PSDImage.open(tmp_path / "two.psd")
    layers = psd_layers_top_first(document)
    assert [layer.name for layer in layers] == ["top", "bottom"]
    np.testing.assert_array_equal(np.rint(layers[0].numpy() * 255).astype(np.uint8), top)
    np.testing.assert_array_equal(np.rint(layers[1].numpy() * 255).astype(np.uint8), bottom)
    stored = np.asarray(document.composite(), np.float64) / 255.0
    # Photoshop's convention for the merged image: the composite over white.
    bottom_on_white = over_opaque(bottom, np.ones((height, width, 3), np.float32))
    np.testing.assert_allclose(stored, over_opaque(top, bottom_on_white), atol=STEP / 2 + 1e-6)
    assert stored[0].min() == 1.0  # where every layer is transparent


def test_psd_keeps_unicode_layer_names(tmp_path: Path) -> None:
    foreground, background, _ = sample()
    write_psd(tmp_path / "names.psd", [Layer("Vordergrund – 前景", foreground), Layer("background", background)])
    assert [layer.name for layer in psd_layers_top_first(PSDImage.open(tmp_path / "names.psd"))] == [
        "Vordergrund – 前景",
        "background",
    ]


def read_png(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with Image.open(io.BytesIO(archive.read(name))) as image:
        assert image.mode == "RGBA"
        return np.asarray(image)


def test_openraster_round_trip(tmp_path: Path) -> None:
    foreground, background, blend = sample()
    path = write_openraster(tmp_path / "sample.ora", foreground_background_stack(foreground, background, blend))

    raw = path.read_bytes()
    # The OpenRaster magic: a stored "mimetype" entry first, without extra field, at offset 30.
    assert raw[:4] == b"PK\x03\x04" and raw[30:38] == b"mimetype" and raw[38:54] == b"image/openraster"
    with zipfile.ZipFile(path) as archive:
        first = archive.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED and first.extra == b""
        assert archive.read("mimetype") == b"image/openraster"
        assert archive.testzip() is None

        image = ElementTree.fromstring(archive.read("stack.xml"))
        assert image.tag == "image" and (image.get("w"), image.get("h")) == (str(WIDTH), str(HEIGHT))
        entries = image.find("stack").findall("layer")
        assert [entry.get("name") for entry in entries] == ["blend (generated)", "foreground", "background"]
        assert [entry.get("visibility") for entry in entries] == ["hidden", "visible", "visible"]
        assert {entry.get("composite-op") for entry in entries} == {"svg:src-over"}
        read_blend, read_foreground, read_background = (read_png(archive, entry.get("src")) for entry in entries)
        np.testing.assert_array_equal(read_foreground, foreground)
        np.testing.assert_allclose(read_background[..., :3] / 255.0, background, atol=STEP / 2 + 1e-6)
        np.testing.assert_allclose(read_blend[..., :3] / 255.0, blend, atol=STEP / 2 + 1e-6)
        assert read_background[..., 3].min() == 255

        merged = read_png(archive, "mergedimage.png") / 255.0
        assert merged[..., 3].min() == 1.0  # the opaque background covers everything
        np.testing.assert_allclose(merged[..., :3], over_opaque(foreground, quantised(background)), atol=STEP)
        np.testing.assert_array_equal(read_png(archive, "Thumbnails/thumbnail.png"), (merged * 255).round())


def test_openraster_merged_image_keeps_alpha_and_thumbnail_is_small(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    top, bottom = (rng.random((20, 520, 4)) for _ in range(2))
    write_openraster(tmp_path / "wide.ora", [Layer("top", top), Layer("bottom", bottom)])
    with zipfile.ZipFile(tmp_path / "wide.ora") as archive:
        merged = read_png(archive, "mergedimage.png") / 255.0
        with Image.open(io.BytesIO(archive.read("Thumbnails/thumbnail.png"))) as thumbnail:
            assert max(thumbnail.size) == 256 and thumbnail.mode == "RGBA"
    top, bottom = quantised(top), quantised(bottom)
    # Porter-Duff over, premultiplied: colour_a + colour_b (1 - a), alpha a + b (1 - a).
    alpha = top[..., 3:] + bottom[..., 3:] * (1 - top[..., 3:])
    premultiplied = top[..., :3] * top[..., 3:] + bottom[..., :3] * bottom[..., 3:] * (1 - top[..., 3:])
    np.testing.assert_allclose(merged[..., 3:], alpha, atol=STEP / 2 + 1e-6)
    np.testing.assert_allclose(merged[..., :3] * merged[..., 3:], premultiplied, atol=STEP)


def test_write_layered_picks_the_format_by_suffix(tmp_path: Path) -> None:
    foreground, background, _ = sample()
    stack = foreground_background_stack(foreground, background)
    assert len(PSDImage.open(write_layered(tmp_path / "a.PSD", stack))) == 2
    with zipfile.ZipFile(write_layered(tmp_path / "a.ora", stack)) as archive:
        assert archive.read("mimetype") == b"image/openraster"
    with pytest.raises(ValueError, match=r"unknown layered image suffix '\.png'.*\.psd.*\.ora"):
        write_layered(tmp_path / "a.png", stack)
    assert not (tmp_path / "a.png").exists()


def bad_stacks() -> dict[str, tuple[list, type[Exception], str]]:
    rgba = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    return {
        "empty": ([], ValueError, "at least one layer"),
        "sizes": (
            [Layer("fg", rgba), Layer("bg", np.zeros((HEIGHT, WIDTH + 1, 3), np.uint8))],
            ValueError,
            rf"one size.*'fg' {HEIGHT}x{WIDTH}, 'bg' {HEIGHT}x{WIDTH + 1}",
        ),
        "dtype": ([Layer("fg", rgba.astype(np.uint16))], TypeError, "'fg'.*dtype uint16"),
        "channels": ([Layer("fg", rgba[..., :2])], ValueError, r"'fg'.*H x W x 4.*\(24, 40, 2\)"),
        "two-dimensional": ([Layer("fg", rgba[..., 0])], ValueError, "'fg'.*shape"),
        "duplicate": ([Layer("fg", rgba), Layer("fg", rgba)], ValueError, "two layers are named 'fg'"),
        "range": ([Layer("fg", np.full((HEIGHT, WIDTH, 4), 1.5))], ValueError, r"'fg'.*\[0, 1\].*1\.5"),
        "nan": ([Layer("fg", np.full((HEIGHT, WIDTH, 4), np.nan))], ValueError, "'fg'.*NaN"),
        "tensor": ([Layer("fg", torch.zeros(HEIGHT, WIDTH, 4))], TypeError, "'fg'.*numpy array"),
        "not a layer": ([("fg", rgba)], TypeError, "layer 0 is a tuple"),
        "empty name": ([Layer("", rgba)], ValueError, "non-empty printable"),
        "control character": ([Layer("fore\nground", rgba)], ValueError, "non-empty printable"),
        "long name": ([Layer("x" * 256, rgba)], ValueError, "256 characters long; the limit is 255"),
    }


@pytest.mark.parametrize("suffix", [".psd", ".ora"])
@pytest.mark.parametrize("case", list(bad_stacks()))
def test_bad_stacks_raise_clear_errors_and_write_nothing(tmp_path: Path, suffix: str, case: str) -> None:
    layers, error, message = bad_stacks()[case]
    with pytest.raises(error, match=message):
        write_layered(tmp_path / f"bad{suffix}", layers)
    assert list(tmp_path.iterdir()) == []


def test_the_joint_stack_needs_a_transparent_foreground() -> None:
    _, background, _ = sample()
    with pytest.raises(ValueError, match=r"foreground must be H x W x 4 RGBA.*\(24, 40, 3\)"):
        foreground_background_stack(background, background)


def test_psd_refuses_psb_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PSD limit of 30000"):
        write_psd(tmp_path / "huge.psd", [Layer("strip", np.zeros((1, 30001, 3), np.uint8))])
    assert list(tmp_path.iterdir()) == []


class Interrupted(RuntimeError):
    pass


@pytest.mark.parametrize("suffix", [".psd", ".ora"])
def test_a_write_failing_midway_leaves_the_previous_file_and_no_partial_one(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    foreground, background, _ = sample()
    path = write_layered(tmp_path / f"sample{suffix}", foreground_background_stack(foreground, background))
    before = path.read_bytes()

    # Fault injection at the third-party writer: some bytes reach the file, then it fails.
    def psd_fails(self, handle, **kwargs):
        handle.write(b"8BPS partial")
        raise Interrupted("disk full")

    def zip_fails(self, name, data, *args, **kwargs):
        if name == "mergedimage.png":
            raise Interrupted("disk full")
        return writestr(self, name, data, *args, **kwargs)

    writestr = zipfile.ZipFile.writestr
    monkeypatch.setattr(psd_tools.psd.document.PSD, "write", psd_fails)
    monkeypatch.setattr(zipfile.ZipFile, "writestr", zip_fails)
    blend = sample(5)[2]
    with pytest.raises(Interrupted):
        write_layered(path, foreground_background_stack(foreground, background, blend))
    assert path.read_bytes() == before
    assert sorted(child.name for child in tmp_path.iterdir()) == [path.name]
