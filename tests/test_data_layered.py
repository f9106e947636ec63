"""Layered sources for the shard writer: folder triplets, layered PSD files, bad input, reading them back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from psd_tools.constants import BlendMode

from data import ShardDataModule
from data.__main__ import main
from data.layered_sources import (
    BLEND_MEAN_TOLERANCE,
    BLEND_MISMATCH,
    NO_BACKGROUND,
    NO_FOREGROUND,
    NOT_OPAQUE,
    SINGLE_LAYER_PSD,
    SIZE_MISMATCH,
    LayerProblem,
    check_blend,
)
from data.schema import SchemaError, decode_sample
from data.shards import iter_shard_samples
from data.spec import resolve_shards
from data.writer import NO_ALPHA, UNREADABLE, write_folder
from layerdiff.batches import LayeredBatch
from layerdiff.rgba import resize_and_crop
from support.shards import tiny_rgba


def _gradient(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth opaque RGB photo stand-in whose columns differ, so a wrong crop shows."""
    ys, xs = np.mgrid[:height, :width]
    rgb = np.stack([xs * 255 / max(width - 1, 1), ys * 255 / max(height - 1, 1), np.full_like(xs, 40 + seed * 50)], -1)
    return np.rint(rgb).astype(np.uint8)


def _over(rgba: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:] / 255.0
    return np.rint(rgba[..., :3] * alpha + rgb * (1.0 - alpha)).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _samples(out_dir: Path) -> dict:
    members = iter_shard_samples(resolve_shards(str(out_dir)), print)
    return {sample.source: sample for sample in (decode_sample(m, require_layers=True) for m in members)}


def _psd(path: Path, layers: list[tuple[str, np.ndarray, int, int]], *, hidden: str | None = None,
         blend_mode: BlendMode = BlendMode.NORMAL, size: tuple[int, int] = (40, 30)) -> None:
    """A real layered PSD (bottom layer first: name, uint8 image, top, left); psd-tools writes its composite."""
    psd = PSDImage.new("RGB", size)
    for index, (name, array, top, left) in enumerate(layers):
        mode = "RGBA" if array.shape[2] == 4 else "RGB"
        topmost = index == len(layers) - 1
        layer = psd.create_pixel_layer(Image.fromarray(array, mode), name=name, top=top, left=left,
                                       blend_mode=blend_mode if topmost else BlendMode.NORMAL)
        layer.visible = name != hidden
    path.parent.mkdir(parents=True, exist_ok=True)
    psd.save(path)


def test_folder_triplets_become_layered_samples_with_one_crop_and_their_captions(tmp_path):
    src = tmp_path / "src"
    fg, bg = tiny_rgba(30, 60, seed=1), _gradient(30, 60)
    _save(src / "wide.fg.png", fg)
    (src / "wide.fg.txt").write_text("a red fox\n", encoding="utf-8")
    (src / "wide.bg.txt").write_text("a snowy field\n", encoding="utf-8")
    (src / "wide.txt").write_text("a red fox in a snowy field\n", encoding="utf-8")
    _save(src / "wide.bg.png", bg)
    _save(src / "wide.blend.png", _over(fg, bg))
    fg2 = tiny_rgba(40, 40, seed=2)
    _save(src / "nested" / "square.fg.png", fg2)
    opaque_rgba = np.concatenate([_gradient(40, 40, seed=1), np.full((40, 40, 1), 255, np.uint8)], -1)
    _save(src / "nested" / "square.bg.png", opaque_rgba)  # RGBA, fully opaque: accepted as a background
    _save(tmp_path / "plain" / "wide.png", fg)  # the same foreground as a plain source, for comparison

    report = write_folder(src, tmp_path / "out", size=32)
    write_folder(tmp_path / "plain", tmp_path / "plain_out", size=32)
    assert report.manifest.num_samples == 2 and not report.dropped and report.without_caption == 1
    samples = _samples(tmp_path / "out")
    assert set(samples) == {"wide.fg.png", "nested/square.fg.png"}
    wide, square = samples["wide.fg.png"], samples["nested/square.fg.png"]
    assert wide.key.endswith("_wide") and square.key.endswith("_square")
    assert (wide.caption, wide.background_caption, wide.blend_caption) == (
        "a red fox", "a snowy field", "a red fox in a snowy field")
    assert (square.caption, square.background_caption, square.blend_caption) == ("", "", "")

    # The foreground goes through the single-layer path unchanged: resize, crop, padding.
    (plain,) = _samples_plain(tmp_path / "plain_out")
    np.testing.assert_array_equal(wide.foreground, plain.foreground)
    assert wide.original_size == (30, 60) and wide.crop_top_left == (0, 16) == plain.crop_top_left
    # The background took the same crop: the gradient's columns 16..47 of the 32x64 resize.
    opaque = np.concatenate([bg / 255.0, np.ones((30, 60, 1))], -1).astype(np.float32)
    expected_bg, crop = resize_and_crop(opaque, 32, 32)
    assert crop == (0, 16)
    assert np.abs(wide.background.astype(float) - expected_bg[..., :3] * 255).max() <= 1.0
    for sample in (wide, square):  # given (8-bit rounded) or composited: the blend is fg over bg
        expected = _over(sample.foreground, sample.background).astype(float)
        assert np.abs(sample.blend.astype(float) - expected).mean() < 1.0
        assert sample.provenance["layers"]["background"].endswith(".bg.png")
    assert square.provenance["layers"]["blend"] == "composited"
    np.testing.assert_array_equal(square.blend, _over(square.foreground, square.background))


