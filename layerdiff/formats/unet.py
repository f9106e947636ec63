"""A trained UNet out of a ``LatentDiffusionModule`` checkpoint, and written as a diffusers UNet folder.

The checkpoint holds the UNet as ``unet``: a LoRA run stores only
``unet.<module>.lora_{A,B}.<adapter>.weight``, a full fine-tune every ``unet.*`` weight; the
frozen rest comes from the ``base_model`` hyper-parameter. The folder is
``UNet2DConditionModel.save_pretrained`` (safetensors) plus ``layerdiff_config.json`` with the
training hyper-parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import UNet2DConditionModel

from layerdiff.formats.checkpoints import exported_state, find_hyperparameter, read_checkpoint
from layerdiff.formats.lora import UNET_PREFIX, Lora, fuse_lora, lora_from_state_dict
from layerdiff.models.base import load_unet

UNET_CONFIG_FILENAME = "layerdiff_config.json"


class UNetCheckpoint(NamedTuple):
    """The trained UNet weights of a checkpoint and what they were trained on."""

    unet_state: dict[str, torch.Tensor]  # trained weights, ``unet.`` stripped
    hyperparameters: dict[str, Any]
    base_model: str
    base_revision: str | None

    def lora(self) -> Lora:
        """The LoRA factors among the weights, scaled by the ``lora_alpha`` hyper-parameter."""
        return lora_from_state_dict(self.unet_state, find_hyperparameter(self.hyperparameters, "lora_alpha"))


def read_unet_checkpoint(
    checkpoint: str | PathLike, use_ema: bool = True, base_model: str | None = None
) -> UNetCheckpoint:
    """The UNet part of a ``LatentDiffusionModule`` checkpoint (EMA weights when present and
    ``use_ema``); ``base_model`` replaces the checkpoint's ``base_model`` hyper-parameter."""
    path = Path(checkpoint)
    contents = read_checkpoint(path)
    hyperparameters = dict(contents.get("hyper_parameters", {}))
    unet_state = exported_state(contents, UNET_PREFIX.rstrip("."), path, use_ema)
    if not unet_state:
        raise ValueError(
            f"{path}: no '{UNET_PREFIX}*' weights in the checkpoint; is it a LatentDiffusionModule checkpoint?"
        )
    base_model = base_model or find_hyperparameter(hyperparameters, "base_model")
    if base_model is None:
        raise ValueError(f"{path}: its hyper-parameters name no base_model; pass --base-model")
    base_revision = find_hyperparameter(hyperparameters, "base_revision")
    return UNetCheckpoint(unet_state, hyperparameters, base_model, base_revision)


def trained_unet(read: UNetCheckpoint, source: str | PathLike) -> UNet2DConditionModel:
    """The base model's UNet with the trained weights loaded (a full fine-tune) or the LoRA
    fused in (a LoRA run); ``source`` names the checkpoint in errors."""
    unet = load_unet(read.base_model, revision=read.base_revision)
    fuse_lora(unet, read.lora())
    plain_state = {key: tensor for key, tensor in read.unet_state.items() if ".lora_" not in key}
    unexpected = unet.load_state_dict(plain_state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(
            f"{source}: {len(unexpected)} UNet weights have no place in {read.base_model}'s UNet "
            f"(e.g. {unexpected[:3]}); was it trained on another base model? Pass --base-model."
        )
    return unet


def save_unet_folder(
    unet: UNet2DConditionModel,
    out_dir: str | PathLike,
    hyperparameters: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``unet`` as a diffusers UNet folder with the training hyper-parameters beside it."""
    out_dir = Path(out_dir)
    unet.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    (out_dir / UNET_CONFIG_FILENAME).write_text(
        json.dumps(hyperparameters, default=str, sort_keys=True, indent=2), encoding="utf-8"
    )
    return out_dir
