"""The weights of jointly denoised layers (:mod:`layerdiff.models.layer_sharing`) in the files
that read them: the released SD1.5 joint model's layout, layerdiff's own layout for every
other setup, and one diffusers/peft LoRA per layer.

In every file the up factors hold the LoRA scale (``up * alpha / rank``, the released units
compute ``W + up @ down``), so a file loads into units of any alpha and means the same.

Layouts:

* **released** (``layer_sd15_joint.safetensors``, read by the released
  ``AttentionSharingPatcher(unet, frames=3, use_control=False).load_state_dict(sd, strict=True)``):
  SD1.5 frame mode only. Keys ``hookers.layers.{i}.{param}``, ``i`` the index of the unit's
  attention module in the released order (``input_blocks.{1,2,4,5,7,8}.1``,
  ``output_blocks.3..11.1``, ``middle_block.1``; attn1 then attn2 of ``transformer_blocks.0``,
  :data:`RELEASED_SD15_BLOCKS`), ``param`` the unit's own name: ``to_{q,k,v,out}_lora.{f}.{down,up}.weight``
  with ``f`` the frame (foreground, background, blend), ``temporal_{i,q,k,v,o,n}.{weight,bias}``.
  No metadata is needed to read it.
* **layerdiff** (:data:`LAYER_SHARING_FILENAME`): any base UNet, mode and layer count. Keys
  ``layer_sharing.{diffusers attention module}.{param}``, e.g.
  ``layer_sharing.mid_block.attentions.0.transformer_blocks.0.attn1.to_q_lora.1.up.weight``;
  ``param`` as above (the temporal parameters in frame mode only), ``{f}`` the layer's index in
  ``layers``. The safetensors metadata :data:`METADATA_KEY` holds JSON ``{"mode", "layers"``
  (names, in index order)``, "rank", "alpha", "architecture"}`` (alpha the training value,
  already folded), next to the provenance keys of :mod:`layerdiff.formats.provenance`.
* **per-layer LoRA** (``{layer}`` + :data:`LAYER_LORA_SUFFIX`): one layer's LoRA alone, written by
  :func:`layerdiff.formats.lora.save_diffusers_lora` (keys ``unet.{module}.to_q.lora.down.weight``,
  ...), so ``load_lora_weights(folder, weight_name=...)`` puts it on a plain UNet: the model
  with that layer's LoRA and no sharing (what ``none`` mode computes for that layer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save

from layerdiff.files import fsync_directory, write_atomically
from layerdiff.formats.lora import Lora, LoraFactors, save_diffusers_lora
from layerdiff.formats.provenance import provenance, read_metadata, tensors_for_file
from layerdiff.formats.unet_names import ldm_attention_prefixes
from layerdiff.models.base import SD15_UNET_CONFIG, unet_architecture
from layerdiff.models.layer_sharing import PROJECTIONS, LayerSharingUnit, LowRankDelta, sharing_units

RELEASED_JOINT_FILENAME = "layer_sd15_joint.safetensors"
RELEASED_JOINT_FRAMES = ("foreground", "background", "blend")
RELEASED_PREFIX = "hookers.layers."
RELEASED_SD15_BLOCKS = (
    *(f"input_blocks.{block}.1" for block in (1, 2, 4, 5, 7, 8)),
    *(f"output_blocks.{block}.1" for block in range(3, 12)),
    "middle_block.1",
)
LAYER_SHARING_FILENAME = "layerdiff_layer_sharing.safetensors"
LAYER_SHARING_PREFIX = "layer_sharing."
METADATA_KEY = "layerdiff.layer_sharing"
LAYER_LORA_SUFFIX = ".lora.safetensors"
COMPONENT = "unet_layer_sharing"
# The linear layer each projection's LoRA adapts, as diffusers names it inside the attention module.
ADAPTED_LINEARS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_FRAME_PARAM = re.compile(r"(?P<part>to_\w+_lora|control_convs)\.(?P<layer>\d+)\.(?P<rest>.+)")  # one per layer

FileKey = Callable[[str, str], str]  # (attention module, unit parameter) -> key in a file


class Settings(NamedTuple):
    """What the units of one UNet were built with (all alike, as ``add_layer_sharing`` builds them)."""

    mode: str
    layers: int
    rank: int
    scale: float


def installed_units(unet: UNet2DConditionModel) -> dict[str, LayerSharingUnit]:
    """The units by attention module name; an error if there are none."""
    units = sharing_units(unet)
    if not units:
        raise ValueError(
            "the UNet has no layer-sharing units; install them first with "
            "layerdiff.models.layer_sharing.add_layer_sharing(unet, layers, mode, rank, alpha)"
        )
    return units


def unit_settings(unet: UNet2DConditionModel) -> Settings:
    """Mode, layer count, LoRA rank and scale of the units."""
    unit = next(iter(installed_units(unet).values()))
    delta = next(module for module in unit.modules() if isinstance(module, LowRankDelta))
    return Settings(unit.mode, unit.layers, delta.down.out_features, delta.scale)


# -- the one mechanism: unit parameters under file keys, out and (strictly) in -------------------


def _is_up(param: str) -> bool:
    return param.endswith(".up.weight")


def _slots(unet: UNet2DConditionModel, file_key: FileKey) -> dict[str, tuple[float, str, torch.Tensor]]:
    """file key -> (the unit's LoRA scale, unit parameter name, the parameter itself)."""
    scale = unit_settings(unet).scale
    return {file_key(module, param): (scale, param, tensor) for module, unit in installed_units(unet).items()
            for param, tensor in unit.state_dict(keep_vars=True).items()}


def export_units(unet: UNet2DConditionModel, file_key: FileKey) -> dict[str, torch.Tensor]:
    """The units' parameters under ``file_key``, the LoRA scale folded into the up factors."""
    return {key: (tensor * scale if _is_up(param) else tensor).detach()
            for key, (scale, param, tensor) in _slots(unet, file_key).items()}


def import_units(unet: UNet2DConditionModel, file_key: FileKey, tensors: Mapping[str, torch.Tensor], source: str,
                 hint: str, folded: bool = True, others: Mapping[str, torch.Tensor] | None = None) -> None:
    """Set every unit parameter, and the ``others`` (parameters by file key, e.g. an encoder's), from
    ``tensors`` (unit up factors scaled when ``folded``); any missing or unexpected key or other
    shape is an error naming ``source``, nothing is set."""
    slots = {**_slots(unet, file_key), **{key: (1.0, key, tensor) for key, tensor in (others or {}).items()}}
    missing, unexpected = sorted(set(slots) - set(tensors)), sorted(set(tensors) - set(slots))
    reshaped = [f"{key} {tuple(tensors[key].shape)} (units: {tuple(slot[2].shape)})" for key, slot in slots.items()
                if key in tensors and tensors[key].shape != slot[2].shape]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{source} does not fit the UNet's layer-sharing units: {len(missing)} keys missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(reshaped)} of another shape {reshaped[:3]}. {hint}"
        )
    with torch.no_grad():
        for key, (scale, param, tensor) in slots.items():
            tensor.copy_(tensors[key].float() / scale if folded and _is_up(param) else tensors[key])


