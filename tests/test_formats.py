"""The interoperability faults of the file formats: the x300 encoder scale in the two released
VAE flavours, the encoder's input convention through exports, checkpoints and the latent cache,
ComfyUI's own LoRA loader keys, and the one LoRA key parser."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from data.latent_cache import LatentCacheEncoder, LatentCacheError, cache_latents
from layerdiff.formats.layerdiffuse_vae import (
    FLAVOURS,
    load_transparency_models,
    load_transparent_vae,
    save_transparent_vae,
    transparency_models_from_checkpoint,
)
from layerdiff.formats.lora import (
    COMFYUI_LORA_FILENAMES,
    LoraFactors,
    load_lora_into_unet,
    lora_from_state_dict,
    parse_lora_key,
    read_lora,
    save_comfyui_lora,
)
from layerdiff.formats.provenance import read_metadata
from layerdiff.models.base import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, load_unet
from layerdiff.models.lora import RELEASED_LORA_TARGETS
from layerdiff.models.transparency import LatentTransparencyEncoder, TransparencyDecoder

TINY_DECODER = {"block_out_channels": (8, 8, 16, 16, 16, 16, 16)}
RANK = 4


class ReleasedOffsetEncoder(nn.Module):
    """The released ``LatentTransparencyOffsetEncoder``, written out by hand: eight 3x3
    convolutions (strides 1,1,2,1,2,1,2,1) with SiLU between, then 256 -> 4, as ``blocks``."""

    def __init__(self) -> None:
        super().__init__()
        widths, strides, layers, channels = (32, 32, 64, 64, 128, 128, 256, 256), (1, 1, 2, 1, 2, 1, 2, 1), [], 4
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.SiLU()]
            channels = width
        self.blocks = nn.Sequential(*layers, nn.Conv2d(channels, 4, 3, padding=1))


def consumer_output(path: Path, offset_scale: float, alpha: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """What a consumer computes from an encoder file: strict load, then its own factor."""
    encoder = ReleasedOffsetEncoder()
    encoder.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        return encoder.blocks(torch.cat([alpha, rgb], dim=1)) * offset_scale


@pytest.fixture(scope="module")
def trained_encoder() -> LatentTransparencyEncoder:
    torch.manual_seed(0)
    encoder = LatentTransparencyEncoder(input_convention="released")
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)  # the zero-initialised head too
    return encoder


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 1, 32, 32, generator=generator), torch.rand(2, 3, 32, 32, generator=generator)


@pytest.fixture(scope="module")
def both_flavours(trained_encoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    save_transparent_vae(trained_encoder, TransparencyDecoder(**TINY_DECODER), out, flavours=tuple(FLAVOURS))
    return out


def assert_same_output(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_each_flavour_gives_our_encoder_output_under_its_consumers_convention(trained_encoder, inputs, both_flavours):
    alpha, rgb = inputs
    with torch.no_grad():
        ours = trained_encoder(alpha, rgb)
    assert ours.abs().max() > 1e-2  # the head is not zero: the scale matters
    for name, flavour in FLAVOURS.items():
        path = both_flavours / flavour.encoder_file
        assert_same_output(consumer_output(path, flavour.offset_scale, alpha, rgb), ours)
        assert float(read_metadata(path)["offset_scale"]) == flavour.offset_scale, name
        assert read_metadata(path)["input_convention"] == "released"
        assert (both_flavours / flavour.decoder_file).is_file()

    # The factor sits in the last convolution only: 300x in the layerdiffusion file.
    folded = load_file(both_flavours / FLAVOURS["layerdiffusion"].encoder_file)
    unfolded = load_file(both_flavours / FLAVOURS["diffusers_cli"].encoder_file)
    for key, tensor in unfolded.items():
        expected = tensor * 300 if key.startswith("blocks.16.") else tensor
        torch.testing.assert_close(folded[key], expected, rtol=1e-6, atol=0)
    # Run without the factor, the unfolded weights would give a 1/300 offset (the fault).
    wrong = consumer_output(both_flavours / FLAVOURS["diffusers_cli"].encoder_file, 1.0, alpha, rgb)
    torch.testing.assert_close(wrong * 300, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flavour_name", list(FLAVOURS))
def test_each_flavour_imports_back_as_our_encoder(trained_encoder, inputs, both_flavours, flavour_name, tmp_path):
    alpha, rgb = inputs
    with torch.no_grad():
        ours = trained_encoder(alpha, rgb)
    flavour = FLAVOURS[flavour_name]

    # Our export alone, with its metadata: scale and input convention from the metadata.
    ours_only = tmp_path / "ours"
    ours_only.mkdir()
    for name in (flavour.encoder_file, flavour.decoder_file):
        shutil.copy(both_flavours / name, ours_only / name)
    encoder, _ = load_transparency_models(ours_only)
    assert encoder.input_convention == "released"
    with torch.no_grad():
        assert_same_output(encoder(alpha, rgb), ours)

    # As the released file (no metadata): the scale from its name, the released input convention.
    released = tmp_path / "released"
    released.mkdir()
    save_file(load_file(both_flavours / flavour.encoder_file), released / flavour.encoder_file)
    encoder = LatentTransparencyEncoder()
    load_transparent_vae(encoder, None, released)
    assert encoder.input_convention == "released"
    with torch.no_grad():
        assert_same_output(encoder(alpha, rgb), ours)

    renamed = tmp_path / "renamed.safetensors"
    shutil.copy(released / flavour.encoder_file, renamed)
    with pytest.raises(ValueError, match=re.escape(FLAVOURS["diffusers_cli"].encoder_file)):
        load_transparent_vae(LatentTransparencyEncoder(), None, (renamed, tmp_path / "none.safetensors"))


def test_older_exports_and_the_released_sd15_name_are_read_with_their_conventions(trained_encoder, inputs, tmp_path):
    alpha, rgb = inputs
    with torch.no_grad():
        ours = trained_encoder(alpha, rgb)
    # Format version 1 wrote our state dict unchanged under the layerdiffusion name, straight colour.
    old = tmp_path / "old"
    old.mkdir()
    metadata = {"component": "transparent_encoder", "format_version": "1"}
    save_file(trained_encoder.state_dict(), old / FLAVOURS["layerdiffusion"].encoder_file, metadata=metadata)
    encoder = LatentTransparencyEncoder()
    load_transparent_vae(encoder, None, old)
    assert encoder.input_convention == "straight"
    assert all(torch.equal(encoder.state_dict()[key], value) for key, value in trained_encoder.state_dict().items())

    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    folded = dict(trained_encoder.state_dict())
    folded.update({key: value * 300 for key, value in folded.items() if key.startswith("blocks.16.")})
    save_file(folded, sd15 / "layer_sd15_vae_transparent_encoder.safetensors")
    encoder = LatentTransparencyEncoder()
    load_transparent_vae(encoder, None, sd15)
    assert encoder.input_convention == "released"
    with torch.no_grad():
        assert_same_output(encoder(alpha, rgb), ours)


def test_input_convention_is_written_and_read_back_through_exports_and_checkpoints(both_flavours, tmp_path):
    straight = tmp_path / "straight"
    save_transparent_vae(LatentTransparencyEncoder(), TransparencyDecoder(**TINY_DECODER), straight)
    assert read_metadata(straight / FLAVOURS["layerdiffusion"].encoder_file)["input_convention"] == "straight"
    assert load_transparency_models(straight)[0].input_convention == "straight"

    # A TransparentVAEModule checkpoint: the convention of the weights its run started from.
    encoder, decoder = load_transparency_models(both_flavours)
    state = {f"transparent_encoder.{key}": value for key, value in encoder.state_dict().items()}
    state.update({f"transparent_decoder.{key}": value for key, value in decoder.state_dict().items()})
    for init_from, expected in ((None, "straight"), (str(straight), "straight"), (str(both_flavours), "released")):
        contents = {"state_dict": state, "hyper_parameters": {"init_from": init_from}}
        loaded, _ = transparency_models_from_checkpoint(contents, tmp_path / "last.ckpt")
        assert loaded.input_convention == expected, init_from
    with pytest.raises(FileNotFoundError, match="started from"):
        transparency_models_from_checkpoint(
            {"state_dict": state, "hyper_parameters": {"init_from": str(tmp_path / "gone")}}, tmp_path / "last.ckpt"
        )


def test_training_from_released_weights_feeds_the_released_colour(tiny_sdxl, tmp_path):
    from layerdiff.modules import TransparentVAEModule

    released = tmp_path / "released"
    save_transparent_vae(LatentTransparencyEncoder(), TransparencyDecoder(**TINY_DECODER), tmp_path / "ours")
    released.mkdir()
    for name in (FLAVOURS["layerdiffusion"].encoder_file, FLAVOURS["layerdiffusion"].decoder_file):
        save_file(load_file(tmp_path / "ours" / name), released / name)  # without our metadata
    module = TransparentVAEModule(
        base_model=str(tiny_sdxl), init_from=str(released), decoder_block_out_channels=TINY_DECODER["block_out_channels"]
    )
    assert module.transparent_encoder.input_convention == "released"


def test_a_latent_cache_is_not_reused_with_the_other_input_convention(tiny_sdxl, tiny_vae_shards, tmp_path):
    folders = {}
    for convention in ("straight", "released"):
        torch.manual_seed(0)
        encoder = LatentTransparencyEncoder(input_convention=convention)
        folders[convention] = tmp_path / convention
        save_transparent_vae(encoder, TransparencyDecoder(**TINY_DECODER), folders[convention])
    encoders = {name: LatentCacheEncoder(str(tiny_sdxl), str(folder)) for name, folder in folders.items()}
    assert encoders["straight"].settings.transparent_encoder_sha256 == encoders["released"].settings.transparent_encoder_sha256

    out_dir = tmp_path / "cache"
    cache_latents(tiny_vae_shards["val"], out_dir, encoders["straight"])
    # Point the manifest's folder at the other export, so the convention is the only difference.
    manifest = out_dir / "latent_cache.json"
    manifest.write_text(manifest.read_text().replace(str(folders["straight"].resolve()), str(folders["released"].resolve())))
    with pytest.raises(LatentCacheError, match="encoder_input_convention: 'straight' in the cache, 'released' now"):
        cache_latents(tiny_vae_shards["val"], out_dir, encoders["released"])


# -- ComfyUI's own LoRA loader ------------------------------------------------------------------


def comfyui_targets(unet_config) -> dict[str, str]:
    """Diffusers transformer-block prefixes -> original UNet paths, numbered as ComfyUI's
    ``unet_to_diffusers`` numbers them: down level x, layer i -> input block 1 + (L + 1) x + i;
    up level x (levels reversed), layer i <= L -> output block (L + 1) x + i."""
    levels = len(unet_config["down_block_types"])
    layers = unet_config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    targets = {"mid_block.attentions.0": "middle_block.1"}
    for x in range(levels):
        for i in range(layers[x]):
            targets[f"down_blocks.{x}.attentions.{i}"] = f"input_blocks.{1 + (layers[x] + 1) * x + i}.1"
    for x, level_layers in enumerate(reversed(layers)):
        for i in range(level_layers + 1):
            targets[f"up_blocks.{x}.attentions.{i}"] = f"output_blocks.{(level_layers + 1) * x + i}.1"
    return targets


def expected_kohya_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """ComfyUI's kohya name -> module, for the adapted modules of ``unet`` (by name)."""
    targets = comfyui_targets(unet.config)
    expected = {}
    for path, module in unet.named_modules():
        if not path.endswith(RELEASED_LORA_TARGETS):
            continue
        block = next(block for block in targets if path.startswith(f"{block}."))
        ldm = targets[block] + path[len(block):]
        expected["lora_unet_" + ldm.replace(".", "_")] = module
    return expected


