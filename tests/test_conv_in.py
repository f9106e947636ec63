"""conv_in grown for LayerDiffusion's condition latents (Fig. 4): the grown UNet computes what
the base one did whatever the conditions hold, round-trips through diffusers' folders, and
grows again by appending."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from layerdiff.models.conv_in import condition_channels, grow_conv_in
from layerdiff.models.tiny import make_unet


def denoise(unet: UNet2DConditionModel, sample: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction for ``sample`` at a fixed step, prompt and SDXL size conditions."""
    config = unet.config
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(sample.shape[0], 5, config.cross_attention_dim, generator=generator)
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(sample.shape[0], pooled_dim, generator=generator),
        "time_ids": torch.randn(sample.shape[0], 6, generator=generator),
    }
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def noisy_latent(unet: UNet2DConditionModel, channels: int = 4, seed: int = 0) -> torch.Tensor:
    size = unet.config.sample_size
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_unet() -> UNet2DConditionModel:
    """The tiny SDXL model's UNet (the ``tiny_sdxl`` fixture's architecture and seed), built
    alone: the tests need no other component."""
    torch.manual_seed(0)
    return make_unet().eval()


@pytest.fixture()
def unet() -> UNet2DConditionModel:
    return tiny_unet()


def test_grown_unet_ignores_the_conditions_until_trained(unet):
    sample = noisy_latent(unet)
    before = denoise(unet, sample)
    old_weight, old_bias = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()

    grow_conv_in(unet, 8)

    assert unet.conv_in.in_channels == unet.config.in_channels == 12 and condition_channels(unet) == 8
    assert torch.equal(unet.conv_in.weight[:, :4], old_weight) and torch.equal(unet.conv_in.bias, old_bias)
    assert not unet.conv_in.weight[:, 4:].any()
    conditions = noisy_latent(unet, channels=8, seed=1) * 3
    assert torch.equal(denoise(unet, torch.cat([sample, conditions], dim=1)), before)
    # Once the new channels carry weight, the conditions matter.
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(std=0.1)
    assert not torch.equal(denoise(unet, torch.cat([sample, conditions], dim=1)), before)


def test_grown_unet_round_trips_through_a_diffusers_folder(unet, tmp_path):
    grow_conv_in(unet, 4)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    sample = torch.cat([noisy_latent(unet), noisy_latent(unet, seed=3)], dim=1)
    unet.save_pretrained(tmp_path / "unet")

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()

    assert loaded.config.in_channels == 8 and loaded.conv_in.weight.shape == (32, 8, 3, 3)
    assert condition_channels(loaded) == 4
    assert torch.equal(denoise(loaded, sample), denoise(unet, sample))


def test_growing_again_appends_channels(unet):
    grow_conv_in(unet, 4)
    grow_conv_in(unet, 4)
    at_once = tiny_unet()
    grow_conv_in(at_once, 8)

    assert unet.config.in_channels == at_once.config.in_channels == 12
    assert all(torch.equal(value, at_once.state_dict()[key]) for key, value in unet.state_dict().items())


def test_growing_keeps_dtype_device_mode_and_frozenness(unet):
    unet.to(torch.bfloat16).requires_grad_(False).train()
    grow_conv_in(unet, 4)
    assert unet.conv_in.weight.dtype == torch.bfloat16 and unet.conv_in.bias.dtype == torch.bfloat16
    assert unet.conv_in.weight.device == torch.device("cpu") and unet.conv_in.training
    assert not unet.conv_in.weight.requires_grad and not unet.conv_in.bias.requires_grad

    with torch.device("meta"):
        meta = UNet2DConditionModel(
            block_out_channels=(32, 64),
            norm_num_groups=8,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D",) * 2,
        )
    grow_conv_in(meta, 4)
    assert meta.conv_in.weight.is_meta and meta.conv_in.weight.shape == (32, 8, 3, 3)


def test_refusals(unet):
    with pytest.raises(ValueError, match="positive"):
        grow_conv_in(unet, 0)
    unet.register_to_config(in_channels=8)
    with pytest.raises(ValueError, match="config.in_channels is 8 but conv_in takes 4"):
        condition_channels(unet)
