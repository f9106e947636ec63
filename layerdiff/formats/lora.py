"""LoRA weights of a UNet in every layout we read or write, and their one key parser.

A LoRA changes each adapted linear layer's weight by ``scale * up @ down`` (peft's ``lora_B``,
``lora_A``; ``scale = lora_alpha / rank``). Our files fold the scale into the up factor and
declare ``alpha == rank`` where the layout has an alpha, so every loader applies the right
scale whether or not it reads alphas or diffusers' ``lora_adapter_metadata``, and importing a
file into an adapter with any alpha divides the scale back out. The training
``lora_rank``/``lora_alpha`` stay in the ``layerdiff_config`` metadata.

Layouts (:data:`LoraFormat`):

* ``diffusers``: ``pytorch_lora_weights.safetensors``, written by diffusers' own
  ``save_lora_weights`` as its training scripts do: keys ``unet.<module>.lora.{down,up}.weight``
  and ``lora_adapter_metadata`` (``r``, ``lora_alpha``, ``target_modules``). Loads with
  ``StableDiffusionXLPipeline.load_lora_weights(folder)`` and with peft's
  ``set_peft_model_state_dict`` after diffusers' ``convert_unet_state_dict_to_peft``.
* ``forge``: the layout of the released ``layer_xl_transparent_attn.safetensors``, which the
  Forge extension and ComfyUI-layerdiffuse read: ``diffusion_model.<original UNet path>.weight::lora::{0,1}``,
  0 the up factor ``(out, rank)``, 1 the down factor ``(rank, in)``, no alpha.
* ``comfyui``: kohya's keys, which ComfyUI's own LoRA loader reads (current ComfyUI no longer
  applies the patches ComfyUI-layerdiffuse builds from the ``forge`` file):
  ``lora_unet_<original UNet path, _ for .>.{lora_up.weight,lora_down.weight,alpha}``.

Original UNet paths come from :mod:`layerdiff.formats.unet_names`. In peft/diffusers state
dicts a factor's key is ``<module>.<factor>[.<adapter>].weight`` (:func:`parse_lora_key`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
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

from layerdiff.formats.checkpoints import submodule_state
from layerdiff.formats.provenance import provenance, read_metadata, tensors_for_file
from layerdiff.formats.unet_names import (
    KOHYA_UNET_PREFIX,
    kohya_module_names,
    kohya_name,
    ldm_attention_prefixes,
    rename_block,
)

DIFFUSERS_LORA_FILENAME = LORA_WEIGHT_NAME_SAFE  # pytorch_lora_weights.safetensors
# SDXL: the released name, so an export drops in where the Forge/ComfyUI extensions look for it.
# SD1.5: the released layer_sd15_transparent_attn is an attention-sharing patch in another layout,
# which those extensions load differently, so the ::lora:: file must not take its name.
FORGE_LORA_FILENAMES = {
    "sdxl": "layer_xl_transparent_attn.safetensors",
    "sd15": "layerdiff_sd15_transparent_attn_lora.safetensors",
}
# For ComfyUI's models/loras folder, next to the released names without clashing with them.
COMFYUI_LORA_FILENAMES = {
    "sdxl": "layerdiff_xl_transparent_attn_comfyui.safetensors",
    "sd15": "layerdiff_sd15_transparent_attn_comfyui.safetensors",
}
UNET_PREFIX = "unet."
FORGE_PREFIX = "diffusion_model."
FORGE_UP, FORGE_DOWN = 0, 1
KOHYA_SUFFIXES = {"up": ".lora_up.weight", "down": ".lora_down.weight", "alpha": ".alpha"}
LoraFormat = Literal["diffusers", "forge", "comfyui"]

# peft (lora_A/B, with the adapter name in checkpoints) and the older diffusers factor names.
_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?:(?P<peft>lora_[AB])(?:\.(?P<adapter>[^.]+))?"
    r"|(?P<diffusers>lora\.(?:down|up)|lora_linear_layer\.(?:down|up)))\.weight"
)
_FORGE_KEY = re.compile(rf"^{re.escape(FORGE_PREFIX)}(?P<module>.+)\.weight::lora::(?P<index>\d+)$")


class LoraKey(NamedTuple):
    """A LoRA factor's key in a peft/diffusers state dict, taken apart."""

    module: str  # the adapted module's path, with any component prefix (``unet.``)
    factor: Literal["down", "up"]  # down: ``(rank, in)``; up: ``(out, rank)``
    adapter: str | None  # peft's adapter name, in checkpoints only


