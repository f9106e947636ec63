"""UNet weights out of training and back in: LoRAs in the diffusers/peft and Forge/ComfyUI
layouts, full fine-tunes as diffusers UNet folders (DESIGN §3).

A LoRA changes each adapted linear layer's weight by ``scale * B @ A`` (peft's ``lora_B``,
``lora_A``; ``scale = lora_alpha / rank``). The Forge/ComfyUI layout of the released
``layer_xl_transparent_attn.safetensors`` stores no alpha, so its up factor carries the scale.
Our files do the same in both layouts: the scale is folded into the up factor (``B``) and the
diffusers file declares ``lora_alpha == rank``. So every loader applies the right scale, whether
or not it reads diffusers' ``lora_adapter_metadata`` (older diffusers, ComfyUI's diffusers-key
loader and plain peft do not), and importing a file into an adapter with any alpha divides the
scale back out. The training ``lora_rank``/``lora_alpha`` stay in ``layerdiff_config`` metadata.

Files:

* ``pytorch_lora_weights.safetensors`` (diffusers/peft), written by diffusers' own
  ``save_lora_weights`` as its training scripts do: keys ``unet.<module>.lora.{down,up}.weight``
  and ``lora_adapter_metadata`` (``r``, ``lora_alpha``, ``target_modules``). Loads with
  ``StableDiffusionXLPipeline.load_lora_weights(folder)`` (or ``StableDiffusionPipeline``), and
  with peft's ``set_peft_model_state_dict`` after diffusers' ``convert_unet_state_dict_to_peft``.
* ``layer_xl_transparent_attn.safetensors`` (SDXL; ``layerdiff_sd15_transparent_attn_lora.safetensors``
  for SD1.5), the Forge/ComfyUI layout: ``diffusion_model.<original UNet path>.weight::lora::{0,1}``,
  0 the up factor ``(out, rank)``, 1 the down factor ``(rank, in)``. Paths follow the original
  (LDM/SGM) UNet's block numbering, derived from the UNet config (:func:`ldm_attention_prefixes`).
* A full UNet: ``UNet2DConditionModel.save_pretrained`` (safetensors) plus
  ``layerdiff_config.json`` with the training hyper-parameters.

Lightning checkpoints of ``LatentDiffusionModule`` hold the UNet as ``unet``: a LoRA run stores
only ``unet.<module>.lora_{A,B}.<adapter>.weight``, a full fine-tune every ``unet.*`` weight; the
frozen rest comes from the ``base_model`` hyper-parameter. EMA averages replace the raw weights
when present (:func:`layerdiff.export.trained_state_dict`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from layerdiff.export import (
    _find_hyperparameter,
    _read_checkpoint,
    _submodule_state,
    layerdiff_metadata,
    tensors_for_file,
    trained_state_dict,
)
from layerdiff.models.base import MODEL_CONFIG_FILE, detect_architecture, load_component, load_unet

DIFFUSERS_LORA_FILENAME = LORA_WEIGHT_NAME_SAFE  # pytorch_lora_weights.safetensors
# SDXL: the released name, so an export drops in where the Forge/ComfyUI extensions look for it.
# SD1.5: the released layer_sd15_transparent_attn is an attention-sharing patch in another layout,
# which those extensions load differently, so the ::lora:: file must not take its name.
FORGE_LORA_FILENAMES = {
    "sdxl": "layer_xl_transparent_attn.safetensors",
    "sd15": "layerdiff_sd15_transparent_attn_lora.safetensors",
}
UNET_CONFIG_FILENAME = "layerdiff_config.json"
UNET_PREFIX = "unet."
FORGE_PREFIX = "diffusion_model."
FORGE_UP, FORGE_DOWN = 0, 1
LoraFormat = Literal["diffusers", "forge"]

# peft parameter names, in checkpoints with the adapter name (``lora_A.layerdiff.weight``),
# in peft/diffusers state dicts without it (``lora_A.weight``).
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_FORGE_KEY = re.compile(rf"^{re.escape(FORGE_PREFIX)}(?P<module>.+)\.weight::lora::(?P<index>\d+)$")


class LoraFactors(NamedTuple):
    """One adapted linear layer: its weight changes by ``up @ down`` (the scale folded into ``up``)."""

    up: torch.Tensor  # (out_features, rank)
    down: torch.Tensor  # (rank, in_features)


# diffusers UNet module path (e.g. ``mid_block.attentions.0.transformer_blocks.0.attn1.to_q``) -> factors
Lora = dict[str, LoraFactors]


# -- the original UNet's block numbering -------------------------------------------------


def ldm_attention_prefixes(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers paths of a UNet's transformer blocks -> the original (LDM/SGM) UNet's paths.

    The original UNet numbers its blocks in one sequence per side: ``input_blocks.0`` is
    ``conv_in``, then each level has ``layers_per_block`` blocks and, all but the last, one
    downsampler block; each level of ``output_blocks`` has ``layers_per_block + 1`` blocks (its
    upsampler sits inside the last). In a block, index 0 is the resnet and 1 the spatial
    transformer, whose inner names (``transformer_blocks.N.attn1.to_q``, ``proj_in``, ...) are the
    same in both. SDXL: ``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``,
    ``mid_block.attentions.0`` -> ``middle_block.1``, ``up_blocks.0.attentions.0`` ->
    ``output_blocks.0.1``.
    """
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
        "the Forge/ComfyUI layout maps; adapt only attention modules (lora_targets) to export that layout."
    )


