"""ControlNet steering (LD sec. 4.4) on the tiny models: a diffusers ControlNetModel built from the
tiny UNet steers single-image generation through diffusers' ControlNet pipelines, and one layer of
a joint-layer set, leaving the other layers' rows alone; a ControlNet for another base is refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image

from layerdiff.models.layer_sharing import sharing_units
from layerdiff.modules import JointLayerLoRAModule, LatentDiffusionModule
from layerdiff.pipelines import GenerationSettings, LayerPromptBatch

SETTINGS = GenerationSettings(width=64, height=64, steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def controlnet(tiny_sdxl, tmp_path_factory):
    """A tiny ControlNet for the tiny SDXL, its zero convolutions made non-zero (as if trained)."""
    torch.manual_seed(0)
    model = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                parameter.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    model.save_pretrained(folder)
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 30:34] = 255
    Image.fromarray(edges).save(folder / "edges.png")
    return folder


def test_a_controlnet_steers_single_image_generation_and_scale_0_is_none(tiny_sdxl, tiny_transparent_vae, controlnet):
    module = LatentDiffusionModule(base_model=str(tiny_sdxl), transparent_vae=str(tiny_transparent_vae), lora_rank=4)
    generate = module.image_generator()
    plain = generate(["a cat"], [0], SETTINGS)[0]
    guide = {"model": str(controlnet), "image": str(controlnet / "edges.png"), "scale": 1.0}
    steered = generate(["a cat"], [0], replace(SETTINGS, controlnet=guide))[0]
    off = generate(["a cat"], [0], replace(SETTINGS, controlnet={**guide, "scale": 0.0}))[0]
    assert not torch.allclose(steered.alpha, plain.alpha, atol=1e-3)
    torch.testing.assert_close(off.alpha, plain.alpha, atol=1e-5, rtol=0)
    assert steered.parameters["controlnet"]["model"] == str(controlnet)


def test_a_controlnet_steers_one_layer_of_a_joint_set(tiny_sdxl, tiny_transparent_vae, controlnet):
    torch.manual_seed(0)
    module = JointLayerLoRAModule(base_model=str(tiny_sdxl), transparent_vae=str(tiny_transparent_vae),
                                  layers=["foreground", "background"], attention_sharing="none", lora_rank=4).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for unit in sharing_units(module.unet).values():
            for parameter in unit.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    prompts = [{"foreground": "a cat", "background": "a room"}]
    plain = module.layer_generator()(LayerPromptBatch([0], prompts, [0], SETTINGS))[0]
    guide = {"model": str(controlnet), "image": str(controlnet / "edges.png"), "layer": "background"}
    steered = module.layer_generator()(LayerPromptBatch([0], prompts, [0], replace(SETTINGS, controlnet=guide)))[0]
    assert not torch.allclose(steered.layers["background"], plain.layers["background"], atol=1e-3)
    # without attention sharing the foreground never sees the background's rows: untouched
    torch.testing.assert_close(steered.layers["foreground"], plain.layers["foreground"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="steers layer 'blend'"):
        module.layer_generator()(LayerPromptBatch([0], prompts, [0], replace(SETTINGS, controlnet={**guide,
                                                                                                   "layer": "blend"})))


def test_a_controlnet_for_another_base_is_refused(tiny_sd15, tiny_transparent_vae, controlnet):
    module = LatentDiffusionModule(base_model=str(tiny_sd15), transparent_vae=str(tiny_transparent_vae), lora_rank=4)
    guide = {"model": str(controlnet), "image": str(controlnet / "edges.png")}
    with pytest.raises(ValueError, match="for another base model"):
        module.image_generator()(["a cat"], [0], replace(SETTINGS, controlnet=guide))
