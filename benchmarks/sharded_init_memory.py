"""Peak memory per rank of building the trained parts whole on every rank vs for sharding.

    python -m benchmarks.sharded_init_memory [--devices 2] [--no-write]

The released-size ``TransparentVAEModule`` (the 104 M-parameter transparency decoder, its
encoder and a 64-wide PatchGAN around the embedded tiny SDXL's frozen VAE) trains one step
under ``FSDP2Strategy`` on ``--devices`` CPU processes (gloo, one thread each; Lightning
starts them), twice, side by side:

* ``whole``: the module built as before sharded construction existed (and as it still is
  outside ``train.py``): every process builds the trained parts whole, then
  ``configure_model`` shards them;
* ``sharded construction``: built inside ``layerdiff.distributed.sharded_construction``, as
  ``train.py`` does under a sharding strategy: the first process builds them whole, the
  others on the meta device, and after sharding each of those gets its shard from rank 0.

Per rank: peak resident set size (``VmHWM``) after building the module, after sharding
(Lightning's setup, optimizer included) and after one training step, and the resident set
size held after sharding (``VmRSS``). Both runs must start
from the same weights: each rank's sum of its parameter shards after sharding and the first
step's loss are compared, and a mismatch fails the benchmark. Prints a markdown table and,
unless ``--no-write``, puts it into the "Sharded construction" section of BENCHMARKS.md with
the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from benchmarks.common import machine_description, report

SECTION_TITLE = "## Sharded construction"
MODES = {"whole": "built whole on every rank", "meta": "sharded construction"}
BATCH_SIZE = 2
IMAGE_SIZE = 64


def _memory(field: str) -> int:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process image, in bytes. Not ``ru_maxrss``:
    Linux carries that over from the parent through fork and exec, and the second rank is
    forked from the first after it built the model."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


class Probe(Callback):
    """Every rank's peak RSS after sharding and after the step, its shards' checksum and the
    first loss, gathered; rank 0 writes ``out``."""

    def __init__(self, out: Path, built: int) -> None:
        self.out = out
        self.record = {"built": built}

    def on_fit_start(self, trainer: Trainer, pl_module) -> None:
        self.record["sharded"] = _memory("VmHWM")
        self.record["held"] = _memory("VmRSS")
        shards = [p.to_local() if hasattr(p, "to_local") else p for p in pl_module.parameters() if p.requires_grad]
        self.record["checksum"] = float(sum(shard.double().sum() for shard in shards))
        self.record["trained_bytes"] = sum(shard.numel() * shard.element_size() for shard in shards)

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        self.record.setdefault("loss", float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        self.record["step"] = _memory("VmHWM")
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, self.record)
        if trainer.is_global_zero:
            self.out.write_text(json.dumps(ranks))


def worker(args: argparse.Namespace) -> None:
    """One run; Lightning starts the other ranks as copies of this command."""
    from torch.utils.data import DataLoader

    from layerdiff.distributed import FSDP2Strategy, sharded_construction
    from layerdiff.modules import TransparentVAEModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    construction = sharded_construction() if args.mode == "meta" else contextlib.nullcontext()
    with construction:
        module = TransparentVAEModule(base_model=args.base_model, discriminator_start_step=0, learning_rate=1e-4)
    built = _memory("VmHWM")
    generator = torch.Generator().manual_seed(0)
    rgb = torch.rand(BATCH_SIZE * args.devices, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    alpha = (torch.rand(BATCH_SIZE * args.devices, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator) > 0.5).float()
    samples = [{"rgb": rgb[index], "alpha": alpha[index]} for index in range(len(rgb))]
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=FSDP2Strategy(activation_checkpointing=True),  # as the strategy overlay sets it
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Probe(args.out, built)],
        default_root_dir=args.out.parent,
    )
    trainer.fit(module, train_dataloaders=DataLoader(samples, batch_size=BATCH_SIZE))


def measure(mode: str, args: argparse.Namespace, work: Path) -> list[dict]:
    out = work / f"{mode}.json"
    command = [
        sys.executable, "-m", "benchmarks.sharded_init_memory", "--worker", "--mode", mode, "--out", str(out),
        "--devices", str(args.devices), "--base-model", args.base_model,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        raise RuntimeError(f"the {mode} run failed:\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def mib(count: float) -> str:
    return f"{count / 2**20:,.0f} MiB"


def table(results: dict[str, list[dict]]) -> str:
    rows = [
        "| construction | rank | trained parts held (its shards) | peak RSS after building "
        "| after sharding | after one step | RSS held after sharding |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, ranks in results.items():
        for rank, record in enumerate(ranks):
            rows.append(
                f"| {MODES[mode]} | {rank} | {mib(record['trained_bytes'])} | {mib(record['built'])} "
                f"| {mib(record['sharded'])} | {mib(record['step'])} | {mib(record['held'])} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (default 2)")
    parser.add_argument("--base-model", default="embedded:tiny-sdxl", help="the frozen VAE's diffusers model")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from layerdiff.models.base import resolve_pretrained

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    resolve_pretrained(args.base_model)  # build the embedded model before anything is measured
    with tempfile.TemporaryDirectory(prefix="layerdiff-bench-") as temporary:
        results = {mode: measure(mode, args, Path(temporary)) for mode in MODES}
    whole, meta = results["whole"], results["meta"]
    for rank, (before, after) in enumerate(zip(whole, meta)):
        if before["checksum"] != after["checksum"] or before["loss"] != after["loss"]:
            raise RuntimeError(f"rank {rank} starts from other weights under sharded construction: {before} vs {after}")

    section = (
        f"{SECTION_TITLE}\n\n"
        f"`python -m benchmarks.sharded_init_memory` on {machine_description()} (a VM shared with other work; "
        f"`uptime` when the run started: {uptime}). The released-size transparent VAE (104 M-parameter decoder, "
        f"encoder, 64-wide PatchGAN; the tiny SDXL's frozen VAE) under `FSDP2Strategy` on {args.devices} CPU "
        f"processes (gloo, 1 thread each), one training step at {IMAGE_SIZE} px, batch {BATCH_SIZE} per rank; "
        "peak resident set size per rank at each point. Both runs start from the same weights on every rank "
        "(shard checksums and the first loss are equal, which the script checks).\n\n"
        f"{table(results)}\n\n"
        "Reading it: built whole, every rank holds the trained parts' whole float32 parameters (about 413 MiB) "
        "before `configure_model` shards them. With sharded construction the ranks after the first of each "
        "node build them on the meta device and only ever allocate their shard, filled from rank 0 one tensor "
        "at a time; rank 0 still builds them whole (it is the source) and sends them before it shards, so its "
        "numbers stay those of whole construction: the saving is per node, one whole copy instead of one per "
        "process, (N - 1) / N of the trained parts on each of the other N - 1 ranks. The step itself "
        "(gathered units, activations, gradients, AdamW moments) comes on top in both runs, and on this "
        "machine it is what sets the peak of the whole run; the saving shows there where the trained parts "
        "outweigh one step's working memory (a full SDXL UNet fine-tune would, at 10 GiB of float32 weights, "
        "but `LatentDiffusionModule` does not build its UNet this way yet)."
    )
    report(section, write=not args.no_write)


if __name__ == "__main__":
    main()
