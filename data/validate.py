"""Read every sample of a set of shards, check it against the schema, summarise what is there."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from data.schema import CorruptMemberError, SchemaError, alpha_coverage, decode_sample
from data.shards import iter_shard_samples

COVERAGE_BINS = 10
BAR_WIDTH = 40


@dataclass
class ValidationReport:
    """What ``validate_shards`` found. ``ok`` is false on any schema error or corrupt member."""

    shards: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    coverages: list[float] = field(default_factory=list)
    caption_lengths: list[int] = field(default_factory=list)
    with_layers: int = 0
    duplicate_keys: list[str] = field(default_factory=list)
    not_transparent: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    schema_errors: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return len(self.coverages)

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.schema_errors)

    def format(self, listed: int = 20) -> str:
        """The text report the CLI prints; lists at most ``listed`` problems per kind."""
        lines = [f"{self.samples} valid samples in {len(self.shards)} shard(s)"]
        empty = [url for url, count in self.shards.items() if count == 0]
        if empty:
            lines.append(f"  {len(empty)} shard(s) hold no samples, e.g. {empty[0]}")
        lines += ["", "image sizes (WxH):"] + _histogram_lines(sorted(self.sizes.items()))
        if self.coverages:
            edges = np.linspace(0.0, 1.0, COVERAGE_BINS + 1)
            counts, _ = np.histogram(self.coverages, bins=edges)
            labels = [f"{low:.1f}-{high:.1f}" for low, high in zip(edges[:-1], edges[1:])]
            lines += ["", "alpha coverage (fraction of pixels with alpha > 0):"]
            lines += _histogram_lines(list(zip(labels, counts.tolist())))
            lengths = self.caption_lengths
            lines += [
                "",
                f"caption length (characters): min {min(lengths)}, median {statistics.median(lengths):g}, "
                f"mean {statistics.fmean(lengths):.1f}, max {max(lengths)}; empty: {lengths.count(0)}",
                f"multi-layer samples (bg.png + blend.png): {self.with_layers} of {self.samples}",
            ]
        lines += _problem_lines("duplicate keys (warning)", self.duplicate_keys, listed)
        lines += _problem_lines(
            "samples without a transparent or a visible pixel (warning)", self.not_transparent, listed
        )
        lines += _problem_lines("corrupt members", self.corrupt, listed)
        lines += _problem_lines("schema errors", self.schema_errors, listed)
        lines += ["", "OK" if self.ok else "FAILED: fix the corrupt members / schema errors above"]
        return "\n".join(lines)


def validate_shards(urls: list[str]) -> ValidationReport:
    """Decode every sample of ``urls`` (layers included) and collect statistics and problems."""
    report = ValidationReport()
    seen_keys: set[str] = set()

    for url in urls:
        report.shards[url] = 0
    for members in iter_shard_samples(urls, lambda error: report.corrupt.append(str(error))):
        url, key = members.get("__url__"), members.get("__key__")
        if key in seen_keys:
            report.duplicate_keys.append(f"{key} (again in {url})")
        seen_keys.add(key)
        try:
            sample = decode_sample(members, decode_layers=True)
        except CorruptMemberError as error:
            report.corrupt.append(str(error))
            continue
        except SchemaError as error:
            report.schema_errors.append(str(error))
            continue
        report.shards[url] += 1
        report.sizes[f"{sample.size[1]}x{sample.size[0]}"] += 1
        report.coverages.append(alpha_coverage(sample.foreground))
        report.caption_lengths.append(len(sample.caption))
        report.with_layers += sample.has_layers
        alpha = sample.foreground[..., 3]
        if alpha.min() == 255 or alpha.max() == 0:
            report.not_transparent.append(f"{key} in {url}")
    return report


def _histogram_lines(rows: list[tuple[str, int]]) -> list[str]:
    largest = max((count for _, count in rows), default=0) or 1
    width = max((len(label) for label, _ in rows), default=0)
    return [f"  {label:<{width}}  {count:8d}  {'#' * round(BAR_WIDTH * count / largest)}" for label, count in rows]


def _problem_lines(title: str, problems: list[str], listed: int) -> list[str]:
    if not problems:
        return []
    lines = ["", f"{title}: {len(problems)}"] + [f"  {problem}" for problem in problems[:listed]]
    if len(problems) > listed:
        lines.append(f"  ... and {len(problems) - listed} more")
    return lines
