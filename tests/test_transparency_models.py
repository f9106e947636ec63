"""Transparency encoder/decoder behaviour and the released test-time augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerdiff.models.transparency import (
    LatentTransparencyEncoder,
    TransparencyDecoder,
    decode_with_augmentation,
    split_alpha_rgb,
)

TINY_WIDTHS = (8, 8, 16, 16, 32, 32, 32)


def tiny_decoder() -> TransparencyDecoder:
    torch.manual_seed(0)
    return TransparencyDecoder(block_out_channels=TINY_WIDTHS, layers_per_block=1, attention_head_dim=8, norm_num_groups=4)


def randomise(module: nn.Module) -> nn.Module:
    """Give zero-initialised layers weights, so every path of the network matters."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return module


def test_encoder_maps_alpha_and_rgb_to_a_latent_sized_offset_starting_at_zero():
    encoder = LatentTransparencyEncoder()
    alpha, rgb = torch.rand(2, 1, 64, 48), torch.rand(2, 3, 64, 48)
    offset = encoder(alpha, rgb)
    assert offset.shape == (2, 4, 8, 6)
    assert torch.count_nonzero(offset) == 0  # zero-initialised head: training starts from x_a = x


def test_encoder_feeds_alpha_first_and_applies_the_released_offset_scale():
    encoder = randomise(LatentTransparencyEncoder())
    alpha, rgb = torch.rand(1, 1, 16, 16), torch.rand(1, 3, 16, 16)
    expected = encoder.blocks(torch.cat([alpha, rgb], dim=1)) * 300.0
    torch.testing.assert_close(encoder(alpha, rgb), expected)


@pytest.mark.parametrize(
    ("alpha_shape", "rgb_shape"),
    [((1, 3, 16, 16), (1, 1, 16, 16)), ((1, 1, 20, 16), (1, 3, 20, 16))],
)
def test_encoder_rejects_swapped_channels_and_sizes_off_the_latent_grid(alpha_shape, rgb_shape):
    with pytest.raises(ValueError):
        LatentTransparencyEncoder()(torch.rand(alpha_shape), torch.rand(rgb_shape))


def test_decoder_outputs_four_unclipped_channels_and_passes_gradients():
    decoder = randomise(tiny_decoder())
    pixel = torch.rand(2, 3, 64, 128, requires_grad=True)
    latent = torch.randn(2, 4, 8, 16, requires_grad=True)
    output = decoder(pixel, latent)
    assert output.shape == (2, 4, 64, 128)
    assert output.min() < 0 or output.max() > 1  # raw output: clipping is for inference only
    output.square().mean().backward()
    assert pixel.grad.abs().sum() > 0 and latent.grad.abs().sum() > 0
    alpha, rgb = split_alpha_rgb(output)
    assert alpha.shape == (2, 1, 64, 128) and rgb.shape == (2, 3, 64, 128)


def test_decoder_latent_path_starts_closed():
    decoder = tiny_decoder()
    pixel = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(decoder(pixel, torch.randn(1, 4, 8, 8)), decoder(pixel, torch.randn(1, 4, 8, 8)))


def test_decoder_rejects_sizes_that_are_not_multiples_of_64():
    decoder = tiny_decoder()
    with pytest.raises(ValueError, match="multiples of 64"):
        decoder(torch.rand(1, 3, 96, 64), torch.rand(1, 4, 12, 8))
    with pytest.raises(ValueError, match="latent"):
        decoder(torch.rand(1, 3, 64, 64), torch.rand(1, 4, 16, 16))


def test_decoder_rejects_a_block_layout_other_than_the_released_one():
    with pytest.raises(ValueError, match="7 widths"):
        TransparencyDecoder(block_out_channels=(8, 16, 32))


