"""Cache what latent diffusion training computes from pixels: ``python -m data cache-latents``.

Every training step on image shards runs the frozen VAE encoder, the transparency encoder
and (for text conditioning) the text encoders on the same images and captions, epoch after
epoch. Their outputs are deterministic: ``codec.encode_adjusted`` takes the posterior mean
and puts the transparency offset where the sample noise would go, so the adjusted latent is
a function of the pixels alone. This module computes them once and writes one cached shard
per image shard, with the same name (schema: ``data.schema``, "Cached samples");
``ShardDataModule`` reads either kind.

Resumable: each shard is written atomically (``ShardWriter`` into a staging folder, then
renamed into place), and a shard whose output exists is not computed again, so running the
same command again finishes an interrupted run, or rewrites only the shards deleted since.
``latent_cache.json`` in the output folder records the settings (base model, transparent
VAE with a digest of its encoder weights, dtype, text embeddings) and what each shard
holds; running into the same folder with other settings stops with an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.batches import collate_images, to_unit_float
from data.cached import encode_cached_sample
from data.schema import (
    IMAGE_KIND,
    LATENT,
    SCHEMA_VERSION,
    CorruptMemberError,
    LayerSample,
    decode_sample,
    sample_kind,
    schema_error,
)
from data.shards import ShardWriter, iter_shard_samples
from data.spec import resolve_shards
from data.stages import batches_by_size
from layerdiff.files import write_atomically
from layerdiff.formats.layerdiffuse_vae import load_transparency_models
from layerdiff.models import codec
from layerdiff.models.base import freeze, load_text_encoders, load_vae
from layerdiff.models.text import encode_prompts

MANIFEST_NAME = "latent_cache.json"
MANIFEST_FORMAT = "layerdiff-latent-cache"
ATTRIBUTION_NAME = "ATTRIBUTION.txt"
# Shards are written here, then renamed into the output folder (which readers list as *.tar).
STAGING_NAME = ".staging"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_TAR_NAME = re.compile(r"[^/\s]+\.tar\b")


class LatentCacheError(ValueError):
    """The output folder holds a cache made otherwise, or inputs and outputs clash."""


@dataclass(frozen=True)
class CacheSettings:
    """What determines a cache's contents; recorded in ``latent_cache.json``."""

    base_model: str
    transparent_vae: str
    transparent_encoder_sha256: str
    encoder_input_convention: str  # the colour the encoder is fed (its weights' convention)
    dtype: str
    text_embeddings: bool


@dataclass
class ShardResult:
    """One input shard's outcome; ``done_earlier`` when its output existed already."""

    name: str
    source: str
    samples: int
    corrupt: int
    done_earlier: bool = False
    seconds: float = 0.0


@dataclass
class CacheReport:
    """What ``cache_latents`` did, counting shards done by earlier runs from the manifest."""

    out_dir: Path
    shards: list[ShardResult] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # descriptions, this run only

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def summary(self, listed: int = 20) -> str:
        """Lines for the CLI: totals, then this run's corrupt members (at most ``listed``)."""
        earlier = [shard for shard in self.shards if shard.done_earlier]
        empty = [shard.name for shard in self.shards if shard.samples == 0]
        lines = [
            f"{self.out_dir}: {self.samples} cached samples from {len(self.shards)} shard(s) "
            f"({len(earlier)} done by an earlier run); corrupt members skipped: "
            f"{sum(shard.corrupt for shard in self.shards)}"
        ]
        if empty:
            lines.append(f"  no valid samples, nothing written: {', '.join(empty)}")
        if self.corrupt:
            lines += [f"corrupt members skipped in this run: {len(self.corrupt)}"]
            lines += [f"  {description}" for description in self.corrupt[:listed]]
            if len(self.corrupt) > listed:
                lines.append(f"  ... and {len(self.corrupt) - listed} more")
        return "\n".join(lines)


