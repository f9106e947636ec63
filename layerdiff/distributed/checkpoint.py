"""Crash-safe sharded checkpoint folders, and reading them whole in one process.

The folder is Lightning's: ``torch.distributed.checkpoint`` files holding ``state_dict`` and
``optimizer_<i>`` (each rank writes its shards), plus ``meta.pt`` written by rank 0 with
everything else (loops, callbacks, schedulers, hyper-parameters). Two additions:

* sharded tensors outside the model and optimizers (the EMA callback's averages of sharded
  parameters) go into the distributed files too, under :data:`SHARDED_ENTRIES` keyed by their
  JSON path in the checkpoint; ``meta.pt`` keeps :data:`SHARDED_PLACEHOLDER` in their place.
  A ``torch.save`` of rank 0's copy would keep only rank 0's shards.
* a save writes into a hidden sibling folder and rank 0 renames it into place only once
  every file is complete (``meta.pt`` last, itself written to a temporary name first), so a
  crash mid-save leaves the previous checkpoint (``last.ckpt`` overwritten every few steps)
  intact and never a folder that looks valid but is not.

Everything in ``meta.pt`` is rank 0's, as in a DDP checkpoint, which rank 0 alone writes:
state that differs per rank must be gathered by its owner before saving (as the modules
gather every rank's noise stream). Routing such values through the distributed files instead
would not help: DCP keeps one copy of a non-tensor value that every rank saves under the same
key.

:func:`read_sharded_checkpoint` / :func:`consolidate_checkpoint` turn a folder into one
in-memory checkpoint / one single-file Lightning ``.ckpt``, the form DDP resumes from and
``LightningModule.load_from_checkpoint`` reads (``python -m layerdiff.export consolidate``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from layerdiff.compat import distributed_checkpoint_metadata_filename, read_distributed_checkpoint

SHARDED_ENTRIES = "sharded_entries"
SHARDED_PLACEHOLDER = "<sharded tensor: stored in the distributed checkpoint files, see sharded_entries>"
METADATA_FILENAME = distributed_checkpoint_metadata_filename()


def save_sharded_checkpoint(strategy: Any, checkpoint: dict[str, Any], filepath: str | os.PathLike) -> None:
    """``FSDP2Strategy.save_checkpoint``: ``checkpoint`` as a sharded folder at ``filepath``,
    atomically (a collective)."""
    path = Path(strategy.broadcast(str(filepath)))
    staging = path.with_name(f".{path.name}.partial")
    optimizers = checkpoint.pop("optimizer_states", [])
    state = {"state_dict": checkpoint.pop("state_dict")}
    state.update({f"optimizer_{index}": optimizer for index, optimizer in enumerate(optimizers)})
    state[SHARDED_ENTRIES], metadata = split_sharded_entries(checkpoint)
    if strategy.is_global_zero:
        remove_path(staging)  # left by a crashed save
    strategy.barrier("save_sharded_checkpoint")
    dcp.save(state, checkpoint_id=staging)  # returns on rank 0 once every rank's files are written
    if strategy.is_global_zero:
        scratch = staging / f".{METADATA_FILENAME}.partial"
        torch.save(metadata, scratch)
        os.replace(scratch, staging / METADATA_FILENAME)
        replace_path(staging, path)
    strategy.barrier("save_sharded_checkpoint")


def load_sharded_checkpoint(
    strategy: Any, checkpoint_path: str | os.PathLike, weights_only: bool | None
) -> dict[str, Any]:
    """``FSDP2Strategy.load_checkpoint``: the model, optimizer and (when fitting) sharded
    callback state from a sharded folder, loaded in place; returns the rest (``meta.pt``)."""
    path = Path(strategy.broadcast(str(checkpoint_path)))
    if not is_sharded_checkpoint(path):
        raise ValueError(
            f"{path} is not a sharded checkpoint folder (one with {METADATA_FILENAME}); {type(strategy).__name__} "
            "resumes from the folders it writes. A single-file checkpoint (a DDP run's, or `python -m "
            "layerdiff.export consolidate` output) resumes under the recipe's default strategy; to start a "
            "sharded run from its weights, use it as the model's initialisation instead."
        )
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # Keys the module left out of the checkpoint (frozen weights) are not read: its
    # load_state_dict decides what may be missing, with its own strictness.
    model_state = {
        key: value for key, value in get_model_state_dict(strategy.model).items() if f"state_dict.{key}" in stored
    }
    loaded = {"state_dict": model_state}
    dcp.load(loaded, checkpoint_id=path)
    strategy.lightning_module.load_state_dict(loaded["state_dict"], strict=strategy.lightning_module.strict_loading)
    for index, optimizer in enumerate(strategy.optimizers):
        key = f"optimizer_{index}"
        optimizer_state = {key: get_optimizer_state_dict(strategy.model, optimizer)}
        dcp.load(optimizer_state, checkpoint_id=path)
        set_optimizer_state_dict(
            strategy.model, optimizer, optim_state_dict=optimizer_state[key], options=StateDictOptions(cpu_offload=True)
        )

    metadata = torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=weights_only)
    trainer = strategy.lightning_module.trainer
    if trainer.state.fn != TrainerFn.FITTING:
        return metadata  # validate/test/predict restore the weights only; callback state keeps its placeholders
    # Sharded entries live in callback states (the EMA's averages); load them into the
    # tensors this run holds there now.
    live = {"callbacks": {callback.state_key: callback.state_dict() for callback in trainer.callbacks}}
    targets = {}
    for entry_path in placeholder_paths(metadata):
        target = _value_at(live, entry_path)
        if not isinstance(target, DTensor):
            raise ValueError(
                f"{path} holds a sharded tensor at {'/'.join(map(str, entry_path))}, but this run has no sharded "
                "tensor there to load it into; resume with the same callbacks and model settings."
            )
        targets[json.dumps(entry_path)] = target
    if targets:
        dcp.load({SHARDED_ENTRIES: targets}, checkpoint_id=path)  # in place, into the live tensors
        insert_sharded_entries(metadata, targets)
    return metadata


def _value_at(nested: Mapping[str, Any], path: list) -> Any:
    """``nested[path[0]][path[1]]...``, or None where the path leads nowhere."""
    value: Any = nested
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def is_sharded_checkpoint(path: Path) -> bool:
    """A sharded checkpoint folder is complete exactly when it has ``meta.pt`` (written last)."""
    return path.is_dir() and (path / METADATA_FILENAME).is_file()


def split_sharded_entries(checkpoint: Mapping[str, Any]) -> tuple[dict[str, DTensor], dict[str, Any]]:
    """``(sharded, rest)``: the DTensors anywhere in ``checkpoint``'s nested dicts by JSON
    path, and ``checkpoint`` with :data:`SHARDED_PLACEHOLDER` in their place (the dicts on
    the way to a DTensor are copied; everything else, e.g. ``AttributeDict`` hyper-parameters,
    is kept as it is)."""
    sharded: dict[str, DTensor] = {}

    def walk(value: Any, where: list) -> Any:
        if isinstance(value, DTensor):
            sharded[json.dumps(where)] = value
            return SHARDED_PLACEHOLDER
        if isinstance(value, Mapping) and _holds_dtensor(value):
            return {key: walk(item, [*where, key]) for key, item in value.items()}
        if isinstance(value, (list, tuple)) and _holds_dtensor(value):
            raise TypeError(
                f"sharded tensors in a {type(value).__name__} at {'/'.join(map(str, where))} cannot be checkpointed; "
                "keep them in a dict (by name)."
            )
        return value

    return sharded, walk(checkpoint, [])


def _holds_dtensor(value: Any) -> bool:
    if isinstance(value, DTensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_dtensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_dtensor(item) for item in value)
    return False


def placeholder_paths(metadata: Any, where: list | None = None) -> Iterator[list]:
    """Paths of the :data:`SHARDED_PLACEHOLDER` values in ``metadata``."""
    where = where or []
    if isinstance(metadata, str) and metadata == SHARDED_PLACEHOLDER:
        yield where
    elif isinstance(metadata, Mapping):
        for key, value in metadata.items():
            yield from placeholder_paths(value, [*where, key])


def insert_sharded_entries(metadata: dict[str, Any], entries: Mapping[str, torch.Tensor]) -> None:
    """Put each entry back at its JSON path in ``metadata``, in place."""
    for encoded, tensor in entries.items():
        *parents, last = json.loads(encoded)
        container = metadata
        for key in parents:
            container = container[key]
        if not (isinstance(container.get(last), str) and container[last] == SHARDED_PLACEHOLDER):
            raise ValueError(f"sharded entry {encoded} has no placeholder in {METADATA_FILENAME}")
        container[last] = tensor


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``, replacing a file or folder there. A folder cannot
    be renamed over a non-empty one, so the old one is renamed aside first; a crash between
    the two renames leaves both complete under hidden names and nothing half-written."""
    retired = destination.with_name(f".{destination.name}.replaced")
    remove_path(retired)
    if destination.exists() or destination.is_symlink():
        os.replace(destination, retired)
    os.replace(source, destination)
    remove_path(retired)


