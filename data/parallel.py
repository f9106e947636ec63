"""An ordered, memory-bounded parallel map for the CPU-heavy parts of shard writing."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_parallel_map(
    function: Callable[[list[Item]], list[Result]],
    items: Iterable[Item],
    *,
    workers: int,
    chunk_size: int = 16,
) -> Iterator[Result]:
    """Apply ``function`` to chunks of ``items`` in ``workers`` processes; yield results in input order.

    ``function`` takes a list (a chunk) and returns one result per item, so that
    small items amortise the inter-process round trip. At most ``4 * workers``
    chunks are in flight, so a million inputs do not pile up in memory when the
    consumer is slower than the pool. ``workers <= 1`` runs in this process.
    """
    chunks = _chunked(items, chunk_size)
    if workers <= 1:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small per-image tensor ops run ~10x slower on a thread team
        try:
            for chunk in chunks:
                yield from function(chunk)
        finally:
            torch.set_num_threads(previous_threads)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread_per_process) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.submit(function, chunk))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _chunked(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _one_thread_per_process() -> None:
    # The pool already uses every core; torch's own threads would only oversubscribe them.
    torch.set_num_threads(1)
