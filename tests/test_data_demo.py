"""Demo data: real OpenMoji artwork, semi-transparent effects, held-out split, determinism, cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.__main__ import main
from data.demo import (
    OPENMOJI_ATTRIBUTION,
    emoji_caption,
    ensure_demo_shards,
    openmoji_codepoints,
    split_codepoints,
    write_demo,
)
from data.schema import decode_sample
from data.shards import iter_shard_samples
from data.spec import resolve_shards


def _decoded(split_dir: Path) -> list:
    return [decode_sample(m, require_layers=True) for m in iter_shard_samples(resolve_shards(str(split_dir)), print)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo(out, size=32, train=48, val=16, seed=3, samples_per_shard=20, workers=1)
    return out


def test_demo_is_deterministic_and_independent_of_worker_count(demo, tmp_path):
    write_demo(tmp_path, size=32, train=48, val=16, seed=3, samples_per_shard=20, workers=2)
    for split in ("train", "val"):
        ours = sorted((demo / split).glob("*.tar"))
        theirs = sorted((tmp_path / split).glob("*.tar"))
        assert [p.name for p in ours] == [p.name for p in theirs] and ours
        assert [p.read_bytes() for p in ours] == [p.read_bytes() for p in theirs]


def test_another_seed_gives_other_data(demo, tmp_path):
    write_demo(tmp_path, size=32, train=8, val=2, seed=4, workers=1)
    assert [s.key for s in _decoded(tmp_path / "train")] != [s.key for s in _decoded(demo / "train")][:8]


def test_samples_are_layered_triplets_with_attribution(demo):
    samples = _decoded(demo / "train")
    assert len(samples) == 48 and all(s.size == (32, 32) for s in samples)
    for sample in samples:
        assert sample.attribution == OPENMOJI_ATTRIBUTION and sample.license.startswith("CC BY-SA 4.0")
        assert sample.caption.startswith("an emoji of ") and sample.blend_caption.startswith(sample.caption)
        assert sample.background_caption in sample.blend_caption
        assert sample.provenance["background_source"].startswith("scikit-image:")
        alpha = sample.foreground[..., 3].astype(np.float32)[..., None] / 255
        expected_blend = sample.foreground[..., :3] * alpha + sample.background * (1 - alpha)
        np.testing.assert_allclose(sample.blend, expected_blend, atol=1.0)
    for split in ("train", "val"):
        attribution = (demo / split / "ATTRIBUTION.txt").read_text(encoding="utf-8")
        assert OPENMOJI_ATTRIBUTION in attribution and "scikit-image" in attribution
        assert json.loads((demo / split / "index.json").read_text())["license"].startswith("CC BY-SA 4.0")


def test_alpha_is_not_only_binary_and_every_sample_has_transparent_and_visible_pixels(demo):
    samples = _decoded(demo / "train")
    for sample in samples:
        alpha = sample.foreground[..., 3]
        assert alpha.min() == 0 and alpha.max() > 0
    effects = [s for s in samples if s.provenance["effect"]]
    assert 0.25 * len(samples) < len(effects) < 0.75 * len(samples)
    # Effects make wide semi-transparent regions, beyond anti-aliased edges.
    soft_fraction = [np.mean((s.foreground[..., 3] > 0) & (s.foreground[..., 3] < 200)) for s in effects]
    assert np.median(soft_fraction) > 0.1
    assert {s.provenance["effect"] for s in effects} == {"soft drop shadow", "glow", "smoke", "glass"}


def test_validation_emoji_never_occur_in_training(demo):
    splits = split_codepoints(3)
    assert not set(splits["train"]) & set(splits["val"])
    assert len(splits["train"]) + len(splits["val"]) == len(openmoji_codepoints()) > 1000
    train_emoji = {s.provenance["emoji"] for s in _decoded(demo / "train")}
    val_emoji = {s.provenance["emoji"] for s in _decoded(demo / "val")}
    assert len(val_emoji) == 16 and not train_emoji & val_emoji


def test_captions_come_from_unicode_names():
    assert emoji_caption(0x1F600) == "an emoji of a grinning face"
    assert emoji_caption(0x1F34E) == "an emoji of a red apple"


def test_embedded_demo_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERDIFF_CACHE", str(tmp_path / "cache"))
    train = resolve_shards("embedded:openmoji-demo-32/train")
    root = tmp_path / "cache" / "demo-32"
    assert train == sorted(str(p) for p in (root / "train").glob("*.tar")) and len(train) == 8
    assert len(resolve_shards("embedded:openmoji-demo-32/val")) == 1
    built = [p.stat().st_mtime_ns for p in (root / "train").glob("*.tar")]
    assert ensure_demo_shards(32) == root  # present: not rebuilt
    assert [p.stat().st_mtime_ns for p in (root / "train").glob("*.tar")] == built
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary build folders left


def test_demo_cache_is_rebuilt_when_asked_for_other_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERDIFF_CACHE", str(tmp_path))
    root = ensure_demo_shards(16, train=4, val=2)
    assert json.loads((root / "train" / "index.json").read_text())["num_samples"] == 4
    assert ensure_demo_shards(16, train=6, val=2) == root
    assert json.loads((root / "train" / "index.json").read_text())["num_samples"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-16"]


def test_demo_cli(tmp_path, capsys):
    assert main(["demo", str(tmp_path), "--size", "16", "--train", "3", "--val", "2", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 samples in 1 shard(s)" in printed and "CC BY-SA 4.0" in printed
    assert main(["demo", str(tmp_path), "--size", "8"]) == 2
    assert "at least 16 px" in capsys.readouterr().err
