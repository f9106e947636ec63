"""DiffuMatting's matting head (sec. 3.5) and GreenPost: the matting losses by hand, the head on
the frozen decoder's features, its file, the refinement against the known backing colour, and the
head inside the module (its own terms, gradients and learning rate)."""

from __future__ import annotations

import json

import pytest
import torch

from layerdiff.keying import chroma_key_alpha, head_matte, refine_matte, unmixed_alpha
from layerdiff.losses import alpha_prediction_loss, composition_loss, gradient_loss
from layerdiff.models.matting_head import MattingHead, MattingHeadConfig, decode_with_features

GREEN = (0.0, 1.0, 0.0)


def disc_matte(size: int = 32, radius: float = 9.0, softness: float = 3.0) -> torch.Tensor:
    """A disc with a soft edge ``softness`` pixels wide: ``[1, 1, size, size]``."""
    rows, columns = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                                   indexing="ij")
    distance = ((rows - size / 2) ** 2 + (columns - size / 2) ** 2).sqrt()
    return ((radius + softness / 2 - distance) / softness).clamp(0.0, 1.0)[None, None]


def over_green(colour: tuple[float, float, float], alpha: torch.Tensor) -> torch.Tensor:
    foreground = torch.tensor(colour, dtype=alpha.dtype).reshape(1, 3, 1, 1)
    return alpha * foreground + (1 - alpha) * torch.tensor(GREEN, dtype=alpha.dtype).reshape(1, 3, 1, 1)


# -- the matting losses ------------------------------------------------------------------------


def test_the_alpha_prediction_loss_is_dims_smooth_l1():
    alpha = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])
    assert alpha_prediction_loss(alpha, alpha) == pytest.approx(1e-6)  # only eps at zero error
    assert alpha_prediction_loss(alpha + torch.tensor([[[[0.1, -0.3], [0.0, 0.0]]]]), alpha) == pytest.approx(
        (0.1 + 0.3 + 2e-6) / 4, abs=1e-7)


def test_the_composition_loss_weighs_an_alpha_error_by_the_colours_distance_from_the_backing():
    alpha = torch.full((1, 1, 2, 2), 0.5)
    backing = torch.tensor(GREEN).reshape(1, 3, 1, 1)
    red, leaf = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1), torch.tensor([0.0, 0.9, 0.0]).reshape(1, 3, 1, 1)
    for foreground, distance in ((red, (1.0, 1.0, 0.0)), (leaf, (0.0, 0.1, 0.0))):
        image = alpha * foreground + (1 - alpha) * backing
        assert composition_loss(alpha, foreground, backing, image) == pytest.approx(1e-6)
        # alpha off by 0.2 moves each channel by 0.2 x |F - B| in that channel
        assert composition_loss(alpha + 0.2, foreground, backing, image) == pytest.approx(
            sum(0.2 * value for value in distance) / 3, abs=1e-5)


def test_the_gradient_loss_sees_edges_not_offsets():
    ramp = torch.arange(5.0).repeat(5, 1)[None, None] * 0.1  # slope 0.1 along x
    assert gradient_loss(ramp + 0.3, ramp) == pytest.approx(0.0, abs=1e-6)
    # Sobel x of the ramp: 8 x 0.1 inside and 4 x 0.1 at the replicated edge columns; y is 0
    assert gradient_loss(ramp, torch.zeros_like(ramp)) == pytest.approx(0.5 * (3 * 0.8 + 2 * 0.4) / 5)


# -- the head on the decoder -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae(tiny_sdxl):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sdxl / "vae").eval()


def test_the_decoder_features_are_its_up_blocks_and_its_image_the_plain_decode(vae):
    latent = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    image, features = decode_with_features(vae, latent)
    config = MattingHeadConfig.for_vae(vae)
    assert [feature.shape[1] for feature in features] == list(config.feature_channels)
    assert features[-1].shape[-2:] == image.shape[-2:] == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(image, (vae.decode(latent).sample * 0.5 + 0.5).clamp(0, 1))
    assert not any(block._forward_hooks for block in vae.decoder.up_blocks)  # the hooks are gone


