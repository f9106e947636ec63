"""``python -m data filter``: image shards in, filtered (and captioned) shards out, every score kept.

Each sample goes through these steps, in this order whatever the order of ``--filter`` (cheap
before expensive, so expensive steps see only survivors; the caption before the CLIP score that
compares with it; near-duplicates last, so that a duplicate is dropped only in favour of a
sample that is written):

1. ``alpha``: LayerDiffusion sec. 3.4's filter, the writer's own check (``data.writer.alpha_problem``):
   no transparent pixel or no visible pixel; records the visible fraction;
2. ``aesthetic``: the LAION aesthetic predictor's score of the CLIP image embedding; drops
   scores under the threshold (without one it only records);
3. captioning (``data.captions``), when a captioning model is given: writes ``txt``;
4. ``clip``: CLIP score, the cosine similarity of the image's and the caption's embeddings;
   drops scores under the threshold; with a threshold an empty caption is dropped too;
5. ``dedup``: near-duplicates by a 64-bit dHash of the foreground over grey, cropped to its
   visible pixels: a sample within ``threshold`` differing bits (default 4) of a kept one is
   dropped, naming the kept one; records the hash as ``dhash``.

Scores go into the sample's JSON as ``scores: {name: value}`` (``alpha``, ``aesthetic``, ``clip``,
``dhash``), merged with scores of earlier runs; pixels and other members are copied as they are.
Output shards are written atomically (``data.shards.ShardWriter``), then ``filter_report.json``:
counts per reason and examples with shard and key.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.captions import Captioner
from data.schema import (
    CAPTION,
    METADATA,
    SCORES,
    CorruptMemberError,
    LayerSample,
    decode_metadata,
    decode_sample,
    sample_kind,
    sampling_weight,
)
from data.scorers import ClipEmbedder, HashIndex, dhash, load_aesthetic_head, on_grey
from data.shards import ShardWriter, iter_shard_samples
from data.writer import alpha_problem
from layerdiff.files import write_atomically

FILTER_NAMES = ("alpha", "aesthetic", "clip", "dedup")
DEFAULT_DEDUP_DISTANCE = 4
REPORT_NAME = "filter_report.json"
CORRUPT = "corrupt"
CAPTIONED_BY = "captioned_by"


@dataclass
class Candidate:
    """One sample on its way through the steps: its members as read (written back with a new
    ``json`` and ``txt``), the decoded sample and its metadata, and the scores recorded so far."""

    members: dict[str, Any]
    sample: LayerSample
    metadata: dict[str, Any]
    scores: dict[str, Any] = field(default_factory=dict)
    _on_grey: np.ndarray | None = None

    @property
    def where(self) -> dict[str, str]:
        return {"shard": self.members["__url__"], "key": self.members["__key__"]}

    def on_grey(self) -> np.ndarray:
        """The foreground over grey, as the models see it (made once, for all steps)."""
        if self._on_grey is None:
            self._on_grey = on_grey(self.sample.foreground)
        return self._on_grey

    def finished(self) -> dict[str, Any]:
        """The members to write: the JSON with the scores merged in, the caption as it now is."""
        metadata = {**self.metadata, SCORES: {**self.metadata.get(SCORES, {}), **self.scores}}
        return {**self.members, CAPTION: self.sample.caption.encode("utf-8"),
                METADATA: json.dumps(metadata, ensure_ascii=False, sort_keys=True).encode("utf-8")}


# A step returns, per candidate of the batch, why it is dropped, or None to keep it.
Step = Callable[[list[Candidate]], list[str | None]]


class AlphaFilter:
    name = "alpha"

    def __call__(self, batch: list[Candidate]) -> list[str | None]:
        for candidate in batch:
            alpha = candidate.sample.foreground[..., 3]
            candidate.scores["alpha"] = round(float((alpha > 0).mean()), 6)
        return [alpha_problem(candidate.sample.foreground[..., 3]) for candidate in batch]


class ScoreFilter:
    """A model score per sample, recorded; under ``threshold`` (when given) the sample is dropped."""

    name = ""

    def __init__(self, threshold: float | None):
        self.threshold = threshold

    def scores(self, batch: list[Candidate]) -> list[float | None]:
        raise NotImplementedError

    def __call__(self, batch: list[Candidate]) -> list[str | None]:
        problems = []
        for candidate, score in zip(batch, self.scores(batch)):
            if score is not None:
                candidate.scores[self.name] = round(score, 6)
            problems.append(self.problem(score))
        return problems

    def problem(self, score: float | None) -> str | None:
        if self.threshold is None or (score is not None and score >= self.threshold):
            return None
        return f"{self.name} score {score:.4f} < threshold {self.threshold}"


class AestheticFilter(ScoreFilter):
    name = "aesthetic"

    def __init__(self, clip: ClipEmbedder, head_path: str | Path, threshold: float | None):
        super().__init__(threshold)
        self.clip = clip
        self.head = load_aesthetic_head(head_path)
        width = next(layer for layer in self.head if isinstance(layer, torch.nn.Linear)).in_features
        if width != clip.width:
            raise ValueError(f"the aesthetic head {head_path} takes {width}-wide embeddings, the CLIP "
                             f"model gives {clip.width}. Fix: give the CLIP model the head was trained on "
                             "(ViT-L/14, 768, for the LAION predictor)")

    @torch.no_grad()
    def scores(self, batch: list[Candidate]) -> list[float | None]:
        return self.head(self.clip.images([candidate.on_grey() for candidate in batch])).squeeze(1).tolist()


class ClipScoreFilter(ScoreFilter):
    name = "clip"

    def __init__(self, clip: ClipEmbedder, threshold: float | None):
        super().__init__(threshold)
        self.clip = clip

    def scores(self, batch: list[Candidate]) -> list[float | None]:
        captioned = [candidate for candidate in batch if candidate.sample.caption.strip()]
        if not captioned:
            return [None] * len(batch)
        images = self.clip.images([candidate.on_grey() for candidate in captioned])
        similarity = (images * self.clip.texts([candidate.sample.caption for candidate in captioned])).sum(dim=1)
        by_id = {id(candidate): value for candidate, value in zip(captioned, similarity.tolist())}
        return [by_id.get(id(candidate)) for candidate in batch]

    def problem(self, score: float | None) -> str | None:
        if score is None and self.threshold is not None:
            return "empty caption: no CLIP score to compare with the threshold"
        return super().problem(score)


class DedupFilter:
    name = "dedup"

    def __init__(self, max_distance: int = DEFAULT_DEDUP_DISTANCE):
        self.index = HashIndex(max_distance)

    def __call__(self, batch: list[Candidate]) -> list[str | None]:
        problems = []
        for candidate in batch:  # in order: the first of a group is kept
            value = dhash(on_grey(candidate.sample.foreground, crop=True))
            candidate.scores["dhash"] = f"{value:016x}"
            found = self.index.nearest(value)
            if found is None:
                self.index.add(value, candidate.where)
                problems.append(None)
            else:
                distance, kept = found
                problems.append(f"near-duplicate of {kept['key']} in {kept['shard']} ({distance} of 64 dHash bits "
                                 f"differ, dhash {value:016x})")
        return problems


class CaptionStep:
    """Writes ``txt`` with the captioner; with ``keep_existing`` only where it is empty. Drops nothing."""

    name = "caption"

    def __init__(self, captioner: Captioner, keep_existing: bool):
        self.captioner = captioner
        self.keep_existing = keep_existing
        self.written = self.kept = self.empty = 0

    def __call__(self, batch: list[Candidate]) -> list[str | None]:
        todo = [candidate for candidate in batch if not (self.keep_existing and candidate.sample.caption.strip())]
        self.kept += len(batch) - len(todo)
        if todo:
            for candidate, caption in zip(todo, self.captioner([candidate.on_grey() for candidate in todo])):
                candidate.sample.caption = caption
                candidate.metadata[CAPTIONED_BY] = self.captioner.name
                self.written += 1
                self.empty += not caption
        return [None] * len(batch)


def parse_thresholds(items: Iterable[str], filters: Iterable[str]) -> dict[str, float]:
    """``["dedup=6", "clip=0.25"]`` as ``{"dedup": 6.0, "clip": 0.25}``, for filters in ``filters`` only."""
    thresholds, chosen = {}, set(filters)
    for item in items:
        name, _, value = item.partition("=")
        if name not in FILTER_NAMES or name == "alpha" or not value:
            raise ValueError(f"bad --threshold {item!r}: write NAME=VALUE with NAME one of aesthetic, clip, dedup "
                             "(alpha has no threshold)")
        if name not in chosen:
            raise ValueError(f"--threshold {item} is for a filter that is not chosen; add --filter {name}")
        try:
            thresholds[name] = float(value)
        except ValueError:
            raise ValueError(f"bad --threshold {item!r}: {value!r} is not a number") from None
    if "dedup" in thresholds and not thresholds["dedup"].is_integer():
        raise ValueError(f"--threshold dedup={thresholds['dedup']}: the near-duplicate distance counts differing bits")
    return thresholds


def build_steps(
    filters: Iterable[str],
    thresholds: dict[str, float],
    *,
    clip_model: str | Path | None = None,
    aesthetic_head: str | Path | None = None,
    captioner: Captioner | None = None,
    keep_captions: bool = False,
    device: str = "cpu",
) -> list[Step]:
    """The chosen filters and the captioning step, in the order of the module docstring."""
    chosen = set(filters)
    unknown = chosen - set(FILTER_NAMES)
    if unknown:
        raise ValueError(f"unknown filter(s) {', '.join(sorted(unknown))}: choose from {', '.join(FILTER_NAMES)}")
    if not chosen and captioner is None:
        raise ValueError("nothing to do: choose filters with --filter and/or a captioning model with --caption-model")
    clip = None
    if chosen & {"aesthetic", "clip"}:
        if clip_model is None:
            raise ValueError("the aesthetic and clip filters need a local CLIP model: give --clip-model DIR")
        clip = ClipEmbedder(clip_model, device)
    if "aesthetic" in chosen and aesthetic_head is None:
        raise ValueError("the aesthetic filter needs the predictor's weights: give --aesthetic-head FILE")
    steps: list[Step] = []
    if "alpha" in chosen:
        steps.append(AlphaFilter())
    if "aesthetic" in chosen:
        steps.append(AestheticFilter(clip, aesthetic_head, thresholds.get("aesthetic")))
    if captioner is not None:
        steps.append(CaptionStep(captioner, keep_captions))
    if "clip" in chosen:
        steps.append(ClipScoreFilter(clip, thresholds.get("clip")))
    if "dedup" in chosen:
        steps.append(DedupFilter(int(thresholds.get("dedup", DEFAULT_DEDUP_DISTANCE))))
    return steps


@dataclass
class FilterReport:
    """What ``filter_shards`` did: samples read and written, drops per step with examples."""

    read: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    captions: dict[str, int] = field(default_factory=dict)  # written, kept, empty

    def drop(self, step: str, where: dict[str, str], why: str, examples: int) -> None:
        self.dropped[step] += 1
        if len(self.examples[step]) < examples:
            self.examples[step].append({**where, "why": why})

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "dropped": dict(self.dropped.most_common()),
                "examples": dict(self.examples), "captions": self.captions}

    def summary(self) -> str:
        lines = [f"read {self.read} samples, wrote {self.written}, dropped {sum(self.dropped.values())}"]
        for step, count in self.dropped.most_common():
            shown = "; ".join(f"{e['key']} in {e['shard']}: {e['why']}" for e in self.examples[step][:3])
            lines.append(f"  {count:6d}  {step}, e.g. {shown}")
        if self.captions:
            lines.append("captions: {written} written, {kept} kept as they were, {empty} came out empty".format(
                **self.captions))
        return "\n".join(lines)


def filter_shards(
    shards: list[str],
    out_dir: str | Path,
    steps: list[Step],
    *,
    batch_size: int = 16,
    samples_per_shard: int = 1000,
    examples: int = 20,
) -> FilterReport:
    """Run ``steps`` (``build_steps``) over every sample of the image ``shards`` and write the
    survivors to shards in ``out_dir``, then ``filter_report.json`` beside them."""
    out = Path(out_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(out.resolve() == Path(shard).resolve().parent for shard in shards):
        raise ValueError(f"output folder {out} holds input shards, which writing would replace; pick another folder")
    report = FilterReport()
    with ShardWriter(out, samples_per_shard) as writer:
        for batch in _batches(_candidates(shards, report, examples), batch_size):
            for step in steps:
                problems = step(batch)
                for candidate, problem in zip(batch, problems):
                    if problem is not None:
                        report.drop(step.name, candidate.where, problem, examples)
                batch = [candidate for candidate, problem in zip(batch, problems) if problem is None]
            for candidate in batch:
                writer.write(candidate.finished())
            report.written += len(batch)
        for step in steps:
            if isinstance(step, CaptionStep):
                report.captions = {"written": step.written, "kept": step.kept, "empty": step.empty}
        writer.close(source=list(shards), created_by="python -m data filter", filter_report=REPORT_NAME,
                     steps=[step.name for step in steps], dropped=dict(report.dropped))
    write_atomically(out / REPORT_NAME, json.dumps(report.to_json(), indent=2).encode("utf-8"))
    return report


def _members(shards: list[str], report: FilterReport, examples: int) -> Iterator[dict[str, Any]]:
    """The member dicts of the shards; the sample at the damage of an unreadable tar is reported."""
    for url in shards:
        def damaged(error: CorruptMemberError, url: str = url) -> None:
            report.read += 1
            report.drop(CORRUPT, {"shard": url, "key": "<tar>"}, str(error), examples)

        yield from iter_shard_samples([url], damaged)


def _candidates(shards: list[str], report: FilterReport, examples: int) -> Iterator[Candidate]:
    """Decoded samples; corrupt ones are reported and skipped, a bad sampling weight or a cached shard stops."""
    for members in _members(shards, report, examples):
        report.read += 1
        url, key = members["__url__"], members["__key__"]
        if sample_kind(members).cached:
            raise ValueError(f"shard {url}, key {key}: a cached sample ({sample_kind(members)}); filtering needs the "
                             "pixels. Fix: filter the image shards, then run `python -m data cache-latents` on the output")
        try:
            metadata = decode_metadata(members, url, key)
            sample = decode_sample(members)
        except CorruptMemberError as error:
            report.drop(CORRUPT, {"shard": url, "key": key}, str(error), examples)
            continue
        sampling_weight(metadata, url, key)  # a bad weight stops here, before any training reads it
        yield Candidate(members, sample, metadata)


def _batches(candidates: Iterator[Candidate], size: int) -> Iterator[list[Candidate]]:
    batch: list[Candidate] = []
    for candidate in candidates:
        batch.append(candidate)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
