"""Training throughput on cached latents vs. encoding images on the fly.

    python -m benchmarks.latent_cache [--steps 50] [--batch-size 8] [--threads 1] [--no-write]

On the embedded tiny SDXL and the first shards of the 64 px OpenMoji demo set
(``embedded:openmoji-demo-64/train``): caches them with ``python -m data cache-latents``'s
code (float32, with and without text embeddings), then trains ``LatentDiffusionModule`` with
the Lightning Trainer, as a LoRA and as a full fine-tune, on each kind of shard:

* image shards: every step runs the frozen VAE encoder, the transparency encoder and the
  text encoders;
* cached latents: the text encoders still run;
* cached latents + text embeddings: only the UNet runs.

Each run takes ``--warmup`` steps, then times ``--steps`` steps (data loading in the training
process included). Runs take turns, ``--repeats`` times, and the fastest counts, so load from
other processes on a shared machine hits them alike. Prints a markdown table of steps/s
ratios against the image shards and, unless ``--no-write``, puts it into the "Latent cache"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from benchmarks.common import machine_description, report
from data.datamodule import ShardDataModule
from data.latent_cache import LatentCacheEncoder, cache_latents
from data.spec import resolve_shards
from layerdiff.formats.layerdiffuse_vae import save_transparent_vae
from layerdiff.models.base import resolve_pretrained
from layerdiff.models.transparency import LatentTransparencyEncoder, TransparencyDecoder
from layerdiff.modules.latent_diffusion import LatentDiffusionModule

SECTION_TITLE = "## Latent cache"
BASE_MODEL = "embedded:tiny-sdxl"
DEMO_SHARDS = "embedded:openmoji-demo-64/train"
# The tiny UNet's attention layers are 32 and 64 wide; rank 8 is a LoRA well below full rank.
LORA_RANK = 8
FINE_TUNES = {f"LoRA rank {LORA_RANK}": LORA_RANK, "full fine-tune": None}
IMAGES = "image shards (encode on the fly)"
LATENTS = "cached latents"
LATENTS_AND_TEXT = "cached latents + text embeddings"


class StepTimer(Callback):
    """Seconds from the end of step ``warmup`` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.started = 0.0
        self.seconds = 0.0

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.started


def steps_per_second(shards: str, transparent_vae: Path, lora_rank: int | None, args: argparse.Namespace,
                     root: Path) -> float:
    """Train ``args.warmup + args.steps`` steps on ``shards``; the rate of the last ``args.steps``."""
    module = LatentDiffusionModule(str(transparent_vae), base_model=BASE_MODEL, lora_rank=lora_rank,
                                   learning_rate=1e-4)
    data = ShardDataModule(shards, batch_size=args.batch_size, num_workers=0, shuffle_buffer=64, resample=True)
    timer = StepTimer(args.warmup)
    trainer = Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=args.warmup + args.steps, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], default_root_dir=root,
    )
    trainer.fit(module, datamodule=data)
    return args.steps / timer.seconds


def export_transparent_vae(folder: Path) -> Path:
    """An untrained transparency encoder (non-zero head, so the offset is real work) and a narrow decoder.

    Throughput does not depend on trained weights; the decoder is loaded but not run in training.
    """
    torch.manual_seed(0)
    encoder = LatentTransparencyEncoder()
    torch.nn.init.normal_(encoder.blocks[-1].weight, std=1e-2)
    save_transparent_vae(encoder, TransparencyDecoder(block_out_channels=(8, 8, 16, 16, 16, 16, 16)), folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per run (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2, help="demo shards (250 samples each) to cache (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, threads beyond the free cores wait on "
                        "each other and single runs came out up to 10x slower)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_at_start = os.getloadavg()[0]  # the machine may be shared; a busy one lowers every number
    resolve_pretrained(BASE_MODEL)  # build the tiny model before anything is timed
    image_shards = ",".join(resolve_shards(DEMO_SHARDS)[: args.shards])
    with tempfile.TemporaryDirectory(prefix="layerdiff-bench-") as temporary:
        root = Path(temporary)
        transparent_vae = export_transparent_vae(root / "transparent_vae")
        shards = {IMAGES: image_shards}
        cache_seconds = {}
        for kind, text_embeddings in ((LATENTS, False), (LATENTS_AND_TEXT, True)):
            encoder = LatentCacheEncoder(BASE_MODEL, str(transparent_vae), text_embeddings=text_embeddings)
            started = time.perf_counter()
            cached = cache_latents(image_shards, root / kind.replace(" ", "-"), encoder, batch_size=args.batch_size)
            cache_seconds[kind] = time.perf_counter() - started
            shards[kind] = str(cached.out_dir)
        samples = cached.samples

        rates: dict[tuple[str, str], float] = {}
        for _ in range(args.repeats):
            for fine_tune, lora_rank in FINE_TUNES.items():
                for kind, spec in shards.items():
                    rate = steps_per_second(spec, transparent_vae, lora_rank, args, root)
                    rates[fine_tune, kind] = max(rate, rates.get((fine_tune, kind), 0.0))

    rows = []
    for fine_tune in FINE_TUNES:
        for kind in shards:
            rows.append(f"| {fine_tune} | {kind} | {rates[fine_tune, kind] / rates[fine_tune, IMAGES]:.2f}x |")
    image_rate = rates["full fine-tune", IMAGES]
    build = "; ".join(f"{kind}: {seconds * image_rate:.0f}" for kind, seconds in cache_seconds.items())
    section = (
        f"{SECTION_TITLE}\n\n"
        f"`python -m benchmarks.latent_cache` on {machine_description()} (a VM shared with other "
        f"work; 1-minute load average {load_at_start:.1f} when the run started). `LatentDiffusionModule` on "
        f"the embedded tiny SDXL, {samples} samples of the 64 px OpenMoji demo shards, batch size "
        f"{args.batch_size}, float32, Lightning Trainer, {args.threads} torch thread(s) (with two, single runs "
        "here varied up to 10x as other work took the cores), data loaded in the training process; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps, fastest of {args.repeats} interleaved "
        f"runs. Caches are float32.\n\n"
        "| fine-tune | training data | steps/s vs. image shards |\n|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nBuilding each cache ({samples} samples) took as long as this many full fine-tune steps on "
        f"image shards: {build}.\n\n"
        "Reading it: the ratio is what skipping the encoders saves per step on this model. The tiny model's "
        "UNet, VAE and text encoders are all small, so their shares of a step differ from SDXL's at 1024 px; "
        "measure there before relying on a ratio for a real run.\n"
    )
    report(section, write=not args.no_write)


if __name__ == "__main__":
    main()
