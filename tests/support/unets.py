"""A UNet's output on fixed inputs, to compare models and exports; SD1.5's layout at tiny widths."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from layerdiff.models.base import SD15_UNET_CONFIG


def unet_output(unet: UNet2DConditionModel, grad: bool = False) -> torch.Tensor:
    """The UNet's prediction on fixed inputs (with SDXL's added conditions when it takes them),
    with autograd recording it if ``grad``."""
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    hidden = torch.randn(1, 5, config.cross_attention_dim, generator=generator)
    added = None
    if config.addition_embed_type == "text_time":
        num_time_ids = 6
        pooled_dim = config.projection_class_embeddings_input_dim - num_time_ids * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(1, pooled_dim, generator=generator),
            "time_ids": torch.randn(1, num_time_ids, generator=generator),
        }
    with torch.set_grad_enabled(grad):
        return unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def make_sd15_unet(cross_attention_dim: int = 16) -> UNet2DConditionModel:
    """SD1.5's block layout (so its 32 attention modules, at 8 x 8, 4 x 4, 2 x 2 and, in the mid
    block, 1 x 1 latents) at tiny widths."""
    return UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": 8, "block_out_channels": (8, 8, 16, 16),
                                   "norm_num_groups": 4, "attention_head_dim": 2,
                                   "cross_attention_dim": cross_attention_dim})


def sd15_shaped_model(tiny_sd15: Path, folder: Path) -> Path:
    """The tiny SD1.5 model folder with :func:`make_sd15_unet` as its UNet: a base model whose
    exports fit the released SD1.5 layouts."""
    import json
    import shutil

    shutil.copytree(tiny_sd15, folder)
    text_width = json.loads((tiny_sd15 / "text_encoder" / "config.json").read_text())["hidden_size"]
    shutil.rmtree(folder / "unet")
    torch.manual_seed(0)
    make_sd15_unet(text_width).save_pretrained(folder / "unet")
    return folder