# -- consolidation -------------------------------------------------------------------------


def read_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint folder as one full checkpoint dict, on the CPU, in one process:
    ``state_dict`` with whole tensors, sharded callback state (EMA averages) back in place,
    and ``optimizer_states`` in ``torch.optim`` form (state keyed by parameter index), the
    layout of a single-file Lightning checkpoint. Needs the whole checkpoint in memory."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a complete sharded checkpoint folder (no {METADATA_FILENAME}); "
            "an interrupted save leaves none, so use the previous checkpoint."
        )
    stored = read_distributed_checkpoint(path)
    # Lightning's checkpoints pickle hyper-parameters (AttributeDict, paths): trusted files only.
    checkpoint = torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=False)
    insert_sharded_entries(checkpoint, stored.pop(SHARDED_ENTRIES, {}))
    checkpoint["state_dict"] = stored.pop("state_dict", {})
    indices = sorted(int(key.removeprefix("optimizer_")) for key in stored if key.startswith("optimizer_"))
    checkpoint["optimizer_states"] = [index_optimizer_state(stored.pop(f"optimizer_{index}")) for index in indices]
    return checkpoint


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


def consolidate_checkpoint(folder: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write a sharded checkpoint folder as one single-file Lightning checkpoint, atomically."""
    checkpoint = read_sharded_checkpoint(folder)
    out_file = Path(out_file)
    if out_file.resolve() == Path(folder).resolve():
        raise ValueError(f"--out {out_file} is the checkpoint folder itself; give a new file name")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_file.with_name(f".{out_file.name}.partial")
    torch.save(checkpoint, scratch)
    replace_path(scratch, out_file)
    return out_file