def _samples_plain(out_dir: Path) -> list:
    return [decode_sample(m) for m in iter_shard_samples(resolve_shards(str(out_dir)), print)]


def test_layered_shards_read_as_layered_batches_and_plain_shards_refuse_require_layers(tmp_path):
    src = tmp_path / "src"
    for index in range(3):
        fg = tiny_rgba(24, 24, seed=index)
        _save(src / f"s{index}.fg.png", fg)
        _save(src / f"s{index}.bg.png", _gradient(24, 24, seed=index))
        (src / f"s{index}.fg.txt").write_text(f"object {index}", encoding="utf-8")
        (src / f"s{index}.txt").write_text(f"scene {index}", encoding="utf-8")
    write_folder(src, tmp_path / "layered", size=16)
    module = ShardDataModule(str(tmp_path / "layered"), batch_size=3, num_workers=0, require_layers=True)
    (batch,) = [module.on_before_batch_transfer(item, 0) for item in module.train_dataloader()]
    assert isinstance(batch, LayeredBatch)
    assert [layer.name for layer in batch.layers] == ["foreground", "background", "blend"]
    foreground, background, blend = batch.layers
    assert foreground.pixels.shape == (3, 4, 16, 16) and background.pixels.shape == blend.pixels.shape == (3, 3, 16, 16)
    assert sorted(batch.caption) == ["object 0", "object 1", "object 2"]
    assert sorted(blend.caption) == ["scene 0", "scene 1", "scene 2"] and background.caption == ["", "", ""]
    expected = foreground.rgb * foreground.alpha + background.rgb * (1 - foreground.alpha)
    assert (blend.rgb - expected).abs().max() <= 1.5 / 255

    _save(tmp_path / "plain" / "cut.png", tiny_rgba(24, 24, seed=7))
    write_folder(tmp_path / "plain", tmp_path / "single", size=16)
    module = ShardDataModule(str(tmp_path / "single"), batch_size=1, num_workers=0, require_layers=True)
    with pytest.raises(SchemaError, match=r"shard .*shard-000000\.tar, key 00000000_cut, field 'bg\.png'.*"
                                          r"re-write the shards from a layered source.*python -m data write"):
        list(module.train_dataloader())


def test_layered_psd_top_layer_is_the_foreground_and_the_rest_the_background(tmp_path):
    src = tmp_path / "src"
    cut, photo, sticker = tiny_rgba(24, 24, seed=3), _gradient(30, 40), tiny_rgba(10, 10, seed=4)
    sky = np.zeros((30, 40, 3), np.uint8)
    _psd(src / "fox.psd", [("sky", sky, 0, 0), ("photo", photo[:20], 0, 0), ("sticker", sticker, 18, 2),
                           ("hidden", np.full((30, 40, 3), 255, np.uint8), 0, 0), ("fox", cut, 3, 24)],
         hidden="hidden")  # the fox hangs over the right edge: only its left 16 columns are on the canvas
    (src / "fox.txt").write_text("a fox in front of a field\n", encoding="utf-8")
    (src / "fox.fg.txt").write_text("a fox\n", encoding="utf-8")
    report = write_folder(src, tmp_path / "out", size=40)  # 40x30 covers 53x40, cropped to 40x40
    assert report.manifest.num_samples == 1 and not report.dropped
    (sample,) = _samples(tmp_path / "out").values()
    assert (sample.caption, sample.blend_caption) == ("a fox", "a fox in front of a field")
    assert sample.original_size == (30, 40) and sample.provenance["layers"]["foreground"] == "fox.psd: layer 'fox'"

    canvas = np.zeros((30, 40, 4), np.uint8)
    canvas[3:27, 24:40] = cut[:, :16]
    below = sky.copy()
    below[:20] = photo[:20]
    below[18:28, 2:12] = _over(sticker, below[18:28, 2:12])  # every visible layer below the top, but not the hidden one
    for stored, source in ((sample.foreground, canvas), (sample.background, below)):
        expected, _ = resize_and_crop(_opaque_if_rgb(source), 40, 40)
        visible = expected[..., 3] > 0.5
        assert visible.sum() > 50
        difference = np.abs(stored[..., :3].astype(float) - expected[..., :3] * 255)[visible]
        assert difference.mean() < 2.0
    np.testing.assert_allclose(sample.foreground[..., 3] / 255, resize_and_crop(canvas / 255.0, 40, 40)[0][..., 3],
                               atol=1 / 255)
    assert np.abs(sample.blend.astype(float) - _over(sample.foreground, sample.background)).mean() < 1.0


