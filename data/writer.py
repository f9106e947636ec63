"""Turn a folder of RGBA PNGs (with optional same-stem ``.txt`` captions), of layered
sources (``NAME.fg.png`` + ``NAME.bg.png`` triplets, layered ``.psd`` files: accepted layouts
in ``data.layered_sources``) or of matting data sets (an image or foreground folder beside an
alpha folder: accepted layouts in ``data.matting_sources``), into shards.

Every image (every layer, with one crop per sample) is resized so it covers its target size, centre-cropped, stripped of
samples LayerDiffusion sec. 3.4 drops (no transparent pixel, no visible pixel),
padded under zero alpha and written in the schema of ``data.schema``. The target
is one square ``size``, or, with ``buckets``, the bucket whose aspect ratio is
nearest the image's (SDXL-style aspect buckets).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.layered_sources import (
    NO_FOREGROUND,
    PSD_SUFFIX,
    LayeredSource,
    LayerProblem,
    UnreadableLayerError,
    find_layered_sources,
    layer_suffix,
    read_layers,
)
from data.matting_sources import MattingSet, MattingSource, find_matting_sets, pair_files, read_matting_source
from data.parallel import ordered_parallel_map
from data.schema import LayerSample, encode_sample
from data.shards import ShardManifest, ShardWriter, TarSample, serialise_sample
from layerdiff.rgba import MissingAlphaError, composite, load_rgba, prepare_foreground, resize_and_crop

IMAGE_SUFFIXES = (".png", PSD_SUFFIX)
EXAMPLES_PER_REASON = 5

NO_ALPHA = "no alpha channel"
NO_TRANSPARENT_PIXEL = "no transparent pixel"
NO_VISIBLE_PIXEL = "no visible pixel"
UNREADABLE = "unreadable image"
CAPTION_NOT_UTF8 = "caption is not UTF-8"


@dataclass(frozen=True)
class Dropped:
    """An input file that was not written, and why (``detail``: the error, where there is one)."""

    path: str
    reason: str
    detail: str = ""


@dataclass
class WriteReport:
    """What ``write_folder`` did: written samples, drops per reason with examples."""

    manifest: ShardManifest
    dropped: Counter = field(default_factory=Counter)
    drop_examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    without_caption: int = 0
    unread_folders: list[str] = field(default_factory=list)  # beside the matting sets' image and alpha folders

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        lines = [
            f"wrote {self.manifest.num_samples} samples in {len(self.manifest.shards)} shard(s); "
            f"sizes {dict(sorted(self.manifest.sizes.items()))}",
            f"dropped {sum(self.dropped.values())} image(s)" + (":" if self.dropped else ""),
        ]
        for reason, count in self.dropped.most_common():
            lines.append(f"  {count:6d}  {reason}, e.g. {', '.join(self.drop_examples[reason])}")
        if self.without_caption:
            lines.append(f"{self.without_caption} image(s) had no caption (NAME.txt, or NAME.fg.txt for layered "
                         "sources) and were written with an empty caption")
        if self.unread_folders:
            lines.append(f"not read (folders beside the matting sets' colour and alpha folders): "
                         f"{', '.join(self.unread_folders)}")
        return "\n".join(lines)


def alpha_problem(alpha_levels: np.ndarray) -> str | None:
    """Why LayerDiffusion sec. 3.4 drops an image with these 8-bit alpha levels (``NO_TRANSPARENT_PIXEL``
    or ``NO_VISIBLE_PIXEL``), or None when it has a transparent and a visible pixel. ``data.filters``
    applies the same check to written shards."""
    if alpha_levels.min() == 255:
        return NO_TRANSPARENT_PIXEL
    if alpha_levels.max() == 0:
        return NO_VISIBLE_PIXEL
    return None


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """Parse ``"1024x1024,1152x896"`` (WIDTHxHEIGHT, comma-separated) into ``[(w, h), ...]``."""
    buckets = []
    for item in filter(None, (piece.strip() for piece in text.split(","))):
        match = re.fullmatch(r"(\d+)x(\d+)", item)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(f"bad bucket {item!r} in {text!r}: write buckets as WIDTHxHEIGHT, e.g. 1152x896")
        buckets.append((int(match[1]), int(match[2])))
    if not buckets:
        raise ValueError(f"no buckets in {text!r}: write them as e.g. 1024x1024,1152x896")
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The ``(w, h)`` bucket whose aspect ratio is nearest ``width / height`` (in log ratio)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))


def fit_to_targets(rgba: np.ndarray, targets: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize float RGBA to cover the ``(w, h)`` target nearest its aspect ratio, centre-crop; return it and ``(top, left)``."""
    width, height = nearest_bucket(rgba.shape[1], rgba.shape[0], list(targets))
    return resize_and_crop(rgba, width, height)


