"""Every private torch / Lightning / diffusers API layerdiff touches, and only here.

Each function below wraps one private name (a ``_``-prefixed module, function or attribute)
that has no public equivalent in the versions we support, and ``tests/test_compat.py``
exercises each with the real library. A private name is looked up when its wrapper is first
called, not when this module is imported, so an upgrade that removes one breaks only the
feature that uses it, with a :class:`PrivateAPIError` that names the API and the wrapper to
adapt. This module imports nothing from the project.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class PrivateAPIError(ImportError):
    """A private API layerdiff depends on is gone or changed in the installed library."""


def _private(module: str, name: str, used_for: str) -> Any:
    """``module.name``, or a :class:`PrivateAPIError` saying what is missing and where it is used."""
    try:
        value = importlib.import_module(module)
        for part in name.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as error:
        raise PrivateAPIError(_missing(f"{module}.{name}", used_for)) from error
    return value


def _missing(api: str, used_for: str) -> str:
    library = api.split(".")[0]
    version = getattr(importlib.import_module(library), "__version__", "?")
    return (
        f"private API {api} (used for {used_for}) is not available in {library} {version}; "
        "adapt its wrapper in layerdiff.compat (tests/test_compat.py shows which)."
    )


def _attribute(owner: Any, name: str, used_for: str) -> Any:
    """``owner.name`` for a private attribute of a library object, or a :class:`PrivateAPIError`."""
    try:
        return getattr(owner, name)
    except AttributeError as error:
        module = type(owner).__module__
        raise PrivateAPIError(_missing(f"{module}.{type(owner).__name__}.{name}", used_for)) from error


def _require_attribute(owner: Any, name: str, used_for: str) -> None:
    """Setting ``owner.name`` only has an effect while the library still reads it."""
    _attribute(owner, name, used_for)


# -- torch ----------------------------------------------------------------------------------


def foreach_norm(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor in one fused kernel (``torch._foreach_norm``, what
    ``clip_grad_norm_`` uses)."""
    return list(_private("torch", "_foreach_norm", "the non-finite gradient check")(list(tensors)))


def foreach_lerp_(targets: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weight: float) -> None:
    """``target += weight * (end - target)`` for each pair, in place, in one fused kernel
    (``torch._foreach_lerp_``, what ``torch.optim`` uses)."""
    _private("torch", "_foreach_lerp_", "the EMA update")(list(targets), list(ends), weight)


def checkpoint_activations(module: nn.Module) -> nn.Module:
    """Recompute ``module``'s activations in backward, in place, with no wrapper module (so
    parameter names stay as they are): the composable ``checkpoint`` FSDP2 is designed with."""
    return _private("torch.distributed._composable", "checkpoint", "activation checkpointing per FSDP2 unit")(module)


def read_distributed_checkpoint(path: str | Path) -> dict[str, Any]:
    """Every entry of a ``torch.distributed.checkpoint`` folder, whole, in this process, with
    no process group: what ``format_utils.dcp_to_torch_save`` does, without the file."""
    planner = _private(
        "torch.distributed.checkpoint.format_utils", "_EmptyStateDictLoadPlanner", "reading a sharded checkpoint whole"
    )
    load = _private(
        "torch.distributed.checkpoint.state_dict_loader", "_load_state_dict", "reading a sharded checkpoint whole"
    )
    from torch.distributed.checkpoint import FileSystemReader

    stored: dict[str, Any] = {}
    load(stored, storage_reader=FileSystemReader(str(path)), planner=planner(), no_dist=True)
    return stored


def dispatch_mode_base() -> type:
    """``TorchDispatchMode``, the base class of a mode that sees every aten op (FLOP counting)."""
    return _private("torch.utils._python_dispatch", "TorchDispatchMode", "counting FLOPs")


