"""The latent cache: ``python -m data cache-latents``, cached shards in the DataModule and the
validator, and the same loss from cached and image batches."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from data import ShardDataModule
from data.__main__ import main
from data.cached import decode_cached_sample, encode_cached_sample
from data.latent_cache import (
    MANIFEST_NAME,
    LatentCacheEncoder,
    LatentCacheError,
    cache_latents,
)
from data.schema import (
    FOREGROUND,
    LATENT,
    METADATA,
    PROMPT_HIDDEN,
    PROMPT_POOLED,
    CorruptMemberError,
    SchemaError,
    encode_sample,
)
from data.shards import iter_shard_samples
from data.spec import resolve_shards
from data.validate import validate_shards
from layerdiff.batches import CachedBatch, ImageBatch
from layerdiff.models import codec
from layerdiff.models.text import encode_prompts
from support.shards import tiny_sample, truncated_foreground, write_tiny_shards

SIZES = ((64, 64), (64, 128))  # two sizes, so batches are bucketed
SAMPLES = 6
KEYS = [f"sample-{index:04d}" for index in range(SAMPLES)]


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_tiny_shards(folder, SAMPLES, per_shard=2, sizes=SIZES)
    return folder


def _encoder(tiny_sdxl, tiny_transparent_vae, **settings) -> LatentCacheEncoder:
    return LatentCacheEncoder(str(tiny_sdxl), str(tiny_transparent_vae), **settings)


def _cache(image_shards, out_dir, tiny_sdxl, tiny_transparent_vae, **settings):
    return cache_latents(str(image_shards), out_dir, _encoder(tiny_sdxl, tiny_transparent_vae, **settings), batch_size=4)


@pytest.fixture(scope="module")
def caches(image_shards, tiny_sdxl, tiny_transparent_vae, tmp_path_factory) -> dict[str, Path]:
    """Caches of ``image_shards``: float32 without and with text embeddings, float16 with them."""
    folders = {}
    for name, settings in {"float32": {}, "float32+text": {"text_embeddings": True},
                           "float16+text": {"text_embeddings": True, "dtype": "float16"}}.items():
        folders[name] = tmp_path_factory.mktemp(name.replace("+", "-"))
        _cache(image_shards, folders[name], tiny_sdxl, tiny_transparent_vae, **settings)
    return folders


def _batch(shards: Path | str, **options):
    """All samples of one size (64 x 64), in key order, as the validation loader gives them."""
    module = ShardDataModule(str(shards), val_shards=str(shards), val_batch_size=SAMPLES, num_workers=0, **options)
    module.setup()
    batches = [module.on_before_batch_transfer(batch, 0) for batch in module.val_dataloader()]
    return next(batch for batch in batches if batch.key[0] == KEYS[0])


def test_the_cli_writes_one_cached_shard_per_image_shard_keeping_captions_and_metadata(
    image_shards, tiny_sdxl, tiny_transparent_vae, tmp_path, capsys
):
    out_dir = tmp_path / "cache"
    arguments = ["cache-latents", str(image_shards), str(out_dir), "--base-model", str(tiny_sdxl),
                 "--transparent-vae", str(tiny_transparent_vae), "--text-embeddings", "--batch-size", "4"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "[1/3] shard-000000.tar: 2 samples, 0 corrupt skipped" in printed and "[3/3] shard-000002.tar" in printed
    assert f"{out_dir}: 6 cached samples from 3 shard(s)" in printed

    inputs, outputs = resolve_shards(str(image_shards)), resolve_shards(str(out_dir))
    assert [Path(path).name for path in outputs] == [Path(path).name for path in inputs]
    images = {members["__key__"]: members for members in iter_shard_samples(inputs, print)}
    for members in iter_shard_samples(outputs, print):
        assert set(members) == {"__key__", "__url__", "txt", METADATA, LATENT, PROMPT_HIDDEN, PROMPT_POOLED}
        assert members["txt"] == images[members["__key__"]]["txt"]
        assert members[METADATA] == images[members["__key__"]][METADATA]
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    assert manifest["num_samples"] == SAMPLES and manifest["settings"]["base_model"] == str(tiny_sdxl)
    assert manifest["settings"]["dtype"] == "float32" and manifest["settings"]["text_embeddings"] is True
    assert not (out_dir / ".staging").exists()


def test_cached_batches_hold_what_training_would_encode(image_shards, caches, tiny_sdxl, tiny_transparent_vae):
    images, cached = _batch(image_shards), _batch(caches["float32+text"])
    assert isinstance(cached, CachedBatch) and isinstance(images, ImageBatch)
    assert {field.name for field in fields(cached)} == {"latent", "prompt_hidden", "prompt_pooled", "caption", "key",
                                                         "original_size", "crop_top_left", "token_ids"}
    for name in ("caption", "key"):
        assert getattr(cached, name) == getattr(images, name)
    for name in ("original_size", "crop_top_left"):
        assert torch.equal(getattr(cached, name), getattr(images, name))
    assert cached.latent.dtype == torch.float32 and cached.latent.shape == (3, 4, 8, 8)

    models = _encoder(tiny_sdxl, tiny_transparent_vae, text_embeddings=True)
    with torch.no_grad():
        _, adjusted = codec.encode_adjusted(models.vae, models.transparent_encoder, images.rgb, images.alpha)
        latent = codec.diffusion_latent(models.vae, adjusted)
    prompts = encode_prompts(models.text_encoders, images.caption)
    torch.testing.assert_close(cached.latent, latent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.prompt_hidden, prompts.hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.prompt_pooled, prompts.pooled, rtol=1e-5, atol=1e-6)

    half = _batch(caches["float16+text"])
    assert half.latent.dtype == torch.float32  # stored as float16, batched as float32
    torch.testing.assert_close(half.latent, latent, rtol=1e-3, atol=1e-3)
    # Worker processes pass the same batches.
    workers = ShardDataModule(str(caches["float16+text"]), val_shards=str(caches["float16+text"]),
                              val_batch_size=SAMPLES, num_workers=1)
    workers.setup()
    batch = next(b for b, _ in workers.val_dataloader() if b.key[0] == KEYS[0])
    assert torch.equal(batch.latent, half.latent) and torch.equal(batch.prompt_hidden, half.prompt_hidden)


@pytest.fixture(scope="module")
def latent_diffusion(tiny_sdxl, tiny_transparent_vae):
    from layerdiff.modules.latent_diffusion import LatentDiffusionModule

    # Caption dropout on, so both paths also swap in the empty prompt for some samples.
    return LatentDiffusionModule(str(tiny_transparent_vae), base_model=str(tiny_sdxl), lora_rank=4, caption_dropout=0.5)


@pytest.mark.parametrize("cache, tolerance", [("float32", 1e-6), ("float32+text", 1e-6), ("float16+text", 1e-4)])
def test_cached_and_image_batches_give_the_same_loss(image_shards, caches, latent_diffusion, cache, tolerance):
    module = latent_diffusion
    images, cached = _batch(image_shards), _batch(caches[cache])
    assert isinstance(images, ImageBatch) and isinstance(cached, CachedBatch)
    assert (cached.prompt_hidden is not None) == cache.endswith("+text")
    losses = [module.compute_loss(batch, torch.Generator().manual_seed(7))["loss"] for batch in (images, cached)]
    assert losses[0] > 0
    torch.testing.assert_close(losses[1], losses[0], rtol=tolerance, atol=0.0)


def test_a_rerun_rewrites_only_the_missing_shards(image_shards, caches, tiny_sdxl, tiny_transparent_vae, tmp_path):
    out_dir = tmp_path / "cache"
    shutil.copytree(caches["float32"], out_dir)
    before = {path.name: path.stat() for path in out_dir.glob("*.tar")}
    removed = out_dir / "shard-000001.tar"
    original = removed.read_bytes()
    removed.unlink()

    lines: list[str] = []
    encoder = _encoder(tiny_sdxl, tiny_transparent_vae)
    report = cache_latents(str(image_shards), out_dir, encoder, batch_size=4, progress=lines.append)
    assert lines[0] == "[1/3] shard-000000.tar: done by an earlier run, kept"
    assert lines[1].startswith("[2/3] shard-000001.tar: 2 samples, 0 corrupt skipped")
    assert lines[2] == "[3/3] shard-000002.tar: done by an earlier run, kept"
    assert report.samples == SAMPLES and "6 cached samples from 3 shard(s) (2 done by an earlier run)" in report.summary()
    for name in ("shard-000000.tar", "shard-000002.tar"):
        after = (out_dir / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
    assert removed.read_bytes() == original  # the same bytes again: caching is deterministic
    assert sorted(path.name for path in out_dir.iterdir()) == [MANIFEST_NAME, *sorted(before)]


def test_other_settings_for_a_cache_folder_are_refused(image_shards, caches, tiny_sdxl, tiny_transparent_vae,
                                                       tmp_path, capsys):
    out_dir = tmp_path / "cache"
    shutil.copytree(caches["float32"], out_dir)
    with pytest.raises(LatentCacheError, match=r"other settings \(dtype: 'float32' in the cache, 'float16' now\)"):
        _cache(image_shards, out_dir, tiny_sdxl, tiny_transparent_vae, dtype="float16")
    arguments = ["cache-latents", str(image_shards), str(out_dir), "--base-model", str(tiny_sdxl),
                 "--transparent-vae", str(tiny_transparent_vae), "--text-embeddings"]
    assert main(arguments) == 2
    assert "text_embeddings: False in the cache, True now" in capsys.readouterr().err

    # A re-trained transparency encoder in the same folder is another setting too.
    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_transparent_vae, retrained)
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    manifest["settings"]["transparent_vae"] = str(retrained)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    _cache(image_shards, out_dir, tiny_sdxl, retrained)  # same weights: accepted
    from safetensors.torch import load_file, save_file

    weights = load_file(retrained / "ld_diffusers_sdxl_vae_transparent_encoder.safetensors")
    weights["blocks.16.bias"] += 1.0
    save_file(weights, retrained / "ld_diffusers_sdxl_vae_transparent_encoder.safetensors")
    with pytest.raises(LatentCacheError, match="transparent_encoder_sha256"):
        _cache(image_shards, out_dir, tiny_sdxl, retrained)

    with pytest.raises(LatentCacheError, match=r"holds shards .* but no latent_cache.json"):
        _cache(caches["float32"] / "shard-000000.tar", image_shards, tiny_sdxl, tiny_transparent_vae)
    with pytest.raises(LatentCacheError, match="holds the input shard"):
        _cache(image_shards / "shard-000000.tar", image_shards, tiny_sdxl, tiny_transparent_vae)


def test_corrupt_input_members_are_skipped_and_counted(tiny_sdxl, tiny_transparent_vae, tmp_path):
    damage = {1: {FOREGROUND: truncated_foreground()}, 4: {METADATA: b"{"}}
    inputs = write_tiny_shards(tmp_path / "images", SAMPLES, per_shard=2, sizes=SIZES, damage=damage)
    report = _cache(tmp_path / "images", tmp_path / "cache", tiny_sdxl, tiny_transparent_vae)
    assert [(shard.samples, shard.corrupt) for shard in report.shards] == [(1, 1), (2, 0), (1, 1)]
    assert f"shard {inputs[0]}, key sample-0001, field 'fg.png'" in report.corrupt[0]
    assert "key sample-0004, field 'json'" in report.corrupt[1]
    summary = report.summary()
    assert "4 cached samples from 3 shard(s)" in summary and "corrupt members skipped: 2" in summary
    manifest = json.loads((tmp_path / "cache" / MANIFEST_NAME).read_text())
    assert manifest["shards"]["shard-000000.tar"] == {"source": inputs[0], "samples": 1, "corrupt": 1}
    cached_keys = [members["__key__"] for members in iter_shard_samples(resolve_shards(str(tmp_path / "cache")), print)]
    assert sorted(cached_keys) == [key for index, key in enumerate(KEYS) if index not in damage]


def test_one_run_reads_one_kind(image_shards, caches, tiny_sdxl, tiny_transparent_vae, tmp_path):
    cached, images = str(caches["float32"]), str(image_shards)
    mixed = ShardDataModule(f"{cached},{images}", batch_size=2, num_workers=0, shuffle_buffer=0)
    with pytest.raises(SchemaError, match=r"field 'fg.png': sample kind image \(fg.png\), but the first sample of "
                                          r".*shard-000000.tar is of kind cached \(latent.npy\); one run reads one kind"):
        list(mixed.train_dataloader())
    with pytest.raises(SchemaError, match=r"field 'prompt_hidden.npy'.*cached \(latent.npy, prompt_hidden.npy, "):
        list(ShardDataModule(f"{cached},{caches['float32+text']}", num_workers=0).train_dataloader())
    with pytest.raises(SchemaError, match=r"train_shards .* of kind cached .* val_shards .* of kind image"):
        ShardDataModule(cached, val_shards=images).setup()
    with pytest.raises(SchemaError, match="require_layers: false"):
        ShardDataModule(cached, require_layers=True, num_workers=0).train_dataloader()
    with pytest.raises(SchemaError, match=r"field 'latent.npy': sample kind cached .* the shard is cached already"):
        _cache(caches["float32"], tmp_path / "again", tiny_sdxl, tiny_transparent_vae)

    report = validate_shards(resolve_shards(f"{cached},{images}"))
    assert report.samples == 6 and len(report.schema_errors) == 6 and not report.ok
    assert "one run reads one kind" in report.schema_errors[0]


def test_validate_summarises_cached_shards(caches, capsys):
    report = validate_shards(resolve_shards(str(caches["float16+text"])))
    assert report.ok and report.samples == SAMPLES and not report.coverages
    assert dict(report.sizes) == {"64x64": 3, "128x64": 3}
    assert dict(report.cached_arrays) == {"latent.npy 4x8x8 float16": 3, "latent.npy 4x8x16 float16": 3,
                                          "prompt_hidden.npy 77x96 float16": 6, "prompt_pooled.npy 32 float16": 6}
    assert main(["validate", str(caches["float16+text"])]) == 0
    printed = capsys.readouterr().out
    assert "6 valid samples in 3 shard(s)" in printed and "kind: cached (latent.npy, prompt_hidden.npy" in printed
    assert "alpha coverage" not in printed and "multi-layer" not in printed and printed.rstrip().endswith("OK")


def test_cached_samples_are_checked_when_decoded():
    image = {**encode_sample(tiny_sample(0, 64, 64)), "__url__": "cache/shard-000000.tar"}
    latent, hidden = np.zeros((4, 8, 8), np.float16), np.zeros((77, 96), np.float16)
    decoded = decode_cached_sample(encode_cached_sample(image, latent, hidden, np.zeros(32, np.float16)))
    assert decoded.size == (64, 64) and decoded.original_size == (128, 128) and decoded.caption == "caption 0"
    assert decoded.latent.dtype == np.float16 and decoded.prompt_pooled.shape == (32,)

    with pytest.raises(CorruptMemberError, match=r"key sample-0000, field 'latent.npy': not a .npy array"):
        decode_cached_sample({**encode_cached_sample(image, latent), LATENT: b"\x93NUMPY truncated"})
    with pytest.raises(SchemaError, match=r"field 'latent.npy': latent \[4, 8, 16\] does not fit the 64x64 image"):
        decode_cached_sample(encode_cached_sample(image, np.zeros((4, 8, 16), np.float32)))
    with pytest.raises(SchemaError, match=r"field 'prompt_hidden.npy': must be a 2-D float array, got 1-D"):
        decode_cached_sample(encode_cached_sample(image, latent, np.zeros(96, np.float32)))
    pooled = encode_cached_sample(image, latent, hidden, np.zeros(32, np.float16))[PROMPT_POOLED]
    without_hidden = {**encode_cached_sample(image, latent), PROMPT_POOLED: pooled}
    with pytest.raises(SchemaError, match=r"prompt_pooled.npy'.*without prompt_hidden.npy.*cache-latents"):
        decode_cached_sample(without_hidden)
