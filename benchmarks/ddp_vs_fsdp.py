"""DDP vs FSDP2: step time and per-rank memory of the same training, side by side.

    python -m benchmarks.ddp_vs_fsdp [--cases vae-demo ld-demo vae-released] [--steps 8] [--warmup 3]
        [--repeats 2] [--devices 2] [--device cpu|cuda] [--base-model DIR] [--no-write]

Every case trains with the Lightning Trainer on ``--devices`` processes (Lightning starts
them), once under ``DDPStrategy`` and once under ``layerdiff.distributed.FSDP2Strategy`` (the
settings of ``configs/strategy/fsdp.yaml``: activation checkpointing on) and under
FSDP2 without activation checkpointing, on the 64 px OpenMoji demo shards:

* ``vae-demo``: ``TransparentVAEModule`` with the demo's narrow decoder, GAN terms on;
* ``ld-demo``: ``LatentDiffusionModule``, full fine-tune of the embedded tiny SDXL's UNet;
* ``vae-released``: ``TransparentVAEModule`` with the released-size transparency decoder
  (104 M parameters) and a 64-wide PatchGAN: where sharding's memory saving shows;
* ``sdxl-full`` (CUDA): ``LatentDiffusionModule``, full bf16-mixed fine-tune of the UNet of
  ``--base-model`` (an SDXL folder), ``--image-size`` px.

Measured per run, after ``--warmup`` untimed steps:

* step time: median seconds between consecutive training-batch ends on rank 0;
* model state per rank: bytes of the parameters (trained and frozen), gradients and
  optimizer state that rank holds after the last step, counted exactly (under FSDP2 its
  shards of the trained ones);
* peak memory per rank: the process's peak resident set size on the CPU (everything:
  framework, frozen models, activations, communication buffers), peak CUDA memory allocated
  on GPUs.

Strategies take turns ``--repeats`` times; the fastest run of each counts (other work on a
shared machine hits both alike). Prints a markdown table and, unless ``--no-write``, puts it
into the "DDP vs FSDP2" section of BENCHMARKS.md (CPU runs only; GPU tables are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import DDPStrategy

from benchmarks.common import machine_description, report
from benchmarks.latent_cache import export_transparent_vae

SECTION_TITLE = "## DDP vs FSDP2"
# FSDP2 as configs/strategy/fsdp.yaml sets it, and without activation checkpointing (what the recompute costs)
STRATEGIES = {"ddp": "DDP", "fsdp2": "FSDP2", "fsdp2-no-ac": "FSDP2, no activation checkpointing"}
CPU_CASES = ("vae-demo", "ld-demo", "vae-released")
CASE_DESCRIPTIONS = {
    "vae-demo": "transparent VAE, demo decoder",
    "ld-demo": "latent diffusion, tiny SDXL full fine-tune",
    "vae-released": "transparent VAE, released-size decoder",
    "sdxl-full": "latent diffusion, SDXL full fine-tune",
}
BATCH_SIZES = {"vae-demo": 8, "ld-demo": 8, "vae-released": 2, "sdxl-full": 1}
DEMO_DECODER = (16, 16, 32, 32, 64, 64, 64)
READING = (
    "Reading it: the sharded state per rank is the trained parts' parameters, gradients and AdamW moments"
    " divided by the number of ranks, plus the frozen weights whole (the tiny SDXL's VAE and text "
    "encoders in the latent diffusion case, which is why it drops by less than half). Peak RSS is a high-"
    "water mark of everything the process held: every rank first builds the whole model (the "
    "LightningModule is constructed before `configure_model` shards it) and FSDP2 allocates its gather "
    "and reduce buffers on top, so on the CPU it shows little of the saving (with `--device cuda` the "
    "column is peak CUDA memory allocated instead). The step-time cost is FSDP2's per-unit communication:"
    " it gathers every unit's parameters in forward and again in backward and reduce-scatters its "
    "gradients, each a gloo round trip over loopback TCP between two single-threaded processes, where DDP"
    " all-reduces gradients in a few buckets; on GPUs NCCL overlaps these with compute. Activation "
    "checkpointing adds a recomputed forward; this shared machine's run-to-run noise is of the same "
    "order, so the two FSDP2 rows of a small configuration can come out in either order. Sharding is for "
    "models whose training state does not fit one device; where it fits, DDP (the recipes' default) is "
    "faster.\n\n"
    "GPU numbers (a full SDXL UNet fine-tune in bf16, FSDP2 vs DDP) await a lent GPU; none was lent for "
    "this work. `python -m benchmarks.ddp_vs_fsdp --device cuda --devices 2 --cases sdxl-full --base-"
    "model <SDXL folder> --image-size 512` measures them and prints the table.\n"
)


class Probe(Callback):
    """Step ends, then every rank's memory, gathered; rank 0 writes ``out``."""

    def __init__(self, out: Path, warmup: int) -> None:
        self.out = out
        self.warmup = warmup
        self.step_ends: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        self.step_ends.append(time.perf_counter())

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        memory = {
            "parameters": sum(_local_bytes(parameter) for parameter in pl_module.parameters()),
            "gradients": sum(_local_bytes(p.grad) for p in pl_module.parameters() if p.grad is not None),
            "optimizer": sum(
                _local_bytes(value)
                for optimizer in trainer.optimizers
                for state in optimizer.state.values()
                for value in state.values()
                if isinstance(value, torch.Tensor)
            ),
            "peak": _peak_memory(pl_module.device),
        }
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, memory)
        if trainer.is_global_zero:
            intervals = [later - earlier for earlier, later in zip(self.step_ends, self.step_ends[1:])]
            intervals = intervals[self.warmup :]
            self.out.write_text(json.dumps({"step_seconds": statistics.median(intervals), "ranks": ranks}))


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's own shard
    return local.numel() * local.element_size()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_module(case: str, base_model: str, transparent_vae: Path):
    from layerdiff.modules import LatentDiffusionModule, TransparentVAEModule

    if case.startswith("vae-"):
        demo = {"decoder_block_out_channels": DEMO_DECODER, "discriminator_channels": 16}
        widths = demo if case == "vae-demo" else {}  # the released-size decoder is the default
        return TransparentVAEModule(base_model=base_model, discriminator_start_step=0, learning_rate=1e-4, **widths)
    return LatentDiffusionModule(str(transparent_vae), base_model=base_model, lora_rank=None, learning_rate=1e-4)


