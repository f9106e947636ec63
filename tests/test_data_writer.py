"""The folder-to-shards writer and its CLI: resizing, buckets, drops, 16-bit input, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import png
import pytest
from PIL import Image

import data.writer
from data.__main__ import main
from data.schema import decode_sample
from data.shards import iter_shard_samples
from data.spec import resolve_shards
from data.writer import (
    NO_ALPHA,
    NO_TRANSPARENT_PIXEL,
    NO_VISIBLE_PIXEL,
    UNREADABLE,
    nearest_bucket,
    parse_buckets,
    write_folder,
)
from layerdiff.rgba import resize_and_crop
from support.shards import tiny_rgba


def _save(path: Path, array: np.ndarray, caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def _samples(out_dir: Path) -> list:
    return [decode_sample(m) for m in iter_shard_samples(resolve_shards(str(out_dir)), print)]


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """Two good cut-outs, and one of each kind of image the writer must drop."""
    src = tmp_path / "src"
    _save(src / "good_square.png", tiny_rgba(40, 40, seed=1), "a square cut-out")
    _save(src / "nested" / "good.wide.png", tiny_rgba(30, 60, seed=2))
    _save(src / "opaque.png", np.full((40, 40, 4), 255, np.uint8))
    _save(src / "nested" / "invisible.png", np.zeros((40, 40, 4), np.uint8), "nothing to see")
    _save(src / "no_alpha.png", np.full((40, 40, 3), 90, np.uint8))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    return src


def test_writer_keeps_good_images_and_reports_every_drop_with_examples(mixed_folder, tmp_path):
    report = write_folder(mixed_folder, tmp_path / "out", size=32)
    assert report.manifest.num_samples == 2
    assert dict(report.dropped) == {NO_TRANSPARENT_PIXEL: 1, NO_VISIBLE_PIXEL: 1, NO_ALPHA: 1, UNREADABLE: 1}
    assert report.drop_examples[NO_TRANSPARENT_PIXEL] == ["opaque.png"]
    assert report.drop_examples[NO_VISIBLE_PIXEL] == ["nested/invisible.png"]
    assert report.drop_examples[NO_ALPHA] == ["no_alpha.png"]
    assert report.without_caption == 1
    summary = report.summary()
    assert "dropped 4 image(s)" in summary and "no alpha channel, e.g. no_alpha.png" in summary

    samples = {sample.source: sample for sample in _samples(tmp_path / "out")}
    assert set(samples) == {"good_square.png", "nested/good.wide.png"}
    square, wide = samples["good_square.png"], samples["nested/good.wide.png"]
    assert square.caption == "a square cut-out" and wide.caption == ""
    assert square.size == wide.size == (32, 32)
    assert square.original_size == (40, 40) and square.crop_top_left == (0, 0)
    assert wide.original_size == (30, 60) and wide.crop_top_left == (0, 16)  # 30x60 -> 32x64, centre crop
    assert "." not in wide.key and wide.key.endswith("good-wide")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_samples"] == 2 and index["dropped"][NO_ALPHA] == 1


def test_colour_under_zero_alpha_is_padded_when_writing(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = (255, 0, 0, 255)  # red square on transparent black
    _save(tmp_path / "src" / "red.png", rgba)
    write_folder(tmp_path / "src", tmp_path / "out", size=32)
    (sample,) = _samples(tmp_path / "out")
    invisible = sample.foreground[..., 3] == 0
    assert invisible.any()
    assert sample.foreground[..., 0][invisible].min() > 200  # red spread outward, not black
    np.testing.assert_array_equal(sample.foreground[8:24, 8:24], rgba[8:24, 8:24])


def test_buckets_pick_the_nearest_aspect_and_batch_sizes_follow(tmp_path):
    src = tmp_path / "src"
    _save(src / "landscape.png", tiny_rgba(40, 80, seed=3))
    _save(src / "portrait.png", tiny_rgba(90, 40, seed=4))
    _save(src / "square.png", tiny_rgba(50, 52, seed=5))
    buckets = parse_buckets("32x32, 48x32,32x48")
    report = write_folder(src, tmp_path / "out", buckets=buckets)
    sizes = {sample.source: sample.size for sample in _samples(tmp_path / "out")}
    assert sizes == {"landscape.png": (32, 48), "portrait.png": (48, 32), "square.png": (32, 32)}
    assert dict(report.manifest.sizes) == {"48x32": 1, "32x48": 1, "32x32": 1}


def test_bucket_parsing_and_choice():
    assert parse_buckets("1024x1024,1152x896") == [(1024, 1024), (1152, 896)]
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_buckets("1024*1024")
    assert nearest_bucket(1600, 1200, [(1024, 1024), (1152, 896), (896, 1152)]) == (1152, 896)


def test_shrinking_keeps_alpha_within_its_input_range():
    rgba = np.zeros((64, 64, 4), np.float32)
    rgba[16:48, 16:48] = (0.2, 0.4, 0.6, 0.6)
    resized, crop = resize_and_crop(rgba, 40, 40)
    assert resized.shape == (40, 40, 4) and crop == (0, 0)
    assert resized[..., 3].max() <= 0.6 + 1e-6  # no ringing halo around the matte
    np.testing.assert_allclose(resized[20, 20, :3], (0.2, 0.4, 0.6), atol=1e-5)  # colour not darkened by premultiplying


def test_sixteen_bit_rgba_png_is_accepted(tmp_path):
    deep = np.zeros((40, 40, 4), np.uint16)
    deep[10:30, 10:30] = (65535, 32768, 0, 40000)
    (tmp_path / "src").mkdir()
    png.from_array(deep.reshape(40, -1), "RGBA;16").save(str(tmp_path / "src" / "deep.png"))
    report = write_folder(tmp_path / "src", tmp_path / "out", size=40)
    assert report.manifest.num_samples == 1 and not report.dropped
    (sample,) = _samples(tmp_path / "out")
    assert tuple(sample.foreground[20, 20]) == (255, 128, 0, round(40000 / 65535 * 255))


def test_output_does_not_depend_on_the_number_of_workers(mixed_folder, tmp_path):
    write_folder(mixed_folder, tmp_path / "one", size=32, samples_per_shard=1, workers=1)
    write_folder(mixed_folder, tmp_path / "two", size=32, samples_per_shard=1, workers=2)
    one, two = resolve_shards(str(tmp_path / "one")), resolve_shards(str(tmp_path / "two"))
    assert len(one) == 2 and [Path(p).read_bytes() for p in one] == [Path(p).read_bytes() for p in two]


def test_interrupted_run_leaves_complete_shards_only(mixed_folder, tmp_path, monkeypatch):
    prepare = data.writer._prepare

    def fail_on_the_wide_image(job):
        if "wide" in job.path.name:
            raise KeyboardInterrupt
        return prepare(job)

    monkeypatch.setattr(data.writer, "_prepare", fail_on_the_wide_image)
    with pytest.raises(KeyboardInterrupt):
        write_folder(mixed_folder, tmp_path / "out", size=32, samples_per_shard=2)
    # One good image was written into a shard that never completed: nothing may look finished.
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == []


def test_cli_write_then_validate(mixed_folder, tmp_path, capsys):
    assert main(["write", str(mixed_folder), str(tmp_path / "out"), "--size", "32", "--workers", "1"]) == 0
    written = capsys.readouterr().out
    assert "wrote 2 samples" in written and "no visible pixel, e.g. nested/invisible.png" in written
    assert main(["validate", str(tmp_path / "out")]) == 0
    assert "2 valid samples in 1 shard(s)" in capsys.readouterr().out


def test_cli_reports_a_missing_source_folder(tmp_path, capsys):
    assert main(["write", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