def split_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        parts.setdefault(name, {})[part] = tensor
    return parts


@pytest.mark.parametrize(("config", "blocks"), [(SDXL_UNET_CONFIG, 70), (SD15_UNET_CONFIG, 16)], ids=["sdxl", "sd15"])
def test_every_comfyui_key_maps_onto_a_unet_weight_of_the_full_size_model(config, blocks, tmp_path):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    adapted = {name: module for name, module in unet.named_modules() if name.endswith(RELEASED_LORA_TARGETS)}
    assert len(adapted) == blocks * 8
    lora = {
        name: LoraFactors(up=torch.ones(module.out_features, 1), down=torch.ones(1, module.in_features))
        for name, module in adapted.items()
    }
    path = save_comfyui_lora(lora, unet.config, tmp_path / COMFYUI_LORA_FILENAMES["sdxl"])

    parts, expected = split_kohya(load_file(path)), expected_kohya_modules(unet)
    assert set(parts) == set(expected)
    for name, found in parts.items():
        assert set(found) == {"lora_up.weight", "lora_down.weight", "alpha"}, name
        weight = expected[name].weight
        assert (found["lora_up.weight"].shape[0], found["lora_down.weight"].shape[1]) == tuple(weight.shape), name
        assert found["alpha"].item() == found["lora_down.weight"].shape[0]
    if config is SDXL_UNET_CONFIG:  # names of the released layer_xl_transparent_attn, kohya-flattened
        assert {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
            "lora_unet_output_blocks_0_1_transformer_blocks_3_attn1_to_k",
            "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v",
        } <= set(parts)
    else:  # SD1.5 cross-attention reads 768-wide text
        assert parts["lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"]["lora_down.weight"].shape == (1, 768)