def test_layers_clipped_to_the_psd_foreground_belong_to_it(tmp_path):
    red = np.zeros((10, 10, 4), np.uint8)
    red[..., 0] = red[..., 3] = 255
    tint = np.zeros((20, 20, 4), np.uint8)
    tint[..., 2], tint[..., 3] = 255, 128
    _psd(tmp_path / "src" / "tinted.psd", [("grey", np.full((20, 20, 3), 100, np.uint8), 0, 0), ("cut", red, 5, 5),
                                           ("tint", tint, 0, 0)], size=(20, 20))
    psd = PSDImage.open(tmp_path / "src" / "tinted.psd")
    psd[2].clipping = True  # the tint shows only where the cut is
    psd.save(tmp_path / "src" / "tinted.psd")
    report = write_folder(tmp_path / "src", tmp_path / "out", size=20)
    assert report.manifest.num_samples == 1 and not report.dropped
    (sample,) = _samples(tmp_path / "out").values()
    assert sample.provenance["layers"]["foreground"] == "tinted.psd: layer 'cut'"
    assert np.abs(sample.foreground[10, 10].astype(int) - (127, 0, 128, 255)).max() <= 1
    assert sample.foreground[0, 0, 3] == 0 and tuple(sample.background[0, 0]) == (100, 100, 100)


def _opaque_if_rgb(image: np.ndarray) -> np.ndarray:
    if image.shape[2] == 3:
        image = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], -1)
    return (image / 255.0).astype(np.float32)


