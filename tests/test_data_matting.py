"""Matting data sets for the shard writer: image or foreground folders beside alpha folders, bad input, reading back."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.__main__ import main
from data.matting_sources import (
    FOREGROUND_LAYOUT,
    IMAGE_LAYOUT,
    MATTE_NOT_GREY,
    MATTE_SIZE_MISMATCH,
    NO_IMAGE,
    NO_MATTE,
    SHARED_NAME,
)
from data.schema import decode_sample
from data.shards import iter_shard_samples
from data.spec import resolve_shards
from data.transforms import GreenScreen
from data.validate import validate_shards
from data.writer import UNREADABLE, write_folder

ROOT = Path(__file__).resolve().parents[1]
RED = np.array([220, 30, 40])


def _save(path: Path, array: np.ndarray, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)


def _soft_disc(size: int, edge: float = 6.0) -> np.ndarray:
    """A uint8 matte: opaque disc, a soft edge ``edge`` pixels wide, transparent corners."""
    ys, xs = np.mgrid[:size, :size]
    radius = np.hypot(ys - size / 2 + 0.5, xs - size / 2 + 0.5)
    return np.rint(np.clip((size / 3 - radius) / edge + 0.5, 0.0, 1.0) * 255).astype(np.uint8)


def _random_rgb(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _noisy_background(size: int, seed: int) -> np.ndarray:
    """Per-pixel noise in cyan, far from ``RED``: the composite's edge is then far from the foreground's colour."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, 0.4, (size, size)), rng.uniform(0.5, 1, (size, size)),
                     rng.uniform(0.5, 1, (size, size))], axis=-1) * 255


def _over(colour: np.ndarray, matte: np.ndarray, background: np.ndarray) -> np.ndarray:
    alpha = matte[..., None] / 255.0
    return np.rint(colour * alpha + background * (1.0 - alpha)).astype(np.uint8)


def _samples(out_dir: Path) -> dict:
    return {sample.source: sample for sample in
            (decode_sample(members) for members in iter_shard_samples(resolve_shards(str(out_dir)), print))}


def _examples(report, reason: str) -> str:
    return " ".join(report.drop_examples[reason])


def test_foreground_layout_keeps_the_given_colour_and_the_alpha_exactly(tmp_path):
    src = tmp_path / "distinctions"  # Distinctions-646 style: FG/ + GT/, and a BG/ folder that is not read
    foregrounds = {"cat": _random_rgb(32, seed=1), "dog": _random_rgb(32, seed=2)}
    for name, colour in foregrounds.items():
        _save(src / "Train" / "FG" / f"{name}.png", colour)
        _save(src / "Train" / "GT" / f"{name}.png", _soft_disc(32))
        _save(src / "Train" / "BG" / f"{name}.jpg", _random_rgb(32, seed=9))
    (src / "Train" / "FG" / "cat.txt").write_text("a cat\n", encoding="utf-8")

    report = write_folder(src, tmp_path / "out", size=32)
    assert report.manifest.num_samples == 2 and not report.dropped and report.without_caption == 1
    assert report.unread_folders == ["Train/BG"] and "Train/BG" in report.summary()
    samples = _samples(tmp_path / "out")
    assert set(samples) == {"Train/FG/cat.png", "Train/FG/dog.png"}
    for name, colour in foregrounds.items():
        sample = samples[f"Train/FG/{name}.png"]
        np.testing.assert_array_equal(sample.foreground[..., 3], _soft_disc(32))
        visible = _soft_disc(32) > 0
        np.testing.assert_array_equal(sample.foreground[..., :3][visible], colour[visible])
        assert sample.provenance["matting"]["layout"] == FOREGROUND_LAYOUT
        assert sample.provenance["matting"]["matte"] == f"Train/GT/{name}.png"
        assert sample.provenance["matting"]["foreground"] == "given"
    assert (samples["Train/FG/cat.png"].caption, samples["Train/FG/dog.png"].caption) == ("a cat", "")
    assert report.manifest.extra["matting"] == [
        {"folder": "Train", "layout": FOREGROUND_LAYOUT, "colour": "FG", "alpha": "GT"}]


