"""A UNet's output on fixed inputs, to compare models and exports."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


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