def parse_lora_key(key: str) -> LoraKey | None:
    """``key`` as a LoRA factor (``<module>.lora_A[.<adapter>].weight``, ``.lora.down.weight``,
    ``.lora_linear_layer.up.weight``, ...), or None for any other key."""
    match = _LORA_KEY.fullmatch(key)
    if match is None:
        return None
    name = match["peft"] or match["diffusers"]
    return LoraKey(match["module"], "down" if name in ("lora_A",) or name.endswith("down") else "up", match["adapter"])


class LoraFactors(NamedTuple):
    """One adapted linear layer: its weight changes by ``up @ down`` (the scale folded into ``up``)."""

    up: torch.Tensor  # (out_features, rank)
    down: torch.Tensor  # (rank, in_features)


# diffusers UNet module path (e.g. ``mid_block.attentions.0.transformer_blocks.0.attn1.to_q``) -> factors
Lora = dict[str, LoraFactors]


# -- LoRA weights from a UNet, a state dict or a file --------------------------------------


def _adapter_layers(unet: torch.nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    layers = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }
    if not layers:
        raise ValueError(
            f"the UNet has no LoRA adapter {adapter_name!r}; add one first, "
            f"e.g. layerdiff.models.lora.add_lora(unet, name={adapter_name!r})."
        )
    return layers


