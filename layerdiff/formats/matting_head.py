"""The DiffuMatting matting head as a file: ``matting_head.safetensors``, the head's weights with
its shape (:class:`~layerdiff.models.matting_head.MattingHeadConfig`) as JSON under
``matting_head_config`` in the metadata, beside the usual provenance; and the head out of a
``DiffuMattingModule`` checkpoint (its trained part ``matting_head``, EMA weights when kept).

A head belongs to the VAE it was trained on (its feature channels are that decoder's); loading
checks the channels against the VAE given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from layerdiff.formats.checkpoints import exported_state, find_hyperparameter, read_checkpoint
from layerdiff.formats.provenance import provenance, read_metadata, tensors_for_file
from layerdiff.models.matting_head import MattingHead, MattingHeadConfig

MATTING_HEAD_FILENAME = "matting_head.safetensors"
MATTING_HEAD_COMPONENT = "diffumatting_matting_head"
CONFIG_KEY = "matting_head_config"
HEAD_PART = "matting_head"


def save_matting_head(head: MattingHead, path: str | PathLike, training_config: Mapping[str, Any] | None = None,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write ``head`` to ``path`` (a file, or a folder that gets ``matting_head.safetensors``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / MATTING_HEAD_FILENAME
    metadata = {**provenance(MATTING_HEAD_COMPONENT, training_config), CONFIG_KEY: json.dumps(head.config.to_dict())}
    save_file(tensors_for_file(head.state_dict(), dtype), str(path), metadata=metadata)
    return path


def load_matting_head(path: str | PathLike, vae: AutoencoderKL | None = None) -> MattingHead:
    """The head in ``path`` (float32); with ``vae``, checked to read that VAE's decoder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"matting head file not found: {path} (write one with `python -m layerdiff.export "
                                "matting-head --checkpoint CKPT --out DIR`)")
    metadata = read_metadata(path)
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: has no '{CONFIG_KEY}' in its metadata, so it is not a layerdiff matting head "
                         f"(component: {metadata.get('component', 'not recorded')})")
    head = MattingHead(MattingHeadConfig.from_dict(json.loads(metadata[CONFIG_KEY])))
    _check_vae(head.config, vae, path)
    state = {key: tensor.float() for key, tensor in load_file(str(path)).items()}
    head.load_state_dict(state, strict=True)
    return head


def matting_head_from_checkpoint(checkpoint: str | PathLike, use_ema: bool = True) -> tuple[MattingHead, dict]:
    """The trained head of a ``DiffuMattingModule`` checkpoint, and the checkpoint's hyper-parameters.
    Its shape is read off the weights, its key colour off the ``key_colour`` hyper-parameter."""
    contents = read_checkpoint(checkpoint)
    hyperparameters = dict(contents.get("hyper_parameters", {}))
    state = {key: tensor.float() for key, tensor in exported_state(contents, HEAD_PART, checkpoint, use_ema).items()}
    if not state:
        raise ValueError(f"{checkpoint}: holds no matting head; it is written by a DiffuMattingModule trained with "
                         "matting_head.weight > 0")
    key_colour = find_hyperparameter(hyperparameters, "key_colour") or (0, 255, 0)
    head = MattingHead(config_of_weights(state, tuple(value / 255.0 for value in key_colour)))
    head.load_state_dict(state, strict=True)
    return head, hyperparameters


def config_of_weights(state: Mapping[str, torch.Tensor], key_colour: tuple[float, float, float]) -> MattingHeadConfig:
    """A head's shape from its weights' shapes (``projections.i`` and ``refine`` convolutions)."""
    projections = sorted((int(key.split(".")[1]), tensor.shape) for key, tensor in state.items()
                         if key.startswith("projections.") and key.endswith(".weight"))
    depth = sum(1 for key, tensor in state.items() if key.startswith("refine.") and key.endswith(".weight")
                and tensor.ndim == 4)
    return MattingHeadConfig(feature_channels=tuple(shape[1] for _, shape in projections), width=projections[0][1][0],
                             depth=depth, key_colour=key_colour)


def _check_vae(config: MattingHeadConfig, vae: AutoencoderKL | None, path: Path) -> None:
    if vae is None:
        return
    expected = MattingHeadConfig.for_vae(vae).feature_channels
    if tuple(config.feature_channels) != expected:
        raise ValueError(f"{path}: the head reads decoder features of {list(config.feature_channels)} channels, the VAE "
                         f"given has {list(expected)}: it was trained on another VAE (an SD1.5/SDXL head fits both "
                         "their VAEs; the embedded tiny model's does not)")
