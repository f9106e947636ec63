"""Shared fixtures and the GPU skip hook for the CPU test suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerdiff.models.tiny import build_tiny_sdxl


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests on machines without CUDA (development and CI)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the embedded tiny SDXL model (seed 0), built once per session; do not modify."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_transparent_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export folder of an untrained transparency encoder and a narrow decoder (the released
    file format), for objectives that build on a trained transparent VAE; do not modify."""
    from layerdiff.export import save_transparent_vae
    from layerdiff.models.transparency import LatentTransparencyEncoder, TransparencyDecoder

    torch.manual_seed(0)
    encoder = LatentTransparencyEncoder()
    # The released encoder starts at a zero offset; a small random last layer makes the
    # adjusted latent differ from the plain one, as after training.
    torch.nn.init.normal_(encoder.blocks[-1].weight, std=1e-2)
    decoder = TransparencyDecoder(block_out_channels=(8, 8, 16, 16, 16, 16, 16))
    folder = tmp_path_factory.mktemp("transparent_vae")
    save_transparent_vae(encoder, decoder, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd15(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD1.5-layout model (one text encoder, no added conditions) from the tiny SDXL's
    VAE, first text encoder and tokenizer plus a matching tiny UNet; do not modify."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        cross_attention_dim=sdxl.text_encoder.config.hidden_size,
    )
    pipeline = StableDiffusionPipeline(
        vae=sdxl.vae,
        text_encoder=sdxl.text_encoder,
        tokenizer=sdxl.tokenizer,
        unet=unet,
        scheduler=sdxl.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("models") / "tiny-sd15"
    pipeline.save_pretrained(folder)
    return folder
