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

Beyond the transformer blocks (:func:`ldm_module_prefixes`, :func:`ldm_parameter_names`, as
diffusers' ``convert_ldm_unet_checkpoint`` and the original ``openaimodel.UNetModel`` lay them
out): a resnet ``down_blocks.L.resnets.J`` is block index 0 (``input_blocks.N.0``) with
``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`` named ``in_layers.0, in_layers.2,
emb_layers.1, out_layers.0, out_layers.3, skip_connection``; a downsampler is
``input_blocks.N.0.op``; an upsampler is ``output_blocks.N.{1, or 2 after a transformer}.conv``;
``mid_block`` is ``middle_block.{0 resnet, 1 transformer, 2 resnet}``; ``conv_in`` is
``input_blocks.0.0``, ``time_embedding.linear_{1,2}`` is ``time_embed.{0,2}``, SDXL's
``add_embedding.linear_{1,2}`` is ``label_emb.0.{0,2}`` and ``conv_norm_out``/``conv_out`` are
``out.0``/``out.2``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel

KOHYA_UNET_PREFIX = "lora_unet_"
# diffusers ResnetBlock2D module -> the original ResBlock's (in_layers/out_layers are Sequentials).
LDM_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Layers outside the blocks; the embeddings only where the config has them.
LDM_TOP_LAYERS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
LDM_LABEL_EMBEDDING = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}


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


def _unet_arguments(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """``unet_config`` over ``UNet2DConditionModel``'s defaults (partial configs such as
    ``SD15_UNET_CONFIG`` name only what differs)."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **unet_config}


def ldm_module_prefixes(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers paths -> original UNet paths of every block and layer that holds weights:
    resnet layers, down/upsamplers, the embeddings and ``conv_in``/``out``, and the
    transformer blocks of :func:`ldm_attention_prefixes` (inside which names agree)."""
    config = _unet_arguments(unet_config)
    if config["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid_block_type {config['mid_block_type']!r}: only SD1.5/SDXL's UNetMidBlock2DCrossAttn is named")
    levels = len(config["down_block_types"])
    layers = config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    prefixes = dict(LDM_TOP_LAYERS)
    for embedding, kind in (("add_embedding", "addition_embed_type"), ("class_embedding", "class_embed_type")):
        if config[kind] is not None:
            prefixes.update({f"{embedding}.{name}": ldm for name, ldm in LDM_LABEL_EMBEDDING.items()})

    def add_resnet(diffusers_path: str, ldm_path: str) -> None:
        prefixes.update({f"{diffusers_path}.{name}": f"{ldm_path}.{ldm}" for name, ldm in LDM_RESNET_LAYERS.items()})

    block = 1  # input_blocks.0 is conv_in
    for level, level_layers in enumerate(layers):
        for layer in range(level_layers):
            add_resnet(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{block}.0")
            block += 1
        if level < levels - 1:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
            block += 1
    add_resnet("mid_block.resnets.0", "middle_block.0")
    add_resnet("mid_block.resnets.1", "middle_block.2")
    block = 0
    for level, level_layers in enumerate(reversed(layers)):
        for layer in range(level_layers + 1):
            add_resnet(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{block}.0")
            block += 1
        if level < levels - 1:  # the upsampler follows the level's last resnet (and transformer)
            index = 2 if "CrossAttn" in config["up_block_types"][level] else 1
            prefixes[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{block - 1}.{index}.conv"
    prefixes.update(ldm_attention_prefixes(config))
    return prefixes


def rename_prefix(path: str, prefixes: Mapping[str, str]) -> str | None:
    """``path`` with its longest prefix in ``prefixes`` replaced (whole dotted segments), or
    None when no prefix matches."""
    parts = path.split(".")
    for length in range(len(parts), 0, -1):
        prefix = ".".join(parts[:length])
        if prefix in prefixes:
            return ".".join([prefixes[prefix], *parts[length:]])
    return None


def ldm_parameter_names(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Every state-dict key of the UNet built from ``unet_config`` -> its original UNet key
    (``conv_in.weight`` -> ``input_blocks.0.0.weight``), SD1.5 and SDXL alike.

    The keys come from the UNet itself (built on the meta device), so a parameter the
    original layout does not name is an error here rather than a key missing from a file.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    prefixes = ldm_module_prefixes(unet_config)
    names = {key: rename_prefix(key, prefixes) for key in unet.state_dict()}
    unnamed = sorted(key for key, name in names.items() if name is None)
    if unnamed:
        raise ValueError(
            f"{len(unnamed)} UNet parameters have no name in the original SD1.5/SDXL layout (e.g. {unnamed[:3]}); "
            "only UNets of that family map to it."
        )
    return names
