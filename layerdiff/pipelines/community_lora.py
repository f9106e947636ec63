"""Community LoRAs on a trained model: the diffusers/peft LoRA files a user stacks on the UNet
at generation, and the check that one fits the model before peft applies it."""

from __future__ import annotations

from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from typing_extensions import NotRequired, TypedDict

from layerdiff.formats.lora import parse_lora_key
from layerdiff.models.base import Architecture

_EXAMPLES_SHOWN = 3


class IncompatibleLoraError(ValueError):
    """A community LoRA file does not fit the base model it is applied to."""


class CommunityLora(TypedDict):
    """A LoRA in the diffusers/peft format stacked on the trained model when generating.

    A plain dict (``{path: style.safetensors, weight: 0.8}`` in YAML), so that it stays plain
    data in hyper-parameters and checkpoints.

    Keys:
        path: the ``.safetensors`` file (or a folder holding ``pytorch_lora_weights.safetensors``).
        weight: its scale, 1 if left out; 0 leaves the output unchanged.
    """

    path: str
    weight: NotRequired[float]


def check_lora_fits(
    lora_file: Path,
    state_dict: dict[str, torch.Tensor],
    components: dict[str, nn.Module],
    base_model: str,
    architecture: Architecture,
) -> None:
    """Raise ``IncompatibleLoraError`` unless every LoRA factor in ``state_dict`` names a layer
    of ``components`` with matching input/output sizes.

    diffusers only warns about LoRA keys that match no layer (and peft fails deep inside on a
    size mismatch); a LoRA made for another architecture (an SD1.5 LoRA on SDXL) would
    then be applied partly or not at all. A LoRA factor ``down`` is ``[rank, in, ...]`` and
    ``up`` is ``[out, rank, ...]``; the layer's weight is ``[out, in, ...]``.
    """
    unknown_components: set[str] = set()
    layers: set[str] = set()
    # dicts as ordered sets: a layer's two factors are reported once
    missing_layers: dict[str, None] = {}
    wrong_shapes: dict[str, str] = {}
    for key, tensor in state_dict.items():
        parsed = parse_lora_key(key)  # keys of diffusers' lora_state_dict: "<component>.<module>...weight"
        if parsed is None:
            continue  # alphas, DoRA magnitudes and biases ride along with the factors
        layer_name = parsed.module
        component_name, _, module_name = layer_name.partition(".")
        layers.add(layer_name)
        if component_name not in components:
            unknown_components.add(component_name)
            continue
        layer = _submodule(components[component_name], module_name)
        if layer is None or not hasattr(layer, "weight"):
            missing_layers[layer_name] = None
            continue
        weight = (layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer).weight
        is_down = parsed.factor == "down"
        lora_size, layer_size = (tensor.shape[1], weight.shape[1]) if is_down else (tensor.shape[0], weight.shape[0])
        if lora_size != layer_size:
            side = "input" if is_down else "output"
            wrong_shapes.setdefault(
                layer_name, f"{layer_name} ({side} size {lora_size} in the LoRA, {layer_size} in the model)"
            )

    problems = []
    if not layers:
        problems.append("it holds no LoRA weights in the diffusers/peft format ('<component>.<layer>.lora_A.weight')")
    if unknown_components:
        problems.append(
            f"it has weights for {', '.join(sorted(unknown_components))}, which an {architecture.upper()} "
            f"model does not have (its parts: {', '.join(components)})"
        )
    mismatches = ((list(missing_layers), "are not in the model"), (list(wrong_shapes.values()), "have other sizes"))
    for found, what in mismatches:
        if found:
            examples = "; ".join(found[:_EXAMPLES_SHOWN]) + ("; ..." if len(found) > _EXAMPLES_SHOWN else "")
            problems.append(f"{len(found)} of the {len(layers)} layers it adapts {what}, e.g. {examples}")
    if problems:
        raise IncompatibleLoraError(
            f"Community LoRA {lora_file} does not fit base model '{base_model}' ({architecture.upper()}): "
            + "; ".join(problems)
            + ". It was probably trained for another architecture (e.g. an SD1.5 LoRA on SDXL); "
            "use a LoRA trained for this base model."
        )


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
