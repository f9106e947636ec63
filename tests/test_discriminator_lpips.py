"""PatchGAN discriminator layout and the locally loaded LPIPS distance."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from layerdiff.models.discriminator import PatchDiscriminator
from layerdiff.models.lpips import LPIPS, TAP_CHANNELS, convert_lpips_weights

# -- discriminator -----------------------------------------------------------------------


def test_discriminator_matches_taming_nlayer_layout():
    discriminator = PatchDiscriminator(in_channels=4)
    shapes = {key: tuple(value.shape) for key, value in discriminator.state_dict().items()}
    # taming's NLayerDiscriminator(input_nc=4, ndf=64, n_layers=3): bias-free convs before BatchNorm.
    assert shapes["main.0.weight"] == (64, 4, 4, 4) and "main.0.bias" in shapes
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.3.running_mean"] == (128,)
    assert shapes["main.5.weight"] == (256, 128, 4, 4)
    assert shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and shapes["main.11.bias"] == (1,)
    strides = [layer.stride for layer in discriminator.main if isinstance(layer, torch.nn.Conv2d)]
    assert strides == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]


def test_discriminator_gives_patch_logits_for_each_norm_choice():
    image = torch.rand(2, 4, 64, 64) * 2 - 1
    for norm in ("batch", "group", "none"):
        discriminator = PatchDiscriminator(channels=8, layers=3, norm=norm)
        logits = discriminator(image)
        assert logits.shape == (2, 1, 6, 6)
        logits.mean().backward()
        assert discriminator.main[0].weight.grad is not None


def test_discriminator_uses_dcgan_initialisation():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator()
    assert discriminator.main[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    norm = discriminator.main[3]
    assert norm.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.count_nonzero(norm.bias) == 0


def test_discriminator_rejects_unknown_norm_and_bad_group_count():
    with pytest.raises(ValueError):
        PatchDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="norm_num_groups"):
        PatchDiscriminator(channels=8, norm="group", norm_num_groups=32)
    assert PatchDiscriminator(channels=8, norm="group").main[3].num_groups == 16


# -- LPIPS -----------------------------------------------------------------------------


def random_source_weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """State dicts shaped like torchvision's vgg16() and the lpips package's vgg.pth."""
    generator = torch.Generator().manual_seed(0)
    vgg = {}
    for key, tensor in LPIPS().state_dict().items():
        if key.startswith("features."):
            vgg[key] = torch.randn(tensor.shape, generator=generator) * 0.05
    vgg["classifier.0.weight"] = torch.zeros(4096, 10)  # dropped by the conversion
    # LPIPS lin weights are non-negative (clamped during its training): keep that property.
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for k, c in enumerate(TAP_CHANNELS)}
    return vgg, lin


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.safetensors"
    save_file(convert_lpips_weights(*random_source_weights()), path)
    return str(path)


def test_conversion_produces_our_layout():
    converted = convert_lpips_weights(*random_source_weights())
    expected = LPIPS().state_dict()
    assert set(converted) == set(expected)
    assert len([key for key in converted if key.endswith(".weight") and key.startswith("features.")]) == 13
    assert converted["lins.4.weight"].shape == (1, 512, 1, 1)
    assert "input_shift" not in converted  # constants live in code, not in the file


def test_conversion_names_what_is_missing():
    vgg, lin = random_source_weights()
    del lin["lin2.model.1.weight"]
    with pytest.raises(KeyError, match="lin2"):
        convert_lpips_weights(vgg, lin)
    vgg, lin = random_source_weights()
    del vgg["features.28.weight"]
    with pytest.raises(KeyError, match="features.28.weight"):
        convert_lpips_weights(vgg, lin)


def test_lpips_from_file_is_frozen_zero_on_identity_and_positive_otherwise(lpips_file):
    lpips = LPIPS.from_file(lpips_file)
    assert not any(parameter.requires_grad for parameter in lpips.parameters())
    assert not lpips.training
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    other = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(image, image).abs().max() == 0
    distance = lpips(image, other)
    assert distance.shape == (2, 1, 1, 1)
    assert (distance > 0).all()


def test_lpips_passes_gradients_to_its_input(lpips_file):
    lpips = LPIPS.from_file(lpips_file)
    image = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    lpips(image, torch.zeros(1, 3, 32, 32)).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_lpips_loads_torch_files_too(tmp_path, lpips_file):
    path = tmp_path / "lpips.pth"
    torch.save(LPIPS.from_file(lpips_file).state_dict(), path)
    torch.testing.assert_close(LPIPS.from_file(path).state_dict(), LPIPS.from_file(lpips_file).state_dict())


def test_missing_lpips_file_explains_how_to_make_one(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="convert_lpips_weights") as error:
        LPIPS.from_file(missing)
    assert str(missing) in str(error.value)


def test_lpips_rejects_non_rgb_input(lpips_file):
    with pytest.raises(ValueError, match="RGB"):
        LPIPS.from_file(lpips_file)(torch.rand(1, 4, 32, 32), torch.rand(1, 4, 32, 32))
