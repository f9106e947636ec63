"""The one protocol for per-rank state in checkpoints: what a checkpoint must hold beyond
weights and optimizer state so that a resumed run continues exactly as an uninterrupted one
would (every rank's global random generators and named generators, its data position).

Lightning writes a checkpoint from rank 0, but every rank builds its contents, so each piece
of per-rank state is gathered into one list under ``checkpoint["per_rank"][name]`` that rank 0
writes and each rank reads its own entry from (:func:`save_per_rank`, :func:`load_per_rank`).
A resumed run with another number of ranks gets ``None`` and starts that state afresh. The
container is the checkpoint itself for LightningModules and callbacks, and a DataModule's own
``state_dict`` (Lightning gives DataModules no access to the checkpoint).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; a collective when distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


PER_RANK_KEY = "per_rank"


def save_per_rank(checkpoint: dict[str, Any], name: str, state: Any) -> None:
    """Put every rank's ``state`` (picklable, and loadable with ``weights_only=True``) into
    ``checkpoint``; a collective: every rank calls it from its checkpoint hook."""
    checkpoint.setdefault(PER_RANK_KEY, {})[name] = gather_from_ranks(state)


def saved_states(checkpoint: dict[str, Any], name: str) -> list[Any] | None:
    """Every rank's ``name`` state in ``checkpoint``, in rank order (``None``: it has none)."""
    return checkpoint.get(PER_RANK_KEY, {}).get(name)


def saved_world_size(checkpoint: dict[str, Any], name: str) -> int | None:
    """How many ranks wrote ``name`` into ``checkpoint`` (``None``: the checkpoint has none)."""
    states = saved_states(checkpoint, name)
    return None if states is None else len(states)


def load_per_rank(checkpoint: dict[str, Any], name: str, rank: int, world_size: int) -> Any | None:
    """This rank's ``name`` state, or ``None`` when the checkpoint has none or was written by a
    different number of ranks (another split of the streams: nothing to continue exactly)."""
    if saved_world_size(checkpoint, name) != world_size:
        return None
    return checkpoint[PER_RANK_KEY][name][rank]


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """Seed of one data-parallel rank's generator: distinct, reproducible streams per
    ``(seed, rank, stream)`` (numpy's SeedSequence mixes them; ``seed + rank`` would make rank
    1 of seed 0 replay rank 0 of seed 1). ``stream`` tells a module's named generators apart."""
    entropy = [seed, rank] if stream == 0 else [seed, rank, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def capture_rng_states() -> dict[str, Any]:
    """The global generators this process draws from: Python's, numpy's, torch's CPU one and
    those of every CUDA device (dropout, and anything else that does not take a generator).

    Only types that ``torch.load(weights_only=True)`` accepts, as Lightning loads checkpoints so.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
