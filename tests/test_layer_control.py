"""Layer-sharing units that read a condition image (layerdiff.models.control_encoder,
layerdiff.models.layer_sharing with control_channels): a new unit with control changes nothing,
the control enters each frame's rows as the released units add it (to the input before attention
and to the output), per sample, through gradient checkpointing; the encoder's feature maps have
the token counts of SD1.5's attention modules, at 64 px on the tiny SD1.5-layout UNet and at
512 px on the full-size one (meta device)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from layerdiff.models.base import SD15_UNET_CONFIG
from layerdiff.models.control_encoder import CONTROL_KWARG, ControlEncoder
from layerdiff.models.layer_sharing import add_layer_sharing, sharing_units
from support.unets import make_sd15_unet

LAYERS, SAMPLES = 2, 2
WIDTH = 8  # the control width where no encoder feeds the units (the released 256 where one does)
TINY_TOKENS = (64, 16, 4, 1)  # the tiny SD1.5-layout UNet's attention modules: 8 x 8 latents down to the mid block's 1 x 1


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return make_sd15_unet().state_dict()


def sharing_unet(base_state, control_channels: int | None, perturb_control: bool = True) -> UNet2DConditionModel:
    """Frame-mode units, their LoRAs and frame attention random (the same values with or without
    control), the control projections random too if ``perturb_control``."""
    unet = make_sd15_unet().eval()
    unet.load_state_dict(base_state)
    units = add_layer_sharing(unet, LAYERS, "frame", rank=4, control_channels=control_channels)
    shared, control = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    with torch.no_grad():
        for unit in units.values():
            for name, parameter in unit.named_parameters():
                is_control = name.startswith("control_convs.")
                if perturb_control or not is_control:
                    generator = control if is_control else shared
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet


def features(samples: int = SAMPLES, channels: int = WIDTH, seed: int = 3) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {tokens: torch.randn(samples, channels, int(tokens**0.5), int(tokens**0.5), generator=generator)
            for tokens in TINY_TOKENS}


def run(unet, control=None, rows: int = SAMPLES * LAYERS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(rows, 4, 8, 8, generator=generator)
    text = torch.randn(rows, 5, 16, generator=generator)
    kwargs = None if control is None else {CONTROL_KWARG: control}
    return unet(sample, 500, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample


def test_new_units_with_control_change_nothing(base_state):
    plain = sharing_unet(base_state, None)
    controlled = sharing_unet(base_state, ControlEncoder.channels, perturb_control=False)
    image = torch.rand(SAMPLES, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(run(controlled, ControlEncoder()(image)), run(plain))

    unit = sharing_units(controlled)["mid_block.attentions.0.transformer_blocks.0.attn2"]
    shapes = {name: tuple(tensor.shape) for name, tensor in unit.state_dict().items() if name.startswith("control_convs.")}
    assert shapes == {f"control_convs.{frame}.{part}": shape for frame in range(LAYERS) for part, shape in
                      (("0.weight", (256, 256, 3, 3)), ("0.bias", (256,)), ("2.weight", (16, 256, 1, 1)), ("2.bias", (16,)))}
    trainable = {name for name, parameter in controlled.named_parameters() if parameter.requires_grad}
    assert f"mid_block.attentions.0.transformer_blocks.0.attn2.processor.{next(iter(shapes))}" in trainable


def released_control(unit, given: dict[int, torch.Tensor], tokens: int) -> torch.Tensor:
    """The released unit's control, written out: frame f of sample b (row b * frames + f) gets
    conv1x1(SiLU(conv3x3(feature of sample b))) of frame f's convs, as [h * w, C] rows."""
    rows = []
    for sample in range(SAMPLES):
        for frame in range(LAYERS):
            first, _, last = unit.control_convs[frame]
            h = F.silu(F.conv2d(given[tokens][sample:sample + 1], first.weight, first.bias, padding=1))
            rows.append(F.conv2d(h, last.weight, last.bias)[0].flatten(1).T)
    return torch.stack(rows)


@pytest.mark.parametrize("module", ["down_blocks.1.attentions.0.transformer_blocks.0.attn1",
                                    "up_blocks.3.attentions.2.transformer_blocks.0.attn2"])
def test_control_enters_each_frame_as_the_released_units_add_it(base_state, module):
    """Unit with control on ``h`` = control + the same unit without control on ``h + control``."""
    unet = sharing_unet(base_state, WIDTH)
    attn, with_control = unet.get_submodule(module), sharing_units(unet)[module]
    without = sharing_units(sharing_unet(base_state, None))[module]  # same base, LoRAs and frame attention
    generator = torch.Generator().manual_seed(5)
    tokens = 16 if module.startswith("down_blocks.1") else 64
    hidden = torch.randn(SAMPLES * LAYERS, tokens, attn.to_q.in_features, generator=generator)
    text = torch.randn(SAMPLES * LAYERS, 5, 16, generator=generator) if module.endswith("attn2") else None
    given = features()
    with torch.no_grad():
        control = released_control(with_control, given, tokens)
        out = with_control(attn, hidden, text, control=given)
        torch.testing.assert_close(out, control + without(attn, hidden + control, text), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out, without(attn, hidden, text), atol=1e-3)  # the control does change it


