"""UNet exports: the LoRA in the diffusers/peft layout (loaded by diffusers pipelines and by
peft) and in the Forge/ComfyUI ``::lora::`` layout of the released LayerDiffuse files, import
back into a training adapter, the original-UNet block names, full UNet folders, and the CLI on
LatentDiffusionModule checkpoints with an EMA."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import (
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from callbacks import EMA
from data import ShardDataModule
from layerdiff.export import main
from layerdiff.formats.lora import (
    COMFYUI_LORA_FILENAMES,
    DIFFUSERS_LORA_FILENAME,
    FORGE_LORA_FILENAMES,
    Lora,
    load_lora_into_unet,
    lora_from_state_dict,
    read_lora,
    save_diffusers_lora,
    save_forge_lora,
)
from layerdiff.formats.provenance import read_metadata
from layerdiff.formats.unet_names import ldm_attention_prefixes, rename_block
from layerdiff.models.base import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, load_unet
from layerdiff.models.lora import DEFAULT_ADAPTER as LORA_ADAPTER
from layerdiff.models.lora import RELEASED_LORA_TARGETS
from layerdiff.modules import LatentDiffusionModule
from support.shards import write_tiny_shards
from support.trainers import quiet_trainer
from support.unets import unet_output

pytestmark = pytest.mark.filterwarnings("ignore:.*(num_workers|does not have many workers|LeafSpec):")

RANK = 4
FORGE_KEY = re.compile(
    r"^diffusion_model\.(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
    r"\.transformer_blocks\.\d+\.attn[12]\.to_(q|k|v|out\.0)\.weight::lora::[01]$"
)
def adapted_unet(model: Path, lora_alpha: float, seed: int) -> UNet2DConditionModel:
    """The model's UNet with a rank-4 adapter on the released targets and random factors."""
    unet = load_unet(str(model))
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=lora_alpha, target_modules=list(RELEASED_LORA_TARGETS)), adapter_name=LORA_ADAPTER
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return unet


def lora_from_unet(unet: UNet2DConditionModel, adapter_name: str) -> Lora:
    """An adapter's factors as the export reads them from a checkpoint: peft names, its alpha."""
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return lora_from_state_dict(state, unet.peft_config[adapter_name].lora_alpha)


@pytest.fixture(scope="module")
def trained_unet(tiny_sdxl) -> UNet2DConditionModel:
    # alpha != rank: the scale (2) must reach every loader.
    return adapted_unet(tiny_sdxl, lora_alpha=2 * RANK, seed=0)