class LatentCacheEncoder:
    """The frozen models that turn image samples into cached samples.

    Computes in float32 on ``device`` (the SDXL VAE overflows in float16) and stores in
    ``dtype``. Images are collated and become float exactly as the loader does it (``data.batches``),
    so the cache equals what training on the image shards encodes.
    """

    def __init__(
        self,
        base_model: str,
        transparent_vae: str,
        *,
        text_embeddings: bool = False,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.vae = freeze(load_vae(base_model)).to(self.device)
        encoder, _ = load_transparency_models(transparent_vae)
        self.transparent_encoder = freeze(encoder).to(self.device)
        self.text_encoders = load_text_encoders(base_model) if text_embeddings else None
        if self.text_encoders is not None:
            for text_encoder in self.text_encoders.encoders:
                freeze(text_encoder).to(self.device)
        self.settings = CacheSettings(
            base_model=_normalised_source(base_model),
            transparent_vae=str(Path(transparent_vae).expanduser().resolve()),
            transparent_encoder_sha256=_state_digest(self.transparent_encoder),
            encoder_input_convention=self.transparent_encoder.input_convention,
            dtype=dtype,
            text_embeddings=text_embeddings,
        )

    @torch.no_grad()
    def __call__(self, samples: list[tuple[dict[str, Any], LayerSample]]) -> list[dict[str, Any]]:
        """Cached member dicts for ``(image members, decoded sample)`` pairs of one image size."""
        images = to_unit_float(collate_images([sample for _, sample in samples]))
        rgb, alpha = images.rgb.to(self.device), images.alpha.to(self.device)
        _, adjusted = codec.encode_adjusted(self.vae, self.transparent_encoder, rgb, alpha)
        arrays = {"latent": codec.diffusion_latent(self.vae, adjusted)}
        if self.text_encoders is not None:
            prompts = encode_prompts(self.text_encoders, [sample.caption for _, sample in samples], self.device)
            arrays["prompt_hidden"], arrays["prompt_pooled"] = prompts.hidden, prompts.pooled
        stored = {name: array.to(self.dtype).cpu().numpy() for name, array in arrays.items() if array is not None}
        for name, array in stored.items():
            if not np.isfinite(array).all():
                keys = ", ".join(members["__key__"] for members, _ in samples)
                fix = ("store them with --dtype float32" if self.dtype == torch.float16
                       else "check the base model and the transparent VAE")
                raise ValueError(f"non-finite {name} values for one of the keys {keys} (stored as {self.dtype}); {fix}")
        return [
            encode_cached_sample(members, **{name: array[index] for name, array in stored.items()})
            for index, (members, _) in enumerate(samples)
        ]


def cache_latents(
    shards: str,
    out_dir: str | os.PathLike,
    encoder: LatentCacheEncoder,
    *,
    batch_size: int = 8,
    progress: Callable[[str], None] = lambda line: None,
) -> CacheReport:
    """Cache every shard of the shards spec ``shards`` into ``out_dir`` (see the module docstring).

    Corrupt input members are skipped and counted, as the loader does; a sample of another
    kind (e.g. already cached) is a ``SchemaError``. ``progress`` receives one line per shard.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    urls = resolve_shards(shards)
    names = [_output_name(url) for url in urls]
    _check_outputs(urls, names, out_dir)
    manifest = _open_manifest(out_dir, encoder.settings)
    _copy_attribution(urls, out_dir)
    staging = out_dir / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    report = CacheReport(out_dir)
    for number, (url, name) in enumerate(zip(urls, names), start=1):
        recorded = manifest["shards"].get(name)
        if (out_dir / name).is_file() and recorded is not None:
            report.shards.append(ShardResult(name, url, recorded["samples"], recorded["corrupt"], done_earlier=True))
            progress(f"[{number}/{len(urls)}] {name}: done by an earlier run, kept")
            continue
        started = time.perf_counter()
        corrupt: list[str] = []
        with ShardWriter(staging, samples_per_shard=sys.maxsize) as writer:
            for batch in batches_by_size(_image_samples(url, corrupt), batch_size, lambda item: item[1].size):
                for members in encoder(batch):
                    writer.write(members)
            written = writer.close().shards
        result = ShardResult(name, url, sum(shard.samples for shard in written), len(corrupt),
                             seconds=time.perf_counter() - started)
        # The manifest entry goes first: an entry without its shard is redone by the next run.
        manifest["shards"][name] = {"source": url, "samples": result.samples, "corrupt": result.corrupt}
        _write_manifest(out_dir, manifest)
        if written:
            os.replace(staging / written[0].name, out_dir / name)
        report.shards.append(result)
        report.corrupt += corrupt
        rate = result.samples / max(result.seconds, 1e-9)
        progress(f"[{number}/{len(urls)}] {name}: {result.samples} samples, {result.corrupt} corrupt skipped, "
                 f"{result.seconds:.1f} s ({rate:.1f} samples/s)"
                 + ("" if written else "; no valid samples, nothing written"))
    shutil.rmtree(staging, ignore_errors=True)
    return report


def _image_samples(url: str, corrupt: list[str]) -> Iterator[tuple[dict[str, Any], LayerSample]]:
    """``(members, decoded sample)`` of one image shard; corrupt members are skipped into ``corrupt``."""
    def record(error: CorruptMemberError) -> None:
        corrupt.append(str(error))

    for members in iter_shard_samples([url], record):
        kind = sample_kind(members)
        if kind != IMAGE_KIND:
            raise schema_error(url, members["__key__"], LATENT, f"sample kind {kind}: the shard is cached already",
                               "give cache-latents the image shards (with fg.png) the cache is to be made from")
        try:
            yield members, decode_sample(members)
        except CorruptMemberError as error:
            record(error)


def _output_name(url: str) -> str:
    """The file name of a shard path or URL (``pipe:`` commands included): its last ``*.tar`` part."""
    names = _TAR_NAME.findall(url)
    if not names:
        raise LatentCacheError(f"cannot name the cached shard of {url!r}: it names no *.tar file")
    return names[-1]


def _check_outputs(urls: list[str], names: list[str], out_dir: Path) -> None:
    seen: dict[str, str] = {}
    for url, name in zip(urls, names):
        if name in seen:
            raise LatentCacheError(
                f"input shards {seen[name]!r} and {url!r} would both be cached as {out_dir / name}; "
                "cache them into separate output folders (e.g. one per split)"
            )
        seen[name] = url
        if Path(url).resolve() == (out_dir / name).resolve():
            raise LatentCacheError(f"the output folder {out_dir} holds the input shard {url}; choose another folder")


def _open_manifest(out_dir: Path, settings: CacheSettings) -> dict[str, Any]:
    """The folder's manifest after checking it was made with ``settings``; a new one for a new cache."""
    manifest = _read_manifest(out_dir)
    if manifest is None:
        existing = sorted(path.name for path in out_dir.glob("*.tar"))
        if existing:
            raise LatentCacheError(
                f"{out_dir} holds shards ({existing[0]}, ...) but no {MANIFEST_NAME}, so it is not a latent cache "
                "this command can resume; choose an empty or new output folder"
            )
        manifest = {"format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION, "settings": asdict(settings),
                    "shards": {}}
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_manifest(out_dir, manifest)
        return manifest
    recorded = manifest["settings"]
    differing = [f"{name}: {recorded.get(name)!r} in the cache, {value!r} now"
                 for name, value in asdict(settings).items() if recorded.get(name) != value]
    if differing:
        raise LatentCacheError(
            f"{out_dir} is a latent cache made with other settings ({'; '.join(differing)}). Re-run with the "
            "cache's settings to finish it, or cache into a new folder (or delete this one) to use the new settings"
        )
    return manifest


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LatentCacheError(f"{path} cannot be read ({error}); delete the folder and cache again") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise LatentCacheError(f"{path} is not a {MANIFEST_FORMAT} manifest; choose another output folder")
    return manifest


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["num_samples"] = sum(entry["samples"] for entry in manifest["shards"].values())
    write_atomically(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))


def _copy_attribution(urls: list[str], out_dir: Path) -> None:
    """Keep the attribution file of the input folder (licenses such as CC BY-SA require it)."""
    for folder in dict.fromkeys(Path(url).parent for url in urls):
        if (folder / ATTRIBUTION_NAME).is_file() and not (out_dir / ATTRIBUTION_NAME).exists():
            shutil.copyfile(folder / ATTRIBUTION_NAME, out_dir / ATTRIBUTION_NAME)


def _normalised_source(name_or_path: str) -> str:
    """A local folder as its absolute path (so other working directories compare equal), else as given."""
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else name_or_path


def _state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights: notices a transparent VAE re-trained into the same path."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
