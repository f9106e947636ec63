"""Reading Lightning checkpoints: the trained weights (EMA averages in place of the raw ones
when the run kept them) and the hyper-parameters, from a single ``.ckpt`` file or a sharded
checkpoint folder.

A sharded folder is what Lightning's ``ModelParallelStrategy`` (FSDP2) saves:
``torch.distributed.checkpoint`` files holding ``state_dict`` and ``optimizer_<i>``, plus
``meta.pt`` with everything else (loops, callbacks, hyper-parameters), written last, so a
folder without it is an interrupted save. Sharded tensors outside the model and optimizers
(the EMA callback's averages of sharded parameters) are stored in the distributed files under
:data:`SHARDED_ENTRIES`, keyed by their JSON path in the checkpoint, and ``meta.pt`` holds
:data:`SHARDED_PLACEHOLDER` in their place.

The EMA callback (``callbacks.EMA``) stores its averages, parameter name -> tensor, under
:data:`EMA_AVERAGES_KEY` in its callback state (``ckpt["callbacks"]``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME

EMA_AVERAGES_KEY = "averaged_parameters"
SHARDED_ENTRIES = "sharded_entries"
SHARDED_PLACEHOLDER = "<sharded tensor: stored in the distributed checkpoint files, see sharded_entries>"
METADATA_FILENAME = _METADATA_FILENAME  # meta.pt
# Wrappers that activation checkpointing and torch.compile insert into parameter names.
_WRAPPER_SEGMENT = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")


def is_sharded_checkpoint(path: Path) -> bool:
    """A sharded checkpoint folder is complete exactly when it has ``meta.pt`` (written last)."""
    return path.is_dir() and (path / METADATA_FILENAME).is_file()


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


def read_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint folder as one full checkpoint dict, on the CPU, in one process:
    ``state_dict`` with whole tensors, sharded callback state (EMA averages) back in place,
    and ``optimizer_states`` in ``torch.optim`` form (state keyed by parameter index), the
    layout of a single-file Lightning checkpoint. Needs the whole checkpoint in memory."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a complete sharded checkpoint folder (no {METADATA_FILENAME}); "
            "an interrupted save leaves none, so use the previous checkpoint."
        )
    stored: dict[str, Any] = {}
    reader = FileSystemReader(str(path))
    _load_state_dict(stored, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint = torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=False)
    insert_sharded_entries(checkpoint, stored.pop(SHARDED_ENTRIES, {}))
    checkpoint["state_dict"] = stored.pop("state_dict", {})
    indices = sorted(int(key.removeprefix("optimizer_")) for key in stored if key.startswith("optimizer_"))
    checkpoint["optimizer_states"] = [index_optimizer_state(stored.pop(f"optimizer_{index}")) for index in indices]
    return checkpoint


def insert_sharded_entries(metadata: dict[str, Any], entries: Mapping[str, torch.Tensor]) -> None:
    """Put each sharded entry back at its JSON path in ``metadata``, in place."""
    for encoded, tensor in entries.items():
        *parents, last = json.loads(encoded)
        container = metadata
        for key in parents:
            container = container[key]
        if not (isinstance(container.get(last), str) and container[last] == SHARDED_PLACEHOLDER):
            raise ValueError(f"sharded entry {encoded} has no placeholder in {METADATA_FILENAME}")
        container[last] = tensor


def index_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A distributed optimizer state dict (keyed by parameter names) in ``torch.optim`` form
    (parameters numbered across the param groups in order), as ``Optimizer.load_state_dict``
    takes it."""
    groups, per_parameter, index = [], {}, 0
    for group in state["param_groups"]:
        numbers = []
        for name in group["params"]:
            if name in state["state"]:
                per_parameter[index] = state["state"][name]
            numbers.append(index)
            index += 1
        groups.append({**group, "params": numbers})
    return {"state": per_parameter, "param_groups": groups}


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