@pytest.fixture(scope="module")
def exported(trained_unet, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    lora = lora_from_unet(trained_unet, LORA_ADAPTER)
    save_diffusers_lora(lora, out, metadata={"lora_rank": RANK, "lora_alpha": 2 * RANK})
    save_forge_lora(lora, trained_unet.config, out / FORGE_LORA_FILENAMES["sdxl"])
    return out


@pytest.mark.parametrize("architecture", ["sdxl", "sd15"])
def test_diffusers_export_loads_into_the_pipeline_with_the_same_unet_output(architecture, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{architecture}")
    pipeline_class = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}[architecture]
    unet = adapted_unet(model, lora_alpha=2 * RANK, seed=1)
    save_diffusers_lora(lora_from_unet(unet, LORA_ADAPTER), tmp_path)

    pipeline = pipeline_class.from_pretrained(model)
    base_output = unet_output(pipeline.unet)
    pipeline.load_lora_weights(tmp_path)

    expected = unet_output(unet)
    torch.testing.assert_close(unet_output(pipeline.unet), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(base_output, expected, atol=1e-3)  # the LoRA does change the output


def test_diffusers_file_layout_and_metadata(exported):
    path = exported / DIFFUSERS_LORA_FILENAME
    keys = set(load_file(path))
    module = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert {f"{module}.lora.down.weight", f"{module}.lora.up.weight"} <= keys
    metadata = read_metadata(path)
    assert metadata["format"] == "pt"
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert adapter["unet.r"] == adapter["unet.lora_alpha"] == RANK  # the scale is folded into lora.up
    assert len(adapter["unet.target_modules"]) == len(keys) // 2
    assert json.loads(metadata["layerdiff_config"]) == {"lora_rank": RANK, "lora_alpha": 2 * RANK}


def test_peft_loads_the_diffusers_export(tiny_sdxl, trained_unet, exported):
    path = exported / DIFFUSERS_LORA_FILENAME
    adapter = json.loads(read_metadata(path)["lora_adapter_metadata"])
    unet = load_unet(str(tiny_sdxl))
    unet.add_adapter(LoraConfig(**{key.removeprefix("unet."): value for key, value in adapter.items()}), "imported")
    state = {key.removeprefix("unet."): tensor for key, tensor in load_file(path).items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="imported")
    assert not result.unexpected_keys
    torch.testing.assert_close(unet_output(unet), unet_output(trained_unet), rtol=0, atol=1e-5)


def test_forge_layout_matches_the_released_key_format(trained_unet, exported):
    tensors = load_file(exported / FORGE_LORA_FILENAMES["sdxl"])
    adapted = lora_from_unet(trained_unet, LORA_ADAPTER)
    assert len(tensors) == 2 * len(adapted)
    assert all(FORGE_KEY.match(key) for key in tensors), [key for key in tensors if not FORGE_KEY.match(key)][:3]
    # The tiny UNet has 2 layers per level: down_blocks.1 -> input_blocks.4, 5; up_blocks.0 -> output_blocks.0-2.
    key = "diffusion_model.input_blocks.5.1.transformer_blocks.1.attn1.to_v.weight::lora::"
    up, down = tensors[key + "0"], tensors[key + "1"]
    module = adapted["down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_v"]
    assert up.shape == (64, RANK) and down.shape == (RANK, 64)
    assert torch.equal(up, module.up) and torch.equal(down, module.down)
    assert read_metadata(exported / FORGE_LORA_FILENAMES["sdxl"])["component"] == "unet_lora"


@pytest.mark.parametrize("filename", [DIFFUSERS_LORA_FILENAME, FORGE_LORA_FILENAMES["sdxl"]])
def test_import_into_a_training_adapter_round_trips(tiny_sdxl, trained_unet, exported, filename):
    same_config = adapted_unet(tiny_sdxl, lora_alpha=2 * RANK, seed=5)
    load_lora_into_unet(same_config, exported / filename, LORA_ADAPTER)
    trained = dict(trained_unet.named_parameters())
    for name, parameter in same_config.named_parameters():
        if ".lora_" in name:
            assert torch.equal(parameter, trained[name]), name

    # Another alpha: the file's scale is divided out, so the adapted UNet computes the same.
    other_alpha = adapted_unet(tiny_sdxl, lora_alpha=RANK / 2, seed=6)
    load_lora_into_unet(other_alpha, exported / filename, LORA_ADAPTER)
    torch.testing.assert_close(unet_output(other_alpha), unet_output(trained_unet), rtol=0, atol=1e-5)


def test_import_mismatches_name_the_setting_to_change(tiny_sdxl, exported, tmp_path):
    unet = load_unet(str(tiny_sdxl))
    unet.add_adapter(LoraConfig(r=2 * RANK, target_modules=list(RELEASED_LORA_TARGETS)), adapter_name=LORA_ADAPTER)
    with pytest.raises(ValueError, match=f"set lora_rank to {RANK}"):
        load_lora_into_unet(unet, exported, LORA_ADAPTER)
    with pytest.raises(ValueError, match="no LoRA adapter 'other'"):
        load_lora_into_unet(unet, exported, "other")

    fewer = load_unet(str(tiny_sdxl))
    fewer.add_adapter(LoraConfig(r=RANK, target_modules=["attn1.to_q"]), adapter_name=LORA_ADAPTER)
    with pytest.raises(ValueError, match="lora_targets"):
        load_lora_into_unet(fewer, exported, LORA_ADAPTER)

    resnet_lora = load_unet(str(tiny_sdxl))
    resnet_lora.add_adapter(LoraConfig(r=RANK, target_modules=["conv1"]), adapter_name=LORA_ADAPTER)
    with pytest.raises(ValueError, match="not inside a transformer block"):
        save_forge_lora(lora_from_unet(resnet_lora, LORA_ADAPTER), resnet_lora.config, tmp_path / "x.safetensors")

    save_file({"diffusion_model.input_blocks.4.1.proj_in.weight::diff::0": torch.zeros(1)}, tmp_path / "diff.safetensors")
    with pytest.raises(ValueError, match="is not a"):
        read_lora(tmp_path / "diff.safetensors", unet.config)


def test_sdxl_paths_are_the_released_file_names():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    prefixes = ldm_attention_prefixes(unet.config)
    adapted = [name for name, _ in unet.named_modules() if name.endswith(RELEASED_LORA_TARGETS)]
    keys = {f"diffusion_model.{rename_block(name, prefixes)}.weight::lora::{index}" for name in adapted for index in (0, 1)}

    # 70 transformer blocks (down 2x2 + 2x10, mid 10, up 3x10 + 3x2) x 2 attentions x 4 projections x 2 factors
    assert len(keys) == 1120 and all(FORGE_KEY.match(key) for key in keys)
    released = {
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight::lora::0",
        "diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_out.0.weight::lora::1",
        "diffusion_model.output_blocks.0.1.transformer_blocks.3.attn1.to_k.weight::lora::0",
    }
    assert released <= keys
    inverse = {ldm: diffusers for diffusers, ldm in prefixes.items()}
    assert all(rename_block(rename_block(name, prefixes), inverse) == name for name in adapted)


def test_sd15_paths_follow_the_original_block_numbering():
    prefixes = ldm_attention_prefixes(SD15_UNET_CONFIG)
    expected = {
        "down_blocks.0.attentions.0": "input_blocks.1.1",
        "down_blocks.1.attentions.1": "input_blocks.5.1",
        "down_blocks.2.attentions.1": "input_blocks.8.1",
        "mid_block.attentions.0": "middle_block.1",
        "up_blocks.1.attentions.0": "output_blocks.3.1",
        "up_blocks.3.attentions.2": "output_blocks.11.1",
    }
    assert {block: prefixes[block] for block in expected} == expected


# -- the CLI on LatentDiffusionModule checkpoints ----------------------------------------------


def train_and_save(
    model: Path, transparent_vae: Path, tmp_path: Path, **module_args
) -> tuple[Path, LatentDiffusionModule, EMA]:
    """Two steps of LatentDiffusionModule with an EMA, saved as a Lightning checkpoint."""
    shards = ",".join(write_tiny_shards(tmp_path / "shards", 4, sizes=((64, 64),)))
    module = LatentDiffusionModule(
        transparent_vae=str(transparent_vae), base_model=str(model), learning_rate=1e-2, caption_dropout=0.0, **module_args
    )
    trainer = quiet_trainer(tmp_path, callbacks=[ema := EMA(decay=0.5)])
    trainer.fit(module, datamodule=ShardDataModule(shards, batch_size=2, num_workers=0))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module, ema


def test_cli_exports_a_lora_checkpoint_with_its_ema(tiny_sdxl, tiny_transparent_vae, tmp_path, capsys):
    checkpoint, module, ema = train_and_save(tiny_sdxl, tiny_transparent_vae, tmp_path, lora_rank=RANK, lora_alpha=2 * RANK)
    raw_output = unet_output(module.unet)
    with ema.averaged_weights():
        ema_output = unet_output(module.unet)
    assert not torch.allclose(ema_output, raw_output, atol=1e-6)

    assert main(["lora", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "ema")]) == 0
    assert str(tmp_path / "ema" / FORGE_LORA_FILENAMES["sdxl"]) in capsys.readouterr().out
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.load_lora_weights(tmp_path / "ema")
    torch.testing.assert_close(unet_output(pipeline.unet), ema_output, rtol=0, atol=1e-5)
    assert json.loads(read_metadata(tmp_path / "ema" / DIFFUSERS_LORA_FILENAME)["layerdiff_config"])["lora_alpha"] == 2 * RANK
    # ComfyUI's own loader's (kohya) file, written by default too, imports back to the EMA LoRA.
    from_comfyui = adapted_unet(tiny_sdxl, lora_alpha=RANK, seed=8)
    load_lora_into_unet(from_comfyui, tmp_path / "ema" / COMFYUI_LORA_FILENAMES["sdxl"], LORA_ADAPTER)
    torch.testing.assert_close(unet_output(from_comfyui), ema_output, rtol=0, atol=1e-5)

    forge_args = ["--format", "forge", "--no-ema", "--dtype", "fp16"]
    assert main(["lora", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "raw"), *forge_args]) == 0
    forge_file = tmp_path / "raw" / FORGE_LORA_FILENAMES["sdxl"]
    assert not (tmp_path / "raw" / DIFFUSERS_LORA_FILENAME).exists()
    assert all(tensor.dtype == torch.float16 for tensor in load_file(forge_file).values())
    imported = adapted_unet(tiny_sdxl, lora_alpha=RANK, seed=7)
    load_lora_into_unet(imported, forge_file, LORA_ADAPTER)
    torch.testing.assert_close(unet_output(imported), raw_output, rtol=0, atol=2e-3)

    # The UNet folder: the base UNet with the (EMA) LoRA fused in, usable by a pipeline.
    assert main(["unet", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "unet")]) == 0
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(unet_output(fused), ema_output, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "unet" / "layerdiff_config.json").read_text())["lora_rank"] == RANK
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, unet=fused)
    latents = pipeline("a red apple", num_inference_steps=1, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_cli_exports_a_full_fine_tune_as_a_unet_folder(tiny_sdxl, tiny_transparent_vae, tmp_path):
    checkpoint, _, _ = train_and_save(tiny_sdxl, tiny_transparent_vae, tmp_path, lora_rank=None)
    assert main(["unet", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "unet"), "--no-ema"]) == 0
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    trained = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert len(trained) == len(loaded)  # every UNet weight trains, and nothing else
    for name, tensor in trained.items():
        assert torch.equal(loaded[name.removeprefix("unet.")], tensor), name
    assert not torch.equal(loaded["conv_in.weight"], load_unet(str(tiny_sdxl)).conv_in.weight)

    with pytest.raises(ValueError, match="layerdiff.export unet"):
        main(["lora", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "lora")])


@pytest.mark.parametrize("filename", [DIFFUSERS_LORA_FILENAME, FORGE_LORA_FILENAMES["sdxl"]])
def test_a_latent_diffusion_module_starts_its_adapter_from_a_lora_file(
    tiny_sdxl, tiny_transparent_vae, trained_unet, exported, filename
):
    from layerdiff.modules import LatentDiffusionModule

    arguments = {"transparent_vae": str(tiny_transparent_vae), "base_model": str(tiny_sdxl)}
    module = LatentDiffusionModule(**arguments, lora_rank=RANK, lora_alpha=RANK, init_lora=str(exported / filename))
    # its own alpha (= rank) differs from the file's: the factors carry the file's scale over
    torch.testing.assert_close(unet_output(module.unet), unet_output(trained_unet), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="init_lora starts a LoRA adapter"):
        LatentDiffusionModule(**arguments, lora_rank=None, init_lora=str(exported / filename))