def write_layer_file(path: str | PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], dtype) -> Path:
    """A safetensors file written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, save(tensors_for_file(tensors, dtype), metadata=metadata))
    return path


def read_layer_file(path: str | PathLike) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"layer-sharing file not found: {path}")
    return load_file(path)


# -- the released SD1.5 joint layout --------------------------------------------------------------


def released_sd15_modules() -> list[str]:
    """The diffusers names of the released units' attention modules, in the released order."""
    to_diffusers = {ldm: name for name, ldm in ldm_attention_prefixes(SD15_UNET_CONFIG).items()}
    return [f"{to_diffusers[block]}.transformer_blocks.0.{attn}" for block in RELEASED_SD15_BLOCKS
            for attn in ("attn1", "attn2")]


def released_units_problem(unet: UNet2DConditionModel, instead: str) -> str | None:
    """Why the units cannot be in a released SD1.5 attention-sharing layout (frame mode, SD1.5's
    attention modules, all four projections adapted), or None if they can; ``instead``: what then."""
    settings, units = unit_settings(unet), installed_units(unet)
    if settings.mode != "frame":
        return f"the released layout holds frame-mode units; these are in {settings.mode!r} mode: {instead}"
    released = released_sd15_modules()
    if set(units) != set(released):
        other = sorted(set(units) ^ set(released))
        return (f"the released layout is SD1.5's {len(released)} attention modules; this UNet has {len(units)} "
                f"(e.g. not both in it and in SD1.5: {other[:2]}), it is not SD1.5-shaped: {instead}")
    adapted = [name for name in PROJECTIONS if hasattr(next(iter(units.values())), f"{name}_lora")]
    if adapted != list(PROJECTIONS):
        return f"the released units adapt all of {PROJECTIONS}; these adapt only {adapted}: {instead}"
    return None


