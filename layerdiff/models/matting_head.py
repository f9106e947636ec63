"""DiffuMatting's matting head (Hu et al., ECCV 2024, arXiv:2403.06168, sec. 3.5): alpha read
off the frozen SD VAE decoder's features ("green colour removal in the latent space of the VAE
decoder").

The paper names the head ("ConR") but not its layers. Ours, and why:

* **Inputs.** The output of every decoder up block (coarse to fine: SD's 512 ch at H/4 down to
  128 ch at H; the coarse ones know what the object is, the fine ones where its edge is), the
  decoded image (the green itself is the strongest cue) and the plain chroma key of that image
  (passed in by ``layerdiff.keying.head_matte``), so that the head learns a *correction* of the
  key where colour alone fails: green objects, green spill, the decoder's colour shifts.
* **Fusion.** Each feature map is projected to ``width`` channels by a 1x1 convolution and
  upsampled bilinearly to the image's size; the sum and the 4 image channels go through
  ``depth`` 3x3 convolutions (GroupNorm, SiLU) at full resolution, then a 3x3 convolution to
  one logit, added to the key's logit. The last convolution starts at zero, so an untrained
  head *is* the chroma key, and training can only start from there.
* **Cost.** Width 32, depth 2 are ~0.1 M parameters on SD's VAE (0.1 % of the decoder's
  49 M); the full-resolution convolutions cost about as much as the decoder's last up block.

The decoder stays frozen: its features are taken without gradient (``decode_with_features``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn


@dataclass(frozen=True)
class MattingHeadConfig:
    """The head's shape, stored in the metadata of its file.

    Args:
        feature_channels: channels of the decoder up blocks' outputs, coarse to fine (read off
            the VAE with :meth:`for_vae`).
        width: channels of the fused features.
        depth: 3x3 convolutions at full resolution after the fusion.
        key_colour: the backing colour, three floats in [0, 1], that the key prior is pulled off.
    """

    feature_channels: tuple[int, ...]
    width: int = 32
    depth: int = 2
    key_colour: tuple[float, float, float] = (0.0, 1.0, 0.0)

    @classmethod
    def for_vae(cls, vae: AutoencoderKL, **settings) -> MattingHeadConfig:
        channels = tuple(reversed(vae.config.block_out_channels))  # the decoder's up blocks, coarse to fine
        return cls(feature_channels=channels, **settings)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MattingHeadConfig:
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


class MattingHead(nn.Module):
    """Decoder features + decoded image -> alpha ``[B, 1, H, W]`` in [0, 1] (see the module docstring)."""

    def __init__(self, config: MattingHeadConfig) -> None:
        super().__init__()
        if config.width < 1 or config.depth < 0 or not config.feature_channels:
            raise ValueError(f"a matting head needs feature channels, width >= 1 and depth >= 0; got {config}")
        self.config = config
        self.projections = nn.ModuleList(nn.Conv2d(channels, config.width, 1) for channels in config.feature_channels)
        groups = next(g for g in (8, 4, 2, 1) if config.width % g == 0)
        layers: list[nn.Module] = []
        channels = config.width + 4  # fused features, the image, the key
        for _ in range(config.depth):
            layers += [nn.Conv2d(channels, config.width, 3, padding=1), nn.GroupNorm(groups, config.width), nn.SiLU()]
            channels = config.width
        self.refine = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor, key_alpha: torch.Tensor) -> torch.Tensor:
        """``features``: the decoder up blocks' outputs, coarse to fine; ``image``: the decode in
        [0, 1]; ``key_alpha``: the chroma key of ``image`` against ``config.key_colour`` (the prior;
        ``layerdiff.keying.head_matte`` passes it)."""
        if len(features) != len(self.projections):
            raise ValueError(f"the matting head takes {len(self.projections)} feature maps (its VAE's up blocks), "
                             f"got {len(features)}: was it built for another VAE?")
        size, dtype = image.shape[-2:], self.out.weight.dtype  # a half-precision VAE feeds a float32 head
        image, key_alpha = image.to(dtype), key_alpha.to(dtype)
        fused = sum(F.interpolate(projection(feature.to(dtype)), size=size, mode="bilinear", align_corners=False)
                    if feature.shape[-2:] != size else projection(feature.to(dtype))
                    for projection, feature in zip(self.projections, features))
        prior = torch.logit(key_alpha.clamp(1e-3, 1 - 1e-3))  # the key's 0 and 1 as finite logits
        hidden = self.refine(torch.cat([fused, image, key_alpha], dim=1))
        return torch.sigmoid(prior + self.out(hidden))


@torch.no_grad()
def decode_with_features(vae: AutoencoderKL, latent: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The frozen decoder's image in [0, 1] (clipped) and its up blocks' outputs, coarse to fine,
    from an unscaled VAE latent; no gradient flows into the decoder."""
    features: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _module, _inputs, output: features.append(output))
             for block in vae.decoder.up_blocks]
    try:
        image = (vae.decode(latent).sample * 0.5 + 0.5).clamp(0.0, 1.0)
    finally:
        for hook in hooks:
            hook.remove()
    return image, features