def test_image_layout_with_splits_estimates_the_foreground_under_the_soft_edge(tmp_path):
    src = tmp_path / "am2k"  # AM-2k style: per split, original/NAME.jpg + mask/NAME.png
    matte = _soft_disc(32, edge=8.0)
    composites = {}
    for split, seed in (("train", 0), ("validation", 1)):
        composite = _over(RED, matte, _noisy_background(32, seed))
        _save(src / split / "original" / f"{split}_0.jpg", composite, quality=95)
        _save(src / split / "mask" / f"{split}_0.png", matte)
        (src / split / "original" / f"{split}_0.txt").write_text(f"a red disc ({split})", encoding="utf-8")
        composites[f"{split}/original/{split}_0.jpg"] = np.asarray(Image.open(src / split / "original" / f"{split}_0.jpg"))

    report = write_folder(src, tmp_path / "out", size=32)
    assert report.manifest.num_samples == 2 and not report.dropped and report.without_caption == 0
    samples = _samples(tmp_path / "out")
    assert set(samples) == set(composites)
    soft_edge = (matte > 0.2 * 255) & (matte < 0.8 * 255)
    for source, composite in composites.items():
        sample = samples[source]
        np.testing.assert_array_equal(sample.foreground[..., 3], matte)
        estimate_error = np.abs(sample.foreground[..., :3][soft_edge] - RED).mean()
        composite_error = np.abs(composite[soft_edge].astype(float) - RED).mean()
        assert estimate_error < composite_error / 4 and estimate_error < 20, (estimate_error, composite_error)
        # Where the matte is opaque the image is the foreground, as decoded.
        np.testing.assert_array_equal(sample.foreground[..., :3][matte == 255], composite[matte == 255])
        assert sample.caption.startswith("a red disc")
        assert sample.provenance["matting"]["layout"] == IMAGE_LAYOUT
        assert sample.provenance["matting"]["alpha_folder"] == source.split("/")[0] + "/mask"


def test_bad_inputs_are_dropped_with_the_file_and_the_fix_while_good_samples_are_written(tmp_path):
    src = tmp_path / "src"
    images, masks = src / "images", src / "alpha"
    for name in ("good", "sixteen_bit", "colour", "small", "lonely", "broken_matte", "twice"):
        _save(images / f"{name}.png", _random_rgb(32, seed=3))
    _save(images / "twice.jpg", _random_rgb(32, seed=3))
    _save(masks / "good.png", _soft_disc(32))
    _save(masks / "twice.png", _soft_disc(32))
    Image.fromarray(_soft_disc(32).astype(np.uint16) * 257).save(masks / "sixteen_bit.png")
    _save(masks / "colour.png", np.stack([_soft_disc(32), np.zeros((32, 32), np.uint8), _soft_disc(32)], -1))
    _save(masks / "small.png", _soft_disc(16))
    _save(masks / "no_image.png", _soft_disc(32))
    (masks / "broken_matte.png").write_bytes(b"not a png at all")

    report = write_folder(src, tmp_path / "out", size=32)
    assert report.manifest.num_samples == 1 and set(_samples(tmp_path / "out")) == {"images/good.png"}
    assert report.dropped == {MATTE_NOT_GREY: 2, MATTE_SIZE_MISMATCH: 1, NO_MATTE: 1, NO_IMAGE: 1, UNREADABLE: 1,
                              SHARED_NAME: 1}
    not_grey = _examples(report, MATTE_NOT_GREY)
    assert "alpha/sixteen_bit.png: is a 16-bit" in not_grey and "alpha/colour.png: is a colour image" in not_grey
    assert "Convert it to 8-bit grey" in not_grey
    assert "images/small.png is 32x32 but its matte alpha/small.png is 16x16" in _examples(report, MATTE_SIZE_MISMATCH)
    assert "images/lonely.png has no matte lonely.png (or .jpg) in alpha/: add its matte" in _examples(report, NO_MATTE)
    assert "alpha/no_image.png has no image no_image.png (or .jpg) in images/" in _examples(report, NO_IMAGE)
    assert "alpha/broken_matte.png" in _examples(report, UNREADABLE)
    assert "images/twice.jpg, images/twice.png share one name" in _examples(report, SHARED_NAME)
    assert "dropped 7 image(s)" in report.summary() and "1  matte and image differ in size, e.g." in report.summary()