def cutout_problem(rgba: np.ndarray) -> str | None:
    """:func:`alpha_problem` of a float RGBA cut-out, on its alpha as the 8-bit PNG will store it."""
    return alpha_problem(np.rint(np.clip(rgba[..., 3], 0.0, 1.0) * 255.0))


@dataclass(frozen=True)
class _Job:
    path: Path
    root: Path
    index: int
    targets: tuple[tuple[int, int], ...]
    layered: LayeredSource | None = None
    matting: MattingSource | None = None  # neither: a plain RGBA PNG


def write_folder(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    size: int = 1024,
    buckets: list[tuple[int, int]] | None = None,
    samples_per_shard: int = 1000,
    workers: int = 1,
) -> WriteReport:
    """Convert every PNG (or layered source, or matting pair) under ``src_dir`` (recursively, sorted) into shards in ``out_dir``.

    ``size`` gives square ``size x size`` samples unless ``buckets`` (``(w, h)``
    pairs) are given. ``workers`` processes decode, resize and pad in parallel;
    the output does not depend on their number.
    """
    src, out = Path(src_dir), Path(out_dir)
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist (expected a folder of RGBA .png files)")
    paths = sorted(path for path in src.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    matting_sets = find_matting_sets(src)
    if not paths and not matting_sets:
        raise FileNotFoundError(f"no .png or .psd files under {src}: the writer reads RGBA PNGs with optional .txt "
                                "captions, layered sources or matting data sets (see `python -m data write --help`)")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"output folder {out} is inside the source folder {src}; pick an output folder outside it")
    targets = tuple(buckets) if buckets else ((size, size),)
    jobs, orphans = _jobs(src, paths, targets, matting_sets)

    dropped: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    without_caption = 0

    def count(outcome: Dropped) -> None:
        dropped[outcome.reason] += 1
        if len(examples[outcome.reason]) < EXAMPLES_PER_REASON:
            examples[outcome.reason].append(f"{outcome.path} ({outcome.detail})" if outcome.detail else outcome.path)

    for path, reason, detail in orphans:
        count(Dropped(path.relative_to(src).as_posix(), reason, detail))
    with ShardWriter(out, samples_per_shard) as writer:
        for outcome in ordered_parallel_map(_prepare_chunk, jobs, workers=workers, chunk_size=4):
            if isinstance(outcome, Dropped):
                count(outcome)
                continue
            sample, has_caption = outcome
            without_caption += not has_caption
            writer.write(sample)
        manifest = writer.close(
            source=str(src),
            created_by="python -m data write",
            targets=[f"{w}x{h}" for w, h in targets],
            dropped=dict(dropped),
            layered=any(job.layered is not None for job in jobs),
            matting=[{"folder": matting_set.folder.relative_to(src).as_posix(), "layout": matting_set.layout,
                      "colour": matting_set.colour.name, "alpha": matting_set.alpha.name} for matting_set in matting_sets],
        )
    unread = [folder.relative_to(src).as_posix() for matting_set in matting_sets for folder in matting_set.unread]
    return WriteReport(manifest, dropped, examples, without_caption, unread)


def _jobs(
    src: Path, paths: list[Path], targets: tuple[tuple[int, int], ...], matting_sets: list[MattingSet]
) -> tuple[list[_Job], list[tuple[Path, str, str]]]:
    """One job per plain PNG, per layered source in layered mode or per matting pair in matting
    mode, and the files left unmatched in those modes (with the reason and message for each)."""
    if matting_sets:
        return _matting_jobs(src, paths, targets, matting_sets)
    layered = [path for path in paths if layer_suffix(path)]
    if not layered:
        return [_Job(path, src, index, targets) for index, path in enumerate(paths)], []
    plain = [path for path in paths if not layer_suffix(path)]
    if plain:
        raise ValueError(
            f"{src} mixes layered sources (e.g. {layered[0].relative_to(src)}) with plain RGBA PNGs (e.g. "
            f"{plain[0].relative_to(src)}); one run writes one kind of shard. Move the plain cut-outs to a folder of "
            "their own and write it separately, or give each a NAME.bg.png and rename it NAME.fg.png"
        )
    sources, orphans = find_layered_sources(layered)
    jobs = [_Job(source.main, src, index, targets, source) for index, source in enumerate(sources)]
    return jobs, [(path, NO_FOREGROUND, detail) for path, detail in orphans]