def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    hidden = torch.randn(1, 5, config.cross_attention_dim, generator=generator)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled, generator=generator), "time_ids": torch.randn(1, 6, generator=generator)}
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def test_the_comfyui_file_applied_as_comfyui_does_gives_the_trained_unet(tiny_sdxl, tmp_path):
    trained = load_unet(str(tiny_sdxl))
    trained.add_adapter(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(RELEASED_LORA_TARGETS)), "layerdiff")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    lora = lora_from_state_dict(get_peft_model_state_dict(trained, adapter_name="layerdiff"), 2 * RANK)
    path = save_comfyui_lora(lora, trained.config, tmp_path / "comfy.safetensors")

    # ComfyUI: weight += up @ down * alpha / rank, on the weight the kohya name maps to.
    patched = load_unet(str(tiny_sdxl))
    targets = expected_kohya_modules(patched)
    with torch.no_grad():
        for name, found in split_kohya(load_file(path)).items():
            up, down = found["lora_up.weight"], found["lora_down.weight"]
            targets[name].weight += up @ down * (found["alpha"].item() / down.shape[0])
    expected = unet_output(trained)
    torch.testing.assert_close(unet_output(patched), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(unet_output(load_unet(str(tiny_sdxl))), expected, atol=1e-3)

    # And back into a training adapter with another alpha.
    imported = load_unet(str(tiny_sdxl))
    imported.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(RELEASED_LORA_TARGETS)), "layerdiff")
    load_lora_into_unet(imported, path, "layerdiff")
    torch.testing.assert_close(unet_output(imported), expected, rtol=0, atol=1e-5)

    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_mid.weight": torch.zeros(1)}, tmp_path / "mid.safetensors")
    with pytest.raises(ValueError, match="not a plain kohya LoRA key"):
        read_lora(tmp_path / "mid.safetensors", trained.config)