def test_each_sample_reads_its_own_condition_and_one_serves_all(base_state):
    unet = sharing_unet(base_state, WIDTH)
    given = features()
    changed = {tokens: feature.clone() for tokens, feature in given.items()}
    for feature in changed.values():
        feature[1] += 1.0  # sample 1's condition
    with torch.no_grad():
        expected, out = run(unet, given), run(unet, changed)
        assert torch.equal(out[:LAYERS], expected[:LAYERS])  # sample 0's layers untouched
        assert not torch.allclose(out[LAYERS:], expected[LAYERS:], atol=1e-4)
        one = {tokens: feature[:1] for tokens, feature in given.items()}
        repeated = {tokens: feature.expand(SAMPLES, -1, -1, -1) for tokens, feature in one.items()}
        torch.testing.assert_close(run(unet, one), run(unet, repeated), rtol=0, atol=1e-6)


def test_features_reach_the_units_again_when_gradient_checkpointing_recomputes(base_state):
    gradients, calls = [], []
    for checkpointing in (False, True):
        unet = sharing_unet(base_state, WIDTH)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unit = sharing_units(unet)["mid_block.attentions.0.transformer_blocks.0.attn1"]
        calls.append(0)
        unit.register_forward_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        given = {tokens: feature.requires_grad_() for tokens, feature in features().items()}
        run(unet, given).square().mean().backward()
        gradients.append([given[64].grad, unit.control_convs[1][0].weight.grad])
    assert calls == [1, 2]  # checkpointing ran the unit again in backward, with the features
    assert gradients[0][0].abs().sum() > 0
    for plain, recomputed in zip(*gradients):
        torch.testing.assert_close(recomputed, plain, rtol=1e-4, atol=1e-7)


def test_encoder_feature_maps_for_a_64_px_image_fit_the_tiny_sd15_unet(base_state):
    encoder = ControlEncoder()
    maps = encoder(torch.rand(SAMPLES, 3, 64, 64) * 2 - 1)
    assert {tokens: tuple(feature.shape) for tokens, feature in maps.items()} == {
        tokens: (SAMPLES, 256, int(tokens**0.5), int(tokens**0.5)) for tokens in TINY_TOKENS}
    parameters = {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}
    assert parameters["blocks_0.0.weight"] == (32, 3, 3, 3) and parameters["blocks_0.14.weight"] == (256, 256, 3, 3)
    assert parameters["blocks_3.2.bias"] == (256,) and len(parameters) == 2 * (8 + 3 * 2)

    seen = set()
    unet = sharing_unet(base_state, encoder.channels)
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            module.register_forward_pre_hook(lambda module, args: seen.add(args[0].shape[1]))
    with torch.no_grad():
        run(unet, maps)  # every unit finds its feature map
    assert seen == set(maps)


def test_encoder_feature_maps_for_a_512_px_image_are_full_size_sd15s_token_counts():
    seen = set()
    with torch.device("meta"):  # shapes only: no memory
        encoder, unet = ControlEncoder(), UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
        add_layer_sharing(unet, LAYERS, "frame", 256, control_channels=encoder.channels)
        for name, module in unet.named_modules():
            if name.endswith(("attn1", "attn2")):
                module.register_forward_pre_hook(lambda module, args: seen.add(args[0].shape[1]))
        maps = encoder(torch.zeros(1, 3, 512, 512))
        out = unet(torch.zeros(LAYERS, 4, 64, 64), 500, encoder_hidden_states=torch.zeros(LAYERS, 77, 768),
                   cross_attention_kwargs={CONTROL_KWARG: maps}).sample
    assert {tokens: tuple(feature.shape) for tokens, feature in maps.items()} == {
        64 * 64: (1, 256, 64, 64), 32 * 32: (1, 256, 32, 32), 16 * 16: (1, 256, 16, 16), 8 * 8: (1, 256, 8, 8)}
    assert seen == set(maps) and out.shape == (LAYERS, 4, 64, 64)


def test_missing_or_misfit_control_is_named(base_state):
    controlled, plain = sharing_unet(base_state, WIDTH), sharing_unet(base_state, None)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"read a condition image: call the UNet with cross_attention_kwargs"):
            run(controlled)
        with pytest.raises(ValueError, match=r"to units without control: install them with .*control_channels"):
            run(plain, features())
        with pytest.raises(ValueError, match=r"no control feature map of 64 tokens \(the features have \[4, 16\]\)"):
            run(controlled, {tokens: feature for tokens, feature in features().items() if tokens in (4, 16)})
        with pytest.raises(ValueError, match="control features of 3 images for a batch of 2 samples of 2 layers"):
            run(controlled, features(samples=3))
    with pytest.raises(ValueError, match=r"RGB images \[B, 3, H, W\]"):
        ControlEncoder()(torch.zeros(1, 4, 64, 64))
