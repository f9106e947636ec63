"""The ``::diff::`` UNet offsets of LayerDiffusion's conditional SDXL files (Fig. 4): the keys
an export can write are the released original-UNet layout (derived here from the architecture,
not from the mapping under test), and a trained UNet exported against its base and applied to
a fresh base is the trained UNet again."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from layerdiff.formats.lora import LoraFactors, fuse_lora
from layerdiff.formats.provenance import read_metadata
from layerdiff.formats.unet_delta import (
    RELEASED_CONDITIONAL_FILES,
    apply_unet_delta,
    conditional_variant,
    delta_keys,
    read_unet_delta,
    save_unet_delta,
)
from layerdiff.formats.unet_names import ldm_parameter_names
from layerdiff.models.base import SD15_UNET_CONFIG, SDXL_UNET_CONFIG
from layerdiff.models.conv_in import grow_conv_in
from layerdiff.models.lora import RELEASED_LORA_TARGETS
from layerdiff.models.tiny import make_unet

Shapes = dict[str, tuple[int, ...]]

# -- the original UNet's layout (openaimodel.UNetModel), from its construction rules -------------


def group_norm(prefix: str, channels: int) -> Shapes:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}


def layer(prefix: str, shape: tuple[int, ...], bias: bool = True) -> Shapes:
    return {f"{prefix}.weight": shape, **({f"{prefix}.bias": shape[:1]} if bias else {})}


def res_block(prefix: str, channels: int, out: int, embedding: int) -> Shapes:
    shapes = {
        **group_norm(f"{prefix}.in_layers.0", channels),
        **layer(f"{prefix}.in_layers.2", (out, channels, 3, 3)),
        **layer(f"{prefix}.emb_layers.1", (out, embedding)),
        **group_norm(f"{prefix}.out_layers.0", out),
        **layer(f"{prefix}.out_layers.3", (out, out, 3, 3)),
    }
    if channels != out:
        shapes.update(layer(f"{prefix}.skip_connection", (out, channels, 1, 1)))
    return shapes


def spatial_transformer(prefix: str, channels: int, depth: int, context: int, linear: bool) -> Shapes:
    projection = (channels, channels) if linear else (channels, channels, 1, 1)
    shapes = {
        **group_norm(f"{prefix}.norm", channels),
        **layer(f"{prefix}.proj_in", projection),
        **layer(f"{prefix}.proj_out", projection),
    }
    for index in range(depth):
        block = f"{prefix}.transformer_blocks.{index}"
        for attention, source in (("attn1", channels), ("attn2", context)):
            shapes.update(layer(f"{block}.{attention}.to_q", (channels, channels), bias=False))
            shapes.update(layer(f"{block}.{attention}.to_k", (channels, source), bias=False))
            shapes.update(layer(f"{block}.{attention}.to_v", (channels, source), bias=False))
            shapes.update(layer(f"{block}.{attention}.to_out.0", (channels, channels)))
        shapes.update(layer(f"{block}.ff.net.0.proj", (8 * channels, channels)))  # GEGLU: 2 x 4 x channels
        shapes.update(layer(f"{block}.ff.net.2", (channels, 4 * channels)))
        for norm in ("norm1", "norm2", "norm3"):
            shapes.update(group_norm(f"{block}.{norm}", channels))
    return shapes


def original_unet_layout(
    in_channels: int,
    channel_mult: tuple[int, ...],
    depths: tuple[int, ...],  # transformer depth per level, 0: no transformer
    middle_depth: int,
    context: int,
    linear: bool,
    adm_in_channels: int | None,
    model_channels: int = 320,
    num_res_blocks: int = 2,
) -> Shapes:
    """Parameter name -> shape of ``openaimodel.UNetModel`` (SD1.5) / SGM's SDXL UNet."""
    embedding = 4 * model_channels
    shapes = {**layer("time_embed.0", (embedding, model_channels)), **layer("time_embed.2", (embedding, embedding))}
    if adm_in_channels:
        shapes.update({**layer("label_emb.0.0", (embedding, adm_in_channels)), **layer("label_emb.0.2", (embedding, embedding))})
    shapes.update(layer("input_blocks.0.0", (model_channels, in_channels, 3, 3)))
    skip_channels, channels, block = [model_channels], model_channels, 1
    for level, (mult, depth) in enumerate(zip(channel_mult, depths)):
        for _ in range(num_res_blocks):
            shapes.update(res_block(f"input_blocks.{block}.0", channels, mult * model_channels, embedding))
            channels = mult * model_channels
            if depth:
                shapes.update(spatial_transformer(f"input_blocks.{block}.1", channels, depth, context, linear))
            skip_channels.append(channels)
            block += 1
        if level < len(channel_mult) - 1:
            shapes.update(layer(f"input_blocks.{block}.0.op", (channels, channels, 3, 3)))
            skip_channels.append(channels)
            block += 1
    shapes.update(res_block("middle_block.0", channels, channels, embedding))
    shapes.update(spatial_transformer("middle_block.1", channels, middle_depth, context, linear))
    shapes.update(res_block("middle_block.2", channels, channels, embedding))
    block = 0
    for level in reversed(range(len(channel_mult))):
        for index in range(num_res_blocks + 1):
            out = channel_mult[level] * model_channels
            shapes.update(res_block(f"output_blocks.{block}.0", channels + skip_channels.pop(), out, embedding))
            channels, position = out, 1
            if depths[level]:
                shapes.update(spatial_transformer(f"output_blocks.{block}.1", channels, depths[level], context, linear))
                position = 2
            if level and index == num_res_blocks:
                shapes.update(layer(f"output_blocks.{block}.{position}.conv", (channels, channels, 3, 3)))
            block += 1
    return {**shapes, **group_norm("out.0", model_channels), **layer("out.2", (4, model_channels, 3, 3))}


