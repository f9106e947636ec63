"""A UNet's input convolution widened for condition latents, as LayerDiffusion's conditional
models take them.

LayerDiffusion (Zhang & Agrawala 2024, arXiv:2402.17113, Fig. 4) generates one layer
conditioned on others: foreground -> blend, background -> blend, foreground + blend ->
background, background + blend -> foreground. The released SDXL models
(``layer_xl_{fg2ble,bg2ble,fgble2bg,bgble2fg}.safetensors``) feed the condition layers' VAE
latents to the UNet concatenated after the noisy latent, so ``conv_in`` takes 4 more input
channels per condition (the released Forge/ComfyUI loaders zero-pad the base ``conv_in`` to the
file's width before adding the file's offset). :func:`grow_conv_in` makes that width a trainable
diffusers UNet: the new input channels start at zero, so the grown UNet computes what the base
one did whatever the conditions hold, and training starts from the base model.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

# The SD/SDXL VAE latent's channels: the noisy latent's width.
LATENT_CHANNELS = 4


def grow_conv_in(unet: UNet2DConditionModel, extra_channels: int) -> None:
    """Give ``unet.conv_in`` ``extra_channels`` more input channels, after its current ones,
    with zero weights, and record the new width as ``unet.config.in_channels``.

    The old weights, bias, dtype, device and ``requires_grad`` are kept, so the grown UNet's
    output on ``cat([sample, conditions], dim=1)`` is the old output on ``sample``. The config
    change makes ``save_pretrained`` + ``from_pretrained`` rebuild the grown width.

    Growing again is defined: the channels are appended after the existing ones, so
    ``grow_conv_in(unet, a); grow_conv_in(unet, b)`` equals ``grow_conv_in(unet, a + b)``.
    Read :func:`condition_channels` first where a UNet may already be grown (a resumed run).
    """
    if extra_channels < 1:
        raise ValueError(f"extra_channels must be a positive number of input channels, not {extra_channels}")
    old = unet.conv_in
    if type(old) is not nn.Conv2d:
        raise TypeError(
            f"unet.conv_in is a {type(old).__name__}, not a plain Conv2d; grow conv_in before adding "
            "adapters to it (or merge and unload them first)."
        )
    weight = old.weight
    grown = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[:, : old.in_channels].copy_(weight)
        if old.bias is not None:
            grown.bias.copy_(old.bias)
    grown.requires_grad_(weight.requires_grad)
    grown.train(old.training)
    unet.conv_in = grown
    unet.register_to_config(in_channels=grown.in_channels)


def condition_channels(unet: UNet2DConditionModel, base_in_channels: int = LATENT_CHANNELS) -> int:
    """How many input channels ``unet`` takes beyond the noisy latent's ``base_in_channels``:
    0 for a base model, 4 per condition layer for LayerDiffusion's conditional models."""
    width = unet.conv_in.in_channels
    if unet.config.in_channels != width:
        raise ValueError(
            f"unet.config.in_channels is {unet.config.in_channels} but conv_in takes {width} channels; "
            "widen conv_in with layerdiff.models.conv_in.grow_conv_in, which keeps both in step."
        )
    if width < base_in_channels:
        raise ValueError(f"conv_in takes {width} channels, fewer than the {base_in_channels} of the noisy latent")
    return width - base_in_channels
