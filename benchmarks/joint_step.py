"""What a joint 2-layer training step (LayerDiffusion arXiv:2402.17113 sec. 3.3, eq. 9) costs
against a single-layer step of ``LatentDiffusionModule`` on the same model.

    python -m benchmarks.joint_step                                   # 5 interleaved rounds, writes BENCHMARKS.md
    python -m benchmarks.joint_step --rounds 1 --steps 2 --warmup 1 --no-write   # smoke run
    python -m benchmarks.joint_step --profile concat --steps 3 --no-write        # where a variant's time goes

Four variants train the embedded tiny SDXL in this process (64 px, batch 8 samples, rank-16
LoRAs on the released attention projections, fp32, AdamW, one thread): ``single`` is
``LatentDiffusionModule`` on the foregrounds (an ``ImageBatch``); ``concat``, ``frame`` and
``none`` are ``JointLayerLoRAModule`` with foreground + background and that attention sharing,
on the ``LayeredBatch`` the foregrounds came from. A step is the whole update: ``compute_loss``
(VAE and transparency encoding, text encoding, UNet), backward, AdamW step. Batches are built
once, in memory, from the OpenMoji demo shards. After ``--warmup`` steps each, the variants take
turns in ``--rounds`` rounds of ``--steps`` steps (the order rotated each round), so load from
other processes hits them alike; each joint/single ratio is paired within a round (the medians
of that round's steps), then summarised by its median and range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import record_function

from benchmarks.common import machine_description, report

SECTION_TITLE = "## Joint-layer step cost"
BASE_MODEL = "embedded:tiny-sdxl"
DEMO_SHARDS = "embedded:openmoji-demo-64/train"
LAYERS = ("foreground", "background")
VARIANTS = ("single", "concat", "frame", "none")
JOINT = VARIANTS[1:]
PHASES = ("step: compute_loss", "step: backward", "step: optimizer")  # labelled for --profile
TARGET = 2.15  # issue 10: 2 layers are twice the UNet batch, so ~2x is the floor


def export_transparent_vae(folder: Path) -> Path:
    """An untrained transparency encoder (a small random last layer, so the adjusted latent is
    not the plain one) and a narrow decoder, in the released file format."""
    from layerdiff.formats.layerdiffuse_vae import save_transparent_vae
    from layerdiff.models.transparency import LatentTransparencyEncoder, TransparencyDecoder

    torch.manual_seed(0)
    encoder = LatentTransparencyEncoder()
    torch.nn.init.normal_(encoder.blocks[-1].weight, std=1e-2)
    save_transparent_vae(encoder, TransparencyDecoder(block_out_channels=(8, 8, 16, 16, 16, 16, 16)), folder)
    return folder


def make_batches(batch_size: int):
    """The first ``batch_size`` demo samples as a ``LayeredBatch`` and their foregrounds as an ``ImageBatch``."""
    from data import ShardDataModule
    from layerdiff.batches import ImageBatch

    data = ShardDataModule(DEMO_SHARDS, batch_size=batch_size, num_workers=0, shuffle_buffer=0, require_layers=True)
    data.setup("fit")
    layered = data.on_before_batch_transfer(next(iter(data.train_dataloader())), 0)
    if len(layered) != batch_size:
        raise RuntimeError(f"the demo shards gave a batch of {len(layered)} samples, not {batch_size}")
    foreground = layered.layer("foreground")
    single = ImageBatch(foreground.rgb, foreground.alpha, foreground.caption, layered.key, layered.original_size,
                        layered.crop_top_left)
    return single, layered


def build_module(variant: str, transparent_vae: Path, lora_rank: int):
    from layerdiff.modules import JointLayerLoRAModule, LatentDiffusionModule

    torch.manual_seed(0)
    common = {"transparent_vae": str(transparent_vae), "base_model": BASE_MODEL, "lora_rank": lora_rank,
              "learning_rate": 1e-4}
    if variant == "single":
        return LatentDiffusionModule(**common)
    return JointLayerLoRAModule(**common, layers=LAYERS, transparent_layers=("foreground",), attention_sharing=variant)


def make_step(module, batch) -> Callable[[], float]:
    """One full training update of ``module`` on ``batch``; returns its wall time in seconds."""
    from layerdiff.optim import build_optimizer

    hp = module.hparams
    optimizer = build_optimizer(module.trained_parameters(), hp.optimizer, hp.learning_rate, tuple(hp.betas),
                                hp.weight_decay)
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        started = time.perf_counter()
        with record_function(PHASES[0]):
            loss = module.compute_loss(batch, generator)["loss"]
        with record_function(PHASES[1]):
            loss.backward()
        with record_function(PHASES[2]):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step


def profile(steps: dict[str, Callable[[], float]], count: int) -> None:
    """Print each variant's time per phase of a step and its heaviest operators (self CPU time)
    over ``count`` steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    for variant, step in steps.items():
        with profiler(activities=[ProfilerActivity.CPU]) as recorded:
            for _ in range(count):
                step()
        events = recorded.key_averages()
        phases = {event.key: event.cpu_time_total / count / 1e3 for event in events if event.key in PHASES}
        print(f"### {variant}: {count} steps; ms per step: "
              + ", ".join(f"{name.removeprefix('step: ')} {phases.get(name, 0.0):.0f}" for name in PHASES) + "\n")
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))


