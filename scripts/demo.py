"""The end-to-end demo on the embedded default (README command 1).

Runs the recipes a user would run with ``train.py``, each with its demo overlay:

1. builds the tiny SDXL-shaped model and the OpenMoji demo shards if they are missing;
2. **transparent VAE** (LD sec. 3.1): validates the untrained model (held-out alpha MSE,
   images at step 0), trains it, validates again and exports the released-layout weights;
3. **latent diffusion** (LD sec. 3.2): fine-tunes the tiny UNet on the adjusted latents of
   that export (validation loss before and after);
4. **generation**: ``predict`` turns demo prompts into RGBA PNGs and a contact sheet;
5. **joint and conditional layers** (LD sec. 3.3): foreground, background and blend LoRAs with
   shared attention on the UNet of stage 3 (exported as a UNet folder), trained on the demo
   triplets jointly and with one layer given (validation loss per layer and per mode before and
   after); ``predict`` writes layer sets with a layered PSD each (``joint_lora/generated/``),
   backgrounds for a held-out foreground (``joint_lora/given_foreground/generated/``) and three
   foregrounds composed one by one over a held-out background (``joint_lora/composition/generated/``);
6. **DiffuMatting**: the pretrained tiny UNet fine-tuned on the demo emoji over pure green with the
   green-background and transition-boundary losses, and the matting head trained on the frozen
   VAE decoder (held-out losses and alpha MSE of the chroma key and of the head, before and
   after); ``predict`` writes green screens (``screen/``), the head's mattes (``alpha_head/``),
   the refined mattes (``alpha/``), the cutouts, and ``mattes.png`` (screen, key, head, refined,
   cutout side by side).

Under ``outputs/demo/``, the transparent VAE writes ``transparent_vae/images/reconstruction_step*.png``
(input, reconstruction, the frozen decoder's view of the adjusted latent) and ``alpha_step*.png``
(input, predicted, error), step 0 before training; latent diffusion ``latent_diffusion/samples/step_*.png``
(fixed prompts and seeds, RGBA on a checkerboard, alpha beneath); generation
``latent_diffusion/generated/`` (PNGs with prompt, seed and settings in their metadata, previews, a
contact sheet). Everything is on ``outputs/demo/index.html``.

Extra command-line arguments override the recipes: ``--trainer.*`` applies to every training
stage, ``--vae.<key>`` only to the first, ``--diffusion.<key>`` only to the second,
``--joint.<key>`` only to the joint-layer stage and ``--matting.<key>`` only to DiffuMatting::

    python scripts/demo.py --trainer.max_steps 100 --diffusion.model.init_args.learning_rate 1e-4
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from layerdiff.cli import quiet_console

quiet_console()  # before the imports below bring in diffusers and transformers, which talk on import

from demo_report import add_metrics_logger, write_demo_report  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402

from layerdiff.export import main as export_main  # noqa: E402
from layerdiff.formats.layerdiffuse_vae import save_transparent_vae  # noqa: E402
from train import LayerdiffCLI  # noqa: E402

VAE_RECIPE = ["-c", "configs/transparent_vae.yaml", "-c", "configs/demo/transparent_vae.yaml"]
DIFFUSION_RECIPE = ["-c", "configs/latent_diffusion.yaml", "-c", "configs/demo/latent_diffusion.yaml"]
PREDICT_OVERLAY = ["-c", "configs/predict.yaml", "-c", "configs/demo/predict.yaml"]
JOINT_RECIPE = ["-c", "configs/joint_lora.yaml", "-c", "configs/demo/joint_lora.yaml"]
JOINT_PREDICT_OVERLAY = ["-c", "configs/predict_layers.yaml", "-c", "configs/demo/predict_layers.yaml"]
MATTING_RECIPE = ["-c", "configs/diffumatting.yaml", "-c", "configs/demo/diffumatting.yaml"]
MATTING_PREDICT_OVERLAY = ["-c", "configs/predict_matting.yaml", "-c", "configs/demo/predict_matting.yaml"]
REQUIRED_ALPHA_IMPROVEMENT = 5.0
STAGE_PREFIXES = ("--vae.", "--diffusion.", "--joint.", "--matting.")


def split_overrides(overrides: list[str]) -> tuple[list[str], ...]:
    """Route ``--vae.x v`` / ``--diffusion.x v`` / ``--joint.x v`` / ``--matting.x v`` to one stage
    and everything else to all."""
    stages: dict[str, list[str]] = {prefix: [] for prefix in STAGE_PREFIXES}
    shared: list[str] = []
    target = shared
    for argument in overrides:
        prefix = next((prefix for prefix in STAGE_PREFIXES if argument.startswith(prefix)), None)
        if prefix is not None:
            target = stages[prefix]
            target.append("--" + argument[len(prefix):])
        elif argument.startswith("--"):
            target = shared
            target.append(argument)
        else:
            target.append(argument)  # the value of the previous option
    return tuple(shared + stages[prefix] for prefix in STAGE_PREFIXES)


def train_transparent_vae(overrides: list[str]) -> dict:
    cli = LayerdiffCLI(args=VAE_RECIPE + overrides, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    add_metrics_logger(trainer)
    root = Path(trainer.default_root_dir)
    before = held_out(trainer, model, datamodule)
    trainer.fit(model, datamodule=datamodule)
    after = held_out(trainer, model, datamodule)
    report_stage(trainer, before, after)
    save_transparent_vae(model.transparent_encoder, model.transparent_decoder, root / "export", metadata=dict(model.hparams))
    finish_wandb_runs(trainer)
    return {
        "root": str(root),
        "export": str(root / "export"),
        "steps": trainer.global_step,
        "alpha_mse_before": before["val/alpha_mse"],
        "alpha_mse_after": after["val/alpha_mse"],
        "alpha_mse_improvement": before["val/alpha_mse"] / max(after["val/alpha_mse"], 1e-12),
        "rgb_psnr_visible_after": after["val/rgb_psnr_visible"],
        "identity_psnr_after": after["val/identity_psnr"],
    }


def fit_between_validations(arguments: list[str]) -> tuple[dict, dict, dict]:
    """A diffusion stage: validate, fit, validate, save ``final.ckpt``; both metric sets and the
    stage's root, checkpoint and steps."""
    cli = LayerdiffCLI(args=arguments, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    add_metrics_logger(trainer)
    before = held_out(trainer, model, datamodule)
    trainer.fit(model, datamodule=datamodule)
    after = held_out(trainer, model, datamodule)
    report_stage(trainer, before, after)
    checkpoint = Path(trainer.default_root_dir) / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=False)
    finish_wandb_runs(trainer)
    return before, after, {"root": trainer.default_root_dir, "checkpoint": str(checkpoint), "steps": trainer.global_step}