# -- LoRA weights from a UNet, a checkpoint or a file --------------------------------------


def _adapter_layers(unet: torch.nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    layers = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
    if not layers:
        raise ValueError(
            f"the UNet has no LoRA adapter {adapter_name!r}; add one first, "
            f"e.g. unet.add_adapter(LoraConfig(...), adapter_name={adapter_name!r})."
        )
    return layers


def lora_from_unet(unet: torch.nn.Module, adapter_name: str) -> Lora:
    """The factors of one peft adapter of a UNet, with each layer's own scale folded in."""
    return {
        name: LoraFactors(
            up=layer.lora_B[adapter_name].weight.detach() * layer.scaling[adapter_name],
            down=layer.lora_A[adapter_name].weight.detach(),
        )
        for name, layer in _adapter_layers(unet, adapter_name).items()
    }


def lora_from_state_dict(state_dict: Mapping[str, torch.Tensor], lora_alpha: float | None) -> Lora:
    """Factors from peft-named UNet weights (``<module>.lora_{A,B}[.<adapter>].weight``) of one
    adapter with one ``lora_alpha`` (``None``: the rank, scale 1). Other keys are ignored."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            if ".lora_" in key:
                raise ValueError(
                    f"unsupported LoRA parameter {key!r}: only plain LoRA factors (no DoRA, no LoRA bias) export"
                )
            continue
        adapters.add(match["adapter"])
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if len(adapters) > 1:
        raise ValueError(f"the weights hold several LoRA adapters {sorted(map(str, adapters))}; export one at a time")
    lora = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} has only its lora_{''.join(pair)} factor")
        rank = pair["A"].shape[0]
        lora[module] = LoraFactors(up=pair["B"] * ((lora_alpha or rank) / rank), down=pair["A"])
    return lora


def read_lora(path: str | PathLike, unet_config: Mapping[str, Any]) -> Lora:
    """A LoRA file in either layout: a Forge/ComfyUI ``::lora::`` file (ours or the released
    LayerDiffuse ones) or a diffusers/peft file (or the folder holding
    ``pytorch_lora_weights.safetensors``). ``unet_config`` maps Forge paths to diffusers ones."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_LORA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"LoRA file not found: {path}. Give a {DIFFUSERS_LORA_FILENAME} (or its folder) or a Forge/ComfyUI "
            f"file such as {FORGE_LORA_FILENAMES['sdxl']}."
        )
    with safe_open(str(path), framework="pt") as handle:
        # Forge's frozen-patcher keys are "<weight>::<patch type>::<index>".
        is_forge = any("::" in key for key in handle.keys())
    return _read_forge_lora(path, unet_config) if is_forge else _read_diffusers_lora(path)


def _read_forge_lora(path: Path, unet_config: Mapping[str, Any]) -> Lora:
    from_ldm = {ldm: diffusers for diffusers, ldm in ldm_attention_prefixes(unet_config).items()}
    factors: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        match = _FORGE_KEY.match(key)
        if match is None or int(match["index"]) not in (FORGE_UP, FORGE_DOWN):
            raise ValueError(f"{path}: {key!r} is not a '{FORGE_PREFIX}<module>.weight::lora::{{0,1}}' LoRA key")
        factors.setdefault(rename_block(match["module"], from_ldm), {})[int(match["index"])] = tensor
    incomplete = sorted(module for module, pair in factors.items() if len(pair) != 2)
    if incomplete:
        raise ValueError(f"{path}: LoRA modules with one factor only, e.g. {incomplete[:3]}")
    return {module: LoraFactors(up=pair[FORGE_UP], down=pair[FORGE_DOWN]) for module, pair in factors.items()}


