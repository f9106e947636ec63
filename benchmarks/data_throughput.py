"""Data pipeline throughput: raw PNG decode vs. the ShardDataModule loader, and the shard writer.

    python -m benchmarks.data_throughput [--size 256] [--samples 400] [--no-write]

Builds demo shards in a temporary folder, then measures on the same shards:

* raw decode: read the tar files and decode the PNG members to arrays, one process;
* the training loader (``ShardDataModule.train_dataloader``) with 0, 1 and 2 workers,
  foreground only and with layers (``require_layers``);
* the folder writer (``python -m data write``) with 1 and 2 worker processes;
* building the demo shards (the default 64 px set, and the shards measured here).

Prints a markdown table and, unless ``--no-write``, puts it into the "Data pipeline"
section of BENCHMARKS.md in the repository root.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import Timing, best_timings, machine_description, report, timed
from data.datamodule import ShardDataModule
from data.demo import DemoJob, make_demo_sample, split_codepoints, write_demo
from data.spec import resolve_shards
from data.writer import write_folder

SECTION_TITLE = "## Data pipeline"
LOADER_WORKERS = (0, 1, 2)
WRITER_WORKERS = (1, 2)


def raw_decode(shards: list[str], members: tuple[str, ...]) -> int:
    """Read every tar and decode the named PNG members to arrays; returns the sample count."""
    samples = 0
    for shard in shards:
        with tarfile.open(shard, mode="r|") as archive:
            for info in archive:
                if info.name.split(".", 1)[1] in members:
                    np.asarray(Image.open(io.BytesIO(archive.extractfile(info).read())))
                    samples += info.name.endswith(members[0])
    return samples


def loader_epoch(shards: str, workers: int, layers: bool, batch_size: int) -> Timing:
    """One epoch of the training loader: steady throughput after the first batch, and the wait for it."""
    module = ShardDataModule(shards, batch_size=batch_size, num_workers=workers, require_layers=layers)
    started = time.perf_counter()
    batches = iter(module.train_dataloader())
    next(batches)
    first_batch = time.perf_counter()
    items = sum(len(batch) for batch, _ in batches)
    return Timing(items, time.perf_counter() - first_batch, first_batch - started)


def make_writer_source(folder: Path, count: int, size: int) -> None:
    """RGBA PNGs to convert: demo foregrounds (with effects) at 1.5x the target size."""
    folder.mkdir(parents=True)
    emoji = split_codepoints(0)["train"]
    for index in range(count):
        sample = make_demo_sample(DemoJob("train", index, round(size * 1.5), 0, emoji[index]))
        Image.fromarray(np.rint(sample.foreground * 255).astype(np.uint8)).save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(sample.caption, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--samples", type=int, default=400, help="training samples in the shards (default 400)")
    parser.add_argument("--writer-images", type=int, default=120, help="images for the writer benchmark")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]  # the machine may be shared; a busy one lowers every number
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="layerdiff-bench-") as temporary:
        root = Path(temporary)
        started = time.perf_counter()
        write_demo(root / "demo-64", size=64, train=2000, val=128)
        build_seconds = time.perf_counter() - started
        rows.append((f"demo build, `python -m data demo` defaults (64 px, 2000 + 128), {os.cpu_count()} processes",
                     f"{2128 / build_seconds:.0f} samples/s", f"{build_seconds:.1f} s"))

        started = time.perf_counter()
        write_demo(root / "demo", size=args.size, train=args.samples, val=16, samples_per_shard=100)
        build_seconds = time.perf_counter() - started
        spec = str(root / "demo" / "train")
        shards = resolve_shards(spec)
        rows.append((f"demo build, {args.size} px, {args.samples} + 16 samples, {os.cpu_count()} processes",
                     f"{(args.samples + 16) / build_seconds:.0f} samples/s", f"{build_seconds:.1f} s"))

        for layers, members in ((False, ("fg.png",)), (True, ("fg.png", "bg.png", "blend.png"))):
            what = "fg + bg + blend" if layers else "fg only"
            runs: dict[Any, Callable[[], Timing]] = {"raw": lambda members=members: timed(lambda: raw_decode(shards, members))}
            for workers in LOADER_WORKERS:
                runs[workers] = lambda workers=workers, layers=layers: loader_epoch(spec, workers, layers, args.batch_size)
            timings = best_timings(runs, args.repeats)
            raw = timings.pop("raw").rate
            rows.append((f"raw PNG decode, {what} (tar read + PIL decode, 1 process)", f"{raw:.0f} samples/s", "1.00x"))
            for workers, timing in timings.items():
                per_worker = f", {timing.rate / workers:.0f}/worker" if workers > 1 else ""
                rows.append((f"ShardDataModule train loader, {what}, num_workers={workers} "
                             f"(first batch after {timing.startup:.2f} s)",
                             f"{timing.rate:.0f} samples/s{per_worker}", f"{timing.rate / raw:.2f}x"))

        source = root / "writer-source"
        make_writer_source(source, args.writer_images, args.size)
        writers = {
            workers: lambda workers=workers: timed(lambda: write_folder(
                source, root / f"written-{workers}", size=args.size, workers=workers).manifest.num_samples)
            for workers in WRITER_WORKERS
        }
        for workers, timing in best_timings(writers, args.repeats).items():
            rows.append((f"shard writer, {round(args.size * 1.5)} px RGBA -> {args.size} px, workers={workers}",
                         f"{timing.rate:.1f} images/s", ""))

    table = "\n".join(
        ["| measurement | throughput | vs. raw decode / time |", "|---|---|---|"]
        + [f"| {name} | {rate} | {ratio} |" for name, rate, ratio in rows]
    )
    section = (
        f"{SECTION_TITLE}\n\n"
        f"`python -m benchmarks.data_throughput` on {machine_description()}; {args.size} px demo shards "
        f"({args.samples} training samples, {len(shards)} shards), batch size {args.batch_size}, "
        f"best of {args.repeats} interleaved runs; loader rates exclude the wait for the first batch "
        f"(worker start-up, shuffle-buffer fill), given beside them; 1-minute load average "
        f"{load_at_start:.1f} when the run started.\n\n{table}\n\n"
        "Reading it: `num_workers=0` decodes in the training process, the like-for-like comparison "
        "with raw decode (which does no shuffling, bucketing, batching or float conversion). Worker "
        "rows add passing batches between processes (uint8, shared memory); they scale with free "
        "cores, so on a machine with as many busy processes as cores they cannot beat one process.\n"
    )
    report(section, write=not args.no_write)


if __name__ == "__main__":
    main()
