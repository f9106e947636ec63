"""Loss functions as pure functions of tensors, each naming the equation it implements.

"LD" is LayerDiffusion (Zhang & Agrawala 2024, arXiv:2402.17113), "DM" DiffuMatting (Hu et al.,
ECCV 2024, arXiv:2403.06168), "DIM" Deep Image Matting (Xu et al. 2017, arXiv:1703.03872); the
diffusion objective (LD eq. 7) is in :mod:`layerdiff.diffusion`. Norms written ``||.||_2`` in the
paper are implemented as per-element mean squared errors, the usual reading in latent-diffusion
code (it only rescales the loss weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def identity_loss(adjusted_decode: torch.Tensor, original_decode: torch.Tensor) -> torch.Tensor:
    """LD eq. 1, the "harmfulness" of the latent offset.

    The frozen decoder must decode the adjusted latent ``x_a`` to the same image it decodes
    from the unmodified latent ``x``: ``|| D*(x_a) - D*(x) ||_2``. ``original_decode`` is a
    constant target (computed without gradient).
    """
    return F.mse_loss(adjusted_decode, original_decode.detach())


def reconstruction_loss(
    rgb_hat: torch.Tensor, alpha_hat: torch.Tensor, rgb: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """LD eq. 4: ``|| I_c - rgb_hat ||_2 + || a - a_hat ||_2``.

    ``rgb`` is the padded colour (LD Appendix A), defined everywhere, so every pixel counts.
    """
    return F.mse_loss(rgb_hat, rgb) + F.mse_loss(alpha_hat, alpha)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """LD eq. 5, discriminator side: the hinge loss of the latent-diffusion PatchGAN."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """LD eq. 5, generator side: raise the discriminator's score of reconstructions."""
    return -logits_fake.mean()


