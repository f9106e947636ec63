"""A diffusers UNet's module names in the original (LDM/SGM) UNet's numbering, which the
Forge/ComfyUI LoRA layouts use, and in kohya's flattened form, which ComfyUI's LoRA loader reads.

The original UNet numbers its blocks in one sequence per side: ``input_blocks.0`` is
``conv_in``, then each level has ``layers_per_block`` blocks and, all but the last, one
downsampler block; each level of ``output_blocks`` has ``layers_per_block + 1`` blocks (its
upsampler sits inside the last). In a block, index 0 is the resnet and 1 the spatial
transformer, whose inner names (``transformer_blocks.N.attn1.to_q``, ``proj_in``, ...) are the
same in both. SDXL: ``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``,
``mid_block.attentions.0`` -> ``middle_block.1``, ``up_blocks.0.attentions.0`` ->
``output_blocks.0.1``. kohya's name of a module is ``lora_unet_`` and its original path with
``_`` for ``.`` (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel

KOHYA_UNET_PREFIX = "lora_unet_"


def ldm_attention_prefixes(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers paths of a UNet's transformer blocks -> the original UNet's paths."""
    levels = len(unet_config["down_block_types"])
    layers = unet_config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    prefixes = {"mid_block.attentions.0": "middle_block.1"}
    first_input_block = 1
    for level, level_layers in enumerate(layers):
        for layer in range(level_layers):
            prefixes[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{first_input_block + layer}.1"
        first_input_block += level_layers + 1
    first_output_block = 0
    for level, level_layers in enumerate(reversed(layers)):
        for layer in range(level_layers + 1):
            prefixes[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{first_output_block + layer}.1"
        first_output_block += level_layers + 1
    return prefixes


def rename_block(path: str, prefixes: Mapping[str, str]) -> str:
    """``path`` with its block prefix replaced by ``prefixes`` (:func:`ldm_attention_prefixes`
    or, for original-UNet paths, its inverse)."""
    parts = path.split(".")
    for length in (2, 3, 4):  # the block prefixes above are 2-4 segments long
        block = ".".join(parts[:length])
        if block in prefixes:
            return ".".join([prefixes[block], *parts[length:]])
    raise ValueError(
        f"LoRA module {path!r} is not inside a transformer block, the only UNet parts whose names "
        "the Forge/ComfyUI layouts map; adapt only attention modules (lora_targets) to export those layouts."
    )


def kohya_name(ldm_path: str) -> str:
    """kohya's flattened name of the module at the original UNet path ``ldm_path``."""
    return KOHYA_UNET_PREFIX + ldm_path.replace(".", "_")


def kohya_module_names(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """kohya names -> diffusers paths of the weighted modules inside a UNet's transformer blocks.

    Flattening loses the dots, so the names are matched against the UNet's own modules (built
    on the meta device from ``unet_config``); both the original-path and the diffusers-path
    spellings are accepted, as ComfyUI accepts both.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    prefixes = ldm_attention_prefixes(unet_config)
    names = {}
    for path, module in unet.named_modules():
        inside_block = any(path.startswith(f"{block}.") for block in prefixes)
        if inside_block and isinstance(getattr(module, "weight", None), torch.Tensor):
            names[kohya_name(rename_block(path, prefixes))] = path
            names[kohya_name(path)] = path
    return names
