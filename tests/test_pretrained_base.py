"""The committed pretrained tiny model (``embedded:tiny-sdxl-pretrained``): the file is what
``python -m data pretrain-base`` writes with today's recipe, and it is pretrained (measured again
here on held-out data, not read from its metadata)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from safetensors import safe_open

from data.pretrain_base import (
    PretrainRecipe,
    demo_images,
    encode_images,
    held_out_denoising_loss,
    held_out_photo_crops,
    pretrain,
    vae_psnr,
)
from layerdiff.models.tiny import (
    PRETRAINED_FORMAT,
    PRETRAINED_WEIGHTS,
    build_tiny_sdxl,
    load_pretrained_weights,
    make_unet,
)
from layerdiff.models.tiny_vae import make_vae

# The quality the committed weights must keep (issue targets; measured values in BENCHMARKS.md).
MIN_PHOTO_PSNR_DB = 20.0
MAX_PRETRAINED_TO_RANDOM_LOSS = 0.5


@pytest.fixture(scope="module")
def committed() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(PRETRAINED_WEIGHTS, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()  # noqa: SIM118


def test_the_committed_file_is_the_current_recipes_output_in_shape(committed):
    state, metadata = committed
    assert metadata["format"] == PRETRAINED_FORMAT
    assert json.loads(metadata["recipe"]) == asdict(PretrainRecipe())  # a changed recipe needs a rebuilt file
    expected = {f"vae.{name}": value.shape for name, value in make_vae().state_dict().items()}
    expected |= {f"unet.{name}": value.shape for name, value in make_unet().state_dict().items()}
    assert {name: value.shape for name, value in state.items()} == expected
    assert all(value.dtype == torch.float16 and value.isfinite().all() for value in state.values())


@pytest.mark.slow
def test_the_pretrained_model_reconstructs_and_denoises_held_out_images(committed, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from layerdiff.models.base import TextEncoders
    from layerdiff.models.text import PromptConditioning

    pipeline = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path / "model", pretrained=True))
    random = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path / "random"))
    metrics = json.loads(committed[1]["metrics"])
    photo_psnr = vae_psnr(pipeline.vae, held_out_photo_crops(0))
    assert photo_psnr >= MIN_PHOTO_PSNR_DB
    assert photo_psnr == pytest.approx(metrics["vae_psnr_held_out_photo"], abs=0.1)  # fp16 weights
    assert photo_psnr > vae_psnr(random.vae, held_out_photo_crops(0)) + 1.0

    val, _ = demo_images("val", None, 1)
    text_encoders = TextEncoders((pipeline.tokenizer, pipeline.tokenizer_2), (pipeline.text_encoder, pipeline.text_encoder_2))
    conditioning = PromptConditioning(text_encoders)
    latents, prompts = encode_images(pipeline.vae, text_encoders, val)
    pretrained_loss = held_out_denoising_loss(pipeline.unet, pipeline.scheduler, conditioning, latents, prompts, 0)
    random_loss = held_out_denoising_loss(random.unet, pipeline.scheduler, conditioning, latents, prompts, 0)
    assert pretrained_loss < MAX_PRETRAINED_TO_RANDOM_LOSS * random_loss
    assert pretrained_loss == pytest.approx(metrics["unet_held_out_loss_pretrained"], rel=0.02)


@pytest.mark.slow
def test_a_short_pretraining_is_deterministic():
    recipe = replace(PretrainRecipe(), vae_steps=2, unet_steps=2, unet_warmup_steps=1, train_samples=64)
    first, first_metrics = pretrain(recipe, log=lambda _: None)
    second, second_metrics = pretrain(recipe, log=lambda _: None)
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    assert first_metrics == second_metrics


def test_the_pretrained_build_needs_seed_zero_and_its_file(tmp_path):
    with pytest.raises(ValueError, match="seed 0"):
        build_tiny_sdxl(tmp_path / "model", seed=1, pretrained=True)
    with pytest.raises(FileNotFoundError, match="python -m data pretrain-base"):
        load_pretrained_weights(None, tmp_path / "absent.safetensors")