def train_latent_diffusion(transparent_vae: str, overrides: list[str]) -> dict:
    arguments = DIFFUSION_RECIPE + [f"--model.init_args.transparent_vae={transparent_vae}"] + overrides
    before, after, stage = fit_between_validations(arguments)
    return {
        **stage,
        "val_loss_before": before["val/loss"],
        "val_loss_after": after["val/loss"],
        # LD sec. 3.1-3.2's premise: before fine-tuning, the offset costs the pretrained UNet little.
        "val_loss_plain_before": before["val/loss_plain"],
        "adjusted_to_plain_before": before["val/loss"] / before["val/loss_plain"],
    }


def generate(transparent_vae: str, checkpoint: str, overrides: list[str]) -> str:
    arguments = ["predict", *DIFFUSION_RECIPE, *PREDICT_OVERLAY, f"--model.init_args.transparent_vae={transparent_vae}"]
    cli = LayerdiffCLI(args=[*arguments, *overrides, f"--ckpt_path={checkpoint}"])
    return str(Path(cli.trainer.default_root_dir) / "generated")


def train_joint_layers(transparent_vae: str, diffusion_checkpoint: str, overrides: list[str]) -> dict:
    """Stage 5 on the UNet of stage 3, as the paper extends its transparent model to layers."""
    base_unet = Path(diffusion_checkpoint).parent.parent / "unet"
    export_main(["unet", "--checkpoint", diffusion_checkpoint, "--out", str(base_unet)])
    arguments = JOINT_RECIPE + [f"--model.init_args.transparent_vae={transparent_vae}",
                                f"--model.init_args.base_unet={base_unet}"] + overrides
    before, after, stage = fit_between_validations(arguments)
    layers = [key.removeprefix("val/loss_") for key in after if key.startswith("val/loss_")]
    modes = sorted({key.split("/")[1] for key in after if key.count("/") == 2})
    return {
        **stage,
        "base_unet": str(base_unet),
        "val_loss_before": before["val/loss"],
        "val_loss_after": after["val/loss"],
        "per_layer": {layer: [before[f"val/loss_{layer}"], after[f"val/loss_{layer}"]] for layer in layers},
        # each mode's held-out loss of each layer it generates, before and after: what a given layer buys
        "per_mode": {mode: {key.split("/")[2]: [before[key], after[key]] for key in after
                            if key.startswith(f"val/{mode}/loss_")} for mode in modes},
    }


