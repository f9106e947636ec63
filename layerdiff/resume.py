"""The one protocol by which per-rank state enters and leaves checkpoints, so that a resumed run
continues exactly as an uninterrupted one would.

Lightning writes a checkpoint from rank 0, but every rank builds its contents. State that
differs per rank (named noise generators, the global RNGs, each rank's data position) is
therefore gathered into one list in rank order (:func:`gather_from_ranks`), which rank 0
writes; on resume each rank takes its own entry (:func:`own_entry`), or nothing when the run
now has another world size (its streams then start afresh, with one warning saying so).

Two kinds of owners use it: the LightningModules (``layerdiff.modules.base``: named generators
and global RNGs, under :data:`PER_RANK_KEY` of the checkpoint) and the DataModule (its stream
positions, in its own ``state_dict``). Values must be types ``torch.load(weights_only=True)``
accepts, as Lightning loads checkpoints so.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

PER_RANK_KEY = "per_rank_state"
GLOBAL_RNGS = "global_rngs"


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; a collective when distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def own_entry(entries: list[Any] | None, rank: int, world_size: int, what: str) -> Any | None:
    """This rank's entry of a list :func:`gather_from_ranks` made, or ``None`` when there is none
    or the list was written by another number of ranks (warned once, on rank 0, naming ``what``)."""
    if entries is None:
        return None
    if len(entries) != world_size:
        if rank == 0:
            warnings.warn(
                f"the checkpoint's {what} was saved by {len(entries)} rank(s) and this run has {world_size}: it "
                "starts afresh (resume with the same devices and nodes to continue it exactly)",
                stacklevel=2,
            )
        return None
    return entries[rank]


def save_per_rank(checkpoint: dict[str, Any], states: Mapping[str, Any]) -> None:
    """Gather this rank's named ``states`` and store every rank's under ``checkpoint[PER_RANK_KEY]``.
    A collective when distributed: every rank calls it with the same names."""
    gathered = gather_from_ranks(dict(states))
    checkpoint[PER_RANK_KEY] = {name: [rank_states[name] for rank_states in gathered] for name in states}


def load_per_rank(checkpoint: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's named states from ``checkpoint[PER_RANK_KEY]`` (those that match the world size)."""
    restored = {}
    for name, entries in checkpoint.get(PER_RANK_KEY, {}).items():
        state = own_entry(entries, rank, world_size, f"per-rank state {name!r}")
        if state is not None:
            restored[name] = state
    return restored


def rank_seed(seed: int, rank: int, stream: str = "") -> int:
    """Seed of one rank's generator of one named stream: distinct, reproducible per
    ``(seed, rank, stream)`` (numpy's SeedSequence mixes them; ``seed + rank`` would make rank 1
    of seed 0 replay rank 0 of seed 1)."""
    entropy = [seed, rank, *stream.encode()] if stream else [seed, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def capture_rng_states() -> dict[str, Any]:
    """The global generators this process draws from: Python's, numpy's, torch's CPU one and
    those of every CUDA device (dropout, and anything else that does not take a generator)."""
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
