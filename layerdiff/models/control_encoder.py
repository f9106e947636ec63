"""The condition image of LayerDiffusion's conditional SD1.5 layer models, as the
attention-sharing units of :mod:`layerdiff.models.layer_sharing` read it: the
"foreground/background-conditioned layer generation" of arXiv:2402.17113 (abstract; the
attention sharing of sec. 3.3 with a condition layer added), released as ``layer_sd15_fg2bg``
(background and blend from a given foreground) and ``layer_sd15_bg2fg`` (foreground and blend
from a given background).

The released design (``AdditionalAttentionCondsEncoder`` and ``AttentionSharingUnit(...,
use_control=True)`` in LayerDiffuse's ``lib_layerdiffusion/attention_sharing.py``):

* a conv encoder (:class:`ControlEncoder`) turns the condition image into 256-channel feature
  maps at 1/8, 1/16, 1/32 and 1/64 of its size, keyed by their token count ``h * w``: for an
  image as large as the generated one these are the token counts of SD1.5's attention modules
  (latent size, then each down level; the mid block at 1/64);
* every unit with control has, per frame (layer), a projection (:func:`control_projection`:
  3x3 conv, SiLU, 1x1 conv to the attention width) of the feature map with its own token count;
  the result is added to the frame's rows of the unit's input before attention, and stays in
  the unit's output (:func:`frame_controls` builds it in the units' ``(b f)`` row order).

The features of one UNet forward reach every unit through diffusers' attention keyword
arguments: ``unet(..., cross_attention_kwargs={CONTROL_KWARG: encoder(image)})``. Passed as an
argument rather than held in shared state, they are there again when gradient checkpointing
recomputes a block during backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

CONTROL_CHANNELS = 256  # the released encoder's output width, which every control projection reads
CONTROL_KWARG = "control"  # the cross_attention_kwargs entry holding the features of the forward
# The released encoder as (in, out, stride) of its 3x3 convs, each followed by SiLU, per block:
# block 0 reaches 1/8 of the image with three stride-2 convs, each later block halves it again.
_ENCODER_BLOCKS: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((3, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)),
    *(((256, 256, 2), (256, 256, 1)),) * 3,
)

ControlFeatures = Mapping[int, torch.Tensor]  # token count h * w -> feature map [B, C, h, w]


def _conv_block(convs: Sequence[tuple[int, int, int]]) -> nn.Sequential:
    """3x3 convs, each followed by SiLU, so the convs sit at the released even indices."""
    layers: list[nn.Module] = []
    for in_channels, out_channels, stride in convs:
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1), nn.SiLU()]
    return nn.Sequential(*layers)


class ControlEncoder(nn.Module):
    """The condition image's feature maps at SD1.5's attention resolutions (the released
    ``AdditionalAttentionCondsEncoder``; parameters ``blocks_{0..3}.{conv index}.{weight,bias}``,
    the released names under its ``kwargs_encoder.`` prefix).

    The released pipelines feed the condition layer composited onto 50 % grey, in [-1, 1]: for an
    RGBA layer that is :func:`layerdiff.rgba.premultiply_on_grey`. Default PyTorch initialisation,
    as released: the encoder reaches the UNet only through the zero-initialised projections.
    """

    channels = CONTROL_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self.blocks_0, self.blocks_1, self.blocks_2, self.blocks_3 = (_conv_block(block) for block in _ENCODER_BLOCKS)

    def forward(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """``[B, 3, H, W]`` in [-1, 1] -> ``{h * w: [B, 256, h, w]}`` for ``h, w`` = ``H, W`` / 8, 16, 32, 64
        (rounded up)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"the control encoder reads RGB images [B, 3, H, W] in [-1, 1]; got shape {tuple(image.shape)}")
        features, h = {}, image
        for block in (self.blocks_0, self.blocks_1, self.blocks_2, self.blocks_3):
            h = block(h)
            features[h.shape[2] * h.shape[3]] = h
        return features


def control_projection(hidden: int, channels: int = CONTROL_CHANNELS) -> nn.Sequential:
    """One frame's control for an attention module of width ``hidden`` (released
    ``control_convs.{frame}``: 3x3 conv ``channels -> channels``, SiLU, 1x1 conv ``channels -> hidden``).

    The last conv starts at zero, as ControlNet's zero convolutions (Zhang et al. 2023,
    arXiv:2302.05543 sec. 3.1), so a new unit changes nothing; the released units use PyTorch's
    default initialisation, since they are only ever loaded from trained files."""
    projection = nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1), nn.SiLU(), nn.Conv2d(channels, hidden, kernel_size=1)
    )
    nn.init.zeros_(projection[2].weight)
    nn.init.zeros_(projection[2].bias)
    return projection


def frame_controls(projections: Sequence[nn.Module], features: ControlFeatures, samples: int, tokens: int) -> torch.Tensor:
    """The control added to a unit's input ``[samples * frames, tokens, hidden]``, frames inner
    (``(b f)``): row ``b * frames + f`` gets ``projections[f]`` of sample ``b``'s feature map
    with ``tokens`` tokens, flattened to tokens (``b c h w -> b (h w) c``). Feature maps of one
    sample serve every sample (the released pipelines encode one condition image per batch)."""
    feature = features.get(tokens)
    if feature is None:
        raise ValueError(
            f"no control feature map of {tokens} tokens (the features have {sorted(features)}): encode a condition "
            "image of the generated image's size (8 x the latent's height and width) with the ControlEncoder"
        )
    if feature.shape[0] not in (1, samples):
        raise ValueError(
            f"control features of {feature.shape[0]} images for a batch of {samples} samples of {len(projections)} "
            "layers: give one condition image per sample (in the batch's sample order) or one for all"
        )
    per_frame = [projection(feature).flatten(2).transpose(1, 2) for projection in projections]  # [B, h * w, hidden]
    return torch.stack(per_frame, dim=1).expand(samples, -1, -1, -1).flatten(0, 1)