def _read_diffusers_lora(path: Path) -> Lora:
    state_dict, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(path), return_lora_metadata=True
    )
    other = sorted(key for key in state_dict if not key.startswith(UNET_PREFIX))
    if other:
        raise ValueError(f"{path}: only UNet LoRAs are read here; the file also adapts other models, e.g. {other[:3]}")
    if network_alphas:
        raise ValueError(
            f"{path}: kohya/A1111-layout LoRAs (per-module alphas) are not read here; give a diffusers/peft "
            "or Forge/ComfyUI LayerDiffuse file."
        )
    config = {key.removeprefix(UNET_PREFIX): value for key, value in (metadata or {}).items()}
    if config.get("use_rslora") or config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ValueError(f"{path}: per-module ranks/alphas and rsLoRA scaling are not supported")
    unet_state = convert_unet_state_dict_to_peft(_submodule_state(state_dict, UNET_PREFIX))
    return lora_from_state_dict(unet_state, config.get("lora_alpha"))


def load_lora_into_unet(unet: UNet2DConditionModel, path: str | PathLike, adapter_name: str) -> None:
    """Set an existing peft adapter of ``unet`` from a LoRA file in either layout (see
    :func:`read_lora`), e.g. the released LayerDiffuse LoRA to initialise training.

    The file's modules must be exactly the adapter's and its rank the adapter's; the adapter
    keeps its own alpha (the file's scale is divided out of the up factor), so the adapted UNet
    computes what the file describes.
    """
    lora = read_lora(path, unet.config)
    layers = _adapter_layers(unet, adapter_name)
    missing, unexpected = sorted(set(layers) - set(lora)), sorted(set(lora) - set(layers))
    if missing or unexpected:
        raise ValueError(
            f"{path}: its LoRA modules differ from adapter {adapter_name!r}'s: {len(missing)} missing from the file "
            f"(e.g. {missing[:2]}), {len(unexpected)} not adapted (e.g. {unexpected[:2]}). Set lora_targets to the "
            "modules the file adapts."
        )
    for name, factors in lora.items():
        layer = layers[name]
        down, up = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if factors.down.shape != down.shape or factors.up.shape != up.shape:
            file_weight, unet_weight = (factors.up.shape[0], factors.down.shape[1]), (up.shape[0], down.shape[1])
            advice = (
                f"set lora_rank to {factors.down.shape[0]}"
                if file_weight == unet_weight
                else "the file adapts another base model"
            )
            raise ValueError(
                f"{path}: module {name!r} is rank {factors.down.shape[0]} on a {file_weight} weight in the file, "
                f"rank {down.shape[0]} on {unet_weight} in the UNet; {advice}."
            )
        with torch.no_grad():
            down.copy_(factors.down)
            up.copy_(factors.up / layer.scaling[adapter_name])


def fuse_lora(unet: torch.nn.Module, lora: Lora) -> None:
    """Add each ``up @ down`` to the weight of the plain linear layer it adapts."""
    with torch.no_grad():
        for name, factors in lora.items():
            weight = unet.get_submodule(name).weight
            weight += (factors.up.float() @ factors.down.float()).to(weight)


# -- writing ---------------------------------------------------------------------------------


