"""Does attention sharing do what LayerDiffusion sec. 3.3 says? An ablation on the demo triplets.

The joint-layer demo recipe (``configs/joint_lora.yaml`` + ``configs/demo/joint_lora.yaml``:
foreground, background and blend) is trained once per sharing mode, from the same start (the
demo's transparent VAE and its stage-2 UNet), on the same batches, with the same seed and steps;
only ``attention_sharing`` differs. Then, per mode:

* the **held-out loss of the blend layer** (eq. 8 term on the validation split, fixed noise):
  with sharing the blend's denoiser sees the foreground and background, so it should be lower;
* **blend consistency** of generated sets: the mean squared error between the generated blend
  and the generated foreground composited over the generated background (pixels in [0, 1]),
  over fixed prompts (the validation triplets' captions) and seeds: lower when layers fit.

Run the demo first (``bash scripts/demo.sh``: it leaves the transparent VAE export and the
stage-2 UNet folder), then::

    python -m benchmarks.sharing_ablation [--steps 200] [--sets 16] [--seeds 0,1] [--write]

Each seed sets the LoRA initialisation, the noise and the data order of all modes alike.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import machine_description, report
from data import ShardDataModule
from layerdiff.pipelines import GenerationSettings, LayerPromptBatch
from layerdiff.rgba import composite
from train import LayerdiffCLI

RECIPE = ["-c", "configs/joint_lora.yaml", "-c", "configs/demo/joint_lora.yaml"]
MODES = ("none", "concat", "frame")


def train(mode: str, seed: int, steps: int, root: Path, transparent_vae: str, base_unet: str):
    arguments = [*RECIPE, f"--seed_everything={seed}", f"--model.init_args.seed={seed}", f"--data.init_args.seed={seed}",
                 f"--trainer.default_root_dir={root / f'{mode}-seed{seed}'}", f"--trainer.max_steps={steps}",
                 f"--trainer.val_check_interval={steps}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                 "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=16",
                 f"--model.init_args.attention_sharing={mode}", f"--model.init_args.transparent_vae={transparent_vae}",
                 f"--model.init_args.base_unet={base_unet}", "--model.init_args.modes=null"]  # joint only, as measured
    cli = LayerdiffCLI(args=arguments, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    validation = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return cli.model, cli.datamodule, validation


def validation_prompts(datamodule: ShardDataModule, count: int) -> list[dict[str, str]]:
    """The captions of the first ``count`` validation triplets (prompts the model never trained on)."""
    prompts = []
    for batch in datamodule.val_dataloader():
        batch = datamodule.on_before_batch_transfer(batch, 0)
        for row in range(len(batch)):
            prompts.append({layer.name: layer.caption[row] for layer in batch.layers})
        if len(prompts) >= count:
            return prompts[:count]
    return prompts


@torch.no_grad()
def blend_consistency(module, prompts: list[dict[str, str]], settings: GenerationSettings) -> float:
    """Mean over sets of MSE(generated blend, generated foreground over generated background)."""
    module.eval()
    errors = []
    for start in range(0, len(prompts), 4):
        chunk = prompts[start:start + 4]
        seeds = list(range(start, start + len(chunk)))
        for item in module.layer_generator()(LayerPromptBatch(seeds, chunk, seeds, settings)):
            foreground, background, blend = (item.layers[name] for name in ("foreground", "background", "blend"))
            composed = composite(foreground[:3], foreground[3:], background)
            errors.append(float(((blend - composed) ** 2).mean()))
    return sum(errors) / len(errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per mode (default 200)")
    parser.add_argument("--sets", type=int, default=16, help="generated layer sets per mode (default 16)")
    parser.add_argument("--sampling-steps", type=int, default=20, help="sampler steps per set (default 20)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each runs every mode (default 0)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"sharing modes (default {','.join(MODES)})")
    parser.add_argument("--transparent-vae", default="outputs/demo/transparent_vae/export")
    parser.add_argument("--base-unet", default="outputs/demo/latent_diffusion/unet")
    parser.add_argument("--root", default="outputs/ablation/sharing")
    parser.add_argument("--write", action="store_true", help="put the results into BENCHMARKS.md")
    args = parser.parse_args(argv)
    for path in (args.transparent_vae, args.base_unet):
        if not Path(path).is_dir():
            parser.error(f"{path} does not exist: run `bash scripts/demo.sh` first (it writes both), or pass the folders")

    load_before = os.getloadavg()[0]
    settings = GenerationSettings(width=64, height=64, steps=args.sampling_steps, guidance_scale=3.0)
    rows, started = [], time.perf_counter()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for seed in seeds:
        for mode in args.modes.split(","):
            began = time.perf_counter()
            module, datamodule, validation = train(mode, seed, args.steps, Path(args.root), args.transparent_vae,
                                                   args.base_unet)
            consistency = blend_consistency(module, validation_prompts(datamodule, args.sets), settings)
            rows.append((mode, seed, validation, consistency, time.perf_counter() - began))
            print(f"{mode} seed {seed}: {validation} blend consistency {consistency:.5f}")

    layers = ("foreground", "background", "blend")
    lines = [
        "## Attention sharing ablation (joint layers, demo triplets)",
        "",
        f"`python -m benchmarks.sharing_ablation --steps {args.steps} --sets {args.sets} --seeds {args.seeds} --write` on "
        f"{machine_description()}, load average {load_before:.1f} at the start; {time.perf_counter() - started:.0f} s.",
        "Each mode trained from the demo's stage-2 UNet with the same seed (LoRA initialisation, noise, data order), "
        "batches and steps "
        "(`configs/demo/joint_lora.yaml`: 3 layers, LoRA rank 16, lr 1e-3); held-out losses on 128 validation "
        f"triplets with fixed noise; blend consistency = MSE(blend, foreground over background) of {args.sets} generated "
        f"sets ({args.sampling_steps} Euler steps, guidance 3, prompts from the validation captions, seeds 0..{args.sets - 1}).",
        "",
        "| sharing | seed | val loss | " + " | ".join(f"val loss {name}" for name in layers) + " | blend consistency (MSE) | s |",
        "| --- | --- | --- | " + " | ".join("---" for _ in layers) + " | --- | --- |",
    ]
    for mode, seed, validation, consistency, seconds in rows:
        values = " | ".join(f"{validation[f'val/loss_{name}']:.4f}" for name in layers)
        lines.append(f"| `{mode}` | {seed} | {validation['val/loss']:.4f} | {values} | {consistency:.5f} | {seconds:.0f} |")
    if len(seeds) > 1:
        for mode in args.modes.split(","):
            mine = [row for row in rows if row[0] == mode]
            means = [sum(row[2][f"val/loss_{name}"] for row in mine) / len(mine) for name in layers]
            total = sum(row[2]["val/loss"] for row in mine) / len(mine)
            consistency = sum(row[3] for row in mine) / len(mine)
            lines.append(f"| `{mode}` | mean | {total:.4f} | " + " | ".join(f"{value:.4f}" for value in means)
                         + f" | {consistency:.5f} | |")
    report("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