def test_layouts_that_cannot_be_read_unambiguously_are_errors_naming_the_fix(tmp_path):
    mixed = tmp_path / "mixed"
    _save(mixed / "set" / "fg" / "a.png", _random_rgb(32, seed=1))
    _save(mixed / "set" / "alpha" / "a.png", _soft_disc(32))
    _save(mixed / "cutouts" / "b.png", np.dstack([_random_rgb(32, seed=1), _soft_disc(32)]))
    with pytest.raises(ValueError, match=r"mixes a matting data set \(set/fg/ with set/alpha/\) with other sources "
                                         r"\(e.g. cutouts/b.png\).*Move the RGBA PNGs"):
        write_folder(mixed, tmp_path / "out", size=32)

    two_alphas = tmp_path / "two_alphas"
    for folder in ("image", "alpha", "mask"):
        _save(two_alphas / folder / "a.png", _soft_disc(32))
    with pytest.raises(ValueError, match=r"holds 2 alpha folders \(alpha, mask\).*keep one"):
        write_folder(two_alphas, tmp_path / "out", size=32)


def test_cli_writes_a_matting_set_that_validates_and_its_help_lists_the_layouts(tmp_path, capsys):
    src = tmp_path / "p3m" / "train"
    for index in range(3):
        _save(src / "blurred_image" / f"p_{index}.jpg", _over(RED, _soft_disc(32), _noisy_background(32, index)))
        _save(src / "mask" / f"p_{index}.png", _soft_disc(32))
    written = subprocess.run([sys.executable, "-m", "data", "write", str(tmp_path / "p3m"), str(tmp_path / "out"),
                              "--size", "32", "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr
    assert "wrote 3 samples" in written.stdout and "3 image(s) had no caption" in written.stdout
    report = validate_shards(resolve_shards(str(tmp_path / "out")))
    assert report.ok and report.samples == 3

    with pytest.raises(SystemExit):
        main(["write", "--help"])
    help_text = capsys.readouterr().out
    assert "alpha, alphas, mask, matte, GT" in help_text and "estimate_foreground_ml" in help_text


def test_green_screen_of_a_matting_sample_composites_over_green_with_the_matte_as_m(tmp_path):
    src = tmp_path / "src"
    colour = _random_rgb(32, seed=4)
    _save(src / "fg" / "x.png", colour)
    _save(src / "alpha" / "x.png", _soft_disc(32))
    write_folder(src, tmp_path / "out", size=32)
    (sample,) = _samples(tmp_path / "out").values()

    screened = GreenScreen()(sample)
    expected = np.dstack([_over(sample.foreground[..., :3], _soft_disc(32), np.array([0, 255, 0])), _soft_disc(32)])
    np.testing.assert_array_equal(screened.foreground, expected)
    assert screened.caption == "green background, "


def test_an_image_saved_as_jpeg_keeps_its_matte_through_a_resize(tmp_path):
    src = tmp_path / "src"
    buffer = io.BytesIO()
    Image.fromarray(_over(RED, _soft_disc(64), _noisy_background(64, 5))).save(buffer, format="JPEG")
    (src / "image").mkdir(parents=True)
    (src / "image" / "big.jpeg").write_bytes(buffer.getvalue())
    _save(src / "matte" / "big.png", _soft_disc(64))
    report = write_folder(src, tmp_path / "out", size=32)
    (sample,) = _samples(tmp_path / "out").values()
    assert report.manifest.num_samples == 1 and sample.original_size == (64, 64)
    # A 2x box shrink of the matte, as resize_and_crop computes it, within 8-bit rounding.
    shrunk = _soft_disc(64).reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.abs(sample.foreground[..., 3].astype(float) - shrunk).max() <= 1.0
