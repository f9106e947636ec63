"""What the benchmark scripts share: the machine's description, best-of-N timing, and writing
their section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCHMARKS_FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine_description() -> str:
    """``"2-core CPU, AMD EPYC, no GPU"``."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core CPU, {model}, {gpu}"


@dataclass
class Timing:
    """``items`` done in ``seconds``; loaders exclude their ``startup``, the wait for the first batch."""

    items: int
    seconds: float
    startup: float = 0.0

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def timed(run: Callable[[], int]) -> Timing:
    """Time ``run`` (it returns its item count) from start to end."""
    started = time.perf_counter()
    items = run()
    return Timing(items, time.perf_counter() - started)


def best_timings(runs: dict[Any, Callable[[], Timing]], repeats: int) -> dict[Any, Timing]:
    """The fastest of ``repeats`` timings of each run.

    The runs take turns, so load from other processes on a shared machine hits them alike.
    """
    best: dict[Any, Timing] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            timing = run()
            if name not in best or timing.rate > best[name].rate:
                best[name] = timing
    return best


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the section of ``path`` whose heading is ``section``'s first line,
    keeping the other sections."""
    title = section.splitlines()[0]
    default = "# Benchmarks\n\nMeasured results, one section per area.\n"
    text = path.read_text(encoding="utf-8") if path.exists() else default
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def report(section: str, write: bool) -> None:
    """Print ``section`` and, with ``write``, put it into BENCHMARKS.md."""
    print(section)
    if write:
        write_section(BENCHMARKS_FILE, section)
        print(f"updated {BENCHMARKS_FILE}")
