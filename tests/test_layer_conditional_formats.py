"""The released SD1.5 conditional attention-sharing files (layerdiff.formats.layer_conditional):
every key and shape against the released construction rules on the full-size UNet, a round
trip with random weights on the tiny SD1.5-layout UNet, frames renamed, and wrong files refused
by name."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from layerdiff.formats.layer_conditional import (
    METADATA_KEY,
    RELEASED_CONDITIONAL,
    load_released_conditional,
    released_conditional_state,
    save_released_conditional,
)
from layerdiff.formats.layer_sharing import load_released_joint, save_released_joint
from layerdiff.formats.provenance import read_metadata
from layerdiff.models.base import SD15_UNET_CONFIG
from layerdiff.models.control_encoder import CONTROL_KWARG, ControlEncoder
from layerdiff.models.layer_sharing import add_layer_sharing, sharing_units
from support.contracts import assert_identical
from support.unets import make_sd15_unet

RANK, ALPHA = 4, 8  # scale 2: the file must fold it into the up factors
FRAMES, SAMPLES = 2, 2
FG2BG = RELEASED_CONDITIONAL["fg2bg"].filename
# The released module_mapping_sd15 in index order (SD1.5's transformer blocks, ldm numbering) and their widths.
RELEASED_BLOCKS = [*(f"input_blocks.{b}.1" for b in (1, 2, 4, 5, 7, 8)), *(f"output_blocks.{b}.1" for b in range(3, 12)),
                   "middle_block.1"]
SD15_WIDTHS = {**dict.fromkeys(["input_blocks.1.1", "input_blocks.2.1", *(f"output_blocks.{b}.1" for b in (9, 10, 11))], 320),
               **dict.fromkeys(["input_blocks.4.1", "input_blocks.5.1", *(f"output_blocks.{b}.1" for b in (6, 7, 8))], 640),
               **dict.fromkeys(["input_blocks.7.1", "input_blocks.8.1", *(f"output_blocks.{b}.1" for b in (3, 4, 5)),
                                "middle_block.1"], 1280)}
# AdditionalAttentionCondsEncoder: (in, out) of each 3x3 conv, at Sequential indices 0, 2, 4, ... (SiLU between).
RELEASED_ENCODER = {"blocks_0": [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)],
                    **{f"blocks_{b}": [(256, 256), (256, 256)] for b in (1, 2, 3)}}


def released_conditional_shapes() -> dict[str, tuple[int, ...]]:
    """AttentionSharingPatcher(unet, frames=2, use_control=True).state_dict()'s shapes, by its rules."""
    expected = {}
    for index, block in enumerate(RELEASED_BLOCKS):
        hidden = SD15_WIDTHS[block]
        for attn, context in (("attn1", hidden), ("attn2", 768)):  # attn2 attends to CLIP ViT-L/14's text
            prefix = f"hookers.layers.{2 * index + (attn == 'attn2')}."
            for projection, width in {"to_q": hidden, "to_k": context, "to_v": context, "to_out": hidden}.items():
                for frame in range(FRAMES):
                    expected[f"{prefix}{projection}_lora.{frame}.down.weight"] = (256, width)
                    expected[f"{prefix}{projection}_lora.{frame}.up.weight"] = (hidden, 256)
            for part in "iqkvo":
                expected[f"{prefix}temporal_{part}.weight"] = (hidden, hidden)
                expected[f"{prefix}temporal_{part}.bias"] = (hidden,)
            expected[f"{prefix}temporal_n.weight"] = expected[f"{prefix}temporal_n.bias"] = (hidden,)
            for frame in range(FRAMES):  # Conv2d(256, 256, 3), SiLU, Conv2d(256, hidden_size, 1)
                expected[f"{prefix}control_convs.{frame}.0.weight"] = (256, 256, 3, 3)
                expected[f"{prefix}control_convs.{frame}.0.bias"] = (256,)
                expected[f"{prefix}control_convs.{frame}.2.weight"] = (hidden, 256, 1, 1)
                expected[f"{prefix}control_convs.{frame}.2.bias"] = (hidden,)
    for block, convs in RELEASED_ENCODER.items():
        for number, (in_channels, out_channels) in enumerate(convs):
            expected[f"kwargs_encoder.{block}.{2 * number}.weight"] = (out_channels, in_channels, 3, 3)
            expected[f"kwargs_encoder.{block}.{2 * number}.bias"] = (out_channels,)
    return expected


