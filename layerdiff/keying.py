"""Pulling a matte off a solid backing colour (the green screen DiffuMatting generates on):
the plain chroma key a matting head must beat, colour unmixing, and how pure the backing is.

All functions take ``[B, 3, H, W]`` colour in [0, 1] and a key colour as three floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _key(key: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(key, dtype=like.dtype, device=like.device).reshape(1, 3, 1, 1)


def chroma_key_alpha(rgb: torch.Tensor, key: Sequence[float] = (0.0, 1.0, 0.0)) -> torch.Tensor:
    """Vlahos' difference key: how far a pixel's key channel exceeds the larger of the other
    two, relative to the key colour's own excess: ``alpha = 1 - (I_k - max I_o) / (K_k - max K_o)``,
    clipped to [0, 1]. The key channel is the key colour's largest (green for a green screen).
    ``[B, 1, H, W]``."""
    key_colour = _key(key, rgb)[0, :, 0, 0]
    channel = int(key_colour.argmax())
    others = [index for index in range(3) if index != channel]
    excess = key_colour[channel] - key_colour[others].max()
    if excess <= 0:
        raise ValueError(f"key colour {tuple(key)} has no dominant channel to key on (e.g. pure green (0, 1, 0))")
    pixel_excess = rgb[:, channel:channel + 1] - rgb[:, others].amax(dim=1, keepdim=True)
    return (1.0 - pixel_excess / excess).clamp(0.0, 1.0)


def unmix_foreground(rgb: torch.Tensor, alpha: torch.Tensor, key: Sequence[float] = (0.0, 1.0, 0.0),
                     min_alpha: float = 1e-3) -> torch.Tensor:
    """The straight foreground colour ``F`` of ``I = alpha F + (1 - alpha) K``, solved per pixel
    and clipped to [0, 1] (the key colour removed from the edges); where alpha is below
    ``min_alpha`` the colour is undefined and set to the pixel's own."""
    key_colour = _key(key, rgb)
    foreground = (rgb - (1.0 - alpha) * key_colour) / alpha.clamp_min(min_alpha)
    return torch.where(alpha >= min_alpha, foreground.clamp(0.0, 1.0), rgb)


def backing_purity(rgb: torch.Tensor, background: torch.Tensor, key: Sequence[float] = (0.0, 1.0, 0.0),
                   tolerance: float = 0.1) -> torch.Tensor:
    """Per image, the share of background pixels (``background`` ``[B, 1, H, W]`` true) whose
    colour is within ``tolerance`` (Euclidean, RGB in [0, 1]) of the key colour. ``[B]``; an
    image without background pixels gets NaN."""
    distance = (rgb - _key(key, rgb)).square().sum(dim=1, keepdim=True).sqrt()
    close = ((distance <= tolerance) & background).flatten(1).sum(dim=1).float()
    return close / background.flatten(1).sum(dim=1).float()
