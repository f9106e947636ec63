"""Files of jointly denoised layers (layerdiff.formats.layer_sharing): the released SD1.5 joint
layout checked key by key against the released naming rules on the full-size UNet, round trips
of every layout, per-layer LoRAs loaded by diffusers, strict loading, and the export CLI."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from layerdiff.export import main
from layerdiff.formats.layer_sharing import (
    LAYER_LORA_SUFFIX,
    LAYER_SHARING_FILENAME,
    METADATA_KEY,
    RELEASED_JOINT_FILENAME,
    load_layer_sharing,
    load_released_joint,
    released_joint_state,
    save_layer_loras,
    save_layer_sharing,
    save_released_joint,
)
from layerdiff.formats.provenance import read_metadata
from layerdiff.models.base import SD15_UNET_CONFIG
from layerdiff.models.layer_sharing import add_layer_sharing, sharing_units
from layerdiff.models.tiny import make_unet
from support.contracts import assert_identical
from support.unets import make_sd15_unet

RANK, ALPHA = 4, 8  # scale 2: the files must fold it into the up factors
LAYERS = ("foreground", "background", "blend")
SAMPLES = 2
# The released module_mapping_sd15, in index order: SD1.5's transformer blocks in ldm numbering.
RELEASED_BLOCKS = [*(f"input_blocks.{b}.1" for b in (1, 2, 4, 5, 7, 8)), *(f"output_blocks.{b}.1" for b in range(3, 12)),
                   "middle_block.1"]
# SD1.5 widths by ldm block (block_out_channels 320, 640, 1280, 1280; the up path mirrors the down path).
SD15_WIDTHS = {"input_blocks.1.1": 320, "input_blocks.2.1": 320, "input_blocks.4.1": 640, "input_blocks.5.1": 640,
               "input_blocks.7.1": 1280, "input_blocks.8.1": 1280, "middle_block.1": 1280,
               **{f"output_blocks.{b}.1": 1280 for b in (3, 4, 5)}, **{f"output_blocks.{b}.1": 640 for b in (6, 7, 8)},
               **{f"output_blocks.{b}.1": 320 for b in (9, 10, 11)}}


def ldm_block(module: str) -> str:
    """The released (ldm) name of an SD1.5 diffusers attention module's transformer block."""
    kind, level, _, index = module.split(".")[:4]
    if kind == "mid_block":
        return "middle_block.1"
    if kind == "down_blocks":  # 2 layers per level, then a downsampler block; input_blocks.0 is conv_in
        return f"input_blocks.{3 * int(level) + int(index) + 1}.1"
    return f"output_blocks.{3 * int(level) + int(index)}.1"  # 3 blocks per level on the way up


BUILDERS = {"sd15": make_sd15_unet, "sdxl": make_unet}


@pytest.fixture(scope="module")
def base_states() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {name: build().state_dict() for name, build in BUILDERS.items()}


def sharing_unet(base_states, architecture: str, mode: str, layers: int = 3, rank: int = RANK, seed: int | None = 1):
    """The base UNet with units installed; ``seed``: every unit parameter random, as if trained."""
    unet = BUILDERS[architecture]().eval()
    unet.load_state_dict(base_states[architecture])
    units = add_layer_sharing(unet, layers, mode, rank, ALPHA)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for unit in units.values():
                for parameter in unit.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet


def output(unet: UNet2DConditionModel, rows: int, select: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's prediction on fixed inputs of ``rows`` rows (only rows ``select`` fed, if given)."""
    config, generator = unet.config, torch.Generator().manual_seed(2)
    inputs = {
        "sample": torch.randn(rows, 4, config.sample_size, config.sample_size, generator=generator),
        "encoder_hidden_states": torch.randn(rows, 5, config.cross_attention_dim, generator=generator),
    }
    added = None
    if config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(rows, 32, generator=generator), "time_ids": torch.randn(rows, 6, generator=generator)}
    if select is not None:
        inputs = {key: value[select] for key, value in inputs.items()}
        added = added and {key: value[select] for key, value in added.items()}
    with torch.no_grad():
        return unet(timestep=500, added_cond_kwargs=added, **inputs).sample