def adaptive_adversarial_weight(
    reconstruction: torch.Tensor,
    adversarial: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """Balance the adversarial gradient against the reconstruction gradient (LD eq. 5-6).

    As in latent diffusion's ``LPIPSWithDiscriminator``: the ratio of the two losses'
    gradient norms at the decoder's last layer, so the GAN term neither vanishes nor
    dominates whatever the loss scales are. Returned detached.
    """
    reconstruction_grad = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    adversarial_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    weight = reconstruction_grad.norm() / (adversarial_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def transparent_vae_generator_loss(
    reconstruction: torch.Tensor,
    identity: torch.Tensor,
    adversarial: torch.Tensor | None,
    *,
    reconstruction_weight: float,
    identity_weight: float,
    adversarial_weight: float,
) -> torch.Tensor:
    """LD eq. 6: ``L = l_recon * L_recon + l_identity * L_identity + l_disc * L_disc``.

    ``adversarial`` is ``None`` before the discriminator starts (or when it is disabled);
    it should already carry the adaptive weight.
    """
    total = reconstruction_weight * reconstruction + identity_weight * identity
    if adversarial is not None:
        total = total + adversarial_weight * adversarial
    return total


def green_background_loss(
    attention_maps: Sequence[torch.Tensor], background: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """DM sec. 3.3, the green-background control loss: the cross-attention map ``A_j`` of the
    "green" token pushed toward the background mask ``1 - M``.

    ``attention_maps``: one ``[B, h, w]`` map per captured layer (averaged over heads, already
    normalised by the caller); ``background``: ``1 - M`` as ``[B, 1, H, W]`` in [0, 1], area-
    averaged to each map's size. The squared error is averaged over pixels, then over the
    samples whose ``weights`` are 1 (0 leaves a sample out: a dropped caption has no green
    token), then over maps.
    """
    if not attention_maps:
        raise ValueError("green_background_loss needs at least one attention map")
    batch = background.shape[0]
    weights = background.new_ones(batch) if weights is None else weights.to(background)
    losses = []
    for attention in attention_maps:
        target = F.adaptive_avg_pool2d(background.float(), attention.shape[-2:])[:, 0]
        per_sample = (attention.float() - target).square().flatten(1).mean(dim=1)
        losses.append((per_sample * weights).sum() / weights.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def sobel_gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Sobel derivatives ``(S_x * X, S_y * X)`` of each channel of a ``[B, C, H, W]`` tensor,
    edges replicated."""
    sobel_x = image.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]  # [2, 1, 3, 3]
    channels = image.shape[1]
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gradients = F.conv2d(padded, kernels.repeat(channels, 1, 1, 1), groups=channels)  # [B, 2C, H, W]
    return gradients[:, 0::2], gradients[:, 1::2]


def sobel_magnitude(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DM sec. 3.4's high-frequency map ``H = sqrt((S_x * X)^2 + (S_y * X)^2)``, per channel of a
    ``[B, C, H, W]`` tensor, edges replicated. ``eps`` inside the root keeps its gradient finite
    where the image is flat; subtracting ``sqrt(eps)`` keeps a flat image's map exactly zero."""
    gx, gy = sobel_gradients(image)
    return torch.sqrt(gx.square() + gy.square() + eps) - eps**0.5


def transition_band(alpha: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Where the matte changes: pixels within ``width`` of a change in alpha (its morphological
    gradient over a ``2 width + 1`` window is above one 8-bit level). ``[B, 1, H, W]`` in [0, 1] ->
    the same shape, 0 or 1. Soft alpha (hair, glass) is in the band wherever it varies."""
    window = 2 * width + 1
    dilated = F.max_pool2d(alpha, window, stride=1, padding=width)
    eroded = -F.max_pool2d(-alpha, window, stride=1, padding=width)
    return ((dilated - eroded) > 1.0 / 255.0).to(alpha.dtype)


def transition_boundary_loss(
    prediction: torch.Tensor, target: torch.Tensor, band: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """DM sec. 3.4, the detail-enhancement (transition boundary) loss: the Sobel maps of the
    predicted clean image (or latent) and of the target, compared where the matte changes.

    ``band``: ``[B, 1, H', W']`` from :func:`transition_band`, max-pooled to the tensors' size (a
    latent pixel that covers any boundary pixel counts). Per sample, the squared error averaged
    over its band pixels and channels, times its ``weights`` entry (default 1); then the mean
    over the samples that have a band.
    """
    mask = F.adaptive_max_pool2d(band.float(), prediction.shape[-2:])
    error = (sobel_magnitude(prediction.float()) - sobel_magnitude(target.float())).square() * mask
    area = mask.flatten(1).sum(dim=1) * prediction.shape[1]
    per_sample = error.flatten(1).sum(dim=1) / area.clamp_min(1.0)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.sum() / (area > 0).sum().clamp_min(1)


def alpha_prediction_loss(alpha_hat: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DIM eq. 1, the alpha-prediction loss: ``mean sqrt((a_hat - a)^2 + eps^2)``, a smooth L1
    that stays sharp near zero error (so soft alpha is fitted, not blurred as by a square)."""
    return torch.sqrt((alpha_hat - alpha).square() + eps**2).mean()


def composition_loss(
    alpha_hat: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, image: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """DIM eq. 2, the compositional loss: the image re-composited with the predicted alpha,
    ``c_p = a_hat F + (1 - a_hat) B``, against the real one, ``mean sqrt((c_p - c)^2 + eps^2)``.
    An alpha error costs in proportion to how far the foreground colour is from the background's:
    on a green screen, little for a green leaf, much for a red apple."""
    recomposited = alpha_hat * foreground + (1.0 - alpha_hat) * background
    return torch.sqrt((recomposited - image).square() + eps**2).mean()


def gradient_loss(alpha_hat: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The mean absolute difference of the Sobel derivatives (x and y) of the predicted and the
    true alpha: penalises blurred or misplaced edges more than ``alpha_prediction_loss``, whose
    per-pixel error a thin edge barely moves."""
    (gx_hat, gy_hat), (gx, gy) = sobel_gradients(alpha_hat), sobel_gradients(alpha)
    return 0.5 * ((gx_hat - gx).abs().mean() + (gy_hat - gy).abs().mean())