def generate_layers(joint: dict, transparent_vae: str, overrides: list[str]) -> str:
    arguments = ["predict", *JOINT_RECIPE, *JOINT_PREDICT_OVERLAY, f"--model.init_args.transparent_vae={transparent_vae}",
                 f"--model.init_args.base_unet={joint['base_unet']}"]
    cli = LayerdiffCLI(args=[*arguments, *overrides, f"--ckpt_path={joint['checkpoint']}"])
    return str(Path(cli.trainer.default_root_dir) / "generated")


def held_out_layers(joint: dict) -> dict[str, str]:
    """The first held-out demo triplet's foreground (RGBA) and background as PNG files: the
    conditional steps' inputs, images the model never trained on."""
    from PIL import Image

    from data.schema import decode_sample
    from data.shards import iter_shard_samples
    from data.spec import resolve_shards

    def refuse(error):
        raise error

    members = next(iter_shard_samples(resolve_shards("embedded:openmoji-demo-64/val"), refuse))
    sample = decode_sample(members, decode_layers=True)
    folder = Path(joint["root"]) / "given"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"foreground": folder / "foreground.png", "background": folder / "background.png"}
    Image.fromarray(sample.foreground, "RGBA").save(paths["foreground"])
    Image.fromarray(sample.background, "RGB").save(paths["background"])
    return {name: str(path) for name, path in paths.items()} | {"foreground_caption": sample.caption,
                                                                  "background_caption": sample.background_caption}


def generate_conditional(joint: dict, transparent_vae: str, overrides: list[str]) -> dict[str, str]:
    """LD sec. 3.3 and 4.3 with the joint stage's model: backgrounds generated around a held-out
    foreground, and a composition of three foregrounds over a held-out background, layer by layer."""
    given = held_out_layers(joint)
    base = ["predict", *JOINT_RECIPE, *JOINT_PREDICT_OVERLAY, f"--model.init_args.transparent_vae={transparent_vae}",
            f"--model.init_args.base_unet={joint['base_unet']}", f"--ckpt_path={joint['checkpoint']}"]
    around = Path(joint["root"]) / "given_foreground"
    LayerdiffCLI(args=[*base, *overrides, f"--trainer.default_root_dir={around}",
                       f"--data.init_args.given_layers={{foreground: {given['foreground']}}}",
                       "--data.init_args.layer_prompts=[{background: a photo of a garden, blend: "
                       f"{given['foreground_caption']} in front of a photo of a garden}}]",
                       "--data.init_args.images_per_prompt=4"])
    composed = Path(joint["root"]) / "composition"
    LayerdiffCLI(args=[*base, *overrides, f"--trainer.default_root_dir={composed}", "--data.init_args.layer_prompts=null",
                       "--data.init_args.compositions=[{background: " + given["background_caption"] + ", background_image: "
                       + given["background"] + ", foregrounds: [an emoji of a red apple, an emoji of a rocket, "
                       "an emoji of a cat face]}]", "--data.init_args.images_per_prompt=2"])
    return {"given": given, "given_foreground": str(around / "generated"), "composition": str(composed / "generated")}


