"""Full-weight UNet offsets in the ``::diff::`` layout of LayerDiffusion's conditional SDXL files.

LayerDiffusion (arXiv:2402.17113, Fig. 4) released its SDXL layer-conditional models as
offsets from the base UNet: ``layer_xl_fg2ble``, ``bg2ble``, ``fgble2bg`` and ``bgble2fg``.
Each key is ``diffusion_model.<original UNet key>::diff::0``, Forge's frozen-patcher notation
(``<weight>::<patch type>::<index>``), and the Forge extension and ComfyUI-layerdiffuse apply it
as ``W + strength * delta``. Where a delta is wider than its 4-D weight (``conv_in``, grown by the
condition latents' channels) they zero-pad the weight to the delta's shape before adding, and the
condition latents follow the noisy latent in the UNet input (``torch.cat([x, c_concat], 1)``),
for the conditional and the unconditional branch alike. A file may hold any subset of the UNet's
weights: a weight it leaves out is the base weight.

:func:`save_unet_delta` writes a trained UNet that way (trained minus base for each weight that
changed: a LoRA run fused into the UNet gives only its adapted layers, plus ``conv_in``);
:func:`apply_unet_delta` loads such a file, ours or a released one, into a diffusers UNet. The
released files have no safetensors metadata, so reading needs none; ours carry
:func:`~layerdiff.formats.provenance.provenance`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from layerdiff.formats.provenance import provenance, tensors_for_file
from layerdiff.formats.unet_names import ldm_parameter_names
from layerdiff.models.conv_in import LATENT_CHANNELS, grow_conv_in

DIFF_PREFIX = "diffusion_model."
DIFF_SUFFIX = "::diff::0"
CONV_IN_WEIGHT = "conv_in.weight"
_DIFF_KEY = re.compile(rf"^{re.escape(DIFF_PREFIX)}(?P<key>.+){re.escape(DIFF_SUFFIX)}$")

Layer = Literal["foreground", "background", "blend"]


@dataclass(frozen=True)
class ConditionalVariant:
    """One of LayerDiffusion's released layer-conditional SDXL models (Fig. 4)."""

    name: str
    filename: str
    conditions: tuple[Layer, ...]  # condition latents in input-channel order, after the noisy latent
    generates: Layer

    @property
    def extra_channels(self) -> int:
        """Input channels ``conv_in`` gains: one VAE latent per condition layer."""
        return LATENT_CHANNELS * len(self.conditions)


# Channel order as the released loaders concatenate the conditions: Forge's
# ``torch.cat([fg_image, blend_image], dim=1)`` for fgble2bg, ComfyUI's ``[latent, blended_latent]``.
RELEASED_CONDITIONAL_FILES: Mapping[str, ConditionalVariant] = MappingProxyType(
    {
        variant.name: variant
        for variant in (
            ConditionalVariant("fg2ble", "layer_xl_fg2ble.safetensors", ("foreground",), "blend"),
            ConditionalVariant("bg2ble", "layer_xl_bg2ble.safetensors", ("background",), "blend"),
            ConditionalVariant("fgble2bg", "layer_xl_fgble2bg.safetensors", ("foreground", "blend"), "background"),
            ConditionalVariant("bgble2fg", "layer_xl_bgble2fg.safetensors", ("background", "blend"), "foreground"),
        )
    }
)


def conditional_variant(name: str) -> ConditionalVariant:
    """The released variant called ``name`` (``fg2ble``) or stored as ``name``
    (``layer_xl_fg2ble.safetensors``)."""
    for variant in RELEASED_CONDITIONAL_FILES.values():
        if name in (variant.name, variant.filename):
            return variant
    raise ValueError(f"no released conditional model {name!r}; known: {', '.join(RELEASED_CONDITIONAL_FILES)}")


# -- writing ---------------------------------------------------------------------------------


