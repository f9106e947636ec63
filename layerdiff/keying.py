"""Pulling a matte off a solid backing colour (the green screen DiffuMatting generates on):
the plain chroma key a matting head must beat, the head's matte, colour unmixing and the
refinement with the known backing (GreenPost), and how pure the backing is.

All functions take ``[B, 3, H, W]`` colour in [0, 1] and a key colour as three floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from layerdiff.models.matting_head import MattingHead


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


def head_matte(head: MattingHead, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The matting head's alpha ``[B, 1, H, W]`` for a decoded green screen ``image`` and the
    decoder features it came with (``layerdiff.models.matting_head.decode_with_features``); the
    head refines the chroma key against its own key colour."""
    return head(features, image, chroma_key_alpha(image.clamp(0.0, 1.0), head.config.key_colour))


def unmixed_alpha(rgb: torch.Tensor, foreground: torch.Tensor,
                  backing: Sequence[float] | torch.Tensor = (0.0, 1.0, 0.0)) -> torch.Tensor:
    """Colour unmixing against a known backing: the ``alpha`` that best explains
    ``I = alpha F + (1 - alpha) B`` for a given foreground colour ``F`` (least squares over the
    three channels: ``<I - B, F - B> / |F - B|^2``), clipped to [0, 1]. ``backing`` is the key
    colour, or the backing per pixel ``[B, 3, H, W]``. Exact where ``F`` and ``B`` are the true
    colours; ill-conditioned where ``F`` is close to ``B`` (a green object). ``[B, 1, H, W]``."""
    backing = backing if isinstance(backing, torch.Tensor) else _key(backing, rgb)
    away = foreground - backing
    spread = away.square().sum(dim=1, keepdim=True)
    return (((rgb - backing) * away).sum(dim=1, keepdim=True) / spread.clamp_min(1e-6)).clamp(0.0, 1.0)


def refine_matte(rgb: torch.Tensor, alpha: torch.Tensor, key: Sequence[float] = (0.0, 1.0, 0.0),
                 uncertain: tuple[float, float] = (0.02, 0.98), grow: int = 2,
                 separation: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffuMatting's GreenPost (arXiv:2403.06168 sec. 3.5; the paper only names it): refine a
    matte with the known backing and return ``(alpha, foreground)``, the final RGBA.

    1. The colours either side of the edge, by pymatting's multi-level foreground estimation
       (Germer et al. 2020): ``F``, the object's colour carried out from the matte's confident
       core (``alpha >= uncertain[1]``; the matte itself when it has no core: smoke), and ``B``,
       the backing carried in from the confident background (``alpha <= uncertain[0]``; the key
       colour where there is none). ``B`` is the key colour as the image shows it: a decoder's
       slight colour shifts of the screen do not read as transparency.
    2. In the uncertain band (``uncertain[0] < alpha < uncertain[1]``, grown by ``grow`` pixels)
       alpha is re-solved by :func:`unmixed_alpha` between ``F`` and ``B``, trusted in proportion
       to how far apart they are (``|F - B| / separation``, at most 1): a green object's edge keeps
       the head's alpha. Outside the band the matte is kept.
    3. ``F`` estimated again with the refined alpha: the decontaminated colour of the cutout.

    ``rgb`` ``[B, 3, H, W]`` and ``alpha`` ``[B, 1, H, W]`` in [0, 1]; runs on the CPU in float64.
    """
    from pymatting import estimate_foreground_ml  # noqa: PLC0415 - numba-compiled; loaded when first needed

    def estimate(image: np.ndarray, matte: torch.Tensor, background: bool = False) -> torch.Tensor:
        found = estimate_foreground_ml(image, matte.numpy(), return_background=background)
        return torch.from_numpy(np.asarray(found[1] if background else found, dtype=np.float64)).permute(2, 0, 1)[None]

    low, high = uncertain
    refined_alphas, foregrounds = [], []
    for image, matte in zip(rgb.detach().double().cpu(), alpha.detach().double().cpu()):
        pixels = image.permute(1, 2, 0).contiguous().numpy()
        core, clear = (matte[0] >= high).double(), (matte[0] <= low).double()
        inside = estimate(pixels, core if core.any() else matte[0])
        backing = estimate(pixels, 1.0 - clear, background=True) if clear.any() else _key(key, inside)
        band = ((matte > low) & (matte < high)).float()[None]
        band = torch.nn.functional.max_pool2d(band, 2 * grow + 1, stride=1, padding=grow)[0] > 0
        trust = ((inside - backing).square().sum(dim=1).sqrt() / separation).clamp(0.0, 1.0)
        solved = trust * unmixed_alpha(image[None], inside, backing)[0] + (1.0 - trust) * matte
        matte = torch.where(band, solved, matte)
        refined_alphas.append(matte)
        foregrounds.append(estimate(pixels, matte[0])[0].clamp(0.0, 1.0))
    return (torch.stack(refined_alphas).to(alpha.device, alpha.dtype),
            torch.stack(foregrounds).to(rgb.device, rgb.dtype))


def estimate_foreground(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The decontaminated colour of a cutout: pymatting's multi-level foreground estimation
    (Germer et al. 2020) for ``[B, 3, H, W]`` colour and its matte ``[B, 1, H, W]``, which carries
    the object's colour into its soft edge instead of dividing the mixed pixels by alpha (which
    amplifies the image's noise and a backing that is not exactly the key colour)."""
    from pymatting import estimate_foreground_ml  # noqa: PLC0415 - numba-compiled; loaded when first needed

    foregrounds = [torch.from_numpy(np.asarray(estimate_foreground_ml(image.permute(1, 2, 0).contiguous().numpy(),
                                                                      matte[0].numpy()), dtype=np.float64)).permute(2, 0, 1)
                   for image, matte in zip(rgb.detach().double().cpu(), alpha.detach().double().cpu())]
    return torch.stack(foregrounds).clamp(0.0, 1.0).to(rgb.device, rgb.dtype)
