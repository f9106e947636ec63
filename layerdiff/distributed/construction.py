"""Building the trained parts for sharded training without a whole copy in every process.

A module's ``__init__`` builds its trained parts whole, and under FSDP2 each process then
keeps only its shard of them. Inside :func:`sharded_construction` (the command line enters it
around building the model when the strategy shards), :func:`trained_part` builds them
on the meta device (shapes, no storage) in every process except the first of each node. Once
``fully_shard`` has split them, :func:`materialize` gives those processes storage for their
own shards only and fills it from global rank 0's whole copy, one tensor at a time
(``set_model_state_dict`` with ``broadcast_from_rank0``), so every value is the one a whole
construction gives, bit for bit; rank 0 sends before it shards, which then frees its whole
copy unit by unit as before. Host memory per node goes from one whole copy per process to
one whole copy plus a shard per process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

M = TypeVar("M", bound=nn.Module)
_SHARDED_CONSTRUCTION: ContextVar[bool] = ContextVar("layerdiff_sharded_construction", default=False)
# Set per process by the launchers Lightning supports (its own, torchrun, SLURM, MPI).
_LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


@contextmanager
def sharded_construction() -> Iterator[None]:
    """Modules built inside build their trained parts for sharded training (see the module
    docstring); their ``configure_model`` must then run under a sharding strategy."""
    token = _SHARDED_CONSTRUCTION.set(True)
    try:
        yield
    finally:
        _SHARDED_CONSTRUCTION.reset(token)


def local_rank() -> int:
    """This process's rank on its node, from the launcher's environment (0 where none is set:
    the process Lightning's own launcher starts the others from)."""
    for variable in _LOCAL_RANK_VARIABLES:
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0


def trained_part(build: Callable[..., M], *args: Any, **kwargs: Any) -> M:
    """``build(*args, **kwargs)``: a module's trained part. On the meta device inside
    :func:`sharded_construction` in every process but its node's first (load initial weights
    into it only where :func:`is_deferred` is false), else as it is."""
    if not _SHARDED_CONSTRUCTION.get() or local_rank() == 0:
        return build(*args, **kwargs)
    with torch.device("meta"):
        return build(*args, **kwargs)


def is_deferred(part: nn.Module) -> bool:
    """Whether ``part`` was built without storage (on the meta device) and awaits :func:`materialize`."""
    return any(tensor.is_meta for tensor in (*part.parameters(), *part.buffers()))


def materialize(parts: Sequence[nn.Module], device: torch.device) -> None:
    """Give every process's ``parts`` global rank 0's values, one tensor at a time (a
    collective: call it in every process). Processes that built the parts on the meta device
    call it after ``fully_shard``, and get storage on ``device`` for their shards only; rank 0
    (and any other process holding them whole) calls it before, so that sharding afterwards
    frees its whole tensors unit by unit. The CPU random generator is rank 0's afterwards, as
    if every process had built the parts whole (meta construction draws no numbers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    deferred = [is_deferred(part) for part in parts]
    if rank == 0 and any(deferred):
        raise RuntimeError(
            "global rank 0 built the trained parts on the meta device, so nothing holds their values; "
            f"it reads its node rank from {', '.join(_LOCAL_RANK_VARIABLES)}: set the first of them that is set "
            "to 0 for global rank 0."
        )
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for part, empty in zip(parts, deferred):
        if empty:
            part.to_empty(device=device)
        non_persistent = {name for name, _ in part.named_buffers()} - set(part.state_dict())
        if non_persistent:
            raise NotImplementedError(
                f"{type(part).__name__} has non-persistent buffers ({', '.join(sorted(non_persistent))}), which "
                "rank 0 cannot send through its state dict; build it outside sharded_construction."
            )
        set_model_state_dict(part, dict(part.state_dict()) if rank == 0 else {}, options=options)
    generator_state = [torch.get_rng_state() if rank == 0 else None]
    dist.broadcast_object_list(generator_state, src=0)
    torch.set_rng_state(generator_state[0])