def released_joint_problem(unet: UNet2DConditionModel, layer_names: Sequence[str] | None = None) -> str | None:
    """Why the units cannot be in the released joint layout, or None if they can. ``layer_names``,
    if given, must be the released frames in some order."""
    instead = "use save_layer_sharing (layerdiff's layer-sharing layout) instead"
    problem = released_units_problem(unet, instead)
    if problem is None and next(iter(installed_units(unet).values())).control_convs is not None:
        problem = ("the released joint layout has no control inputs and these units have them: "
                   "layerdiff.formats.layer_conditional writes the released conditional layout")
    if problem is None and layer_names is not None and sorted(layer_names) != sorted(RELEASED_JOINT_FRAMES):
        problem = f"the released frames are {RELEASED_JOINT_FRAMES}, the layers {list(layer_names)}: rename them, or {instead}"
    return problem


def released_unit_key(frames: Sequence[int]) -> FileKey:
    """The released key of a unit parameter: ``hookers.layers.{index of the module in the released
    order}.{param}``, the per-layer parts of layer ``l`` under frame ``frames[l]``."""
    index = {module: i for i, module in enumerate(released_sd15_modules())}

    def file_key(module: str, param: str) -> str:
        match = _FRAME_PARAM.fullmatch(param)
        if match:
            param = f"{match['part']}.{frames[int(match['layer'])]}.{match['rest']}"
        return f"{RELEASED_PREFIX}{index[module]}.{param}"

    return file_key


def _released_key(unet: UNet2DConditionModel, layer_names: Sequence[str] | None) -> FileKey:
    if problem := released_joint_problem(unet, layer_names):
        raise ValueError(problem)
    return released_unit_key(list(range(unit_settings(unet).layers)) if layer_names is None else [
        RELEASED_JOINT_FRAMES.index(name) for name in layer_names])