def sdxl_layout(in_channels: int) -> Shapes:
    return original_unet_layout(in_channels, (1, 2, 4), (0, 2, 10), 10, 2048, linear=True, adm_in_channels=2816)


def file_layout(unet: UNet2DConditionModel) -> Shapes:
    """Original UNet key -> shape of each offset an export of ``unet`` can write."""
    keys = delta_keys(unet.config)
    shapes = {}
    for key, tensor in unet.state_dict().items():
        assert keys[key].startswith("diffusion_model.") and keys[key].endswith("::diff::0"), keys[key]
        shapes[keys[key].removeprefix("diffusion_model.").removesuffix("::diff::0")] = tuple(tensor.shape)
    return shapes


def test_sdxl_exports_write_the_released_layout():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert file_layout(unet) == sdxl_layout(4)
    assert len(file_layout(unet)) == 1680  # the SDXL UNet's tensors in any SDXL checkpoint

    grown = 0
    for name, channels in (("fg2ble", 8), ("bg2ble", 8), ("fgble2bg", 12), ("bgble2fg", 12)):
        variant = RELEASED_CONDITIONAL_FILES[name]
        assert 4 + variant.extra_channels == channels and variant.filename == f"layer_xl_{name}.safetensors"
        if channels - 4 > grown:  # the variants in turn: 8, 8, 12, 12 input channels
            grow_conv_in(unet, channels - 4 - grown)
            grown = channels - 4
        layout = file_layout(unet)
        assert layout["input_blocks.0.0.weight"] == (320, channels, 3, 3)
        assert layout == sdxl_layout(channels)


def test_sd15_names_follow_the_original_checkpoint():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    layout = original_unet_layout(4, (1, 2, 4, 4), (1, 1, 1, 0), 1, 768, linear=False, adm_in_channels=None)
    assert file_layout(unet) == layout and len(layout) == 686
    assert {"input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.8.2.conv.bias"} <= set(layout)


