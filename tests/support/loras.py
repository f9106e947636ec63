"""Community LoRA files for the tiny models, saved as diffusers saves LoRAs."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from layerdiff.models.base import load_unet


def randomise_lora_up_weights(unet: torch.nn.Module, seed: int) -> None:
    """peft starts ``lora_B`` at zero (no effect); give it weights so the adapter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def write_community_lora(base_model: Path, folder: Path, seed: int = 1) -> Path:
    """A LoRA trained (well, initialised) on ``base_model``'s UNet, saved as diffusers saves LoRAs."""
    unet = load_unet(str(base_model))
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="style")
    randomise_lora_up_weights(unet, seed)
    lora_layers = get_peft_model_state_dict(unet, adapter_name="style")
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=lora_layers)
    return folder / "pytorch_lora_weights.safetensors"