def train_diffumatting(overrides: list[str]) -> dict:
    before, after, stage = fit_between_validations(MATTING_RECIPE + overrides)
    return {
        **stage,
        "val_loss_before": before["val/loss"],
        "val_loss_after": after["val/loss"],
        "terms": {term: [before[f"val/{term}"], after[f"val/{term}"]] for term in ("noise", "green", "boundary", "matte")
                  if f"val/{term}" in after},
        # held-out alpha MSE on the VAE decode of the validation composites: the head against the key it starts as
        "alpha_mse_key": after.get("val/alpha_mse_key"),
        "alpha_mse_head": [before.get("val/alpha_mse_head"), after.get("val/alpha_mse_head")],
    }


def generate_green_screens(matting: dict, overrides: list[str]) -> str:
    cli = LayerdiffCLI(args=["predict", *MATTING_RECIPE, *MATTING_PREDICT_OVERLAY, *overrides,
                             f"--ckpt_path={matting['checkpoint']}"])
    generated = Path(cli.trainer.default_root_dir) / "generated"
    matte_sheet(generated)
    return str(generated)


def matte_sheet(generated: Path, rows: int = 8) -> None:
    """``mattes.png``: per generated image, the green screen, the chroma key of it, the head's
    matte, the refined matte and the cutout on a checkerboard, side by side."""
    import numpy as np
    import torch
    from PIL import Image

    from layerdiff.keying import chroma_key_alpha
    from layerdiff.rgba import image_grid, to_uint8_hwc

    def read(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255.0

    names = sorted(path.name for path in (generated / "alpha_head").glob("*.png"))[:rows]
    if not names:
        return
    lines = []
    for name in names:
        screen = read(generated / "screen" / name)
        key = chroma_key_alpha(screen[None])[0].expand(3, -1, -1)
        lines.append([screen, key, read(generated / "alpha_head" / name), read(generated / "alpha" / name),
                      read(generated / "previews" / name)])
    Image.fromarray(to_uint8_hwc(image_grid([torch.stack(line) for line in lines]))).save(generated / "mattes.png")


def held_out(trainer, model, datamodule) -> dict:
    """Validation metrics without a progress bar or table: the stage's one bar is its training's."""
    bar = trainer.progress_bar_callback
    if bar is None:
        return trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    bar.disable()
    try:
        return trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    finally:
        bar.enable()


def report_stage(trainer, before: dict, after: dict) -> None:
    """The stage's key numbers, held-out before and after its training, when it ends."""
    numbers = ", ".join(f"{name} {before[name]:.4f} -> {value:.4f}" for name, value in after.items())
    print(f"[{Path(trainer.default_root_dir).name}] {trainer.global_step} steps; {numbers}", flush=True)


def finish_wandb_runs(trainer) -> None:
    """End the stage's W&B run, so that the next stage's logger starts its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def run_demo(overrides: list[str]) -> int:
    started = time.perf_counter()
    vae_overrides, diffusion_overrides, joint_overrides, matting_overrides = split_overrides(overrides)
    vae = train_transparent_vae(vae_overrides)
    diffusion = train_latent_diffusion(vae["export"], diffusion_overrides)
    predictions = generate(vae["export"], diffusion["checkpoint"], diffusion_overrides)
    joint = train_joint_layers(vae["export"], diffusion["checkpoint"], joint_overrides)
    layer_sets = generate_layers(joint, vae["export"], joint_overrides)
    conditional = generate_conditional(joint, vae["export"], joint_overrides)
    matting = train_diffumatting(matting_overrides)
    green_screens = generate_green_screens(matting, matting_overrides)
    summary = {
        "transparent_vae": vae,
        "latent_diffusion": diffusion,
        "predictions": predictions,
        "joint_layers": joint,
        "layer_sets": layer_sets,
        "conditional": conditional,
        "diffumatting": matting,
        "green_screens": green_screens,
        "seconds": round(time.perf_counter() - started, 1),
    }
    summary_path = Path(vae["root"]).parent / "demo_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    report_path = write_demo_report(summary, summary_path.parent)

    print("\n== layerdiff demo on the embedded tiny SDXL ==")
    print("1. latent transparency (transparent VAE)")
    print(f"   held-out alpha MSE   before {vae['alpha_mse_before']:.4f}  after {vae['alpha_mse_after']:.4f}"
          f"  ({vae['alpha_mse_improvement']:.1f}x lower)")
    print(f"   colour PSNR (visible pixels) {vae['rgb_psnr_visible_after']:.2f} dB, identity PSNR "
          f"(frozen decoder, adjusted vs plain latent) {vae['identity_psnr_after']:.2f} dB")
    print(f"   pictures {vae['root']}/images (step 0 = before), export {vae['export']}")
    print("2. diffusion on adjusted latents")
    print(f"   held-out loss (eq. 7)  before {diffusion['val_loss_before']:.4f}  after {diffusion['val_loss_after']:.4f}")
    print(f"   premise: before fine-tuning, the pretrained UNet's held-out loss on adjusted latents is "
          f"{diffusion['adjusted_to_plain_before']:.3f}x its loss on the plain latents "
          f"({diffusion['val_loss_plain_before']:.4f})")
    print(f"   samples during training {diffusion['root']}/samples, checkpoint {diffusion['checkpoint']}")
    print(f"3. text -> RGBA: {predictions} (PNGs with alpha, checkerboard previews, contact_sheet.png)")
    print("4. joint layers (foreground, background, blend; shared attention)")
    print(f"   held-out loss (eq. 9)  before {joint['val_loss_before']:.4f}  after {joint['val_loss_after']:.4f}; per layer "
          + ", ".join(f"{name} {pair[0]:.3f} -> {pair[1]:.3f}" for name, pair in joint["per_layer"].items()))
    print(f"   layer sets: {layer_sets} (each layer as PNG, a layered .psd, previews, contact_sheet.png)")
    for mode, terms in joint["per_mode"].items():
        print(f"   mode {mode}: " + ", ".join(f"{name} {pair[0]:.3f} -> {pair[1]:.3f}" for name, pair in terms.items()))
    print(f"   backgrounds for a held-out foreground: {conditional['given_foreground']}; a composition of three "
          f"foregrounds over a held-out background, layer by layer: {conditional['composition']}")
    print("5. DiffuMatting (objects on a green screen; green-background and boundary losses)")
    print(f"   held-out loss  before {matting['val_loss_before']:.4f}  after {matting['val_loss_after']:.4f}; per term "
          + ", ".join(f"{name} {pair[0]:.3f} -> {pair[1]:.3f}" for name, pair in matting["terms"].items()))
    print(f"   held-out alpha MSE on the decoded composites: chroma key {matting['alpha_mse_key']:.4f}, matting head "
          f"{matting['alpha_mse_head'][0]:.4f} -> {matting['alpha_mse_head'][1]:.4f}")
    print(f"   green screens and cutouts: {green_screens} (screen/, alpha_head/, refined alpha/, RGBA cutouts, previews, "
          "mattes.png, contact_sheet.png)")
    print(f"report {report_path} (open it in a browser)")
    print(f"summary {summary_path}; W&B offline runs under outputs/demo/*/wandb; took {summary['seconds']} s")
    if vae["alpha_mse_improvement"] < REQUIRED_ALPHA_IMPROVEMENT:
        print(f"FAILED: alpha MSE improved only {vae['alpha_mse_improvement']:.1f}x "
              f"(expected at least {REQUIRED_ALPHA_IMPROVEMENT}x)")
        return 1
    for name, stage in (("diffusion", diffusion), ("joint-layer", joint), ("DiffuMatting", matting)):
        if not stage["val_loss_after"] < stage["val_loss_before"]:
            print(f"FAILED: the {name} stage did not lower the held-out loss")
            return 1
    return 0


if __name__ == "__main__":
    for name in ("lightning.pytorch", "lightning.fabric"):  # their per-stage info lines (seed, devices, restores)
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.exit(run_demo(sys.argv[1:]))