def save_diffusers_lora(
    lora: Lora,
    out_dir: str | PathLike,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` into ``out_dir`` through diffusers'
    ``save_lora_weights``, then add the layerdiff provenance to its safetensors metadata."""
    rank = _single_rank(lora)
    peft_state = {}
    for module, factors in lora.items():
        peft_state[f"{module}.lora_A.weight"] = factors.down
        peft_state[f"{module}.lora_B.weight"] = factors.up
    out_dir = Path(out_dir)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        out_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(tensors_for_file(peft_state, dtype)),
        # The scale is folded into the up factors, so alpha equals the rank.
        unet_lora_adapter_metadata={"r": rank, "lora_alpha": rank, "target_modules": sorted(lora)},
    )
    path = out_dir / DIFFUSERS_LORA_FILENAME
    with safe_open(str(path), framework="pt") as handle:
        diffusers_metadata = dict(handle.metadata() or {})
    save_file(load_file(path), path, metadata={**layerdiff_metadata("unet_lora", metadata), **diffusers_metadata})
    return path


def save_forge_lora(
    lora: Lora,
    unet_config: Mapping[str, Any],
    path: str | PathLike,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``lora`` in the Forge/ComfyUI ``::lora::`` layout of the released LayerDiffuse LoRAs."""
    to_ldm = ldm_attention_prefixes(unet_config)
    tensors = {}
    for module, factors in lora.items():
        key = f"{FORGE_PREFIX}{rename_block(module, to_ldm)}.weight::lora::"
        tensors[f"{key}{FORGE_UP}"] = factors.up
        tensors[f"{key}{FORGE_DOWN}"] = factors.down
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_metadata = {"format": "layerdiffuse", **layerdiff_metadata("unet_lora", metadata)}
    save_file(tensors_for_file(tensors, dtype), path, metadata=file_metadata)
    return path


def _single_rank(lora: Lora) -> int:
    ranks = Counter(factors.down.shape[0] for factors in lora.values())
    if len(ranks) != 1:
        raise ValueError(f"the diffusers export writes one rank for all modules; this LoRA has ranks {dict(ranks)}")
    return next(iter(ranks))


# -- Lightning checkpoints --------------------------------------------------------------------


class _UNetCheckpoint(NamedTuple):
    unet_state: dict[str, torch.Tensor]  # trained weights, ``unet.`` stripped
    hyperparameters: dict[str, Any]
    base_model: str
    base_revision: str | None


def _read_unet_checkpoint(checkpoint: str | PathLike, use_ema: bool, base_model: str | None) -> _UNetCheckpoint:
    path = Path(checkpoint)
    contents = _read_checkpoint(path)
    hyperparameters = dict(contents.get("hyper_parameters", {}))
    unet_state = _submodule_state(trained_state_dict(contents, use_ema), UNET_PREFIX)
    if not unet_state:
        raise ValueError(
            f"{path}: no '{UNET_PREFIX}*' weights in the checkpoint; is it a LatentDiffusionModule checkpoint?"
        )
    base_model = base_model or _find_hyperparameter(hyperparameters, "base_model")
    if base_model is None:
        raise ValueError(f"{path}: its hyper-parameters name no base_model; pass --base-model")
    base_revision = _find_hyperparameter(hyperparameters, "base_revision")
    return _UNetCheckpoint(unet_state, hyperparameters, base_model, base_revision)


def export_lora_checkpoint(
    checkpoint: str | PathLike,
    out_dir: str | PathLike,
    formats: Sequence[LoraFormat] = ("diffusers", "forge"),
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    base_model: str | None = None,
) -> list[Path]:
    """Write a LoRA checkpoint's adapter into ``out_dir`` in each of ``formats``.

    The scale comes from the ``lora_alpha`` hyper-parameter (unset: the rank). The Forge layout
    needs the base model's UNet config (read from ``base_model``, by default the checkpoint's).
    """
    read = _read_unet_checkpoint(checkpoint, use_ema, base_model)
    lora = lora_from_state_dict(read.unet_state, _find_hyperparameter(read.hyperparameters, "lora_alpha"))
    if not lora:
        raise ValueError(
            f"{checkpoint}: the checkpoint's UNet weights hold no LoRA (a full fine-tune?); "
            "export it with `python -m layerdiff.export unet`."
        )
    paths = []
    if "diffusers" in formats:
        paths.append(save_diffusers_lora(lora, out_dir, read.hyperparameters, dtype))
    if "forge" in formats:
        unet_config = load_component(
            UNet2DConditionModel.load_config, read.base_model, "unet", MODEL_CONFIG_FILE, read.base_revision
        )
        filename = FORGE_LORA_FILENAMES[detect_architecture(read.base_model, revision=read.base_revision)]
        paths.append(save_forge_lora(lora, unet_config, Path(out_dir) / filename, read.hyperparameters, dtype))
    return paths


def export_unet_checkpoint(
    checkpoint: str | PathLike,
    out_dir: str | PathLike,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    base_model: str | None = None,
) -> Path:
    """Write the checkpoint's UNet as a diffusers UNet folder: the base model's UNet with the
    trained weights loaded (a full fine-tune) or the LoRA fused in (a LoRA run)."""
    read = _read_unet_checkpoint(checkpoint, use_ema, base_model)
    unet = load_unet(read.base_model, revision=read.base_revision)
    lora = lora_from_state_dict(read.unet_state, _find_hyperparameter(read.hyperparameters, "lora_alpha"))
    fuse_lora(unet, lora)
    plain_state = {key: tensor for key, tensor in read.unet_state.items() if ".lora_" not in key}
    unexpected = unet.load_state_dict(plain_state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(
            f"{checkpoint}: {len(unexpected)} UNet weights have no place in {read.base_model}'s UNet "
            f"(e.g. {unexpected[:3]}); was it trained on another base model? Pass --base-model."
        )
    out_dir = Path(out_dir)
    unet.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    (out_dir / UNET_CONFIG_FILENAME).write_text(
        json.dumps(read.hyperparameters, default=str, sort_keys=True, indent=2), encoding="utf-8"
    )
    return out_dir