def test_one_parser_reads_every_factor_key_layout():
    cases = {
        "unet.mid_block.attentions.0.to_q.lora_A.weight": ("unet.mid_block.attentions.0.to_q", "down", None),
        "down_blocks.1.attn1.to_out.0.lora_B.layerdiff.weight": ("down_blocks.1.attn1.to_out.0", "up", "layerdiff"),
        "unet.x.to_k.lora.down.weight": ("unet.x.to_k", "down", None),
        "text_encoder.q_proj.lora_linear_layer.up.weight": ("text_encoder.q_proj", "up", None),
    }
    assert {key: tuple(parse_lora_key(key)) for key in cases} == cases
    for other in ("unet.x.alpha", "unet.x.lora_A.bias", "unet.x.lora_magnitude_vector.weight", "unet.x.weight"):
        assert parse_lora_key(other) is None, other


def test_an_export_of_a_part_the_checkpoint_does_not_export_names_what_it_does(tmp_path):
    from layerdiff.formats.checkpoints import exported_state

    contents = {"state_dict": {"unet.x.lora_A.weight": torch.zeros(1)},
                "trained_parts": {"exported": ["unet"], "auxiliary": []}}
    assert set(exported_state(contents, "unet", tmp_path)) == {"x.lora_A.weight"}
    with pytest.raises(ValueError, match=r"exports \['unet'\], not 'transparent_encoder'"):
        exported_state(contents, "transparent_encoder", tmp_path)
