"""What exact data resume costs: recording the stream position in every batch, and restoring it.

    python -m benchmarks.resume_cost [--size 128] [--samples 1200] [--no-write]

On demo shards (in a temporary folder), side by side in one run:

* loader throughput with the per-batch stream position (``track_position``, what training
  uses) against the same loader without it;
* the wait for the first batch of a loader resumed from a checkpointed position early, in the
  middle and late in an epoch, against a fresh loader's. A position names the samples held in
  the shuffle buffer and size buckets; restoring reads those back and re-reads the shard the
  cursor was in, so the wait should not grow with how far into the epoch the run was.

Prints a markdown table and, unless ``--no-write``, puts it into the "Exact resume" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import Timing, best_timings, machine_description, report
from data.datamodule import ShardDataModule
from data.demo import write_demo

SECTION_TITLE = "## Exact resume"


def loader_settings(workers: int, batch_size: int) -> dict:
    return dict(batch_size=batch_size, num_workers=workers, shuffle_buffer=1000, seed=0)


def epoch_throughput(spec: str, workers: int, batch_size: int, track_position: bool) -> Timing:
    module = ShardDataModule(spec, **loader_settings(workers, batch_size))
    loader = module.train_dataloader()
    loader.dataset.track_position = track_position
    started = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    items = sum(len(batch) for batch, _ in batches)
    return Timing(items, time.perf_counter() - first, first - started)


def first_batch_wait(spec: str, workers: int, batch_size: int, after_batches: int) -> Timing:
    """Wait for the first batch of a loader restored after ``after_batches`` consumed ones
    (a fresh loader for 0)."""
    state = None
    if after_batches:
        module = ShardDataModule(spec, **loader_settings(workers, batch_size))
        for taken, batch in enumerate(module.train_dataloader(), start=1):
            module.on_before_batch_transfer(batch, 0)
            if taken == after_batches:
                break
        state = module.state_dict()
    resumed = ShardDataModule(spec, **loader_settings(workers, batch_size))
    started = time.perf_counter()
    if state is not None:
        resumed.load_state_dict(state)
    next(iter(resumed.train_dataloader()))
    waited = time.perf_counter() - started
    return Timing(1, waited)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="image size (default 128)")
    parser.add_argument("--samples", type=int, default=1200, help="training samples (default 1200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="loader workers (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="layerdiff-bench-") as temporary:
        write_demo(Path(temporary), size=args.size, train=args.samples, val=8, samples_per_shard=100)
        spec = str(Path(temporary) / "train")
        batches_per_epoch = args.samples // args.batch_size
        throughput = best_timings(
            {tracked: lambda tracked=tracked: epoch_throughput(spec, args.workers, args.batch_size, tracked)
             for tracked in (False, True)},
            args.repeats,
        )
        stops = {"fresh loader": 0, "10 % into the epoch": batches_per_epoch // 10,
                 "50 %": batches_per_epoch // 2, "90 %": batches_per_epoch * 9 // 10}
        waits = best_timings(
            {name: lambda stop=stop: first_batch_wait(spec, args.workers, args.batch_size, stop)
             for name, stop in stops.items()},
            args.repeats,
        )

    untracked = throughput[False].rate
    rows = [
        ("loader epoch, no position in the batches", f"{untracked:.0f} samples/s", "1.00x"),
        ("loader epoch, position in every batch (training)", f"{throughput[True].rate:.0f} samples/s",
         f"{throughput[True].rate / untracked:.2f}x"),
    ]
    fresh = waits.pop("fresh loader").seconds
    rows.append(("first batch of a fresh loader", f"{fresh:.2f} s", "1.00x"))
    for name, timing in waits.items():
        rows.append((f"first batch of a loader resumed {name}", f"{timing.seconds:.2f} s",
                     f"{timing.seconds / fresh:.2f}x"))
    table = "\n".join(["| measurement | result | vs. first row of its kind |", "|---|---|---|"]
                      + [f"| {name} | {value} | {ratio} |" for name, value, ratio in rows])
    section = (
        f"{SECTION_TITLE}\n\n"
        f"`python -m benchmarks.resume_cost` on {machine_description()}; {args.size} px demo shards "
        f"({args.samples} samples, 100 per shard), batch size {args.batch_size}, num_workers={args.workers}, "
        f"shuffle buffer 1000, best of {args.repeats} interleaved runs; 1-minute load average "
        f"{load_at_start:.1f} when the run started.\n\n{table}\n\n"
        "Reading it: the position (shard cursor, and the buffered samples by reference) costs what the "
        "first two rows differ by. A resumed loader reads back the samples its shuffle buffer and size "
        "buckets held and re-reads the shard its cursor was in, then goes on; it does not replay the "
        "epoch, so its wait stays flat however far into the epoch the checkpoint was, where replaying "
        "(re-reading and decoding everything before the position) would grow with it.\n"
    )
    report(section, write=not args.no_write)


if __name__ == "__main__":
    main()