def overload_packet(op: Any) -> Any:
    """The overload packet (``aten.mm``) of an op overload (``aten.mm.default``), the key of
    ``torch.utils.flop_counter.flop_registry``."""
    return _attribute(op, "_overloadpacket", "counting FLOPs")


def cpu_flash_attention_ops() -> tuple[Any, Any]:
    """The CPU flash-attention forward and backward aten ops, which ``flop_registry`` lacks."""
    return (
        _private("torch", "ops.aten._scaled_dot_product_flash_attention_for_cpu", "counting attention FLOPs"),
        _private("torch", "ops.aten._scaled_dot_product_flash_attention_for_cpu_backward", "counting attention FLOPs"),
    )


def shutdown_loader_workers(iterator: Iterable) -> None:
    """Stop a ``DataLoader`` iterator's worker processes now (no-op without workers); a
    worker's exception otherwise leaves them to a later garbage collection."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

        if isinstance(iterator, _MultiProcessingDataLoaderIter):
            raise PrivateAPIError(
                _missing("torch.utils.data.dataloader._MultiProcessingDataLoaderIter._shutdown_workers", "data loading")
            )
        return
    shutdown()


# -- Lightning ------------------------------------------------------------------------------


def distributed_checkpoint_metadata_filename() -> str:
    """The file a Lightning sharded checkpoint folder keeps its non-tensor state in
    (``meta.pt``): ours are Lightning's folders, so Lightning's tools read them."""
    return _private("lightning.fabric.utilities.load", "_METADATA_FILENAME", "sharded checkpoint folders")


def attached_trainer(module: Any) -> Any:
    """The ``Trainer`` a ``LightningModule`` is attached to, or None (its ``trainer``
    property raises instead, e.g. inside ``load_from_checkpoint``)."""
    return _attribute(module, "_trainer", "telling whether a module runs under a Trainer")


def set_data_parallel_size(strategy: Any, size: int) -> None:
    """Set a ``ModelParallelStrategy``'s data-parallel size after construction, before its
    ``setup_environment`` builds the device mesh (the node and process counts it needs are
    known only then)."""
    _require_attribute(strategy, "_data_parallel_size", "sizing FSDP2Strategy's device mesh")
    strategy._data_parallel_size = size


def data_parallel_size(strategy: Any) -> int | str:
    """A ``ModelParallelStrategy``'s data-parallel size as configured (``"auto"`` until set up)."""
    return _attribute(strategy, "_data_parallel_size", "sizing FSDP2Strategy's device mesh")


def last_saved_step(checkpoint: Any) -> int:
    """The global step of a ``ModelCheckpoint``'s latest save (any kind)."""
    return _attribute(checkpoint, "_last_global_step_saved", "saving on preemption")


def save_last_checkpoint(checkpoint: Any, trainer: Any) -> None:
    """Have a ``ModelCheckpoint`` write its ``last`` checkpoint now, recorded as its own save
    (it then skips the saves it would make later in the run for this step)."""
    candidates = _attribute(checkpoint, "_monitor_candidates", "saving on preemption")(trainer)
    _attribute(checkpoint, "_save_last_checkpoint", "saving on preemption")(trainer, candidates)


def skip_next_validation(trainer: Any) -> None:
    """Make the fit loop skip the validation it would run before stopping."""
    epoch_loop = trainer.fit_loop.epoch_loop
    _require_attribute(epoch_loop, "_skip_next_val", "stopping on preemption without validating")
    epoch_loop._skip_next_val = True


# -- diffusers ------------------------------------------------------------------------------


def set_gradient_checkpointing(module: nn.Module, enabled: bool, function: Callable) -> None:
    """Switch a diffusers block's own gradient checkpointing (``gradient_checkpointing``) and
    the recompute function it calls (``_gradient_checkpointing_func``, normally set by
    ``ModelMixin``), for blocks used outside a ``ModelMixin``."""
    module.gradient_checkpointing = enabled
    module._gradient_checkpointing_func = function