def worker(args: argparse.Namespace) -> None:
    """One run; Lightning starts the other ranks as copies of this command."""
    from data.datamodule import ShardDataModule
    from layerdiff.distributed import FSDP2Strategy

    torch.manual_seed(0)
    module = build_module(args.case, args.base_model, args.transparent_vae)
    data = ShardDataModule(
        f"embedded:openmoji-demo-{args.image_size}/train",
        batch_size=BATCH_SIZES[args.case],
        num_workers=0,
        shuffle_buffer=64,
        resample=True,
    )
    if args.strategy.startswith("fsdp2"):
        strategy = FSDP2Strategy(activation_checkpointing=args.strategy == "fsdp2")
    else:
        # The GAN's generator and discriminator backward passes each leave the other's parameters unused.
        strategy = DDPStrategy(find_unused_parameters=args.case.startswith("vae-"))
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=args.devices,
        strategy=strategy,
        precision="bf16-mixed" if args.device == "cuda" else "32-true",
        max_steps=args.warmup + args.steps + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Probe(args.out, args.warmup)],
        default_root_dir=args.out.parent,
    )
    trainer.fit(module, datamodule=data)


def measure(case: str, strategy: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"{case}-{strategy}.json"
    command = [
        sys.executable, "-m", "benchmarks.ddp_vs_fsdp", "--worker", "--case", case, "--strategy", strategy,
        "--out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup), "--devices", str(args.devices),
        "--device", args.device, "--base-model", args.base_model, "--image-size", str(args.image_size),
        "--transparent-vae", str(work / "transparent_vae"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{case} under {strategy} failed:\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def mib(count: float) -> str:
    return f"{count / 2**20:,.0f} MiB"


def table(results: dict[tuple[str, str], dict], cases: list[str]) -> str:
    rows = [
        "| configuration | strategy | step time vs DDP | model state per rank (params + grads + optimizer) "
        "| peak memory per rank |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        ddp_seconds = results[case, "ddp"]["step_seconds"]
        for strategy in STRATEGIES:
            measured = results[case, strategy]
            ranks = measured["ranks"]
            state = max(rank["parameters"] + rank["gradients"] + rank["optimizer"] for rank in ranks)
            parts = ranks[0]
            breakdown = f"{mib(parts['parameters'])} + {mib(parts['gradients'])} + {mib(parts['optimizer'])}"
            rows.append(
                f"| {CASE_DESCRIPTIONS[case]} | {STRATEGIES[strategy]} "
                f"| {measured['step_seconds'] / ddp_seconds:.2f}x | {mib(state)} ({breakdown}) "
                f"| {mib(max(rank['peak'] for rank in ranks))} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASE_DESCRIPTIONS), help="default: the CPU cases")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per strategy and case; the fastest counts")
    parser.add_argument("--devices", type=int, default=2, help="processes (CPU) or GPUs per run (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--base-model", default="embedded:tiny-sdxl", help="diffusers model folder (sdxl-full: SDXL)")
    parser.add_argument("--image-size", type=int, default=64, help="demo shard size in px (default 64)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--transparent-vae", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    cases = args.cases or list(CPU_CASES)
    if "sdxl-full" in cases and (args.device != "cuda" or args.base_model.startswith("embedded:")):
        parser.error("sdxl-full needs --device cuda and --base-model <an SDXL folder>")

    from data.spec import resolve_shards
    from layerdiff.models.base import resolve_pretrained

    load_at_start = os.getloadavg()[0]  # the machine may be shared; a busy one lowers every number
    resolve_pretrained(args.base_model)  # build embedded models and data before anything is timed
    resolve_shards(f"embedded:openmoji-demo-{args.image_size}/train")
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="layerdiff-bench-") as temporary:
        export_transparent_vae(Path(temporary) / "transparent_vae")  # what the latent diffusion cases build on
        for _ in range(args.repeats):
            for case in cases:
                for strategy in STRATEGIES:
                    measured = measure(case, strategy, args, Path(temporary))
                    best = results.get((case, strategy))
                    if best is None or measured["step_seconds"] < best["step_seconds"]:
                        results[case, strategy] = measured

    device = f"{args.devices} GPUs" if args.device == "cuda" else f"{args.devices} CPU processes (gloo, 1 thread each)"
    section = (
        f"{SECTION_TITLE}\n\n"
        f"`python -m benchmarks.ddp_vs_fsdp` on {machine_description()} (a VM shared with other work; 1-minute "
        f"load average {load_at_start:.1f} when the run started). {device}, Lightning Trainer, "
        f"{'bf16-mixed' if args.device == 'cuda' else 'float32'}, AdamW, {args.image_size} px OpenMoji demo "
        f"shards, batch size per rank {', '.join(f'{BATCH_SIZES[case]} ({case})' for case in cases)}; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps, fastest of {args.repeats} interleaved runs. "
        "FSDP2 with the settings of `configs/strategy/fsdp.yaml` (per-block units, activation checkpointing, "
        "frozen weights whole on every rank); DDP with Lightning's defaults (plus `find_unused_parameters` for the "
        "transparent VAE, whose generator and discriminator backward passes each leave the other's parameters "
        "unused). Model state is counted exactly "
        "(this rank's parameters, gradients and optimizer state after the last step, frozen weights included; "
        "the breakdown is rank 0's); peak memory is "
        + ("peak CUDA memory allocated" if args.device == "cuda" else "the process's peak RSS")
        + ".\n\n"
        + table(results, cases)
        + "\n\n"
        + READING
    )
    report(section, write=not args.no_write and args.device == "cpu")


if __name__ == "__main__":
    main()