def released_joint_state(unet: UNet2DConditionModel, layer_names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The units in the released ``layer_sd15_joint`` layout (frames = the units' layers, in
    their order, or reordered to foreground, background, blend when ``layer_names`` is given)."""
    return export_units(unet, _released_key(unet, layer_names))


def save_released_joint(path: str | PathLike, unet: UNet2DConditionModel, layer_names: Sequence[str] | None = None,
                        metadata: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    return write_layer_file(path, released_joint_state(unet, layer_names), provenance(COMPONENT, metadata), dtype)


def load_released_joint(
    unet: UNet2DConditionModel,
    path_or_state: str | PathLike | Mapping[str, torch.Tensor],
    layer_names: Sequence[str] | None = None,
) -> None:
    """Initialise the units from a released-layout file (or its state dict), e.g. the released
    ``layer_sd15_joint.safetensors``; its frames must be the units' layers."""
    is_state = isinstance(path_or_state, Mapping)
    source = "the given released-layout state dict" if is_state else str(path_or_state)
    tensors = dict(path_or_state) if is_state else read_layer_file(path_or_state)
    file_key, settings = _released_key(unet, layer_names), unit_settings(unet)
    first = f"{RELEASED_PREFIX}0.to_q_lora."
    frames = {key[len(first):].split(".")[0] for key in tensors if key.startswith(first)}
    if len(frames) != settings.layers:
        raise ValueError(f"{source} holds {len(frames)} frames; the units denoise {settings.layers} layers. "
                         f"Install add_layer_sharing(unet, {len(frames)}, 'frame', ...) to load it.")
    down = tensors.get(f"{first}0.down.weight")
    if down is not None and down.shape[0] != settings.rank:
        raise ValueError(f"{source} holds rank-{down.shape[0]} LoRAs; the units are rank {settings.rank}. "
                         f"Install the units with rank={down.shape[0]} (the released file is rank 256).")
    import_units(unet, file_key, tensors, source, "Is it a released SD1.5 attention-sharing file without control?")


# -- layerdiff's layer-sharing layout ----------------------------------------------------------------


def _own_key(module: str, param: str) -> str:
    return f"{LAYER_SHARING_PREFIX}{module}.{param}"


def _check_layer_names(layer_names: Sequence[str], layers: int) -> list[str]:
    names = list(layer_names)
    if len(names) != layers or len(set(names)) != layers:
        raise ValueError(f"need {layers} distinct layer names, one per layer of the units; got {names}")
    unsafe = [name for name in names if not re.fullmatch(r"[\w.-]+", name) or name.startswith(".")]
    if unsafe:
        raise ValueError(f"layer names become file names: use letters, digits, '_', '-', '.' only; got {unsafe}")
    return names


def save_layer_sharing(
    path: str | PathLike,
    unet: UNet2DConditionModel,
    layer_names: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the units in layerdiff's layout; ``metadata`` is the training configuration."""
    settings = unit_settings(unet)
    layout = {
        "mode": settings.mode,
        "layers": _check_layer_names(layer_names, settings.layers),
        "rank": settings.rank,
        "alpha": settings.scale * settings.rank,
        "architecture": unet_architecture(unet.config),
    }
    file_metadata = {**provenance(COMPONENT, metadata), METADATA_KEY: json.dumps(layout)}
    return write_layer_file(path, export_units(unet, _own_key), file_metadata, dtype)


def load_layer_sharing(
    unet: UNet2DConditionModel, path: str | PathLike, layer_names: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """Set the units from a layerdiff layer-sharing file (or an export folder holding one), which
    must match them (mode, layer count and, if given, ``layer_names``, rank, base architecture),
    and return its layout; a file without our metadata is read as the released layout."""
    path = Path(path) / LAYER_SHARING_FILENAME if Path(path).is_dir() else path
    tensors = read_layer_file(path)
    encoded = read_metadata(path).get(METADATA_KEY)
    if encoded is None:
        return load_released_joint(unet, tensors, layer_names)
    layout, settings = json.loads(encoded), unit_settings(unet)
    ours = {"mode": settings.mode, "layers": settings.layers, "rank": settings.rank,
            "architecture": unet_architecture(unet.config)}
    theirs = {**layout, "layers": len(layout["layers"])}
    if layer_names is not None:
        ours["layers"], theirs["layers"] = list(layer_names), layout["layers"]
    differing = {name: (theirs.get(name), value) for name, value in ours.items() if theirs.get(name) != value}
    if differing:
        described = "; ".join(f"{name}: {file} in the file, {units} in the UNet" for name, (file, units) in
                              differing.items())
        raise ValueError(f"{path} was written for other layer-sharing units ({described}); install the units as "
                         "the file says (add_layer_sharing) or export again")
    import_units(unet, _own_key, tensors, str(path), "Was it written for another base model?")
    return layout


# -- one diffusers/peft LoRA per layer -------------------------------------------------------------


def layer_lora(unet: UNet2DConditionModel, layer: int) -> Lora:
    """Layer ``layer``'s LoRA factors, by the diffusers path of the linear layer each adapts."""
    lora = {}
    for module, unit in installed_units(unet).items():
        for projection, linear in ADAPTED_LINEARS.items():
            deltas = getattr(unit, f"{projection}_lora", None)
            if deltas is not None:
                delta = deltas[layer]
                lora[f"{module}.{linear}"] = LoraFactors(
                    up=(delta.up.weight * delta.scale).detach(), down=delta.down.weight.detach())
    return lora


def save_layer_loras(
    out_dir: str | PathLike,
    unet: UNet2DConditionModel,
    layer_names: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Write ``{layer}.lora.safetensors`` per layer into ``out_dir``: each written by diffusers in
    a hidden staging folder, then renamed into place whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, name in enumerate(_check_layer_names(layer_names, unit_settings(unet).layers)):
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out_dir))
        try:
            written = save_diffusers_lora(layer_lora(unet, layer), staging, metadata, dtype)
            paths.append(out_dir / f"{name}{LAYER_LORA_SUFFIX}")
            os.replace(written, paths[-1])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    fsync_directory(out_dir)
    return paths