def delta_keys(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Each state-dict key of the UNet ``unet_config`` describes -> its key in a ``::diff::`` file
    (``conv_in.weight`` -> ``diffusion_model.input_blocks.0.0.weight::diff::0``)."""
    return {key: f"{DIFF_PREFIX}{ldm_key}{DIFF_SUFFIX}" for key, ldm_key in ldm_parameter_names(unet_config).items()}


def unet_delta(
    trained_state: Mapping[str, torch.Tensor],
    base_state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """File key -> ``trained - base`` (float32) for every weight of ``trained_state`` that differs
    from the base, on the original UNet's names of the architecture ``unet_config`` describes.

    ``trained_state`` is a plain diffusers UNet state dict (any LoRA fused in first); a weight it
    leaves out counts as unchanged. A ``conv_in`` wider than the base's (:func:`grow_conv_in`) is
    compared with the base's zero-padded to its width and always written, so the file records the
    width.
    """
    file_keys = delta_keys(unet_config)
    delta = {}
    for key, trained in trained_state.items():
        if key not in base_state or key not in file_keys:
            raise ValueError(f"trained weight {key!r} is not a weight of the base UNet; {_unknown_key_hint(key)}")
        base = base_state[key].to(trained.device, torch.float32)
        grown = key == CONV_IN_WEIGHT and trained.shape != base.shape
        if grown:
            base = _pad_input_channels(base, trained.shape, key)
        elif trained.shape != base.shape:
            raise ValueError(f"trained weight {key!r} is {tuple(trained.shape)}, the base's {tuple(base.shape)}")
        difference = trained.detach().to(torch.float32) - base
        if grown or bool(difference.any()):
            delta[file_keys[key]] = difference
    return delta


def save_unet_delta(
    trained_state: Mapping[str, torch.Tensor],
    base_state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    path: str | PathLike,
    training_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write :func:`unet_delta` to ``path`` in ``dtype``, with our provenance in the metadata
    (name an SDXL variant's file :attr:`ConditionalVariant.filename` for the extensions to find it)."""
    delta = unet_delta(trained_state, base_state, unet_config)
    if not delta:
        raise ValueError("the trained UNet equals the base UNet: there is no offset to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "layerdiffuse", **provenance("unet_delta", training_config)}
    save_file(tensors_for_file(delta, dtype), path, metadata=metadata)
    return path


# -- reading ---------------------------------------------------------------------------------


def is_unet_delta(path: str | PathLike) -> bool:
    """Whether ``path`` is a ``::diff::`` file (a released conditional model or our export)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        return any(_DIFF_KEY.match(key) for key in handle.keys())


def read_unet_delta(path: str | PathLike) -> dict[str, torch.Tensor]:
    """Original UNet key -> offset, from a ``diffusion_model.<key>::diff::0`` file."""
    path = Path(path)
    delta, foreign = {}, []
    for key, tensor in load_file(path).items():
        match = _DIFF_KEY.match(key)
        if match is None:
            foreign.append(key)
        else:
            delta[match["key"]] = tensor
    if foreign:
        lora = " (a ::lora:: file loads with layerdiff.formats.lora)" if any("::lora::" in key for key in foreign) else ""
        raise ValueError(
            f"{path}: {len(foreign)} keys are not '{DIFF_PREFIX}<original UNet key>{DIFF_SUFFIX}' offsets, "
            f"e.g. {foreign[:3]}{lora}"
        )
    return delta


def apply_unet_delta(unet: UNet2DConditionModel, path: str | PathLike, strength: float = 1.0) -> None:
    """Add ``strength`` times the file's offsets to ``unet``'s weights, in place, as the released
    loaders do; a file with a wider ``conv_in`` first grows the UNet's (:func:`grow_conv_in`).

    Strict: every key must name a weight of this UNet with the offset's shape, except that a
    ``conv_in`` offset may differ in input channels (narrower ones add to the first channels,
    as the released loaders pad). Nothing is changed unless the whole file fits. Any
    ``strength``, 0 included, grows ``conv_in``: its new channels start at zero.
    """
    path = Path(path)
    delta = read_unet_delta(path)
    state = unet.state_dict()
    if any(".base_layer." in key for key in state):
        raise ValueError(f"{path}: the UNet carries peft adapters; merge and unload them before applying an offset")
    from_ldm = {ldm: key for key, ldm in ldm_parameter_names(unet.config).items()}
    targets, problems = {}, []
    for ldm_key, tensor in delta.items():
        key = from_ldm.get(ldm_key)
        if key is None or key not in state:
            problems.append(f"{ldm_key!r}: this UNet has no weight of that name")
            continue
        shape, expected = tuple(tensor.shape), tuple(state[key].shape)
        input_width_only = key == CONV_IN_WEIGHT and len(shape) == 4 and shape[:1] + shape[2:] == expected[:1] + expected[2:]
        if shape != expected and not input_width_only:
            problems.append(f"{ldm_key!r}: offset {shape}, the UNet's weight {expected}")
            continue
        targets[key] = tensor
    if problems:
        raise ValueError(
            f"{path}: {len(problems)} of its {len(delta)} offsets do not fit this UNet, e.g. {'; '.join(problems[:3])}. "
            f"{_likely_cause(len(problems), len(delta), unet)}"
        )
    conv_in = targets.get(CONV_IN_WEIGHT)
    if conv_in is not None and conv_in.shape[1] > unet.conv_in.in_channels:
        grow_conv_in(unet, conv_in.shape[1] - unet.conv_in.in_channels)
    parameters = dict(unet.named_parameters())
    buffers = dict(unet.named_buffers())
    with torch.no_grad():
        for key, tensor in targets.items():
            weight = parameters[key] if key in parameters else buffers[key]
            offset = tensor.to(weight.device, torch.float32)
            if offset.shape != weight.shape:  # a narrower conv_in offset: the first input channels
                offset = _pad_input_channels(offset, weight.shape, key)
            weight.copy_((weight.to(torch.float32) + strength * offset).to(weight.dtype))


def _likely_cause(failed: int, total: int, unet: UNet2DConditionModel) -> str:
    config = unet.config
    this = f"this UNet: widths {tuple(config.block_out_channels)}, {config.layers_per_block} layers per level"
    if failed == 1 < total:
        return f"Every other offset fits, so the file was edited or written for a variant of this architecture ({this})."
    return (
        f"The file was written for another UNet architecture ({this}): apply it to the base model it was trained on, "
        "SDXL files to an SDXL UNet, SD1.5 files to an SD1.5 UNet."
    )


def _unknown_key_hint(key: str) -> str:
    if ".lora_" in key or ".base_layer." in key:
        return "fuse the LoRA into the UNet (and unload the adapter) before exporting an offset."
    if key.startswith("unet."):
        return "pass the UNet's own state dict (keys without the 'unet.' prefix)."
    return "was the UNet trained on another base model?"


def _pad_input_channels(weight: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """``weight`` zero-padded to ``shape``'s input channels (dim 1), as the released loaders pad."""
    if weight.dim() != 4 or weight.shape[0] != shape[0] or weight.shape[2:] != shape[2:] or weight.shape[1] > shape[1]:
        raise ValueError(f"{key!r}: {tuple(weight.shape)} cannot be padded to {tuple(shape)}; only input channels grow")
    padded = weight.new_zeros(shape)
    padded[:, : weight.shape[1]] = weight
    return padded
