"""The latent-transparency codec as plain functions of its parts (LayerDiffusion sec. 3.1).

Every objective that touches transparent latents goes through these: the transparent VAE
training, the latent diffusion training (on-the-fly encoding), the latent cache and
generation. Latents come in two scales: the VAE's own ("unscaled", what the transparency
decoder consumes) and the diffusion model's (``diffusion_latent``: shifted and scaled by the
VAE config, what the UNet learns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from layerdiff.models.transparency import InputConvention, LatentTransparencyEncoder, decode_with_augmentation
from layerdiff.rgba import premultiply_on_grey


RELEASED_PAD_SHRINK = 1.2


def released_padded_rgb(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The released ``pad_rgb`` colour from straight colour: ``colour * alpha + fill * (1 - alpha)``
    in every pixel, ``fill`` rebuilt from an alpha pyramid (LayerDiffusion Appendix A).

    Premultiplied colour and alpha shrink by 1.2 per level (area averaging) until the shorter
    side is one pixel; from the alpha-weighted mean colour at the top, each level upsamples the
    fill bilinearly and sets ``fill = colour_l * alpha_l + fill * (1 - alpha_l)``. Only visible
    colour enters (``rgb * alpha``), so whatever fill the shards hold under alpha = 0 is ignored.
    """
    levels = [(rgb * alpha, alpha)]
    height, width = alpha.shape[-2:]
    while min(height, width) > 1:
        height, width = max(1, int(height / RELEASED_PAD_SHRINK)), max(1, int(width / RELEASED_PAD_SHRINK))
        premultiplied, coverage = levels[-1]
        levels.append(tuple(F.interpolate(image, size=(height, width), mode="area") for image in (premultiplied, coverage)))
    top_colour, top_alpha = levels[-1]
    fill = top_colour.sum(dim=(2, 3), keepdim=True) / top_alpha.sum(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    for premultiplied, coverage in reversed(levels):
        fill = F.interpolate(fill, size=premultiplied.shape[2:], mode="bilinear", align_corners=False)
        fill = premultiplied + fill * (1.0 - coverage)
    return fill


def encoder_input_rgb(rgb: torch.Tensor, alpha: torch.Tensor, convention: InputConvention) -> torch.Tensor:
    """Our shards' straight padded colour in the ``convention`` an encoder's weights expect."""
    if convention == "straight":
        return rgb
    if convention == "released":
        return released_padded_rgb(rgb, alpha)
    raise ValueError(f"unknown encoder input convention {convention!r}; expected 'straight' or 'released'")


def encode_adjusted(
    vae: AutoencoderKL, transparent_encoder: LatentTransparencyEncoder, rgb: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VAE's latent ``x`` and the adjusted latent ``x_a`` (both unscaled).

    ``x = mean(E*(I_p))`` with ``I_p`` premultiplied onto grey, and, as in the released code,
    the offset takes the place of the Gaussian sample noise: ``x_a = x + std * E(a, rgb)``.
    So ``x_a`` is deterministic, which is what makes caching it exact. ``E`` sees the padded
    colour in its own ``input_convention``.
    """
    posterior = vae.encode(premultiply_on_grey(rgb, alpha)).latent_dist
    offset = transparent_encoder(alpha, encoder_input_rgb(rgb, alpha, transparent_encoder.input_convention))
    return posterior.mean, posterior.mean + posterior.std * offset


def decode_pixels(vae: AutoencoderKL, latent: torch.Tensor) -> torch.Tensor:
    """``D*``: the frozen VAE's decode in [0, 1], not clipped (so gradients pass)."""
    return vae.decode(latent).sample * 0.5 + 0.5


def decode_transparent(
    transparent_decoder: nn.Module, pixels: torch.Tensor, latent: torch.Tensor, augmentation: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``D``: alpha and straight colour from the frozen decode ``pixels`` and the latent.

    ``augmentation`` is the released 8-way flip/rotation median (inference only).
    """
    pixels = pixels.clamp(0.0, 1.0)
    if augmentation:
        output = decode_with_augmentation(transparent_decoder, pixels, latent)
    else:
        output = transparent_decoder(pixels, latent)
    return output[:, :1], output[:, 1:]


def diffusion_latent(vae: AutoencoderKL, latent: torch.Tensor) -> torch.Tensor:
    """VAE latent -> the scale the UNet is trained on: ``(x - shift) * scaling_factor``."""
    shift = vae.config.get("shift_factor") or 0.0
    return (latent - shift) * vae.config.scaling_factor


def vae_latent(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of ``diffusion_latent``."""
    shift = vae.config.get("shift_factor") or 0.0
    return latents / vae.config.scaling_factor + shift


@torch.no_grad()
def decode_rgba(
    vae: AutoencoderKL, transparent_decoder: nn.Module, latents: torch.Tensor, augmentation: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated diffusion-scale latents -> ``(alpha, rgb)`` in [0, 1]: the generation decode."""
    latent = vae_latent(vae, latents)
    alpha, rgb = decode_transparent(transparent_decoder, decode_pixels(vae, latent), latent, augmentation)
    return alpha.clamp(0.0, 1.0), rgb.clamp(0.0, 1.0)
