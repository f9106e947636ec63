"""The picked samples of a reviewed round as shards (``python -m data round add``), written by the rules of
``python -m data write``: the same target fitting, drop rule (LayerDiffusion sec. 3.4), colour padding
(Appendix A), schema and atomic shard writer, with the round's provenance and sampling weight in each
sample's metadata."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.parallel import ordered_parallel_map
from data.review_journal import JOURNAL_NAME, PICKED, DecisionJournal
from data.rounds import RoundError, RoundManifest, RoundSample, load_round
from data.schema import SAMPLING_WEIGHT, LayerSample, encode_sample
from data.shards import INDEX_NAME, ShardWriter, TarSample, serialise_sample
from data.writer import NO_ALPHA, UNREADABLE, Dropped, cutout_problem, fit_to_targets
from layerdiff.rgba import MissingAlphaError, load_rgba, prepare_foreground

ROUND = "round"


@dataclass
class AddReport:
    """What ``add_round`` wrote."""

    round: str
    out_dir: Path
    decisions: Counter
    written: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)

    def summary(self) -> str:
        total = sum(self.decisions.values())
        lines = [f"round {self.round}: {total - self.decisions['undecided']} of {total} samples reviewed, "
                 f"{self.decisions['picked']} picked, {self.decisions['rejected']} rejected",
                 f"wrote {self.written} picked sample(s) to {self.out_dir}"]
        lines += [f"  dropped {sample}: {reason}" for sample, reason in self.dropped]
        if self.decisions["undecided"]:
            lines.append(f"note: {self.decisions['undecided']} sample(s) are still undecided and were left out; review "
                         "on and run this command again to add them (it rewrites OUT_DIR)")
        return "\n".join(lines)


def add_round(
    round_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weight: float = 2.0,
    size: int | None = None,
    samples_per_shard: int = 1000,
    workers: int = 1,
) -> AddReport:
    """Write the picked samples of a reviewed round into shards in ``out_dir``, through the shard writer's
    rules (resized to ``size`` or kept at their own size, the sec. 3.4 drop rule, padded colour, atomic
    shards). Each sample's metadata carries ``sampling_weight`` and ``round`` (name, sample id, status
    ``picked``, prompt, seed, checkpoint). A round nobody reviewed, or with nothing picked, is an error."""
    folder = Path(round_dir)
    manifest = load_round(folder)
    if not (weight > 0 and weight < float("inf")):
        raise RoundError(f"--weight must be a positive number (the paper uses 2.0 for a new round), got {weight}")
    if size is not None and size < 1:
        raise RoundError(f"--size must be a positive number of pixels, got {size}")
    if not (folder / JOURNAL_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {JOURNAL_NAME}: nobody has reviewed round {manifest.name} yet. "
                                f"Review it first: python -m data round review {folder}")
    _check_not_other_shards(Path(out_dir), manifest.name)
    journal = DecisionJournal(folder / JOURNAL_NAME, [sample.id for sample in manifest.samples], writable=False)
    report = AddReport(manifest.name, Path(out_dir), journal.counts())
    picked = [sample for sample in manifest.samples if journal.decision_of(sample.id) == PICKED]
    if not picked:
        raise RoundError(f"nothing to add: no sample of round {manifest.name} is picked ({report.summary().splitlines()[0]}). "
                         f"Pick some with `python -m data round review {folder}` (key p)")
    report.written, report.dropped = write_picks(folder, manifest, picked, out_dir, weight=weight, size=size,
                                                 samples_per_shard=samples_per_shard, workers=workers)
    return report


def _check_not_other_shards(out_dir: Path, round_name: str) -> None:
    # the shard writer replaces every shard in its folder: never a data set's, nor another round's
    index = out_dir / INDEX_NAME
    try:
        written = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        written = {"created_by": "an unknown program"}
    if (written or any(out_dir.glob("shard-*.tar"))) and written.get("round") != round_name:
        by = written.get("created_by", "an unknown program")
        raise RoundError(f"{out_dir} already holds shards ({by}{', round ' + written['round'] if 'round' in written else ''}),"
                         f" which adding round {round_name} there would replace; give a new folder, e.g. "
                         f"{out_dir.parent / (round_name + '-shards')} (or, if they are what an interrupted "
                         "`round add` of this round left, delete them first)")


@dataclass(frozen=True)
class _Pick:
    path: Path
    key: str
    source: str  # "<round>/<file>"
    sample: RoundSample
    size: int | None
    provenance: dict[str, Any]


def write_picks(
    round_dir: Path,
    manifest: RoundManifest,
    picked: list[RoundSample],
    out_dir: str | os.PathLike,
    *,
    weight: float,
    size: int | None,
    samples_per_shard: int,
    workers: int,
) -> tuple[int, list[tuple[str, str]]]:
    """Write ``picked`` into shards in ``out_dir``; return how many were written and the dropped ``(id, reason)``."""
    prefix = re.sub(r"[^A-Za-z0-9_-]+", "-", manifest.name).strip("-") or "round"
    checkpoint = manifest.model.get("checkpoint")
    picks = [
        _Pick(round_dir / sample.file, f"{prefix}_{sample.id}", f"{manifest.name}/{sample.file}", sample, size,
              {SAMPLING_WEIGHT: weight, ROUND: {"name": manifest.name, "sample": sample.id, "status": "picked",
                                                "prompt": sample.prompt, "seed": sample.seed, "checkpoint": checkpoint}})
        for sample in picked
    ]  # fmt: skip
    dropped = []
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for pick, outcome in zip(picks, ordered_parallel_map(_prepare_chunk, picks, workers=workers, chunk_size=4)):
            if isinstance(outcome, Dropped):
                dropped.append((pick.sample.id, f"{outcome.reason}{': ' + outcome.detail if outcome.detail else ''}"))
            else:
                writer.write(outcome)
        manifest_out = writer.close(
            source=str(round_dir), created_by="python -m data round add", round=manifest.name,
            sampling_weight=weight, picked=len(picked), dropped=dict(dropped),
        )  # fmt: skip
    return manifest_out.num_samples, dropped


def _prepare_chunk(picks: list[_Pick]) -> list[Dropped | TarSample]:
    return [_prepare(pick) for pick in picks]


def _prepare(pick: _Pick) -> Dropped | TarSample:
    try:
        rgba = load_rgba(pick.path, name=pick.source)
    except MissingAlphaError as error:
        return Dropped(pick.source, NO_ALPHA, str(error))
    except Exception as error:  # noqa: BLE001 - a damaged image is reported with the others, not fatal
        return Dropped(pick.source, UNREADABLE, f"{type(error).__name__}: {error}")
    original_size = rgba.shape[:2]
    target = (pick.size, pick.size) if pick.size else (original_size[1], original_size[0])
    rgba, crop_top_left = fit_to_targets(rgba, (target,))
    problem = cutout_problem(rgba)
    if problem is not None:
        return Dropped(pick.source, problem)
    sample = LayerSample(
        key=pick.key,
        foreground=prepare_foreground(rgba),
        caption=pick.sample.prompt,
        original_size=original_size,
        crop_top_left=crop_top_left,
        source=pick.source,
        provenance=pick.provenance,
    )
    return serialise_sample(encode_sample(sample))
