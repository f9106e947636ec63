"""Loss functions as pure functions of tensors, each naming the equation it implements.

"LD" is LayerDiffusion (Zhang & Agrawala 2024, arXiv:2402.17113); the diffusion objective
(LD eq. 7) is in :mod:`layerdiff.diffusion`. Norms
written ``||.||_2`` in the paper are implemented as per-element mean squared errors, the
usual reading in latent-diffusion code (it only rescales the loss weights).
"""

from __future__ import annotations

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
