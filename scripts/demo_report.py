"""The demo's results page, ``outputs/demo/index.html``: each stage's before/after pictures where
the recipes' callbacks wrote them, the contact sheets of generation, the summary numbers, and
training curves of the metrics a ``CSVLogger`` beside W&B recorded for each training stage."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from layerdiff.report import Picture, Section, read_metrics_csv, write_report

METRICS_FOLDER = "metrics"  # <stage root>/metrics/metrics.csv
CURVE_PREFIXES = ("train/", "val/")  # the objectives and held-out metrics; not learning rates or throughput


def add_metrics_logger(trainer: Trainer) -> None:
    """Also log the stage's metrics to ``<default_root_dir>/metrics/metrics.csv``, which the page
    draws its curves from (W&B keeps them in its binary run file)."""
    trainer.loggers = [*trainer.loggers, CSVLogger(trainer.default_root_dir, name="", version=METRICS_FOLDER)]


def before_and_after(directory: Path, prefix: str, last_step: int) -> tuple[Path, Path]:
    """Of the pictures ``<prefix><step>.png`` in ``directory``: the one at step 0 and the latest at
    or before ``last_step`` (a longer earlier run may have left later ones)."""
    stems = {path.stem[len(prefix) :]: path for path in directory.glob(f"{prefix}*.png")}
    found = {int(digits): path for digits, path in stems.items() if digits.isdigit()}
    if 0 not in found:
        raise FileNotFoundError(f"No step-0 picture {prefix}<step>.png in {directory}: did the stage run from step 0?")
    return found[0], found[max(step for step in found if step <= last_step)]


def step_of(path: Path, prefix: str) -> int:
    return int(path.stem[len(prefix) :])


def curves(root: str) -> dict[str, list[tuple[int, float]]]:
    metrics = read_metrics_csv(Path(root) / METRICS_FOLDER / "metrics.csv")
    return {name: series for name, series in sorted(metrics.items()) if name.startswith(CURVE_PREFIXES)}


def pair(before: Path, after: Path, prefix: str, what: str) -> list[Picture]:
    return [Picture(before, f"{what}, step 0 (before training)"), Picture(after, f"{what}, step {step_of(after, prefix)}")]


def write_demo_report(summary: dict, directory: Path) -> Path:
    """``<directory>/index.html`` from the demo's summary (``demo_summary.json``'s content)."""
    sections = []
    vae = summary["transparent_vae"]
    images = Path(vae["root"]) / "images"
    sections.append(Section(
        "1. Latent transparency (transparent VAE)",
        "Rows: input on a checkerboard, reconstruction, frozen decoder on the adjusted latent; "
        "alpha maps: input alpha, predicted alpha, absolute error.",
        {"held-out alpha MSE before": vae["alpha_mse_before"], "held-out alpha MSE after": vae["alpha_mse_after"],
         "alpha MSE improvement (x)": vae["alpha_mse_improvement"],
         "colour PSNR, visible pixels (dB)": vae["rgb_psnr_visible_after"],
         "identity PSNR, frozen decoder (dB)": vae["identity_psnr_after"], "training steps": vae["steps"]},
        pair(*before_and_after(images, "reconstruction_step", vae["steps"]), "reconstruction_step", "reconstructions")
        + pair(*before_and_after(images, "alpha_step", vae["steps"]), "alpha_step", "alpha maps"),
        curves(vae["root"]),
    ))  # fmt: skip
    diffusion = summary["latent_diffusion"]
    sections.append(Section(
        "2. Diffusion on adjusted latents",
        "Fixed prompts and seeds sampled during training: images on a checkerboard, each row followed by its alpha.",
        {"held-out loss before": diffusion["val_loss_before"], "held-out loss after": diffusion["val_loss_after"],
         "training steps": diffusion["steps"]},
        pair(*before_and_after(Path(diffusion["root"]) / "samples", "step_", diffusion["steps"]), "step_", "samples"),
        curves(diffusion["root"]),
    ))  # fmt: skip
    sections.append(Section(
        "3. Text to RGBA", "The generated images on a checkerboard.",
        pictures=[Picture(Path(summary["predictions"]) / "contact_sheet.png", f"contact sheet of {summary['predictions']}")],
    ))  # fmt: skip
    if "joint_layers" in summary:
        joint = summary["joint_layers"]
        per_layer = {f"held-out loss {layer}": f"{losses[0]:.4g} \u2192 {losses[1]:.4g}"
                     for layer, losses in joint["per_layer"].items()}
        per_mode = {f"{mode}: {layer}": f"{losses[0]:.4g} \u2192 {losses[1]:.4g}"
                    for mode, terms in joint.get("per_mode", {}).items() for layer, losses in terms.items()}
        conditional = summary.get("conditional")
        extra = [] if conditional is None else [
            Picture(Path(conditional["given_foreground"]) / "contact_sheet.png",
                    "backgrounds (and blends) generated for a held-out foreground"),
            Picture(Path(conditional["composition"]) / "contact_sheet.png",
                    "three foregrounds composed one by one over a held-out background (layers, then the blend)")]
        sections.append(Section(
            "4. Joint and conditional layers (foreground, background, blend)",
            "Each row: the layers (transparent ones on a checkerboard), then composited top over bottom. The model "
            "trains jointly and with one layer given (held-out loss per mode: a given layer should lower the others'); "
            "then it generates backgrounds around a given foreground and composes layers one by one.",
            {"held-out loss before": joint["val_loss_before"], "held-out loss after": joint["val_loss_after"], **per_layer,
             **per_mode, "training steps": joint["steps"]},
            pair(*before_and_after(Path(joint["root"]) / "samples", "step_", joint["steps"]), "step_", "layer samples")
            + [Picture(Path(summary["layer_sets"]) / "contact_sheet.png", f"contact sheet of {summary['layer_sets']}")]
            + extra,
            curves(joint["root"]),
        ))  # fmt: skip
    if "diffumatting" in summary:
        matting = summary["diffumatting"]
        sections.append(Section(
            "5. DiffuMatting (objects on a green screen)",
            "Fixed prompts and seeds sampled during training, their matte read off by the matting head and refined "
            "against the green (GreenPost), on a checkerboard; then the generated green screens: per row the screen, "
            "its chroma key, the head's matte, the refined matte and the cutout.",
            {"held-out loss before": matting["val_loss_before"], "held-out loss after": matting["val_loss_after"],
             **{f"held-out {term} loss": f"{pair[0]:.4g} \u2192 {pair[1]:.4g}" for term, pair in matting["terms"].items()},
             "held-out alpha MSE, chroma key": matting["alpha_mse_key"],
             "held-out alpha MSE, matting head": "{:.4g} \u2192 {:.4g}".format(*matting["alpha_mse_head"]),
             "training steps": matting["steps"]},
            pair(*before_and_after(Path(matting["root"]) / "samples", "step_", matting["steps"]), "step_", "samples")
            + [Picture(Path(summary["green_screens"]) / "mattes.png", "screen | chroma key | head | refined | cutout"),
               Picture(Path(summary["green_screens"]) / "contact_sheet.png", f"contact sheet of {summary['green_screens']}")],
            curves(matting["root"]),
        ))  # fmt: skip
    numbers = {"demo seconds": summary["seconds"]}
    return write_report(directory / "index.html", "layerdiff demo on the embedded tiny SDXL", sections, numbers)
