"""The diffusion training step as pure functions of tensors (k-diffusion style), shared by every
objective that fine-tunes a UNet: one latent per sample (LayerDiffusion arXiv:2402.17113 sec.
3.2, eq. 7) or several layers of one sample denoised together (sec. 3.3, eq. 8-9).

A step is: :func:`draw` (caption dropout, timesteps, noise: every random number, from one
generator, in a fixed order) -> :func:`add_noise` -> the UNet -> :func:`target` ->
:func:`min_snr_weights` -> :func:`denoising_loss`. The layers of a sample share its timestep
and each have their own noise and caption dropout. Conditional layer generation (sec. 3.3: a
layer given clean, at t = 0, is not denoised and carries no loss) adds :func:`draw_modes` (after
:func:`draw`, so a step without modes draws the same numbers), :func:`given_layers` and
:func:`layer_losses`. Schedules are variance preserving, described by ``alphas_cumprod``
(``alpha_bar_t``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PredictionType = Literal["epsilon", "v_prediction"]


@dataclass
class Draws:
    """The random part of one training step.

    ``drop`` is ``[layers, B]`` (True: that layer of that sample is trained on the empty
    caption), ``timesteps`` is ``[B]`` (shared by the layers of a sample), ``noise`` one tensor
    per layer, shaped like its latent.
    """

    drop: torch.Tensor
    timesteps: torch.Tensor
    noise: list[torch.Tensor]


def draw(
    generator: torch.Generator,
    shapes: Sequence[torch.Size | tuple[int, ...]],
    num_train_timesteps: int,
    caption_dropout: float = 0.0,
    noise_offset: float = 0.0,
) -> Draws:
    """Every random number of a step for latents of ``shapes`` (one per layer, equal batch size).

    Order (fixed, so a seed gives one step on any device: ``generator`` lives on the CPU): the
    dropout of every layer of every sample, the timesteps, then per layer its noise and, with
    ``noise_offset`` (offset noise, Guttenberg 2023), its per-channel offset.
    """
    batch_size = shapes[0][0]
    if any(shape[0] != batch_size for shape in shapes):
        raise ValueError(f"every layer's latents need the same batch size; got shapes {[tuple(s) for s in shapes]}")
    drop = (torch.rand(len(shapes) * batch_size, generator=generator) < caption_dropout).reshape(len(shapes), batch_size)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    noise = []
    for shape in shapes:
        layer_noise = torch.randn(tuple(shape), generator=generator)
        if noise_offset:
            offset = torch.randn(batch_size, shape[1], *([1] * (len(shape) - 2)), generator=generator)
            layer_noise = layer_noise + noise_offset * offset
        noise.append(layer_noise)
    return Draws(drop, timesteps, noise)


def _schedule_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)`` broadcastable to ``like``."""
    alpha_bar = alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device)]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return (alpha_bar**0.5).reshape(shape), ((1 - alpha_bar) ** 0.5).reshape(shape)


def add_noise(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The forward process ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (DDPM, Ho et al.
    2020 eq. 4), computed as diffusers' ``DDPMScheduler.add_noise`` does (same numbers)."""
    signal, sigma = _schedule_at(alphas_cumprod, timesteps, latents)
    return signal * latents + sigma * noise


def target(
    prediction_type: PredictionType,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet learns to output: the noise ``eps`` (epsilon prediction), or the velocity
    ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0`` (Salimans & Ho 2022, sec. 4)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        signal, sigma = _schedule_at(alphas_cumprod, timesteps, latents)
        return signal * noise - sigma * latents
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; got {prediction_type!r}")


def clean_estimate(
    prediction_type: PredictionType,
    alphas_cumprod: torch.Tensor,
    noisy: torch.Tensor,
    prediction: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The UNet's estimate of ``x_0`` from ``x_t`` and its output: ``(x_t - sqrt(1 - alpha_bar_t) eps)
    / sqrt(alpha_bar_t)`` for epsilon prediction, ``sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v``
    for v prediction (the inverse of :func:`add_noise` and :func:`target`)."""
    signal, sigma = _schedule_at(alphas_cumprod, timesteps, noisy)
    if prediction_type == "epsilon":
        return (noisy - sigma * prediction) / signal
    if prediction_type == "v_prediction":
        return signal * noisy - sigma * prediction
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; got {prediction_type!r}")


def signal_to_noise_ratio(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)`` of a variance-preserving schedule."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv:2303.09556 eq. 10 and its v form).

    The ideal x0-loss weight ``min(SNR, gamma)`` expressed for the network's target: divided
    by ``SNR`` for epsilon prediction and by ``SNR + 1`` for v prediction.
    """
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"min-SNR weighting is defined for 'epsilon' and 'v_prediction', not {prediction_type!r}")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """LayerDiffusion eq. 7: ``E || target - f_theta(x_t, t, c) ||_2^2`` (per-element mean).

    ``weights`` (one per sample, e.g. :func:`min_snr_weights`)
    reweight the per-sample errors. Computed in float32 whatever the autocast dtype.
    """
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def draw_modes(generator: torch.Generator, probabilities: Sequence[float], batch_size: int) -> torch.Tensor:
    """Each sample's mode (an index into ``probabilities``), drawn after :func:`draw`'s numbers:
    how a model learns joint and conditional generation at once (LD sec. 3.3). ``[B]``."""
    return torch.multinomial(torch.tensor(probabilities, dtype=torch.float64), batch_size, replacement=True,
                             generator=generator)


def given_layers(
    latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, given: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet input of layers given as conditions (LD sec. 3.3): where ``given`` (``[B, L]``
    bool), the clean latent at ``t = 0`` in place of the noisy one. ``latents`` and ``noisy`` are
    ``[B, L, ...]``, ``timesteps`` the samples' ``[B]``; returns the input ``[B, L, ...]`` and each
    layer's timestep ``[B, L]``. A sampler prepares a given layer the same way at every step."""
    mask = given.reshape(*given.shape, *([1] * (latents.ndim - 2))).to(latents.device)
    layer_timesteps = torch.where(given.to(timesteps.device), torch.zeros_like(timesteps)[:, None], timesteps[:, None])
    return torch.where(mask, latents, noisy), layer_timesteps


def layer_losses(
    prediction: torch.Tensor, target: torch.Tensor, generated: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD eq. 8-9 over the layers that were denoised: ``prediction`` and ``target`` ``[B, L, ...]``,
    ``generated`` ``[B, L]`` (False: a given layer, no loss), ``weights`` per sample (Min-SNR).
    Returns the mean squared error over every generated (sample, layer) pair, and per layer its
    mean over the samples that generated it (``[L]``; NaN for a layer no sample generated). With
    every layer generated the total is eq. 9's, the mean of eq. 8's per-layer terms."""
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(2).mean(dim=2)  # [B, L]
    if weights is not None:
        errors = errors * weights[:, None]
    generated = generated.to(errors.device, errors.dtype)
    total = (errors * generated).sum() / generated.sum().clamp_min(1.0)
    per_layer = (errors * generated).sum(dim=0) / generated.sum(dim=0)
    return total, per_layer
