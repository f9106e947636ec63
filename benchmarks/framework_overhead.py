"""What the framework costs per step: ``train.py fit`` against a bare PyTorch loop doing the
same computation, on image shards and on cached latents.

    python -m benchmarks.framework_overhead                 # 8 interleaved rounds, writes BENCHMARKS.md
    python -m benchmarks.framework_overhead --rounds 1 --steps 12 --no-write   # smoke run

Both sides train the embedded tiny SDXL (64 px demo shards, batch 16, rank-16 LoRA on the
released targets, fp32, AdamW, gradient clipping at 1.0, EMA, one thread, one loader worker)
in a fresh process each: ours through ``train.py fit`` with the latent-diffusion recipe and its
demo overlay, the bare loop here (webdataset + PIL for the data, the same codec, text
encoders, diffusion step and optimizer calls; no Lightning). Each run reports its steady-state
step time (median over the steps after ``--warmup``) and the wall time from launch to the end
of its first step. The sides take turns within a round, so load from elsewhere hits them alike;
the ratios are paired within a round and summarised by their median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from benchmarks.common import machine_description, report

SECTION_TITLE = "## Framework overhead"
REPO = Path(__file__).resolve().parent.parent
RECIPE = ("configs/latent_diffusion.yaml", "configs/demo/latent_diffusion.yaml")
BATCH_SIZE = 16
LORA_RANK = 16
DEMO_SHARDS = "embedded:openmoji-demo-64/train"
BARE_LOOP_NOTE = (
    "The bare loop is `bare_loop` in the script (webdataset + PIL, captions tokenized in the loader worker as "
    "ours and diffusers' are, the same codec, text encoders, diffusion step, AdamW, clipping and EMA lerp, "
    "no Lightning). diffusers' "
    '`train_text_to_image_lora_sdxl.py` is not compared: its examples are not installable here. '
    'First-step times include start-up (imports, argument parsing, W&B offline set-up, the samples the '
    'recipe draws at step 0).'
)
DEMO_SHARDS_USED = 3  # enough samples for one epoch of --steps at most 45, without caching them all


class StepClock(Callback):
    """Writes the wall-clock time (``time.time()``) at the end of every training step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.ends.append(time.time())

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.write_text(json.dumps(self.ends))


def summarise(launched: float, ends: list[float], warmup: int) -> dict[str, float]:
    steps = [later - earlier for earlier, later in zip(ends, ends[1:])][warmup:]
    return {"step_s": statistics.median(steps), "first_step_s": ends[0] - launched}


# -- the two sides ----------------------------------------------------------------------------


def ours(shards: str, transparent_vae: Path, steps: int, root: Path) -> list[str]:
    clock = root / "clock.json"
    return [
        sys.executable, "train.py", "fit", *(argument for config in RECIPE for argument in ("-c", config)),
        f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
        f"--model.init_args.transparent_vae={transparent_vae}", f"--model.init_args.lora_rank={LORA_RANK}",
        f"--data.init_args.train_shards={shards}", f"--data.init_args.val_shards={shards}",
        f"--data.init_args.batch_size={BATCH_SIZE}",
        "--trainer.callbacks+=benchmarks.framework_overhead.StepClock", f"--trainer.callbacks.path={clock}",
    ]  # fmt: skip


def bare(shards: str, transparent_vae: Path, steps: int, root: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.framework_overhead", "--bare-loop", shards, str(transparent_vae),
            str(steps), str(root / "clock.json")]


