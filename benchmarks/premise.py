"""LayerDiffusion's premise on the embedded default (arXiv 2402.17113, sec. 3.1-3.2): fine-tuning a
*pretrained* UNet on adjusted latents gets further in N steps than training the same UNet from
random weights, because the offset leaves the pretrained model's knowledge usable.

    python scripts/demo.py                 # once: its first stage exports the transparent VAE
    python -m benchmarks.premise           # both runs side by side, writes BENCHMARKS.md

Both runs use the demo's latent-diffusion recipe and overlay unchanged (same data, steps, seed,
learning rate, transparent VAE) on the pretrained tiny model; the second replaces its UNet by
the random one of ``embedded:tiny-sdxl`` (the same architecture, seed 0), so the UNet's weights
are the only difference. Reported: held-out loss on adjusted latents before and after, and the
pretrained UNet's loss on plain latents before (``val/loss_plain``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from benchmarks.common import machine_description, report

SECTION_TITLE = "## Premise: a pretrained UNet fine-tunes on adjusted latents"
REPO = Path(__file__).resolve().parent.parent
RECIPE = ["-c", "configs/latent_diffusion.yaml", "-c", "configs/demo/latent_diffusion.yaml"]
DEMO_EXPORT = REPO / "outputs/demo/transparent_vae/export"


def random_unet_base(folder: Path) -> Path:
    """The pretrained tiny model with the random seed-0 UNet of ``embedded:tiny-sdxl`` in its place."""
    from layerdiff.models.base import resolve_pretrained

    shutil.copytree(resolve_pretrained("embedded:tiny-sdxl-pretrained"), folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(Path(resolve_pretrained("embedded:tiny-sdxl")) / "unet", folder / "unet")
    return folder


def fine_tune(base_model: str, transparent_vae: Path, root: Path, overrides: list[str]) -> tuple[dict, dict]:
    """The demo's diffusion stage on ``base_model``: held-out metrics before and after."""
    sys.path.insert(0, str(REPO))
    from train import LayerdiffCLI

    arguments = [*RECIPE, f"--model.init_args.base_model={base_model}", f"--model.init_args.transparent_vae={transparent_vae}",
                 f"--trainer.default_root_dir={root}", *overrides]
    cli = LayerdiffCLI(args=arguments, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    before = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    trainer.fit(model, datamodule=datamodule)
    after = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    for logger in trainer.loggers:  # end this run's W&B run (offline, in the temporary folder)
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transparent-vae", type=Path, default=DEMO_EXPORT, help="the demo's transparent VAE export")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for both runs, e.g. --trainer.max_steps=50")
    args = parser.parse_args()
    if not (args.transparent_vae / "vae_transparent_encoder.safetensors").is_file():
        parser.error(f"no transparent VAE export in {args.transparent_vae}: run `bash scripts/demo.sh` first "
                     "(its first stage writes it), or pass --transparent-vae")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        bases = {"pretrained UNet": "embedded:tiny-sdxl-pretrained",
                 "random UNet": str(random_unet_base(Path(work) / "random-unet"))}
        for name, base in bases.items():
            results[name] = fine_tune(base, args.transparent_vae, Path(work) / name.replace(" ", "-"), args.overrides)
            before, after = results[name]
            print(f"{name}: held-out loss {before['val/loss']:.4f} -> {after['val/loss']:.4f} "
                  f"(plain latents before: {before['val/loss_plain']:.4f})", flush=True)
    steps = "300 (the demo's)" if not args.overrides else " ".join(args.overrides)
    lines = [
        SECTION_TITLE, "",
        f"`python -m benchmarks.premise` on {machine_description()}: the demo's latent-diffusion stage (full "
        f"fine-tune, steps: {steps}, seed 0) on the pretrained tiny model, once as it is and once with its UNet "
        "replaced by the random seed-0 UNet of `embedded:tiny-sdxl` (same VAE, text encoders, data, transparent "
        "VAE). Held-out loss of LD eq. 7 on the demo's validation emoji (never trained on), same noise and "
        "timesteps at every validation.", "",
        "| UNet at the start | loss on adjusted latents, before | after | loss on plain latents, before "
        "| adjusted / plain, before |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (before, after) in results.items():
        lines.append(f"| {name} | {before['val/loss']:.4f} | {after['val/loss']:.4f} | {before['val/loss_plain']:.4f} | "
                     f"{before['val/loss'] / before['val/loss_plain']:.3f} |")
    (pretrained_before, pretrained_after), (random_before, random_after) = results.values()
    ratio = pretrained_before["val/loss"] / pretrained_before["val/loss_plain"]
    lines += ["", (
        f"Reading it: before any fine-tuning the pretrained UNet's loss on adjusted latents is {ratio:.3f}x its loss "
        f"on the plain latents of the same images ({'within' if ratio <= 1.1 else 'outside'} the 10 % the demo aims "
        f"for). After the same steps the pretrained start reaches {pretrained_after['val/loss']:.4f}, the random "
        f"start {random_after['val/loss']:.4f}"
        + (f", above where the pretrained UNet began ({pretrained_before['val/loss']:.4f})."
           if random_after["val/loss"] > pretrained_before["val/loss"] else ".")
    )]
    report("\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()
