"""Reading Lightning checkpoints: the trained weights (EMA averages in place of the raw ones
when the run kept them) and the hyper-parameters, from a single ``.ckpt`` file or a sharded
checkpoint folder.

A sharded folder (FSDP2) is read through ``layerdiff.distributed``, which writes it.

The EMA callback (``callbacks.EMA``) stores its averages, parameter name -> tensor, under
:data:`EMA_AVERAGES_KEY` in its callback state (``ckpt["callbacks"]``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from layerdiff.distributed import read_sharded_checkpoint

EMA_AVERAGES_KEY = "averaged_parameters"
# What an objective module trains: {"exported": [attribute names], "auxiliary": [...]}.
TRAINED_PARTS_KEY = "trained_parts"
# Wrappers that activation checkpointing and torch.compile insert into parameter names.
_WRAPPER_SEGMENT = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as one dict on the CPU: a ``.ckpt`` file, or a sharded folder
    consolidated in memory (:func:`read_sharded_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        return read_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Lightning pickles hyper-parameters (AttributeDict, paths, namespaces), which the
    # weights-only unpickler refuses: read only checkpoints you trust.
    return torch.load(path, map_location="cpu", weights_only=False)


def trained_state_dict(contents: Mapping[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint's ``state_dict``, with the EMA callback's averages in place of the raw
    weights when the checkpoint has them and ``use_ema``."""
    state_dict = dict(contents.get("state_dict", {}))
    if not use_ema:
        return state_dict
    averages = [
        state[EMA_AVERAGES_KEY]
        for state in contents.get("callbacks", {}).values()
        if isinstance(state, Mapping) and EMA_AVERAGES_KEY in state
    ]
    if not averages:
        return state_dict
    unknown = sorted(set(averages[0]) - set(state_dict))
    if len(averages) > 1 or unknown:
        raise ValueError(
            f"the checkpoint's EMA state does not match its weights ({len(averages)} EMA states; averaged "
            f"parameters missing from state_dict: {unknown[:3]}). Export the raw weights with --no-ema "
            "(use_ema=False)."
        )
    state_dict.update(averages[0])
    return state_dict


def exported_state(
    contents: Mapping[str, Any], part: str, checkpoint_path: str | os.PathLike, use_ema: bool = True
) -> dict[str, torch.Tensor]:
    """The weights of trained part ``part`` (e.g. ``unet``), its prefix removed (empty when the
    checkpoint has none). A checkpoint that declares its parts (:data:`TRAINED_PARTS_KEY`, from
    ``layerdiff.modules.base``) must list ``part`` among the exported ones."""
    declared = contents.get(TRAINED_PARTS_KEY)
    if declared is not None and part not in declared["exported"]:
        raise ValueError(
            f"{checkpoint_path}: this checkpoint's module exports {declared['exported']}, not '{part}' "
            f"(its training machinery: {declared['auxiliary'] or 'none'}); use the export command for that module."
        )
    return submodule_state(trained_state_dict(contents, use_ema), f"{part}.")


def submodule_state(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` (e.g. ``unet.``), prefix and wrapper segments removed."""
    return {
        _WRAPPER_SEGMENT.sub("", key[len(prefix):]): tensor
        for key, tensor in state_dict.items()
        if key.startswith(prefix)
    }


def find_hyperparameter(hyperparameters: Any, name: str) -> Any:
    """First value stored under ``name`` in possibly nested mappings (depth-first), else None."""
    if isinstance(hyperparameters, Mapping):
        if name in hyperparameters:
            return hyperparameters[name]
        for value in hyperparameters.values():
            found = find_hyperparameter(value, name)
            if found is not None:
                return found
    return None
