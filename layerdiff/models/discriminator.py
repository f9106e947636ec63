"""PatchGAN discriminator for the adversarial term of LayerDiffusion eq. 5.

The paper trains the transparency decoder with latent diffusion's ``LPIPSWithDiscriminator``,
whose discriminator is the pix2pix PatchGAN ``NLayerDiscriminator`` (taming-transformers,
``taming/modules/discriminator/model.py``) with 4 input channels ``[alpha, r, g, b]``. Layer
order and the ``main`` attribute follow that module, so with ``norm="batch"`` its weights load
from a latent-diffusion ``loss.discriminator.*`` state dict.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

NormKind = Literal["batch", "group", "none"]


class PatchDiscriminator(nn.Module):
    """Conv stack giving one real/fake logit per overlapping patch: ``[B, 1, h, w]``.

    ``layers`` stride-2 4x4 convolutions (width doubling from ``channels``, capped at 8x),
    one stride-1 conv, then a 1-channel 4x4 conv; LeakyReLU(0.2) after every conv but the last
    and normalisation after every conv but the first and the last.

    Args:
        in_channels: channels of the judged image (4 for ``[alpha, r, g, b]``).
        channels: width of the first conv (pix2pix ``ndf``).
        layers: number of stride-2 convolutions (pix2pix ``n_layers``).
        norm: ``"batch"`` reproduces taming. BatchNorm statistics are per device and per call
            (real and fake batches are normalised separately, and under sharded data parallel
            each rank sees only its micro-batch, unless converted to SyncBatchNorm), which
            makes small-batch multi-GPU training drift; ``"group"`` (GroupNorm) and ``"none"``
            avoid batch statistics altogether.
        norm_num_groups: groups for ``norm="group"``; must divide every normalised width.
            ``None``: 32, or the narrowest normalised width when that is smaller (narrow test
            and demo discriminators).
    """

    def __init__(
        self,
        in_channels: int = 4,
        channels: int = 64,
        layers: int = 3,
        norm: NormKind = "batch",
        norm_num_groups: int | None = None,
    ) -> None:
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}")
        widths = [channels * min(2**index, 8) for index in range(layers + 1)]
        if norm_num_groups is None:
            norm_num_groups = min(32, widths[1])
        if norm == "group" and any(width % norm_num_groups for width in widths[1:]):
            raise ValueError(
                f"norm_num_groups={norm_num_groups} must divide every normalised width {widths[1:]}"
            )
        # BatchNorm's affine shift makes a conv bias redundant (as in taming); GroupNorm's
        # per-group mean leaves per-channel biases meaningful, so they stay.
        conv_bias = norm != "batch"

        def normalisation(width: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(width)
            if norm == "group":
                return nn.GroupNorm(norm_num_groups, width)
            return nn.Identity()

        sequence: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for index in range(1, layers + 1):
            stride = 2 if index < layers else 1
            sequence += [
                nn.Conv2d(widths[index - 1], widths[index], kernel_size=4, stride=stride, padding=1, bias=conv_bias),
                normalisation(widths[index]),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        sequence.append(nn.Conv2d(widths[-1], 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*sequence)
        self.apply(_dcgan_init)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Patch logits for an image in [-1, 1] (hinge loss consumes them raw)."""
        return self.main(image)


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation as taming's ``weights_init``: conv ~ N(0, 0.02), norm scale ~ N(1, 0.02)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