def bare_loop(shards: str, transparent_vae: str, steps: int, clock: str) -> None:
    """The same training as the recipe, written as a plain loop."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from data.spec import resolve_shards
    from layerdiff import diffusion
    from layerdiff.formats.layerdiffuse_vae import load_transparency_models
    from layerdiff.models import codec
    from layerdiff.models.base import load_scheduler, load_text_encoders, load_unet, load_vae, resolve_pretrained
    from layerdiff.models.lora import DEFAULT_ADAPTER, RELEASED_LORA_TARGETS, add_lora
    from layerdiff.models.text import PromptEmbeddings, encode_prompts, encode_tokens, sdxl_time_ids, tokenize_prompts

    torch.manual_seed(0)
    base = resolve_pretrained("embedded:tiny-sdxl")
    vae, unet, scheduler = load_vae(base).requires_grad_(False), load_unet(base), load_scheduler(base)
    text_encoders = load_text_encoders(base)
    for encoder in text_encoders.encoders:
        encoder.requires_grad_(False)
    encoder, _ = load_transparency_models(transparent_vae)
    encoder.requires_grad_(False)
    unet.requires_grad_(False).train()  # as the module trains it (from_pretrained returns eval mode)
    add_lora(unet, DEFAULT_ADAPTER, LORA_RANK, None, RELEASED_LORA_TARGETS)
    trained = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=1e-2)
    averages = [parameter.detach().clone() for parameter in trained]
    generator = torch.Generator().manual_seed(0)
    empty = encode_prompts(text_encoders, [""])

    def to_sample(sample):
        metadata = json.loads(sample["json"])
        sizes = torch.tensor(metadata["original_size"]), torch.tensor(metadata["crop_top_left"])
        if "latent.npy" in sample:  # cached: latent and prompt embeddings stored as .npy
            arrays = [torch.from_numpy(np.load(io.BytesIO(sample[name]))) for name in
                      ("latent.npy", "prompt_hidden.npy", "prompt_pooled.npy")]
            return (*arrays, *sizes)
        rgba = np.asarray(Image.open(io.BytesIO(sample["fg.png"])).convert("RGBA"), dtype=np.float32) / 255
        image = torch.from_numpy(rgba).permute(2, 0, 1)
        # Tokenized in the loader worker, as diffusers' script does.
        token_ids = torch.stack([ids[0] for ids in tokenize_prompts(text_encoders.tokenizers, [sample["txt"].decode()])])
        return (image[:3], image[3:], token_ids, *sizes)

    dataset = wds.WebDataset(resolve_shards(shards), shardshuffle=False, empty_check=False).map(to_sample)
    loader = torch.utils.data.DataLoader(dataset.batched(BATCH_SIZE), batch_size=None, num_workers=1)
    ends: list[float] = []
    for first, second, third, original_size, crop in loader:
        if third.is_floating_point():  # cached latents and prompt embeddings (else token ids)
            latents, prompts = first, PromptEmbeddings(second, third)
        else:
            with torch.no_grad():
                latents = codec.diffusion_latent(vae, codec.encode_adjusted(vae, encoder, first, second)[1])
            prompts = None
        draws = diffusion.draw(generator, [latents.shape], scheduler.config.num_train_timesteps, 0.1, 0.0)
        if prompts is None:
            prompts = encode_tokens(text_encoders, tuple(third.unbind(1)))
        if draws.drop[0].any():
            prompts = prompts.select(draws.drop[0], empty)
        noisy = diffusion.add_noise(scheduler.alphas_cumprod, latents, draws.noise[0], draws.timesteps)
        time_ids = sdxl_time_ids(original_size, crop, tuple(side * 8 for side in latents.shape[-2:]))
        prediction = unet(noisy, draws.timesteps, encoder_hidden_states=prompts.hidden,
                          added_cond_kwargs={"text_embeds": prompts.pooled, "time_ids": time_ids}).sample
        target = diffusion.target("epsilon", scheduler.alphas_cumprod, latents, draws.noise[0], draws.timesteps)
        loss = diffusion.denoising_loss(prediction, target, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch._foreach_lerp_(averages, [parameter.detach() for parameter in trained], 1e-4)
        ends.append(time.time())
        if len(ends) == steps:
            break
    Path(clock).write_text(json.dumps(ends))


# -- running them -------------------------------------------------------------------------------


def run(command: list[str], root: Path, warmup: int) -> dict[str, float]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
                   "WANDB_SILENT": "true"}
    launched = time.time()
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return summarise(launched, json.loads((root / "clock.json").read_text()), warmup)


def prepare(work: Path) -> tuple[Path, str, str]:
    """An export of a fresh transparency encoder, the demo shards and their cached latents."""
    from data.spec import resolve_shards
    from layerdiff.formats.layerdiffuse_vae import save_transparent_vae
    from layerdiff.models.base import resolve_pretrained
    from layerdiff.models.transparency import LatentTransparencyEncoder, TransparencyDecoder

    torch.manual_seed(0)
    export = work / "transparent_vae"
    save_transparent_vae(LatentTransparencyEncoder(), TransparencyDecoder(block_out_channels=(8, 8, 16, 16, 16, 16, 16)),
                         export)
    images = ",".join(resolve_shards(DEMO_SHARDS)[:DEMO_SHARDS_USED])
    cached = work / "cached"
    subprocess.run([sys.executable, "-m", "data", "cache-latents", images, str(cached), "--base-model",
                    resolve_pretrained("embedded:tiny-sdxl"), "--transparent-vae", str(export), "--text-embeddings"],
                   cwd=REPO, check=True, capture_output=True)
    return export, images, ",".join(resolve_shards(str(cached)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the step time")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("--bare-loop", nargs=4, metavar=("SHARDS", "TRANSPARENT_VAE", "STEPS", "CLOCK"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_loop:
        torch.set_num_threads(1)
        shards, transparent_vae, steps, clock = args.bare_loop
        bare_loop(shards, transparent_vae, int(steps), clock)
        return

    with tempfile.TemporaryDirectory() as work:
        export, images, cached = prepare(Path(work))
        paths = {"image shards": images, "cached latents": cached}
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for round_index in range(args.rounds):
            for path, shards in paths.items():
                sides = (("ours", ours), ("bare", bare))
                # Alternating which side runs first, so a drift in the machine's speed favours neither.
                for side, command in sides if round_index % 2 == 0 else sides[::-1]:
                    root = Path(work) / f"{side}-{path.replace(' ', '-')}-{round_index}"
                    root.mkdir()
                    outcome = run(command(shards, export, args.steps, root), root, args.warmup)
                    results.setdefault((path, side), []).append(outcome)
                    print(f"round {round_index} {path:15s} {side}: {outcome['step_s'] * 1e3:.1f} ms/step, "
                          f"first step at {outcome['first_step_s']:.1f} s", flush=True)

    load = os.getloadavg()
    lines = [
        SECTION_TITLE, "",
        f"`python -m benchmarks.framework_overhead --rounds {args.rounds} --steps {args.steps}` on "
        f"{machine_description()}, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) "
        f"at the end. Embedded tiny SDXL, 64 px, batch {BATCH_SIZE}, LoRA rank {LORA_RANK}, fp32, one thread, "
        "one loader worker; ratios paired within each round (the side that runs first alternates), then their "
        "median. " + BARE_LOOP_NOTE, "",
        "| data | ours ms/step | bare loop ms/step | ours / bare (median, min-max) | first step: ours / bare (s) |",
        "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for path in paths:
        mine, theirs = results[(path, "ours")], results[(path, "bare")]
        ratios = [a["step_s"] / b["step_s"] for a, b in zip(mine, theirs)]
        lines.append(
            f"| {path} | {statistics.median(r['step_s'] for r in mine) * 1e3:.1f} | "
            f"{statistics.median(r['step_s'] for r in theirs) * 1e3:.1f} | {statistics.median(ratios):.3f}x "
            f"({min(ratios):.3f}-{max(ratios):.3f}) | {statistics.median(r['first_step_s'] for r in mine):.1f} / "
            f"{statistics.median(r['first_step_s'] for r in theirs):.1f} |"
        )
    report("\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()
