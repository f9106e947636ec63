"""``train.py fit`` runs of the transparent VAE demo recipe, shrunk, for the preemption and
SLURM tests (in other processes, with ``tests/`` importable)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]


def run_environment() -> dict[str, str]:
    """For train.py in another process: the probe importable, W&B offline, one thread per rank."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    return {
        **environment,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), environment.get("PYTHONPATH")])),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }


def saved_step(path: Path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


def tiny_fit_arguments(
    tiny_sdxl: Path, shards: dict[str, str], root: Path, max_steps: int, hold_at_step: int | None = None
) -> list[str]:
    """``train.py fit`` arguments for the transparent VAE recipe with the demo overlay, shrunk to
    a tiny decoder and a few deterministic steps (no resampling, fixed seeds; no discriminator,
    whose parameters DDP finds unused before its start step), with the test probe recording
    start steps (and holding at a step)."""
    arguments = [
        "-c", "configs/transparent_vae.yaml", "-c", "configs/demo/transparent_vae.yaml",
        "--model.init_args.base_model", str(tiny_sdxl),
        "--model.init_args.decoder_block_out_channels", "[8, 8, 16, 16, 16, 16, 16]",
        "--model.init_args.adversarial_weight", "0",
        "--data.init_args.train_shards", shards["train"],
        "--data.init_args.val_shards", shards["val"],
        "--data.init_args.batch_size", "2",
        "--data.init_args.resample", "false",
        "--data.init_args.num_workers", "1",
        "--trainer.max_steps", str(max_steps),
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=support.preemption_probe.StepProbe",
        f"--trainer.callbacks.directory={root / 'probe'}",
    ]  # fmt: skip
    if hold_at_step is not None:
        arguments.append(f"--trainer.callbacks.hold_at_step={hold_at_step}")
    return arguments