def test_full_size_sd15_export_has_the_released_keys_and_shapes():
    with torch.device("meta"):  # shapes only: no memory
        unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
        add_layer_sharing(unet, 3, "frame", 256)
    state = released_joint_state(unet)

    expected = {}
    for index, block in enumerate(RELEASED_BLOCKS):
        hidden = SD15_WIDTHS[block]
        for attn, context in (("attn1", hidden), ("attn2", 768)):  # attn2 attends to CLIP ViT-L/14's text
            prefix = f"hookers.layers.{2 * index + (attn == 'attn2')}."
            inputs = {"to_q": hidden, "to_k": context, "to_v": context, "to_out": hidden}
            for projection, width in inputs.items():
                for frame in range(3):
                    expected[f"{prefix}{projection}_lora.{frame}.down.weight"] = (256, width)
                    expected[f"{prefix}{projection}_lora.{frame}.up.weight"] = (hidden, 256)
            for part in "iqkvo":
                expected[f"{prefix}temporal_{part}.weight"] = (hidden, hidden)
                expected[f"{prefix}temporal_{part}.bias"] = (hidden,)
            expected[f"{prefix}temporal_n.weight"] = expected[f"{prefix}temporal_n.bias"] = (hidden,)
    assert len(expected) == 32 * (4 * 3 * 2 + 5 * 2 + 2)
    assert {key: tuple(tensor.shape) for key, tensor in state.items()} == expected
    assert state["hookers.layers.0.to_q_lora.0.down.weight"].shape == (256, 320)
    assert state["hookers.layers.1.to_k_lora.2.down.weight"].shape == (256, 768)


def test_released_layout_round_trip_module_order_and_scale(base_states, tmp_path):
    unet = sharing_unet(base_states, "sd15", "frame")
    units = sharing_units(unet)
    with torch.no_grad():  # a mark per module, to find it again by the released index
        for number, unit in enumerate(units.values()):
            unit.temporal_i.bias.fill_(number)
    state = released_joint_state(unet)
    for module, unit in units.items():
        index = 2 * RELEASED_BLOCKS.index(ldm_block(module)) + module.endswith("attn2")
        assert torch.equal(state[f"hookers.layers.{index}.temporal_i.bias"], unit.temporal_i.bias.detach()), module
        up = state[f"hookers.layers.{index}.to_v_lora.1.up.weight"]
        assert torch.equal(up, unit.to_v_lora[1].up.weight.detach() * ALPHA / RANK)  # W + up @ down, no scale

    path = save_released_joint(tmp_path / RELEASED_JOINT_FILENAME, unet)
    fresh = sharing_unet(base_states, "sd15", "frame", seed=None)
    load_released_joint(fresh, path)
    torch.testing.assert_close(output(fresh, 3 * SAMPLES), output(unet, 3 * SAMPLES), rtol=0, atol=1e-6)


