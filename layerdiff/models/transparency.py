"""Latent transparency encoder ``E`` and decoder ``D`` (LayerDiffusion arXiv:2402.17113 sec. 3.1).

Both follow the released LayerDiffuse modules module-for-module, so that their state dicts
*are* the released ``vae_transparent_encoder.safetensors`` / ``vae_transparent_decoder.safetensors``
layouts (``LatentTransparencyOffsetEncoder`` and ``UNet1024`` in the released
``lib_layerdiffuse/vae.py``). Load and save those files with ``layerdiff.formats.layerdiffuse_vae``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerdiff.compat import set_gradient_checkpointing

LATENT_CHANNELS = 4
LATENT_DOWNSCALE = 8
RELEASED_DECODER_WIDTHS = (32, 32, 64, 128, 256, 512, 512)
_DOWN_BLOCK_TYPES = ("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3
_UP_BLOCK_TYPES = ("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4
# The colour the encoder sees: "straight" (ours: the visible colour unchanged where alpha > 0) or
# "released" (the released ``pad_rgb``: colour * alpha + fill * (1 - alpha) there).
InputConvention = Literal["straight", "released"]
# down_blocks[3] is the first block working at H/8, the latent's resolution.
_LATENT_INJECTION_BLOCK = 3


class LatentTransparencyEncoder(nn.Module):
    """``E``: alpha and padded colour to the latent offset that hides transparency in the latent.

    Layout of the released ``vae_transparent_encoder.safetensors``: nine 3x3 convolutions with
    SiLU between them, three of them stride 2, the last zero-initialised so training starts
    from the unmodified latent.

    The released ``TransparentVAEEncoder`` multiplies the network's output by 300 ("similar to
    LoRA's alpha", so the zero-initialised head does not start out too small) and uses the
    product as the Gaussian sample noise: ``x_a = mean + std * offset``. ``forward`` includes that
    factor (the exports fold it into the last convolution for consumers that do not apply it).

    ``input_convention`` is the padded colour the weights expect (:data:`InputConvention`);
    ``layerdiff.models.codec.encoder_input_rgb`` converts our straight-colour shards to it. It is
    set by whoever loads weights (the released files: ``"released"``) and written into exports.
    """

    offset_scale = 300.0

    def __init__(self, input_convention: InputConvention = "straight") -> None:
        super().__init__()
        if input_convention not in get_args(InputConvention):
            raise ValueError(f"input_convention must be one of {get_args(InputConvention)}, got {input_convention!r}")
        self.input_convention: InputConvention = input_convention
        widths = (32, 32, 64, 64, 128, 128, 256, 256)
        strides = (1, 1, 2, 1, 2, 1, 2, 1)
        layers: list[nn.Module] = []
        in_channels = 4
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, stride=stride, padding=1), nn.SiLU()]
            in_channels = width
        head = nn.Conv2d(in_channels, LATENT_CHANNELS, kernel_size=3, padding=1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.blocks = nn.Sequential(*layers, head)

    def forward(self, alpha: torch.Tensor, padded_rgb: torch.Tensor) -> torch.Tensor:
        """Latent offset ``[B, 4, H/8, W/8]`` from ``alpha [B,1,H,W]`` and ``padded_rgb [B,3,H,W]``.

        Both inputs are in [0, 1]; the network sees ``cat([alpha, padded_rgb])`` in that order
        and range, as the released ``TransparentVAEEncoder.forward`` feeds it.
        """
        if alpha.shape[1] != 1 or padded_rgb.shape[1] != 3:
            raise ValueError(
                f"expected alpha [B,1,H,W] and padded_rgb [B,3,H,W], got {tuple(alpha.shape)} and "
                f"{tuple(padded_rgb.shape)}"
            )
        height, width = alpha.shape[-2:]
        if height % LATENT_DOWNSCALE or width % LATENT_DOWNSCALE:
            raise ValueError(f"image size {height}x{width} must be a multiple of {LATENT_DOWNSCALE}")
        return self.blocks(torch.cat([alpha, padded_rgb], dim=1)) * self.offset_scale


class TransparencyDecoder(nn.Module):
    """``D``: the released "UNet1024": frozen VAE decode plus latent to ``[alpha, r, g, b]``.

    A diffusers-block UNet without time embedding: ``conv_in`` (3 -> widths[0]); four
    ``DownBlock2D`` then three ``AttnDownBlock2D``; a ``UNetMidBlock2D`` with attention; three
    ``AttnUpBlock2D`` then four ``UpBlock2D`` (``layers_per_block + 1`` resnets each);
    ``conv_norm_out``, SiLU, ``conv_out`` (widths[0] -> 4). The latent enters through a
    zero-initialised 1x1 ``latent_conv_in`` added to the features entering ``down_blocks[3]``.
    The defaults give the released file: 104,104,804 parameters in 538 tensors.

    Only widths, depth, head size and group count are configurable; the seven-block shape
    (and with it the H/8 latent injection and the multiple-of-64 input size) is fixed.
    """

    def __init__(
        self,
        block_out_channels: Sequence[int] = RELEASED_DECODER_WIDTHS,
        layers_per_block: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 4,
    ) -> None:
        super().__init__()
        widths = tuple(block_out_channels)
        if len(widths) != len(_DOWN_BLOCK_TYPES):
            raise ValueError(
                f"block_out_channels needs {len(_DOWN_BLOCK_TYPES)} widths (the released decoder's "
                f"block layout), got {len(widths)}: {widths}"
            )
        # The constructor arguments, for exports to record next to the weights.
        self.config = {
            "block_out_channels": list(widths),
            "layers_per_block": layers_per_block,
            "attention_head_dim": attention_head_dim,
            "norm_num_groups": norm_num_groups,
        }
        self.size_multiple = 2 ** (len(widths) - 1)
        norm_eps = 1e-5

        self.conv_in = nn.Conv2d(3, widths[0], kernel_size=3, padding=1)
        self.latent_conv_in = nn.Conv2d(LATENT_CHANNELS, widths[_LATENT_INJECTION_BLOCK - 1], kernel_size=1)
        nn.init.zeros_(self.latent_conv_in.weight)
        nn.init.zeros_(self.latent_conv_in.bias)

        self.down_blocks = nn.ModuleList()
        in_channels = widths[0]
        for index, block_type in enumerate(_DOWN_BLOCK_TYPES):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=in_channels,
                    out_channels=widths[index],
                    temb_channels=None,
                    add_downsample=index < len(widths) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    downsample_padding=1,
                    downsample_type="conv",
                )
            )
            in_channels = widths[index]

        self.mid_block = UNetMidBlock2D(
            in_channels=widths[-1],
            temb_channels=None,
            resnet_eps=norm_eps,
            resnet_act_fn="silu",
            attention_head_dim=attention_head_dim,
            resnet_groups=norm_num_groups,
            attn_groups=None,
            add_attention=True,
        )

        self.up_blocks = nn.ModuleList()
        reversed_widths = widths[::-1]
        previous_channels = reversed_widths[0]
        for index, block_type in enumerate(_UP_BLOCK_TYPES):
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=reversed_widths[min(index + 1, len(widths) - 1)],
                    out_channels=reversed_widths[index],
                    prev_output_channel=previous_channels,
                    temb_channels=None,
                    add_upsample=index < len(widths) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    upsample_type="conv",
                )
            )
            previous_channels = reversed_widths[index]

        self.conv_norm_out = nn.GroupNorm(num_groups=norm_num_groups, num_channels=widths[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(widths[0], 4, kernel_size=3, padding=1)

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Raw ``[B, 4, H, W]`` output ``[alpha, r, g, b]`` (unclipped, so training gets gradients).

        ``pixel`` is the frozen VAE's decode mapped to [0, 1], ``[B, 3, H, W]``; ``latent`` is the
        *unscaled* latent it was decoded from (no ``scaling_factor``), ``[B, 4, H/8, W/8]``.
        """
        height, width = pixel.shape[-2:]
        if pixel.shape[1] != 3 or height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"pixel must be [B, 3, H, W] with H and W multiples of {self.size_multiple}, got "
                f"{tuple(pixel.shape)}; crop or pad images (and their latents) to a multiple of "
                f"{self.size_multiple} first"
            )
        expected_latent = (LATENT_CHANNELS, height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE)
        if tuple(latent.shape[1:]) != expected_latent:
            raise ValueError(f"latent must be [B, *{expected_latent}] for this pixel size, got {tuple(latent.shape)}")

        features = self.conv_in(pixel)
        skips = [features]
        for index, block in enumerate(self.down_blocks):
            if index == _LATENT_INJECTION_BLOCK:
                features = features + self.latent_conv_in(latent)
            features, block_skips = block(hidden_states=features, temb=None)
            skips.extend(block_skips)

        features = self.mid_block(features, None)

        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            features = block(features, tuple(block_skips), None)

        return self.conv_out(F.silu(self.conv_norm_out(features)))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute resnet activations in backward (the diffusers blocks' own mechanism)."""
        self._set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_gradient_checkpointing(False)

    def _set_gradient_checkpointing(self, enabled: bool) -> None:
        # diffusers blocks read these two attributes; ModelMixin normally sets them, and we
        # stay a plain nn.Module so that sharding and state dicts see nothing extra.
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                set_gradient_checkpointing(module, enabled, functools.partial(checkpoint, use_reentrant=False))


def split_alpha_rgb(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the decoder's ``[alpha, r, g, b]`` output into ``alpha [B,1,H,W]`` and ``rgb [B,3,H,W]``."""
    return output[:, :1], output[:, 1:]


# (horizontal flip, quarter turns): the released ``estimate_augmented`` variant list, in its order.
_AUGMENTATIONS = tuple((flip, turns) for flip in (False, True) for turns in range(4))


def _augment(image: torch.Tensor, flip: bool, turns: int) -> torch.Tensor:
    if flip:
        image = image.flip(3)
    return image.rot90(turns, dims=(2, 3))


def _unaugment(image: torch.Tensor, flip: bool, turns: int) -> torch.Tensor:
    image = image.rot90(-turns, dims=(2, 3))
    return image.flip(3) if flip else image


@torch.no_grad()
def decode_with_augmentation(decoder: nn.Module, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Test-time augmented decode, as the released ``TransparentVAEDecoder.estimate_augmented``.

    The eight variants {no flip, horizontal flip} x {0, 1, 2, 3 quarter turns} of ``pixel`` and
    ``latent`` are decoded, each output is clipped to [0, 1] and turned back, and the result is
    the element-wise median over the eight (``torch.median``: the lower of the two middle values).

    Unlike the released loop of eight passes, variants of equal shape share one batched forward
    pass: one for square images, two for non-square ones (odd quarter turns swap H and W). The
    batch is 8x (or 4x) the input's, so pass small batches at high resolution.
    """
    height, width = pixel.shape[-2:]
    if height == width:
        batches = [_AUGMENTATIONS]
    else:
        batches = [tuple(variant for variant in _AUGMENTATIONS if variant[1] % 2 == odd) for odd in (0, 1)]

    restored: dict[tuple[bool, int], torch.Tensor] = {}
    for variants in batches:
        outputs = decoder(
            torch.cat([_augment(pixel, *variant) for variant in variants]),
            torch.cat([_augment(latent, *variant) for variant in variants]),
        ).clamp(0.0, 1.0)
        for variant, output in zip(variants, outputs.chunk(len(variants))):
            restored[variant] = _unaugment(output, *variant)

    return torch.stack([restored[variant] for variant in _AUGMENTATIONS]).median(dim=0).values