def test_released_variants_name_their_conditions_in_channel_order():
    assert [(v.name, v.conditions, v.generates) for v in RELEASED_CONDITIONAL_FILES.values()] == [
        ("fg2ble", ("foreground",), "blend"),
        ("bg2ble", ("background",), "blend"),
        ("fgble2bg", ("foreground", "blend"), "background"),
        ("bgble2fg", ("background", "blend"), "foreground"),
    ]
    assert conditional_variant("layer_xl_bgble2fg.safetensors") is RELEASED_CONDITIONAL_FILES["bgble2fg"]
    with pytest.raises(ValueError, match="known: fg2ble, bg2ble, fgble2bg, bgble2fg"):
        conditional_variant("fg2bg")


# -- export and import on the tiny SDXL UNet ---------------------------------------------------

# Weights the "training" below changes, and their original names (written out by hand).
CHANGED = {
    "conv_in.weight": "input_blocks.0.0.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    ),
    "up_blocks.0.resnets.2.conv_shortcut.weight": "output_blocks.2.0.skip_connection.weight",
    "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.2.conv.weight",
    "mid_block.resnets.1.norm2.weight": "middle_block.2.out_layers.0.weight",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
}


def tiny_unet() -> UNet2DConditionModel:
    """The tiny SDXL model's UNet (the ``tiny_sdxl`` fixture's architecture and seed), alone."""
    torch.manual_seed(0)
    return make_unet().eval()


def train(base: UNet2DConditionModel, extra_channels: int) -> UNet2DConditionModel:
    """``base`` grown and with the ``CHANGED`` weights moved. Each is scaled by 1 to 1.5, so
    ``trained - base`` is exact (Sterbenz) and a round trip can be checked bit for bit."""
    trained = copy.deepcopy(base)
    grow_conv_in(trained, extra_channels)
    generator = torch.Generator().manual_seed(5)
    parameters = dict(trained.named_parameters())
    with torch.no_grad():
        for key in CHANGED:
            parameters[key].mul_(1 + 0.5 * torch.rand(parameters[key].shape, generator=generator))
        parameters["conv_in.weight"][:, 4:] = torch.randn(32, extra_channels, 3, 3, generator=generator) * 0.1
    return trained


def prediction(unet: UNet2DConditionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    size, config = unet.config.sample_size, unet.config
    sample = torch.randn(1, config.in_channels, size, size, generator=generator)
    hidden = torch.randn(1, 5, config.cross_attention_dim, generator=generator)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled, generator=generator), "time_ids": torch.randn(1, 6, generator=generator)}
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def base() -> UNet2DConditionModel:
    return tiny_unet()


@pytest.fixture(scope="module")
def trained(base) -> UNet2DConditionModel:
    return train(base, RELEASED_CONDITIONAL_FILES["fgble2bg"].extra_channels)


@pytest.fixture(scope="module")
def exported(base, trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("delta") / RELEASED_CONDITIONAL_FILES["fgble2bg"].filename
    return save_unet_delta(trained.state_dict(), base.state_dict(), trained.config, path, training_config={"lr": 1e-5})


def test_export_writes_the_changed_weights_only(exported):
    assert set(load_file(exported)) == {f"diffusion_model.{name}::diff::0" for name in CHANGED.values()}
    assert read_unet_delta(exported)["input_blocks.0.0.weight"].shape == (32, 12, 3, 3)
    metadata = read_metadata(exported)
    assert metadata["component"] == "unet_delta" and metadata["layerdiff_config"] == '{"lr": 1e-05}'


def test_applied_to_a_fresh_base_it_is_the_trained_unet(base, trained, exported, tmp_path):
    released = tmp_path / "released.safetensors"
    save_file(load_file(exported), released)  # as the released files are: no metadata
    for path in (exported, released):
        fresh = copy.deepcopy(base)
        apply_unet_delta(fresh, path)
        assert fresh.config.in_channels == 12
        state = fresh.state_dict()
        assert all(torch.equal(state[key], value) for key, value in trained.state_dict().items())
        assert torch.equal(prediction(fresh), prediction(trained))


def test_half_strength_gives_the_midpoint_weights(base, trained, exported):
    half = copy.deepcopy(base)
    apply_unet_delta(half, exported, strength=0.5)
    base_state, trained_state, state = base.state_dict(), trained.state_dict(), half.state_dict()
    padded = torch.zeros_like(trained_state["conv_in.weight"])
    padded[:, :4] = base_state["conv_in.weight"]
    base_state["conv_in.weight"] = padded
    for key, value in trained_state.items():
        if key in CHANGED:
            torch.testing.assert_close(state[key], (base_state[key] + value) / 2)
        else:
            assert torch.equal(state[key], base_state[key]), key


def test_a_fused_lora_run_writes_its_adapted_layers_and_conv_in(base, tmp_path):
    trained = copy.deepcopy(base)
    grow_conv_in(trained, 4)
    generator = torch.Generator().manual_seed(7)
    lora = {}
    for name, module in trained.named_modules():
        if name.endswith(RELEASED_LORA_TARGETS):
            out_features, in_features = module.weight.shape
            up, down = torch.randn(out_features, 2, generator=generator), torch.randn(2, in_features, generator=generator)
            lora[name] = LoraFactors(up=up * 0.1, down=down)
    fuse_lora(trained, lora)
    path = save_unet_delta(trained.state_dict(), base.state_dict(), trained.config, tmp_path / "lora_run.safetensors")

    keys = delta_keys(trained.config)
    assert set(load_file(path)) == {keys[f"{name}.weight"] for name in lora} | {keys["conv_in.weight"]}
    fresh = copy.deepcopy(base)
    apply_unet_delta(fresh, path)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=1e-6)