def test_full_size_sd15_export_has_the_released_keys_and_shapes():
    with torch.device("meta"):  # shapes only: no memory
        unet, encoder = UNet2DConditionModel.from_config(SD15_UNET_CONFIG), ControlEncoder()
        add_layer_sharing(unet, FRAMES, "frame", 256, control_channels=encoder.channels)
    state = released_conditional_state(unet, encoder, "fg2bg")
    expected = released_conditional_shapes()
    assert len(expected) == 32 * (4 * FRAMES * 2 + 5 * 2 + 2 + FRAMES * 4) + 2 * (8 + 3 * 2)
    assert {key: tuple(tensor.shape) for key, tensor in state.items()} == expected


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return make_sd15_unet().state_dict()


def conditional_unet(base_state, layers: int = FRAMES, seed: int | None = 1, control: bool = True, rank: int = RANK):
    """The tiny SD1.5-layout UNet with units reading a ControlEncoder, and the encoder; ``seed``:
    every unit and encoder parameter random, as if trained."""
    unet = make_sd15_unet().eval()
    unet.load_state_dict(base_state)
    encoder = ControlEncoder()
    units = add_layer_sharing(unet, layers, "frame", rank, ALPHA, control_channels=encoder.channels if control else None)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in [*(p for unit in units.values() for p in unit.parameters()), *encoder.parameters()]:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return unet, encoder


def output(unet: UNet2DConditionModel, encoder: ControlEncoder) -> torch.Tensor:
    """The prediction for fixed noise, prompts and condition images of SAMPLES samples."""
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(SAMPLES * FRAMES, 4, 8, 8, generator=generator)
    text = torch.randn(SAMPLES * FRAMES, 5, 16, generator=generator)
    condition = torch.rand(SAMPLES, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text, cross_attention_kwargs={CONTROL_KWARG: encoder(condition)}).sample


def trained_state(unet: UNet2DConditionModel, encoder: ControlEncoder) -> dict[str, torch.Tensor]:
    return {**{f"unet.{key}": value for key, value in unet.state_dict().items() if ".processor." in key},
            **{f"encoder.{key}": value for key, value in encoder.state_dict().items()}}


def test_round_trip_gives_identical_tensors_and_outputs(base_state, tmp_path):
    unet, encoder = conditional_unet(base_state)
    path = save_released_conditional(tmp_path / FG2BG, unet, encoder, "fg2bg", metadata={"lora_alpha": ALPHA})
    written = load_file(path)
    unit = sharing_units(unet)["mid_block.attentions.0.transformer_blocks.0.attn1"]  # released index 30
    assert torch.equal(written["hookers.layers.30.control_convs.1.2.weight"], unit.control_convs[1][2].weight.detach())
    assert torch.equal(written["hookers.layers.30.to_k_lora.0.up.weight"], unit.to_k_lora[0].up.weight.detach() * ALPHA / RANK)
    assert torch.equal(written["kwargs_encoder.blocks_2.2.bias"], encoder.blocks_2[2].bias.detach())
    assert json.loads(read_metadata(path)[METADATA_KEY]) == {
        "task": "fg2bg", "filename": FG2BG, "frames": ["background", "blend"], "condition": "foreground"}

    fresh, fresh_encoder = conditional_unet(base_state, seed=None)
    load_released_conditional(fresh, fresh_encoder, path, "fg2bg")
    assert_identical(trained_state(fresh, fresh_encoder), trained_state(unet, encoder), "units and encoder")
    assert torch.equal(output(fresh, fresh_encoder), output(unet, encoder))


