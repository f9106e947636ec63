"""Read every sample of a set of shards, check it against the schema, summarise what is there.

Image shards and cached shards (``python -m data cache-latents``) alike; the kind of the
first sample is the kind every other sample must have, as in training.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from data.cached import decode_cached_sample
from data.schema import (
    CorruptMemberError,
    SampleKind,
    SchemaError,
    alpha_coverage,
    decode_sample,
    kind_mismatch,
    sample_kind,
)
from data.shards import iter_shard_samples

COVERAGE_BINS = 10
BAR_WIDTH = 40


@dataclass
class ValidationReport:
    """What ``validate_shards`` found. ``ok`` is false on any schema error or corrupt member."""

    shards: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    coverages: list[float] = field(default_factory=list)  # image samples only
    caption_lengths: list[int] = field(default_factory=list)
    with_layers: int = 0
    kind: SampleKind | None = None  # that of the first sample
    cached_arrays: Counter = field(default_factory=Counter)  # "latent.npy 4x8x8 float16" -> samples
    duplicate_keys: list[str] = field(default_factory=list)
    not_transparent: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    schema_errors: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return len(self.caption_lengths)

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.schema_errors)

    def format(self, listed: int = 20) -> str:
        """The text report the CLI prints; lists at most ``listed`` problems per kind."""
        lines = [f"{self.samples} valid samples in {len(self.shards)} shard(s)"]
        empty = [url for url, count in self.shards.items() if count == 0]
        if empty:
            lines.append(f"  {len(empty)} shard(s) hold no samples, e.g. {empty[0]}")
        if self.kind is not None:
            lines.append(f"kind: {self.kind}")
        lines += ["", "image sizes (WxH):"] + _histogram_lines(sorted(self.sizes.items()))
        if self.coverages:
            edges = np.linspace(0.0, 1.0, COVERAGE_BINS + 1)
            counts, _ = np.histogram(self.coverages, bins=edges)
            labels = [f"{low:.1f}-{high:.1f}" for low, high in zip(edges[:-1], edges[1:])]
            lines += ["", "alpha coverage (fraction of pixels with alpha > 0):"]
            lines += _histogram_lines(list(zip(labels, counts.tolist())))
        if self.cached_arrays:
            lines += ["", "cached arrays (field shape dtype):"] + _histogram_lines(sorted(self.cached_arrays.items()))
        if self.caption_lengths:
            lengths = self.caption_lengths
            lines += [
                "",
                f"caption length (characters): min {min(lengths)}, median {statistics.median(lengths):g}, "
                f"mean {statistics.fmean(lengths):.1f}, max {max(lengths)}; empty: {lengths.count(0)}",
            ]
        if self.coverages:
            lines.append(f"multi-layer samples (bg.png + blend.png): {self.with_layers} of {self.samples}")
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
        if report.kind is None:
            report.kind, first_url = sample_kind(members), url
        try:
            if sample_kind(members) != report.kind:
                raise kind_mismatch(members, report.kind, f"the first sample (of {first_url})")
            if report.kind.cached:
                sample = decode_cached_sample(members)
            else:
                sample = decode_sample(members, decode_layers=True)
        except CorruptMemberError as error:
            report.corrupt.append(str(error))
            continue
        except SchemaError as error:
            report.schema_errors.append(str(error))
            continue
        report.shards[url] += 1
        report.sizes[f"{sample.size[1]}x{sample.size[0]}"] += 1
        report.caption_lengths.append(len(sample.caption))
        if report.kind.cached:
            for name, array in sample.arrays.items():
                report.cached_arrays[f"{name} {'x'.join(map(str, array.shape))} {array.dtype}"] += 1
            continue
        report.coverages.append(alpha_coverage(sample.foreground))
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
