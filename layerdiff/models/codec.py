"""The latent-transparency codec as plain functions of its parts (LayerDiffusion sec. 3.1).

Every objective that touches transparent latents goes through these: the transparent VAE
training, the latent diffusion training (on-the-fly encoding), the latent cache and
generation. Latents come in two scales: the VAE's own ("unscaled", what the transparency
decoder consumes) and the diffusion model's (``diffusion_latent``: shifted and scaled by the
VAE config, what the UNet learns).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from layerdiff.models.transparency import InputConvention, LatentTransparencyEncoder, decode_with_augmentation
from layerdiff.rgba import premultiply_on_grey, pyramid_fill


def encoder_input_rgb(rgb: torch.Tensor, alpha: torch.Tensor, convention: InputConvention) -> torch.Tensor:
    """Our shards' straight padded colour in the ``convention`` an encoder's weights expect."""
    if convention == "straight":
        return rgb
    if convention == "released":
        return pyramid_fill(rgb, alpha, stop="shorter_side")  # the released pad_rgb
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


def encode_opaque(vae: AutoencoderKL, rgb: torch.Tensor) -> torch.Tensor:
    """An opaque layer's latent (unscaled): the posterior mean of ``E*(2 rgb - 1)``, deterministic
    like ``encode_adjusted`` (a background or blend of joint layers, LayerDiffusion sec. 3.3)."""
    return vae.encode(rgb * 2.0 - 1.0).latent_dist.mean


def layer_latent(
    vae: AutoencoderKL, transparent_encoder: LatentTransparencyEncoder | None, rgb: torch.Tensor, alpha: torch.Tensor | None
) -> torch.Tensor:
    """A layer's latent on the UNet's scale: a transparent layer's adjusted latent ``x_a``
    (straight padded colour and alpha), an opaque layer's plain one (``alpha`` None). What joint
    training denoises and what a layer given as a condition (LD sec. 3.3) carries, in training
    and in sampling alike."""
    if alpha is None:
        return diffusion_latent(vae, encode_opaque(vae, rgb))
    if transparent_encoder is None:
        raise ValueError("a transparent layer's latent needs the transparency encoder (transparent_vae)")
    return diffusion_latent(vae, encode_adjusted(vae, transparent_encoder, rgb, alpha)[1])


def condition_image(rgb: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """A condition layer as the released conditional models read it, in [-1, 1]: composited on
    grey (``0.5 + (rgb - 0.5) a``), an opaque layer as it is."""
    return rgb * 2.0 - 1.0 if alpha is None else premultiply_on_grey(rgb, alpha)


def condition_latent(vae: AutoencoderKL, rgb: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """A condition layer's latent for the channels LD Fig. 4's models concatenate to the noisy
    latent, on the UNet's scale: :func:`condition_image` VAE-encoded, as the released SDXL
    conditional models read them (they draw a posterior sample; the mean here, so training and
    sampling see one deterministic latent)."""
    return diffusion_latent(vae, vae.encode(condition_image(rgb, alpha)).latent_dist.mean)


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
def decode_opaque(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Generated diffusion-scale latents of an opaque layer -> RGB in [0, 1]."""
    return decode_pixels(vae, vae_latent(vae, latents)).clamp(0.0, 1.0)


@torch.no_grad()
def decode_rgba(
    vae: AutoencoderKL, transparent_decoder: nn.Module, latents: torch.Tensor, augmentation: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated diffusion-scale latents -> ``(alpha, rgb)`` in [0, 1]: the generation decode."""
    latent = vae_latent(vae, latents)
    alpha, rgb = decode_transparent(transparent_decoder, decode_pixels(vae, latent), latent, augmentation)
    return alpha.clamp(0.0, 1.0), rgb.clamp(0.0, 1.0)
