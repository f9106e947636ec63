"""``EpochDataLoader``: runs a ``ShardStream`` one epoch per pass and keeps what training consumed of it.

It yields what the stream yields, ``Tagged(batch, position)``, with the batch's images made
float in the training process (``data.batches.to_unit_float``); the DataModule unwraps each
item in ``on_before_batch_transfer`` and hands the position to ``consume``. The loader's
``StreamProgress`` is thus the place, per worker, after the last batch training took.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from data.batches import to_unit_float
from data.stream import ShardStream, StreamPosition, Tagged
from layerdiff.compat import shutdown_loader_workers


@dataclass
class StreamProgress:
    """How far one rank's training stream got in an epoch, as far as training consumed it.

    ``positions`` maps each logical worker to its stream's position after the last batch
    training took from it; ``last_worker`` produced the last of those batches; ``complete``
    says every batch of the epoch was consumed.
    """

    epoch: int = 0
    positions: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_worker: int | None = None
    complete: bool = False

    def to_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "positions": self.positions, "last_worker": self.last_worker,
                "complete": self.complete}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StreamProgress:
        return cls(int(state["epoch"]), {int(worker): position for worker, position in state["positions"].items()},
                   state["last_worker"], bool(state["complete"]))

    @classmethod
    def from_checkpoint(
        cls, state: dict[str, Any], saved_with: tuple[int, int], now: tuple[int, int], *, warn: bool
    ) -> StreamProgress:
        """A rank's saved progress, or its epoch from the start when the checkpoint was written with
        another (ranks, workers) split, whose positions do not apply (warning when ``warn``)."""
        progress = cls.from_state(state)
        if saved_with == now or not progress.positions:
            return progress
        if warn:
            warnings.warn(
                f"The checkpoint's data position was recorded with {saved_with[0]} rank(s) x {saved_with[1]} "
                f"worker(s), this run has {now[0]} x {now[1]}: the shards split differently, so epoch "
                f"{progress.epoch} restarts from its beginning (samples already seen in it are seen again). Resume "
                "with the same devices, nodes and num_workers to continue exactly where the run stopped.",
                stacklevel=3,
            )
        return cls(progress.epoch)


def _outlast_sigterm(worker_id: int) -> None:
    """SLURM sends SIGTERM to every process of a job, these workers included, while the training
    process saves at its next step (``callbacks.Preemption``), for which it still needs batches.
    Workers end anyway when the loader shuts them down or the training process exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class EpochDataLoader(DataLoader):
    """Runs a ``ShardStream`` one epoch per pass; images arrive as float.

    Each pass tells the stream its epoch, so shuffling differs per epoch: the trainer's
    ``current_epoch`` while fitting (``fit_epoch``), else the next in this loader's own count.
    Workers are not persistent, so each pass pickles the dataset afresh with that epoch.
    Images cross from the workers as uint8 and become float here (``to_unit_float``), in pinned
    memory when ``pin_memory``.

    A training loader also keeps the ``StreamProgress`` of its pass (``consume`` records each
    batch training takes). A pass over the epoch of ``resume`` continues from there: every
    worker from its position, and worker indices rotated so that torch's round-robin over the
    workers asks the one that was next first. The DataLoader draws worker seeds from its own
    generator, never from the global RNG, so starting a pass does not move training's streams.
    """

    def __init__(
        self,
        dataset: ShardStream,
        *,
        num_workers: int,
        pin_memory: bool,
        fit_epoch: Callable[[], int | None] = lambda: None,
        resume: StreamProgress | None = None,
    ):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         generator=torch.Generator().manual_seed(dataset.seed), worker_init_fn=_outlast_sigterm)
        self.pin_float_images = pin_memory
        self.fit_epoch = fit_epoch
        self.resume = resume
        self.progress = resume if resume is not None else StreamProgress(complete=True, epoch=-1)
        self._yielded = self._consumed = 0
        self._exhausted = False

    def _start_pass(self) -> int:
        """The epoch of the pass now starting; sets up resuming when it is the saved one."""
        epoch = self.fit_epoch()
        if epoch is None:
            epoch = self.progress.epoch + 1 if self.progress.complete else self.progress.epoch
        resume, self.resume = self.resume, None
        self.dataset.resume_from, self.dataset.worker_offset = {}, 0
        if resume is not None and resume.epoch == epoch:
            self.dataset.resume_from = resume.positions
            if resume.last_worker is not None:
                self.dataset.worker_offset = (resume.last_worker + 1) % max(self.num_workers, 1)
            self.progress = resume
        else:
            self.progress = StreamProgress(epoch)
        self.dataset.epoch = epoch
        self._yielded = self._consumed = 0
        self._exhausted = False
        return epoch

    def consume(self, position: StreamPosition) -> None:
        """Record that training took the batch ``position`` came with (a training stream's)."""
        self.progress.positions[position.worker] = position.state
        self.progress.last_worker = position.worker
        self._consumed += 1
        self._mark_complete()

    def _mark_complete(self) -> None:
        if self._exhausted and self._consumed == self._yielded:
            self.progress.complete = True

    def __iter__(self) -> Iterator[Tagged]:
        self._start_pass()
        if self.progress.complete:  # resumed after the epoch's last batch: nothing is left of it
            return
        batches = super().__iter__()
        try:
            for batch, position in batches:
                self._yielded += 1
                yield Tagged(to_unit_float(batch, pin_memory=self.pin_float_images), position)
            self._exhausted = True
            self._mark_complete()
        finally:
            # A worker's exception leaves torch's iterator in a reference cycle, so its workers
            # would be shut down only by a later garbage collection, which then stalls ~5 s.
            shutdown_loader_workers(batches)