def test_refuses_keys_and_shapes_the_unet_lacks(base, exported, tmp_path):
    offsets = load_file(exported)
    cases = {
        "input_blocks.1.1.proj_in.weight": (torch.zeros(32, 32), "this UNet has no weight of that name"),
        "out.2.weight": (torch.zeros(4, 16, 3, 3), r"offset \(4, 16, 3, 3\), the UNet's weight \(4, 32, 3, 3\)"),
    }
    for name, (tensor, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({**offsets, f"diffusion_model.{name}::diff::0": tensor}, path)
        unet = copy.deepcopy(base)
        with pytest.raises(ValueError, match=rf"{path.name}: 1 of its 7 offsets .*'{name}'.*{message}.*edited"):
            apply_unet_delta(unet, path)
        assert unet.config.in_channels == 4 and all(torch.equal(v, base.state_dict()[k]) for k, v in unet.state_dict().items())

    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.input_blocks.4.1.proj_in.weight::lora::0": torch.zeros(1)}, lora)
    with pytest.raises(ValueError, match=r"lora.safetensors: 1 keys are not .*::diff::0.*layerdiff.formats.lora"):
        apply_unet_delta(copy.deepcopy(base), lora)


def test_refuses_a_file_of_another_architecture(base, tmp_path):
    torch.manual_seed(0)
    sd15 = UNet2DConditionModel(  # the tiny_sd15 fixture's UNet: SD1.5's layout at tiny widths
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
    )
    trained = {key: value * 2 for key, value in sd15.state_dict().items()}
    path = save_unet_delta(trained, sd15.state_dict(), sd15.config, tmp_path / "sd15.safetensors")
    with pytest.raises(ValueError, match=r"sd15.safetensors: 63 of its 175 offsets .*another UNet architecture"):
        apply_unet_delta(copy.deepcopy(base), path)


def test_export_refusals(base, trained, tmp_path):
    base_state = base.state_dict()
    with pytest.raises(ValueError, match="'unet.conv_in.weight'.*without the 'unet.' prefix"):
        save_unet_delta({"unet.conv_in.weight": base_state["conv_in.weight"]}, base_state, base.config, tmp_path / "a")
    lora_key = "mid_block.attentions.0.proj_in.lora_A.default.weight"
    with pytest.raises(ValueError, match="fuse the LoRA"):
        save_unet_delta({lora_key: torch.zeros(4, 64)}, base_state, base.config, tmp_path / "b")
    with pytest.raises(ValueError, match="equals the base UNet"):
        save_unet_delta(base_state, base_state, base.config, tmp_path / "c")
    assert set(ldm_parameter_names(trained.config)) == set(trained.state_dict())
