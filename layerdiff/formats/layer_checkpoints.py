"""The layer-sharing units of a ``JointLayerLoRAModule`` checkpoint, installed on its base UNet
(built on the meta device: the base weights are not read), with the control encoder of a
control-conditioned model (the released SD1.5 fg2bg / bg2fg design): what the layer exports
(:mod:`.layer_sharing`, :mod:`.layer_conditional`) are written from."""

from __future__ import annotations

from os import PathLike
from typing import Any, NamedTuple

import torch
from diffusers import UNet2DConditionModel

from layerdiff.formats.checkpoints import exported_state, find_hyperparameter, read_checkpoint
from layerdiff.formats.layer_sharing import import_units
from layerdiff.formats.unet import read_unet_checkpoint
from layerdiff.models.base import MODEL_CONFIG_FILE, load_component
from layerdiff.models.control_encoder import ControlEncoder
from layerdiff.models.layer_sharing import PROJECTIONS, add_layer_sharing

CONTROL_ENCODER_PART = "control_encoder"


class JointCheckpoint(NamedTuple):
    """The units of a joint-layer checkpoint on its base UNet, what they were trained with, and
    the control encoder and its layer when the model has one."""

    unet: UNet2DConditionModel
    layer_names: list[str]
    hyperparameters: dict[str, Any]
    control_encoder: ControlEncoder | None = None
    control_layer: str | None = None


def read_joint_checkpoint(
    checkpoint: str | PathLike, use_ema: bool = True, base_model: str | None = None
) -> JointCheckpoint:
    """The layer-sharing units of a ``JointLayerLoRAModule`` checkpoint: ``unet.*.processor.*``
    weights, hyper-parameters ``layers`` (names), ``attention_sharing``, ``lora_rank``,
    ``lora_alpha``, ``control_layer`` and ``base_model`` (replaced by ``base_model`` if given)."""
    read = read_unet_checkpoint(checkpoint, use_ema, base_model)
    wanted = ("layers", "attention_sharing", "lora_rank")
    found = {name: find_hyperparameter(read.hyperparameters, name) for name in wanted}
    names = found["layers"]
    if any(value is None for value in found.values()) or not isinstance(names, (list, tuple)) or not all(
            isinstance(name, str) for name in names):
        raise ValueError(f"{checkpoint}: hyper-parameters {wanted} (layers: a list of layer names) are not all there "
                         f"({found}); is it a JointLayerLoRAModule checkpoint?")
    marker = ".processor."
    weights = {key: tensor for key, tensor in read.unet_state.items() if marker in key}
    if not weights:
        raise ValueError(f"{checkpoint}: no layer-sharing weights ('unet.<attention module>{marker}*')")
    projections = [name for name in PROJECTIONS if any(f"{marker}{name}_lora." in key for key in weights)]
    control_layer = find_hyperparameter(read.hyperparameters, "control_layer")
    config = load_component(
        UNet2DConditionModel.load_config, read.base_model, "unet", MODEL_CONFIG_FILE, read.base_revision
    )
    layer_names, alpha = list(names), find_hyperparameter(read.hyperparameters, "lora_alpha")
    with torch.device("meta"):  # no base weights, and no initialisation of units about to be overwritten
        unet = UNet2DConditionModel.from_config(config)
        units = add_layer_sharing(unet, len(layer_names), found["attention_sharing"], found["lora_rank"], alpha,
                                  projections, control_channels=ControlEncoder.channels if control_layer else None)
    for unit in units.values():
        unit.to_empty(device="cpu")
    hint = (f"Do the hyper-parameters (layers {layer_names}, lora_rank {found['lora_rank']}) and the base model "
            f"{read.base_model} match the weights? Pass --base-model if it was another.")
    import_units(unet, lambda module, param: f"{module}{marker}{param}", weights, str(checkpoint), hint, folded=False)
    encoder = None
    if control_layer:
        encoder = ControlEncoder()
        state = exported_state(read_checkpoint(checkpoint), CONTROL_ENCODER_PART, checkpoint, use_ema)
        encoder.load_state_dict({key: tensor.float() for key, tensor in state.items()}, strict=True)
    return JointCheckpoint(unet, layer_names, read.hyperparameters, encoder, control_layer)