def test_an_untrained_head_is_the_chroma_key_and_training_it_beats_the_key_where_the_key_fails(vae):
    torch.manual_seed(0)
    head = MattingHead(MattingHeadConfig.for_vae(vae, width=16, depth=1))
    # A greenish object: the difference key reads it as partly transparent everywhere.
    alpha = disc_matte().float()
    composite = over_green((0.3, 0.6, 0.2), alpha)
    latent = vae.encode(composite * 2 - 1).latent_dist.mean.detach()
    image, features = decode_with_features(vae, latent)
    key = chroma_key_alpha(image)
    with torch.no_grad():
        torch.testing.assert_close(head_matte(head, image, features), key.clamp(1e-3, 1 - 1e-3), atol=1e-6, rtol=0)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(150):
        loss = alpha_prediction_loss(head_matte(head, image, features), alpha) + gradient_loss(
            head_matte(head, image, features), alpha)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        head_error = (head_matte(head, image, features) - alpha).square().mean()
    key_error = (key - alpha).square().mean()
    assert head_error < 0.25 * key_error, (head_error, key_error)


def test_the_head_file_round_trips_with_its_shape_in_the_metadata(vae, tmp_path):
    from safetensors.torch import save_file

    from layerdiff.formats.matting_head import load_matting_head, save_matting_head
    from layerdiff.formats.provenance import read_metadata

    head = MattingHead(MattingHeadConfig.for_vae(vae, width=8, depth=1, key_colour=(0.0, 0.0, 1.0)))
    torch.nn.init.normal_(head.out.weight)
    path = save_matting_head(head, tmp_path / "export", {"lr": 1e-3})
    assert path.name == "matting_head.safetensors"
    metadata = read_metadata(path)
    assert json.loads(metadata["matting_head_config"])["key_colour"] == [0.0, 0.0, 1.0]
    assert json.loads(metadata["layerdiff_config"]) == {"lr": 1e-3}
    loaded = load_matting_head(path, vae)
    assert loaded.config == head.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), head.state_dict().values()))

    other = MattingHead(MattingHeadConfig(feature_channels=(512, 512, 256, 128)))
    save_matting_head(other, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match=r"\[512, 512, 256, 128\] channels.*trained on another VAE"):
        load_matting_head(tmp_path / "sd.safetensors", vae)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "stranger.safetensors"))
    with pytest.raises(ValueError, match="not a layerdiff matting head"):
        load_matting_head(tmp_path / "stranger.safetensors")


# -- GreenPost: refining against the known backing ---------------------------------------------


def test_unmixing_against_the_key_recovers_alpha_given_the_foreground_colour():
    alpha = disc_matte()
    composite = over_green((0.9, 0.3, 0.5), alpha)
    foreground = torch.tensor([0.9, 0.3, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1).expand_as(composite)
    torch.testing.assert_close(unmixed_alpha(composite, foreground), alpha)


def test_refinement_sharpens_a_blurred_matte_and_decontaminates_the_edge_colour():
    truth = disc_matte(softness=2.0)
    composite = over_green((0.9, 0.3, 0.5), truth)
    blurred = torch.nn.functional.avg_pool2d(truth, 5, stride=1, padding=2, count_include_pad=False)
    refined, foreground = refine_matte(composite, blurred)
    band = (truth > 0.05) & (truth < 0.95)
    before, after = (blurred - truth).abs()[band].mean(), (refined - truth).abs()[band].mean()
    assert after < 0.01 * before, (before, after)  # a flat colour is recovered exactly from the core
    edge = band.expand_as(foreground)
    red = torch.tensor([0.9, 0.3, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1).expand_as(foreground)
    assert (foreground - red).abs()[edge].mean() < 0.01 * (composite - red).abs()[edge].mean()


def test_refinement_barely_moves_the_matte_of_an_object_as_green_as_the_backing():
    matte = disc_matte()
    composite = over_green((0.0, 0.97, 0.02), matte)  # 0.036 from the key: unmixing is trusted 0.036 / 0.3
    guess = matte * 0.8
    refined, _ = refine_matte(composite, guess)
    assert (refined - guess).abs().max() < 0.15 * 0.2 + 1e-3  # at most that share of the 0.2 it could gain


def test_refinement_reads_the_backing_as_the_image_shows_it_not_the_nominal_key():
    truth = disc_matte(softness=2.0)
    shifted = torch.tensor([0.06, 0.9, 0.1], dtype=torch.float64).reshape(1, 3, 1, 1)  # a decoder's off-green screen
    red = torch.tensor([0.9, 0.3, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1)
    composite = truth * red + (1 - truth) * shifted
    blurred = torch.nn.functional.avg_pool2d(truth, 5, stride=1, padding=2, count_include_pad=False)
    refined, _ = refine_matte(composite, blurred, GREEN)
    band = (truth > 0.05) & (truth < 0.95)
    assert (refined - truth).abs()[band].mean() < 0.01 * (blurred - truth).abs()[band].mean()
    # against the nominal key instead, the same edge is mis-read by tens of percent
    nominal = unmixed_alpha(composite, red.expand_as(composite), GREEN)
    assert (nominal - truth).abs()[band].mean() > 0.02