def _matting_jobs(
    src: Path, paths: list[Path], targets: tuple[tuple[int, int], ...], matting_sets: list[MattingSet]
) -> tuple[list[_Job], list[tuple[Path, str, str]]]:
    folders = {matting_set.folder for matting_set in matting_sets}
    outside = [path for path in paths if folders.isdisjoint(path.parents)]
    if outside:
        first = matting_sets[0]
        raise ValueError(
            f"{src} mixes a matting data set ({first.colour.relative_to(src)}/ with {first.alpha.relative_to(src)}/) "
            f"with other sources (e.g. {outside[0].relative_to(src)}); one run writes one kind of shard. Move the "
            "RGBA PNGs or layered sources to a folder of their own and write it separately"
        )
    sources, orphans = [], []
    for matting_set in matting_sets:
        pairs, unmatched = pair_files(matting_set, src)
        sources += pairs
        orphans += unmatched
    return [_Job(source.colour, src, index, targets, matting=source) for index, source in enumerate(sources)], orphans


def _prepare_chunk(jobs: list[_Job]) -> list[Dropped | tuple[TarSample, bool]]:
    return [_prepare(job) for job in jobs]


def _prepare(job: _Job) -> Dropped | tuple[TarSample, bool]:
    relative = job.path.relative_to(job.root).as_posix()
    layers = matting = None
    try:
        if job.layered is not None:
            layers = read_layers(job.layered, job.root)
            rgba = layers.foreground
        elif job.matting is not None:
            rgba, matting = read_matting_source(job.matting, job.root)
        else:
            rgba = load_rgba(job.path, name=relative)
    except MissingAlphaError as error:
        return Dropped(relative, NO_ALPHA, "" if job.layered is None else str(error))
    except LayerProblem as problem:
        return Dropped(relative, problem.reason, str(problem))
    except UnreadableLayerError as error:
        return Dropped(relative, UNREADABLE, str(error))
    except Exception as error:  # noqa: BLE001 - any decode failure of one input file is reported, not fatal
        return Dropped(relative, UNREADABLE, f"{type(error).__name__}: {error}")
    original_size = rgba.shape[:2]
    rgba, crop_top_left = fit_to_targets(rgba, job.targets)
    height, width = rgba.shape[:2]  # the target's: the layers take the same crop
    problem = cutout_problem(rgba)
    if problem is not None:
        return Dropped(relative, problem)
    caption_paths = (job.path.with_suffix(".txt"),) if job.layered is None else job.layered.caption_paths()
    captions = []
    for path in caption_paths:
        try:
            captions.append(path.read_text(encoding="utf-8").strip() if path.is_file() else "")
        except UnicodeDecodeError as error:
            return Dropped(relative, CAPTION_NOT_UTF8, f"{path.relative_to(job.root).as_posix()}: {error}")
    sample = LayerSample(
        key=f"{job.index:08d}_{_slug(job.path.stem if job.layered is None else job.layered.stem.name)}",
        foreground=prepare_foreground(rgba),
        caption=captions[0],
        original_size=original_size,
        crop_top_left=crop_top_left,
        source=relative,
    )
    if matting is not None:
        sample.provenance = {"matting": matting}
    if layers is not None:
        sample.background = _resize_opaque(layers.background, width, height)
        if layers.blend is None:  # from the 8-bit layers as stored, so that it is their "over" up to its own rounding
            foreground, background = (np.rint(image * 255.0) / 255.0 for image in (sample.foreground, sample.background))
            sample.blend = composite(foreground[..., :3], foreground[..., 3:], background)
        else:
            sample.blend = _resize_opaque(layers.blend, width, height)
        sample.background_caption, sample.blend_caption = captions[1], captions[2]
        sample.provenance = {"layers": layers.provenance}
    return serialise_sample(encode_sample(sample)), caption_paths[0].is_file()


def _resize_opaque(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """``resize_and_crop`` for an opaque layer: with alpha 1 it takes the same crop as the foreground."""
    opaque = np.concatenate([rgb, np.ones_like(rgb[..., :1])], axis=-1)
    return resize_and_crop(opaque, width, height)[0][..., :3]


def _slug(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem)[:48].strip("-") or "image"