def lora_from_state_dict(state_dict: Mapping[str, torch.Tensor], lora_alpha: float | None) -> Lora:
    """Factors from peft-named UNet weights (``<module>.lora_{A,B}[.<adapter>].weight``) of one
    adapter with one ``lora_alpha`` (``None``: the rank, scale 1). Other keys are ignored."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, tensor in state_dict.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            if ".lora_" in key:
                raise ValueError(
                    f"unsupported LoRA parameter {key!r}: only plain LoRA factors (no DoRA, no LoRA bias) export"
                )
            continue
        adapters.add(parsed.adapter)
        factors.setdefault(parsed.module, {})[parsed.factor] = tensor
    if len(adapters) > 1:
        raise ValueError(f"the weights hold several LoRA adapters {sorted(map(str, adapters))}; export one at a time")
    lora = {}
    for module, pair in factors.items():
        if set(pair) != {"down", "up"}:
            raise ValueError(f"LoRA module {module!r} has only its {''.join(pair)} factor")
        rank = pair["down"].shape[0]
        lora[module] = LoraFactors(up=pair["up"] * ((lora_alpha or rank) / rank), down=pair["down"])
    return lora


def lora_file(path: str | PathLike) -> Path:
    """The LoRA file itself: ``path``, or ``pytorch_lora_weights.safetensors`` inside a folder."""
    path = Path(path).expanduser()
    candidate = path / DIFFUSERS_LORA_FILENAME if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(
            f"LoRA file not found: {candidate}. Give a {DIFFUSERS_LORA_FILENAME} (or its folder), a Forge/ComfyUI "
            f"file such as {FORGE_LORA_FILENAMES['sdxl']} or a kohya-keyed ComfyUI LoRA."
        )
    return candidate


def read_lora(path: str | PathLike, unet_config: Mapping[str, Any]) -> Lora:
    """A LoRA file in any layout of :data:`LoraFormat` (ours or the released LayerDiffuse ones;
    for ``diffusers`` also the folder holding ``pytorch_lora_weights.safetensors``).
    ``unet_config`` maps original UNet paths to diffusers ones."""
    path = lora_file(path)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if any("::" in key for key in keys):  # Forge's frozen-patcher keys: "<weight>::<patch type>::<index>"
        return _read_forge_lora(path, unet_config)
    if any(key.startswith(KOHYA_UNET_PREFIX) for key in keys):
        return _read_kohya_lora(path, unet_config)
    return _read_diffusers_lora(path)


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


def _read_kohya_lora(path: Path, unet_config: Mapping[str, Any]) -> Lora:
    modules = kohya_module_names(unet_config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        name, part = next(
            ((key.removesuffix(suffix), part) for part, suffix in KOHYA_SUFFIXES.items() if key.endswith(suffix)),
            (key, None),
        )
        if part is None or name not in modules:
            raise ValueError(
                f"{path}: {key!r} is not a plain kohya LoRA key ('{KOHYA_UNET_PREFIX}<module>"
                f"{{{', '.join(KOHYA_SUFFIXES.values())}}}') of a transformer-block module of this UNet"
            )
        parts.setdefault(name, {})[part] = tensor
    lora = {}
    for name, found in parts.items():
        if not {"up", "down"} <= set(found):
            raise ValueError(f"{path}: LoRA module {name!r} lacks a factor (has {sorted(found)})")
        rank = found["down"].shape[0]
        scale = float(found["alpha"]) / rank if "alpha" in found else 1.0  # ComfyUI: no alpha means scale 1
        lora[modules[name]] = LoraFactors(up=found["up"].float() * scale, down=found["down"])
    return lora


def _read_diffusers_lora(path: Path) -> Lora:
    state_dict, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(path), return_lora_metadata=True
    )
    other = sorted(key for key in state_dict if not key.startswith(UNET_PREFIX))
    if other:
        raise ValueError(f"{path}: only UNet LoRAs are read here; the file also adapts other models, e.g. {other[:3]}")
    if network_alphas:
        raise ValueError(
            f"{path}: LoRAs with per-module alphas in diffusers' conversion are not read here; give a diffusers/peft, "
            "Forge/ComfyUI LayerDiffuse or kohya UNet file."
        )
    config = {key.removeprefix(UNET_PREFIX): value for key, value in (metadata or {}).items()}
    if config.get("use_rslora") or config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ValueError(f"{path}: per-module ranks/alphas and rsLoRA scaling are not supported")
    unet_state = convert_unet_state_dict_to_peft(submodule_state(state_dict, UNET_PREFIX))
    return lora_from_state_dict(unet_state, config.get("lora_alpha"))


def load_lora_into_unet(unet: UNet2DConditionModel, path: str | PathLike, adapter_name: str) -> None:
    """Set an existing peft adapter of ``unet`` from a LoRA file in any layout (see
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
    diffusers_metadata = read_metadata(path)
    save_file(load_file(path), path, metadata={**provenance("unet_lora", metadata), **diffusers_metadata})
    return path


def save_forge_lora(
    lora: Lora,
    unet_config: Mapping[str, Any],
    path: str | PathLike,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``lora`` in the Forge/ComfyUI-layerdiffuse ``::lora::`` layout of the released LoRAs."""
    to_ldm = ldm_attention_prefixes(unet_config)
    tensors = {}
    for module, factors in lora.items():
        key = f"{FORGE_PREFIX}{rename_block(module, to_ldm)}.weight::lora::"
        tensors[f"{key}{FORGE_UP}"] = factors.up
        tensors[f"{key}{FORGE_DOWN}"] = factors.down
    return _save(tensors, path, {"format": "layerdiffuse", **provenance("unet_lora", metadata)}, dtype)


def save_comfyui_lora(
    lora: Lora,
    unet_config: Mapping[str, Any],
    path: str | PathLike,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``lora`` with kohya's keys on the original UNet's paths, as ComfyUI's LoRA loader
    reads them; ``alpha`` is the rank (scale 1: the scale is in the up factor)."""
    to_ldm = ldm_attention_prefixes(unet_config)
    tensors = {}
    for module, factors in lora.items():
        name = kohya_name(rename_block(module, to_ldm))
        tensors[name + KOHYA_SUFFIXES["up"]] = factors.up
        tensors[name + KOHYA_SUFFIXES["down"]] = factors.down
        tensors[name + KOHYA_SUFFIXES["alpha"]] = torch.tensor(float(factors.down.shape[0]))
    return _save(tensors, path, provenance("unet_lora", metadata), dtype)


def _save(
    tensors: Mapping[str, torch.Tensor], path: str | PathLike, metadata: dict[str, str], dtype: torch.dtype
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors_for_file(tensors, dtype), path, metadata=metadata)
    return path


def _single_rank(lora: Lora) -> int:
    ranks = Counter(factors.down.shape[0] for factors in lora.values())
    if len(ranks) != 1:
        raise ValueError(f"the diffusers export writes one rank for all modules; this LoRA has ranks {dict(ranks)}")
    return next(iter(ranks))