def test_frames_follow_the_layer_names(base_state):
    unet, encoder = conditional_unet(base_state)
    state = released_conditional_state(unet, encoder, "bg2fg", ["blend", "foreground"])
    unit = sharing_units(unet)["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]  # released index 1
    assert torch.equal(state["hookers.layers.1.control_convs.0.0.weight"], unit.control_convs[1][0].weight.detach())
    assert torch.equal(state["hookers.layers.1.to_v_lora.1.down.weight"], unit.to_v_lora[0].down.weight.detach())
    fresh, fresh_encoder = conditional_unet(base_state, seed=None)
    load_released_conditional(fresh, fresh_encoder, state, "bg2fg", ["blend", "foreground"])
    assert torch.equal(output(fresh, fresh_encoder), output(unet, encoder))
    with pytest.raises(ValueError, match=r"the bg2fg frames are \('foreground', 'blend'\); the layers are \['background'"):
        released_conditional_state(unet, encoder, "bg2fg", ["background", "blend"])


def test_wrong_files_are_refused_by_name(base_state, tmp_path):
    joint_unet = conditional_unet(base_state, layers=3, control=False)[0]
    joint = save_released_joint(tmp_path / "layer_sd15_joint.safetensors", joint_unet)
    unet, encoder = conditional_unet(base_state, seed=None)
    with pytest.raises(ValueError, match=r"layer_sd15_joint\.safetensors holds no control encoder \(kwargs_encoder\.\*\): "
                                         r"it is not a conditional .* \(3 frames without control: the joint model"):
        load_released_conditional(unet, encoder, joint, "fg2bg")
    with pytest.raises(ValueError, match="the released joint layout has no control inputs"):
        load_released_joint(unet, joint)

    state = released_conditional_state(*conditional_unet(base_state), "fg2bg")
    three_frames = {**state, **{key.replace("_lora.1.", "_lora.2.").replace("control_convs.1.", "control_convs.2."):
                                value.clone() for key, value in state.items() if "_lora.1." in key or "control_convs.1." in key}}
    save_file(three_frames, tmp_path / "three.safetensors")
    with pytest.raises(ValueError, match=r"three\.safetensors holds 3 frames; the conditional files hold 2"):
        load_released_conditional(unet, encoder, tmp_path / "three.safetensors", "fg2bg")

    save_file(state, tmp_path / FG2BG)  # as released: no metadata, the name says the task
    save_released_conditional(tmp_path / "ours.safetensors", *conditional_unet(base_state), "fg2bg")
    for path in (tmp_path / FG2BG, tmp_path / "ours.safetensors"):
        with pytest.raises(ValueError, match=rf"{path.name} is the fg2bg model .*load it with task='fg2bg'"):
            load_released_conditional(unet, encoder, path, "bg2fg")

    with pytest.raises(ValueError, match=r"these units have no control inputs: .* layer_sd15_joint\.safetensors"):
        released_conditional_state(joint_unet, encoder, "fg2bg")
    with pytest.raises(ValueError, match="the conditional files hold 2 frames .*these units denoise 3 layers"):
        released_conditional_state(conditional_unet(base_state, layers=3, seed=None)[0], encoder, "fg2bg")
    with pytest.raises(ValueError, match=r"rank-4 LoRAs; the units are rank 8"):
        load_released_conditional(conditional_unet(base_state, seed=None, rank=8)[0], encoder, state, "fg2bg")
    with pytest.raises(ValueError, match=r"released conditional models are \['bg2fg', 'fg2bg'\]; got task 'fg2fg'"):
        released_conditional_state(unet, encoder, "fg2fg")


def test_loading_is_strict_and_names_file_key_and_shapes(base_state, tmp_path):
    state = released_conditional_state(*conditional_unet(base_state), "fg2bg")
    unet, encoder = conditional_unet(base_state, seed=None)
    before = {key: value.clone() for key, value in trained_state(unet, encoder).items()}
    missing = {key: value for key, value in state.items() if key != "kwargs_encoder.blocks_2.0.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing\.safetensors .*1 keys missing \['kwargs_encoder\.blocks_2\.0\.bias'\]"):
        load_released_conditional(unet, encoder, tmp_path / "missing.safetensors", "fg2bg")
    reshaped = {**state, "hookers.layers.5.control_convs.0.2.weight": torch.zeros(3, 256, 1, 1)}
    save_file(reshaped, tmp_path / "reshaped.safetensors")
    with pytest.raises(ValueError, match=r"reshaped\.safetensors .*1 of another shape \['hookers\.layers\.5\.control_convs"
                                         r"\.0\.2\.weight \(3, 256, 1, 1\) \(units: \(8, 256, 1, 1\)\)'\]"):
        load_released_conditional(unet, encoder, tmp_path / "reshaped.safetensors", "fg2bg")
    with pytest.raises(ValueError, match=r"1 unexpected \['kwargs_encoder\.blocks_4\.0\.bias'\]"):
        load_released_conditional(unet, encoder, {**state, "kwargs_encoder.blocks_4.0.bias": torch.zeros(256)}, "fg2bg")
    assert_identical(trained_state(unet, encoder), before, "units and encoder after refused loads")  # nothing half-loaded
