"""DiffuMatting's two losses, ablated on the embedded default (arXiv:2403.06168 sec. 3.3-3.4).

    python -m benchmarks.diffumatting_ablation            # three fine-tunes + the untrained base, writes BENCHMARKS.md
    python -m benchmarks.diffumatting_ablation --no-write -- --trainer.max_steps=2   # smoke run

Each run is the demo's DiffuMatting recipe and overlay (same data, steps, seed), once with both
losses, once without the green-background loss, once without the boundary loss; the untrained
pretrained base is the fourth row. Every model then redraws the held-out validation composites
(emoji never trained on, over pure green, their captions) from ``--strength`` of the noise
schedule with DDIM and classifier-free guidance, the same noise per image for every model. On
the results, with the ground-truth alpha of the held-out composites:

* backing purity: the share of true background pixels within 0.1 (RGB distance, [0, 1]) of pure green;
* the plain chroma key's alpha (``layerdiff.keying``) against the true alpha: SAD, MSE, Grad, Conn
  (``layerdiff.metrics.matting``, whole image).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from lightning.pytorch.loggers import WandbLogger

from benchmarks.common import machine_description, report

SECTION_TITLE = "## DiffuMatting: the green-background and boundary losses, ablated"
REPO = Path(__file__).resolve().parent.parent
RECIPE = ["-c", "configs/diffumatting.yaml", "-c", "configs/demo/diffumatting.yaml"]
RUNS = {
    "both losses": [],
    "no green-background loss": ["--model.init_args.green_loss={weight: 0.0, downsampling: [2]}"],
    "no boundary loss": ["--model.init_args.boundary_loss={weight: 0.0}"],
}
GREEN = (0.0, 1.0, 0.0)


def build(arguments: list[str]):
    sys.path.insert(0, str(REPO))
    from train import LayerdiffCLI

    cli = LayerdiffCLI(args=[*RECIPE, *arguments], run=False)
    return cli.trainer, cli.model, cli.datamodule


def fine_tune(root: Path, overrides: list[str]):
    trainer, model, datamodule = build([f"--trainer.default_root_dir={root}", *overrides])
    trainer.fit(model, datamodule=datamodule)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    return model.eval()


def held_out_batches(datamodule, limit: int):
    datamodule.setup("validate")
    seen = 0
    for batch in datamodule.val_dataloader():
        batch = batch[0] if isinstance(batch, tuple) else batch
        yield batch
        seen += len(batch)
        if seen >= limit:
            return


@torch.no_grad()
def redraw(model, batch, strength: float, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """SDEdit: the composite noised to ``strength`` of the schedule, then denoised with DDIM."""
    from layerdiff import diffusion
    from layerdiff.models import codec

    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    start = int(strength * model.num_train_timesteps) - 1
    timesteps = scheduler.timesteps[scheduler.timesteps <= start]
    latents = codec.diffusion_latent(model.vae, codec.encode_opaque(model.vae, batch.rgb))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    latents = diffusion.add_noise(model.noise_scheduler.alphas_cumprod, latents, noise, timesteps[:1].expand(len(latents)))
    prompts = model.encode_prompts(batch.caption)
    empty = model.encode_prompts([""] * len(batch))
    both = type(prompts)(torch.cat([empty.hidden, prompts.hidden]),
                         None if prompts.pooled is None else torch.cat([empty.pooled, prompts.pooled]))
    size = tuple(side * model.vae_scale_factor for side in latents.shape[-2:])
    added = model.conditioning.added_conditions(both, torch.cat([batch.original_size] * 2),
                                                torch.cat([batch.crop_top_left] * 2), size)
    model.attention.stop()
    for t in timesteps:
        output = model.unet(torch.cat([latents] * 2), t, encoder_hidden_states=both.hidden, added_cond_kwargs=added).sample
        unconditional, conditional = output.chunk(2)
        latents = scheduler.step(unconditional + guidance * (conditional - unconditional), t, latents).prev_sample
    return codec.decode_opaque(model.vae, latents)


def measure(model, datamodule, args) -> dict[str, float]:
    from layerdiff.keying import backing_purity, chroma_key_alpha
    from layerdiff.metrics.matting import matting_metrics

    purity, metrics = [], matting_metrics()
    for index, batch in enumerate(held_out_batches(datamodule, args.images)):
        image = redraw(model, batch, args.strength, args.steps, args.guidance, seed=index)
        purity.append(backing_purity(image, batch.alpha == 0, GREEN))
        to_uint8 = lambda alpha: torch.from_numpy(np.rint(alpha[:, 0].numpy() * 255).astype(np.uint8))  # noqa: E731
        metrics.update(to_uint8(chroma_key_alpha(image, GREEN)), to_uint8(batch.alpha))
    scores = {name: float(value) for name, value in metrics.compute().items()}
    return {"purity": float(torch.cat(purity).nanmean()), **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="held-out composites redrawn per model")
    parser.add_argument("--strength", type=float, default=0.8, help="share of the noise schedule redrawn")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps over the whole schedule")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every run, e.g. --trainer.max_steps=50")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as work:
        _, base, datamodule = build([f"--trainer.default_root_dir={work}/base", *args.overrides])
        results["untrained base"] = measure(base.eval(), datamodule, args)
        print("untrained base:", results["untrained base"], flush=True)
        for name, overrides in RUNS.items():
            model = fine_tune(Path(work) / name.replace(" ", "-"), [*overrides, *args.overrides])
            results[name] = measure(model, datamodule, args)
            print(f"{name}:", results[name], flush=True)

    steps = "300 (the demo's)" if not args.overrides else " ".join(args.overrides)
    lines = [
        SECTION_TITLE, "",
        f"`python -m benchmarks.diffumatting_ablation` on {machine_description()}: the demo's DiffuMatting recipe "
        f"(full fine-tune of the pretrained tiny model, steps: {steps}, seed 0) with each loss switched off in turn. "
        f"Each model redraws {args.images} held-out composites from {args.strength:.0%} of the noise schedule (DDIM, "
        f"{args.steps} steps over the schedule, guidance {args.guidance}, the same noise per image for every model). "
        "Purity: share of true background pixels within 0.1 of pure green. SAD, MSE, Grad, Conn: the plain chroma "
        "key's alpha of the redrawn image against the true alpha (DIM definitions, whole image; lower is better).", "",
        "| model | backing purity | SAD | MSE | Grad | Conn |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, scores in results.items():
        lines.append(f"| {name} | {scores['purity']:.3f} | {scores['sad']:.3f} | {scores['mse']:.4f} | "
                     f"{scores['grad']:.3f} | {scores['conn']:.3f} |")
    lines += ["", reading(results)]
    report("\n".join(lines) + "\n", write=not args.no_write)


def reading(results: dict[str, dict[str, float]]) -> str:
    """What the table says about each loss, in words (one seed: differences of a few hundredths are noise)."""
    both, base = results["both losses"], results["untrained base"]
    no_green, no_boundary = results["no green-background loss"], results["no boundary loss"]

    def effect(without: dict, metric: str, higher_is_better: bool) -> str:
        change = both[metric] - without[metric]
        better = change > 0 if higher_is_better else change < 0
        verdict = "about equal" if abs(change) < 0.01 * abs(without[metric]) else "better" if better else "worse"
        return f"{without[metric]:.3f} -> {both[metric]:.3f} ({verdict})"

    return (f"Reading it (one seed per row): fine-tuning on green composites raises backing purity from "
            f"{base['purity']:.3f} (untrained) to {both['purity']:.3f} with both losses. Adding the "
            f"green-background loss changes purity {effect(no_green, 'purity', True)} and SAD "
            f"{effect(no_green, 'sad', False)}; adding the boundary loss changes purity "
            f"{effect(no_boundary, 'purity', True)}, SAD {effect(no_boundary, 'sad', False)} and Grad "
            f"{effect(no_boundary, 'grad', False)}. The tiny UNet has cross-attention at one size only (4 x 4 maps of "
            "a 64 px image), so the green loss supervises 16 cells per image here; the paper's claim is about SD at "
            "512-1024 px and remains untested by this table.")


if __name__ == "__main__":
    main()