def summarise(times: dict[str, list[list[float]]]) -> list[str]:
    """Table rows: each variant's median step time and its per-round paired ratio to ``single``."""
    single_rounds = [statistics.median(steps) for steps in times["single"]]
    rows = [f"| single layer (`LatentDiffusionModule`, LoRA) | "
            f"{statistics.median(sum(times['single'], [])) * 1e3:.0f} | 1.00x | |"]
    for variant in JOINT:
        ratios = [statistics.median(steps) / base for steps, base in zip(times[variant], single_rounds)]
        verdict = "yes" if statistics.median(ratios) <= TARGET else "**no**"
        rows.append(f"| 2 layers, `{variant}` sharing | {statistics.median(sum(times[variant], [])) * 1e3:.0f} | "
                    f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {verdict} |")
    return rows


def reading(times: dict[str, list[list[float]]]) -> str:
    """What the table means, with each sharing mode's extra over ``none`` (the same two-layer batch)."""
    median = {variant: statistics.median(sum(steps, [])) for variant, steps in times.items()}
    extra = {variant: median[variant] - median["none"] for variant in ("concat", "frame")}
    return (
        "Reading it: two layers double every batch a step touches (the VAE encodes both layers, the "
        "transparency encoder only the foreground; the text encoders see each layer's captions; the UNet runs "
        f"2 x the samples), so on a compute-bound model ~2x is the floor and the target of {TARGET}x leaves "
        f"{TARGET - 2:.2f}x for sharing. On this tiny model at 64 px a step is mostly per-operator overhead "
        "(thousands of small matmuls and convolutions, whose cost hardly grows with the batch), so doubling the "
        "batch costs less than 2x and `none` lands well below it; on SDXL at 1024 px expect every variant closer "
        "to 2x plus its sharing cost. Over `none` (the same two-layer batch, independent layers): `concat` adds "
        f"{extra['concat'] * 1e3:.0f} ms ({extra['concat'] / median['single']:+.2f}x of a single-layer step), "
        "self-attention over both layers' tokens (2N keys per query, so its share grows with the token count at "
        f"high resolution); `frame` adds {extra['frame'] * 1e3:.0f} ms "
        f"({extra['frame'] / median['single']:+.2f}x), the extra attention across the layers at each token in "
        "every attention module (a LayerNorm, five linear layers and an SDPA call over sequences of 2, in self- "
        "and cross-attention alike). By FLOPs that is 10 C^2 per token and transformer block on top of about "
        "18 C^2 for the block's projections and feed-forward, so on SDXL at full size `frame` is likely well "
        "over the target (the SDXL recipe shares by `concat`; `frame` is the released SD1.5 design). Per-layer "
        "LoRAs also apply each layer's update as its own pair of matmuls on that layer's rows, twice the LoRA "
        "calls of the single-layer adapter. `--profile VARIANT ...` prints the time per phase and the heaviest "
        "operators."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=8, help="samples (each of 2 layers in the joint variants)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--profile", nargs="+", choices=VARIANTS, help="profile these variants instead of timing")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()

    single, layered = make_batches(args.batch_size)
    with tempfile.TemporaryDirectory() as work:
        transparent_vae = export_transparent_vae(Path(work) / "transparent_vae")
        variants = args.profile or VARIANTS
        steps = {variant: make_step(build_module(variant, transparent_vae, args.lora_rank),
                                    single if variant == "single" else layered) for variant in variants}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    if args.profile:
        profile(steps, args.steps)
        return

    times: dict[str, list[list[float]]] = {variant: [] for variant in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS[round_index % len(VARIANTS):] + VARIANTS[:round_index % len(VARIANTS)]
        for variant in order:
            times[variant].append([steps[variant]() for _ in range(args.steps)])
        print(f"round {round_index}: " + ", ".join(f"{variant} {statistics.median(times[variant][-1]) * 1e3:.0f} ms"
                                                   for variant in VARIANTS), flush=True)
    load_after = os.getloadavg()
    under = f"(under `nice -n {os.nice(0)}`) " if os.nice(0) else ""

    lines = [
        SECTION_TITLE, "",
        f"`python -m benchmarks.joint_step --rounds {args.rounds} --steps {args.steps} --warmup {args.warmup}` "
        f"{under}on {machine_description()}, "
        f"torch {torch.__version__}; load average "
        f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1 / 5 / 15 min) before, "
        f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} after. Embedded tiny SDXL, 64 px, "
        f"batch {args.batch_size} samples, LoRA rank {args.lora_rank} (per layer in the joint variants), fp32, "
        "one thread; a step is `compute_loss` (encoding included), backward and an AdamW step, on batches built "
        "once in memory from the OpenMoji demo shards (the single-layer batch is the layered batch's foregrounds). "
        f"{args.warmup} warm-up steps per variant, then {args.rounds} rounds of {args.steps} steps per variant, "
        "order rotated; ratios paired within each round (medians of the round's steps), then their median and "
        "range.", "",
        f"| variant | median ms/step | vs. single layer (median, min-max) | <= {TARGET}x |",
        "| --- | --- | --- | --- |",
        *summarise(times), "",
        reading(times),
    ]  # fmt: skip
    report("\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()