def test_released_frames_follow_the_layer_names(base_states):
    unet = sharing_unet(base_states, "sd15", "frame")
    names = ("blend", "foreground", "background")
    state = released_joint_state(unet, names)
    unit = sharing_units(unet)["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert torch.equal(state["hookers.layers.30.to_q_lora.0.down.weight"], unit.to_q_lora[1].down.weight.detach())
    fresh = sharing_unet(base_states, "sd15", "frame", seed=None)
    load_released_joint(fresh, state, names)
    torch.testing.assert_close(output(fresh, 3 * SAMPLES), output(unet, 3 * SAMPLES), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("architecture", "mode", "layers"), [("sd15", "frame", 3), ("sdxl", "concat", 2), ("sdxl", "frame", 2)])
def test_layerdiff_layout_round_trip(base_states, tmp_path, architecture, mode, layers):
    unet = sharing_unet(base_states, architecture, mode, layers)
    names = [f"layer{index}" for index in range(layers)]
    path = save_layer_sharing(tmp_path / LAYER_SHARING_FILENAME, unet, names, metadata={"lora_alpha": ALPHA})
    metadata = read_metadata(path)
    assert json.loads(metadata[METADATA_KEY]) == {"mode": mode, "layers": names, "rank": RANK, "alpha": ALPHA,
                                                  "architecture": architecture}
    assert json.loads(metadata["layerdiff_config"]) == {"lora_alpha": ALPHA}
    key = f"layer_sharing.mid_block.attentions.0.transformer_blocks.0.attn2.to_out_lora.{layers - 1}.up.weight"
    unit = sharing_units(unet)["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert torch.equal(load_file(path)[key], unit.to_out_lora[layers - 1].up.weight.detach() * ALPHA / RANK)

    fresh = sharing_unet(base_states, architecture, mode, layers, seed=None)
    assert load_layer_sharing(fresh, path, names)["layers"] == names
    torch.testing.assert_close(output(fresh, layers * SAMPLES), output(unet, layers * SAMPLES), rtol=0, atol=1e-6)


def test_layer_loras_load_into_a_plain_unet_with_diffusers_and_match_none_mode(base_states, tmp_path):
    unet = sharing_unet(base_states, "sdxl", "none")
    paths = save_layer_loras(tmp_path, unet, LAYERS, metadata={"lora_alpha": ALPHA})
    assert [path.name for path in paths] == [f"{name}{LAYER_LORA_SUFFIX}" for name in LAYERS]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in paths)  # no staging left
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight" in load_file(paths[1])
    joint = output(unet, 3 * SAMPLES)
    base = None
    for layer, name in enumerate(LAYERS):
        plain = make_unet().eval()
        plain.load_state_dict(base_states["sdxl"])
        base = output(plain, 3 * SAMPLES) if base is None else base
        rows = torch.arange(SAMPLES) * 3 + layer  # layers inner: (b l)
        plain.load_lora_adapter(str(tmp_path), weight_name=f"{name}{LAYER_LORA_SUFFIX}", prefix="unet", adapter_name=name)
        torch.testing.assert_close(output(plain, 3 * SAMPLES, rows), joint[rows], rtol=0, atol=1e-5)
        assert not torch.allclose(base[rows], joint[rows], atol=1e-3)  # the LoRA does change the output


def test_released_layout_refuses_other_setups(base_states):
    for unet, named in ((sharing_unet(base_states, "sdxl", "frame"), "not SD1.5-shaped"),
                        (sharing_unet(base_states, "sd15", "concat"), "'concat' mode")):
        with pytest.raises(ValueError, match=named) as error:
            released_joint_state(unet)
        assert "save_layer_sharing" in str(error.value)
    with pytest.raises(ValueError, match="released frames are"):
        released_joint_state(sharing_unet(base_states, "sd15", "frame"), ["a", "b", "c"])


def test_released_loading_names_what_does_not_fit(base_states, tmp_path):
    state = released_joint_state(sharing_unet(base_states, "sd15", "frame"))
    with pytest.raises(ValueError, match="holds 3 frames; the units denoise 2 layers"):
        load_released_joint(sharing_unet(base_states, "sd15", "frame", layers=2, seed=None), state)
    with pytest.raises(ValueError, match="rank-4 LoRAs; the units are rank 8"):
        load_released_joint(sharing_unet(base_states, "sd15", "frame", rank=8, seed=None), state)

    fresh = sharing_unet(base_states, "sd15", "frame", seed=None)
    before = {key: value.clone() for key, value in fresh.state_dict().items()}
    missing = {key: value for key, value in state.items() if key != "hookers.layers.7.temporal_k.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing\.safetensors .*1 keys missing \['hookers\.layers\.7\.temporal_k\.bias'\]"):
        load_released_joint(fresh, tmp_path / "missing.safetensors")
    reshaped = {**state, "hookers.layers.3.temporal_q.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"1 of another shape \['hookers\.layers\.3\.temporal_q\.weight \(3, 3\)"):
        load_released_joint(fresh, reshaped)
    with pytest.raises(ValueError, match=r"1 unexpected \['hookers\.layers\.32\.temporal_q\.weight'\]"):
        load_released_joint(fresh, {**state, "hookers.layers.32.temporal_q.weight": torch.zeros(3, 3)})
    assert all(torch.equal(value, before[key]) for key, value in fresh.state_dict().items())  # nothing half-loaded


def test_layerdiff_layout_loading_names_what_does_not_fit(base_states, tmp_path):
    path = save_layer_sharing(tmp_path / "joint.safetensors", sharing_unet(base_states, "sd15", "frame"), LAYERS)
    cases = [
        (sharing_unet(base_states, "sd15", "concat", seed=None), None, "mode: frame in the file, concat in the UNet"),
        (sharing_unet(base_states, "sd15", "frame", layers=2, seed=None), None, "layers: 3 in the file, 2 in the UNet"),
        (sharing_unet(base_states, "sd15", "frame", rank=2, seed=None), None, "rank: 4 in the file, 2 in the UNet"),
        (sharing_unet(base_states, "sdxl", "frame", seed=None), None, "architecture: sd15 in the file, sdxl in the UNet"),
        (sharing_unet(base_states, "sd15", "frame", seed=None), ["fg", "bg", "blend"],
         r"layers: \['foreground', 'background', 'blend'\] in the file, \['fg', 'bg', 'blend'\] in the UNet"),
    ]
    for unet, names, message in cases:
        with pytest.raises(ValueError, match=rf"joint\.safetensors was written for other .*{message}"):
            load_layer_sharing(unet, path, names)
    source = sharing_unet(base_states, "sd15", "frame")
    released = save_released_joint(tmp_path / RELEASED_JOINT_FILENAME, source)
    fresh = sharing_unet(base_states, "sd15", "frame", seed=None)
    assert load_layer_sharing(fresh, released) is None  # no layout metadata: read as the released layout
    assert_identical(released_joint_state(fresh), released_joint_state(source), "units")
    with pytest.raises(ValueError, match="layer names become file names"):
        save_layer_loras(tmp_path, sharing_unet(base_states, "sd15", "none"), ["a/b", "c", "d"])


def joint_checkpoint(unet: UNet2DConditionModel, path, base_model: str, layers, mode: str) -> None:
    """A JointLayerLoRAModule checkpoint as Lightning writes it: the UNet under ``unet.``."""
    state = {f"unet.{key}": value for key, value in unet.state_dict().items()}
    hyperparameters = {"base_model": base_model, "layers": list(layers), "attention_sharing": mode,
                       "lora_rank": RANK, "lora_alpha": ALPHA, "learning_rate": 1e-4}
    torch.save({"state_dict": state, "hyper_parameters": hyperparameters}, path)


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_export_cli_writes_every_layout_from_a_joint_checkpoint(base_states, tmp_path, capsys, architecture):
    unet = sharing_unet(base_states, architecture, "frame")
    base_model = tmp_path / "base"
    unet.save_config(base_model / "unet")  # the export reads only the base UNet's config
    joint_checkpoint(unet, tmp_path / "last.ckpt", str(base_model), LAYERS, "frame")

    out = tmp_path / "out"
    assert main(["layer-sharing", "--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(out)]) == 0
    written = sorted(path.name for path in out.iterdir())
    loras = [f"{name}{LAYER_LORA_SUFFIX}" for name in LAYERS]
    released = [RELEASED_JOINT_FILENAME] if architecture == "sd15" else []
    assert written == sorted([LAYER_SHARING_FILENAME, *loras, *released])
    if architecture == "sdxl":
        assert f"note: no {RELEASED_JOINT_FILENAME}: " in capsys.readouterr().out

    expected = output(unet, 3 * SAMPLES)
    fresh = sharing_unet(base_states, architecture, "frame", seed=None)
    layout = load_layer_sharing(fresh, out / LAYER_SHARING_FILENAME, LAYERS)
    assert layout["alpha"] == ALPHA
    torch.testing.assert_close(output(fresh, 3 * SAMPLES), expected, rtol=0, atol=1e-6)
    if released:
        fresh = sharing_unet(base_states, architecture, "frame", seed=None)
        load_released_joint(fresh, out / RELEASED_JOINT_FILENAME)
        torch.testing.assert_close(output(fresh, 3 * SAMPLES), expected, rtol=0, atol=1e-6)


def test_export_cli_names_a_checkpoint_that_does_not_fit(base_states, tmp_path):
    unet = sharing_unet(base_states, "sd15", "frame")
    base_model = tmp_path / "base"
    unet.save_config(base_model / "unet")
    joint_checkpoint(unet, tmp_path / "two.ckpt", str(base_model), LAYERS[:2], "frame")
    with pytest.raises(ValueError, match=r"two\.ckpt does not fit .*layers \['foreground', 'background'\]"):
        main(["layer-sharing", "--checkpoint", str(tmp_path / "two.ckpt"), "--out", str(tmp_path / "out")])
    torch.save({"state_dict": {}, "hyper_parameters": {"base_model": str(base_model)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"no 'unet\.\*' weights"):
        main(["layer-sharing", "--checkpoint", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "out")])


@pytest.mark.slow
def test_export_cli_reads_a_joint_layer_lora_module_checkpoint(tiny_sdxl, tiny_transparent_vae, tmp_path):
    from layerdiff.modules import JointLayerLoRAModule

    module = JointLayerLoRAModule(transparent_vae=str(tiny_transparent_vae), base_model=str(tiny_sdxl), layers=LAYERS,
                                  attention_sharing="frame", lora_rank=RANK, lora_alpha=ALPHA)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in (p for unit in sharing_units(module.unet).values() for p in unit.parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)  # the lean checkpoint Lightning writes: trained weights only
    torch.save(checkpoint, tmp_path / "last.ckpt")

    out = tmp_path / "out"
    assert main(["layer-sharing", "--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(out)]) == 0
    fresh = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").eval()
    add_layer_sharing(fresh, len(LAYERS), "frame", RANK)  # another alpha: the files hold the scale
    load_layer_sharing(fresh, out / LAYER_SHARING_FILENAME, LAYERS)
    torch.testing.assert_close(output(fresh, 3 * SAMPLES), output(module.unet.eval(), 3 * SAMPLES), rtol=0, atol=1e-6)