def test_gradient_checkpointing_gives_the_same_gradients():
    decoder = randomise(tiny_decoder())
    pixel, latent = torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8)

    def gradients() -> list[torch.Tensor]:
        decoder.zero_grad()
        decoder(pixel, latent).square().mean().backward()
        return [parameter.grad.clone() for parameter in decoder.parameters()]

    plain = gradients()
    decoder.enable_gradient_checkpointing()
    resnet_calls = count_calls(decoder.down_blocks[0].resnets[0])
    checkpointed = gradients()
    assert len(resnet_calls) == 2  # forward, then recomputed in backward
    decoder.disable_gradient_checkpointing()
    for expected, actual in zip(plain, checkpointed):
        torch.testing.assert_close(actual, expected)


class PointwiseDecoder(nn.Module):
    """Per-pixel map of the pixel and the nearest latent cell: commutes with flips and rotations."""

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        latent_term = nn.functional.interpolate(latent[:, :1], scale_factor=8, mode="nearest")
        return torch.cat([pixel.mean(1, keepdim=True) + latent_term, pixel * 1.5 - 0.2], dim=1)


class OrientedDecoder(nn.Module):
    """A random 3x3 conv: its output depends on the image's orientation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.latent = nn.Conv2d(4, 4, kernel_size=1)

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return self.conv(pixel) + nn.functional.interpolate(self.latent(latent), scale_factor=8)


def count_calls(module: nn.Module) -> list[int]:
    # A pre-hook: checkpoint recomputation stops once it has what backward needs, before
    # forward hooks would run.
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_augmentation_of_an_equivariant_decoder_equals_the_plain_pass():
    decoder = PointwiseDecoder()
    pixel, latent = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    augmented = decode_with_augmentation(decoder, pixel, latent)
    torch.testing.assert_close(augmented, decoder(pixel, latent).clamp(0, 1))


@pytest.mark.parametrize(("height", "width", "passes"), [(32, 32, 1), (32, 48, 2)])
def test_augmentation_is_the_median_of_the_eight_inverted_variants(height, width, passes):
    decoder = OrientedDecoder()
    calls = count_calls(decoder)
    pixel = torch.rand(2, 3, height, width)
    latent = torch.randn(2, 4, height // 8, width // 8)

    augmented = decode_with_augmentation(decoder, pixel, latent)
    assert len(calls) == passes  # variants of one shape share one batched pass

    with torch.no_grad():
        variants = []
        for flip in (False, True):
            for turns in range(4):
                def augment(image: torch.Tensor, flip: bool = flip, turns: int = turns) -> torch.Tensor:
                    return (image.flip(3) if flip else image).rot90(turns, dims=(2, 3))

                output = decoder(augment(pixel), augment(latent)).clamp(0, 1).rot90(-turns, dims=(2, 3))
                variants.append(output.flip(3) if flip else output)
    expected = torch.stack(variants).median(dim=0).values
    assert augmented.shape == (2, 4, height, width)
    torch.testing.assert_close(augmented, expected)
    assert not torch.allclose(augmented, decoder(pixel, latent).clamp(0, 1))


def test_released_padding_blends_the_fill_into_semi_transparent_pixels_by_hand():
    from layerdiff.models.codec import encoder_input_rgb

    # One row, so the pyramid has one level: fill = sum(rgb * a) / sum(a) = (2/3, 0, 1/3).
    # The last pixel's colour (under alpha = 0) is whatever the shard padded it with: ignored.
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.5]]).T.reshape(1, 3, 1, 3)
    alpha = torch.tensor([1.0, 0.5, 0.0]).reshape(1, 1, 1, 3)
    released = encoder_input_rgb(rgb, alpha, "released")
    expected = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 0.0, 2 / 3], [2 / 3, 0.0, 1 / 3]]).T.reshape(1, 3, 1, 3)
    torch.testing.assert_close(released, expected)
    assert encoder_input_rgb(rgb, alpha, "straight") is rgb
    with pytest.raises(ValueError, match="input_convention"):
        LatentTransparencyEncoder(input_convention="premultiplied")