def test_bad_layered_input_is_dropped_with_the_file_the_problem_and_the_fix(tmp_path, capsys):
    src = tmp_path / "src"
    fg, bg = tiny_rgba(40, 40, seed=5), _gradient(40, 40)
    _save(src / "good.fg.png", fg)
    _save(src / "good.bg.png", bg)
    _save(src / "sizes.fg.png", fg)
    _save(src / "sizes.bg.png", _gradient(36, 40))
    _save(src / "wrong.fg.png", fg)
    _save(src / "wrong.bg.png", bg)
    _save(src / "wrong.blend.png", _over(fg, bg[::-1]))  # composited over another background
    _save(src / "rgb.fg.png", fg[..., :3])
    _save(src / "rgb.bg.png", bg)
    _save(src / "alone.fg.png", fg)
    _save(src / "orphan.bg.png", bg)
    _save(src / "holes.fg.png", fg)
    holes = np.concatenate([bg, np.full((40, 40, 1), 255, np.uint8)], -1)
    holes[:5, :5, 3] = 0
    _save(src / "holes.bg.png", holes)
    _save(src / "broken.fg.png", fg)
    (src / "broken.bg.png").write_bytes(b"\x89PNG\r\n\x1a\n and then nothing")
    (src / "junk.psd").write_bytes(b"8BPS but not really a PSD")
    _psd(src / "single.psd", [("Background", bg[:30], 0, 0)])
    _psd(src / "multiply.psd", [("photo", _gradient(30, 40), 0, 0), ("cut", tiny_rgba(30, 40, seed=6), 0, 0)],
         blend_mode=BlendMode.MULTIPLY)

    assert main(["write", str(src), str(tmp_path / "out"), "--size", "32", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 samples" in printed and "dropped 10 image(s)" in printed
    assert set(_samples(tmp_path / "out")) == {"good.fg.png"}
    report = write_folder(src, tmp_path / "again", size=32)
    assert dict(report.dropped) == {SIZE_MISMATCH: 1, BLEND_MISMATCH: 2, NO_ALPHA: 1, NO_BACKGROUND: 1,
                                    NO_FOREGROUND: 1, NOT_OPAQUE: 1, UNREADABLE: 2, SINGLE_LAYER_PSD: 1}
    examples = {reason: " ".join(found) for reason, found in report.drop_examples.items()}
    assert "sizes.fg.png is 40x40 but sizes.bg.png is 40x36: export all layers" in examples[SIZE_MISMATCH]
    assert "wrong.blend.png: the blend differs from foreground over background by" in examples[BLEND_MISMATCH]
    assert f"(tolerance {BLEND_MEAN_TOLERANCE:g} and 40 of 0..255)" in examples[BLEND_MISMATCH]
    assert "delete the blend to have it composited" in examples[BLEND_MISMATCH]
    assert "multiply.psd: the blend differs" in examples[BLEND_MISMATCH] and "normal blend mode" in examples[BLEND_MISMATCH]
    assert "rgb.fg.png: image mode 'RGB' has no alpha channel" in examples[NO_ALPHA]
    assert "alone.fg.png has no alone.bg.png beside it: add the background" in examples[NO_BACKGROUND]
    assert examples[NO_FOREGROUND].startswith("orphan.bg.png (no orphan.fg.png beside it")
    assert "holes.bg.png: 25 of 1600 pixels of the background are not fully opaque" in examples[NOT_OPAQUE]
    assert "broken.bg.png: UnidentifiedImageError" in examples[UNREADABLE] and "junk.psd: " in examples[UNREADABLE]
    assert "single.psd has 1 visible layer(s) with pixels ('Background')" in examples[SINGLE_LAYER_PSD]
    assert "put the cut-out on its own layer above the background" in examples[SINGLE_LAYER_PSD]


def test_mixing_layered_and_plain_sources_is_an_error_naming_one_of_each(tmp_path, capsys):
    src = tmp_path / "src"
    _save(src / "a.fg.png", tiny_rgba(16, 16))
    _save(src / "a.bg.png", _gradient(16, 16))
    _save(src / "sub" / "cut.png", tiny_rgba(16, 16))
    with pytest.raises(ValueError, match=r"mixes layered sources \(e\.g\. a\.bg\.png\) with plain RGBA PNGs "
                                         r"\(e\.g\. sub/cut\.png\).*NAME\.fg\.png"):
        write_folder(src, tmp_path / "out", size=16)
    assert main(["write", str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    assert "sub/cut.png" in capsys.readouterr().err


def test_blend_tolerance_accepts_rounding_and_jpeg_but_not_another_image():
    fg = tiny_rgba(48, 48, seed=8).astype(np.float32)
    fg[..., :3] = _gradient(48, 48, seed=2)  # smooth colour, like a photo's cut-out
    bg = _gradient(48, 48)[::-1].astype(np.float32)
    fg, bg = fg / 255.0, bg / 255.0
    exact = fg[..., :3] * fg[..., 3:] + bg * (1 - fg[..., 3:])
    buffer = io.BytesIO()
    Image.fromarray(np.rint(exact * 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    jpeg = np.asarray(Image.open(buffer), np.float32) / 255.0
    for accepted in (np.rint(exact * 255) / 255, jpeg):
        check_blend(fg, bg, accepted, "ok.blend.png", "fix")
    for rejected in (np.clip(exact + 10 / 255, 0, 1), fg[..., :3] * fg[..., 3:] + bg[:, ::-1] * (1 - fg[..., 3:])):
        with pytest.raises(LayerProblem, match=r"bad\.blend\.png: the blend differs .* levels mean.*; fix$"):
            check_blend(fg, bg, rejected, "bad.blend.png", "fix")


def test_layered_output_does_not_depend_on_the_number_of_workers(tmp_path):
    src = tmp_path / "src"
    for index in range(3):
        _save(src / f"s{index}.fg.png", tiny_rgba(20, 28, seed=index))
        _save(src / f"s{index}.bg.png", _gradient(20, 28, seed=index))
    _psd(src / "p.psd", [("photo", _gradient(30, 40), 0, 0), ("cut", tiny_rgba(20, 20, seed=9), 5, 5)])
    write_folder(src, tmp_path / "one", size=16, samples_per_shard=2, workers=1)
    write_folder(src, tmp_path / "two", size=16, samples_per_shard=2, workers=2)
    one, two = resolve_shards(str(tmp_path / "one")), resolve_shards(str(tmp_path / "two"))
    assert len(one) == 2 and [Path(p).read_bytes() for p in one] == [Path(p).read_bytes() for p in two]
