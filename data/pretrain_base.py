"""Pretrain the embedded tiny SDXL into ``embedded:tiny-sdxl-pretrained``: the small "pretrained
base" the demo fine-tunes, as LayerDiffusion fine-tunes SDXL (arXiv 2402.17113, sec. 3.1-3.2).

    python -m data pretrain-base layerdiff/models/tiny_sdxl_pretrained.safetensors

The method's premise is a base that already knows images: a VAE whose decoder ``D*`` turns
latents back into pictures, and a UNet that generates them. The plain embedded model has
neither (its UNet is random, its VAE fitted for seconds), so this recipe, deterministic on one
CPU thread, trains both on ordinary RGB images of the demo's world:

1. the VAE, further, as an autoencoder (reconstruction + KL, as SD's): the scikit-image photo
   crops of ``layerdiff.models.tiny_vae`` mixed with the demo's training emoji as the method
   encodes them (composited over photos, and premultiplied onto grey);
2. the UNet from scratch on the VAE's latents of RGB images with captions: each training
   emoji over its photo (the blend caption) and over a plain colour (``"... on a plain
   background"``), with caption dropout so classifier-free guidance works; the diffusion step
   is ``layerdiff.diffusion``'s, the text encoders stay as built (frozen).

The result is one fp16 safetensors file of the VAE and UNet weights (``vae.*``, ``unet.*``)
whose metadata holds the recipe and the held-out measurements (validation emoji never seen in
training; a photo never fitted on). ``layerdiff.models.tiny`` builds the pretrained model from
it; a test checks that the committed file matches this recipe and measures its quality again.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save

from data.datamodule import ShardDataModule
from data.demo import ensure_demo_shards
from layerdiff import diffusion
from layerdiff.batches import LayeredBatch
from layerdiff.files import write_atomically
from layerdiff.models import codec
from layerdiff.models.base import TextEncoders
from layerdiff.models.text import PromptConditioning, PromptEmbeddings, encode_prompts
from layerdiff.models.tiny import PRETRAINED_FORMAT, assemble_tiny_sdxl
from layerdiff.models.tiny_vae import (
    VAE_HELD_OUT_PHOTO,
    VAE_IMAGE_SIZE,
    fit_tiny_vae,
    load_photo,
    random_crop,
    torch_threads,
)
from layerdiff.rgba import premultiply_on_grey

PLAIN_BACKGROUND_SUFFIX = " on a plain background"


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything the pretrained weights depend on (with the tiny model's build recipe)."""

    seed: int = 0
    vae_steps: int = 1200
    vae_emoji_fraction: float = 0.5  # of each VAE batch: demo emoji composites, the rest photo crops
    unet_steps: int = 2000
    unet_batch_size: int = 32
    unet_learning_rate: float = 1e-3
    unet_warmup_steps: int = 100
    caption_dropout: float = 0.1
    train_samples: int = 2000  # the demo's training split, all of it
    threads: int = 1  # one thread: the same weights on any machine with the same CPU


@dataclass
class RGBImages:
    """Images in [0, 1] ``[N, 3, H, W]`` with one caption each."""

    pixels: torch.Tensor
    captions: list[str]


def demo_images(split: str, limit: int | None, seed: int) -> tuple[RGBImages, torch.Tensor]:
    """The demo split's RGB images with captions (its N blends, then its N foregrounds over a
    plain colour) and its foregrounds premultiplied onto grey ``[N, 3, H, W]`` in [-1, 1], as
    the method encodes them."""
    root = ensure_demo_shards(VAE_IMAGE_SIZE)
    datamodule = ShardDataModule(str(root / split), batch_size=64, num_workers=0, shuffle_buffer=0, require_layers=True)
    blends, blend_captions, plains, plain_captions, premultiplied = [], [], [], [], []
    generator = torch.Generator().manual_seed(seed)
    for tagged in datamodule.train_dataloader():
        batch: LayeredBatch = datamodule.on_before_batch_transfer(tagged, 0)  # float images in [0, 1]
        foreground, blend = batch.layer("foreground"), batch.layer("blend")
        colours = torch.rand(len(batch), 3, 1, 1, generator=generator)
        plain = foreground.rgb * foreground.alpha + colours * (1 - foreground.alpha)
        blends.append(blend.rgb)
        plains.append(plain)
        blend_captions += blend.caption
        plain_captions += [caption + PLAIN_BACKGROUND_SUFFIX for caption in foreground.caption]
        premultiplied.append(premultiply_on_grey(foreground.rgb, foreground.alpha))
        if limit is not None and sum(len(chunk) for chunk in premultiplied) >= limit:
            break
    return RGBImages(torch.cat(blends + plains), blend_captions + plain_captions), torch.cat(premultiplied)


def pretrain(recipe: PretrainRecipe, log=print) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the tiny model's VAE and UNet by ``recipe``; their fp16 state and the held-out metrics."""
    with torch_threads(recipe.threads), torch.random.fork_rng(devices=[]):
        return _pretrain(recipe, log)


def _pretrain(recipe: PretrainRecipe, log) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    with tempfile.TemporaryDirectory() as tokenizers:  # the tokenizers are read into memory
        pipeline = assemble_tiny_sdxl(tokenizer_root=Path(tokenizers), seed=recipe.seed)
    vae, unet = pipeline.vae, pipeline.unet
    train, train_premultiplied = demo_images("train", recipe.train_samples, recipe.seed)
    val, val_premultiplied = demo_images("val", None, recipe.seed + 1)
    log(f"demo images: {len(train.captions)} train, {len(val.captions)} held out")

    start = time.perf_counter()
    blends = len(train_premultiplied)  # the first N images are the blends
    emoji_bank = torch.cat([train.pixels[:blends] * 2 - 1, train_premultiplied])
    vae_losses = fit_tiny_vae(vae, steps=recipe.vae_steps, seed=recipe.seed, extra_images=emoji_bank,
                              extra_fraction=recipe.vae_emoji_fraction)
    last = vae_losses[-50:]
    log(f"VAE: {recipe.vae_steps} steps, loss {vae_losses[0]:.4f} -> {sum(last) / len(last):.4f} "
        f"in {time.perf_counter() - start:.0f} s")
    vae.requires_grad_(False).eval()

    text_encoders = TextEncoders((pipeline.tokenizer, pipeline.tokenizer_2), (pipeline.text_encoder, pipeline.text_encoder_2))
    train_latents, train_prompts = encode_images(vae, text_encoders, train)
    val_latents, val_prompts = encode_images(vae, text_encoders, val)
    empty = encode_prompts(text_encoders, [""])
    conditioning = PromptConditioning(text_encoders)
    scheduler = pipeline.scheduler
    random_unet_loss = held_out_denoising_loss(unet, scheduler, conditioning, val_latents, val_prompts, recipe.seed)

    start = time.perf_counter()
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_learning_rate, weight_decay=1e-2)
    steps, warmup = recipe.unet_steps, recipe.unet_warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(recipe.seed)
    losses = []
    for step in range(steps):
        rows = torch.randint(len(train_latents), (recipe.unet_batch_size,), generator=generator)
        latents, hidden, pooled = train_latents[rows], train_prompts.hidden[rows], train_prompts.pooled[rows]
        draws = diffusion.draw(generator, [latents.shape], scheduler.config.num_train_timesteps, recipe.caption_dropout)
        prompts = PromptEmbeddings(hidden, pooled).select(draws.drop[0], empty)
        loss = _denoising_loss(unet, scheduler, conditioning, latents, prompts, draws.noise[0], draws.timesteps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            log(f"UNet step {step + 1}/{steps}: loss {sum(losses[-250:]) / 250:.4f}")
    unet.eval().requires_grad_(False)
    log(f"UNet: {steps} steps in {time.perf_counter() - start:.0f} s")

    metrics = {
        "vae_psnr_held_out_photo": vae_psnr(vae, held_out_photo_crops(recipe.seed)),
        "vae_psnr_held_out_emoji_blend": vae_psnr(vae, val.pixels[: len(val_premultiplied)] * 2 - 1),
        "vae_psnr_held_out_emoji_on_grey": vae_psnr(vae, val_premultiplied),
        "unet_held_out_loss_random": random_unet_loss,
        "unet_held_out_loss_pretrained": held_out_denoising_loss(unet, scheduler, conditioning, val_latents, val_prompts,
                                                                 recipe.seed),
    }
    state = {f"vae.{name}": value for name, value in vae.state_dict().items()}
    state |= {f"unet.{name}": value for name, value in unet.state_dict().items()}
    return {name: value.detach().to(torch.float16).contiguous() for name, value in state.items()}, metrics


@torch.no_grad()
def encode_images(vae, text_encoders, images: RGBImages) -> tuple[torch.Tensor, PromptEmbeddings]:
    """The images' diffusion-scale latents and their captions' embeddings."""
    latents = torch.cat([codec.diffusion_latent(vae, codec.encode_opaque(vae, chunk))
                         for chunk in images.pixels.split(256)])
    return latents, encode_prompts(text_encoders, images.captions)


def _denoising_loss(unet, scheduler, conditioning: PromptConditioning, latents, prompts, noise, timesteps) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod
    noisy = diffusion.add_noise(alphas_cumprod, latents, noise, timesteps)
    size = VAE_IMAGE_SIZE  # whole images, uncropped
    added = conditioning.added_conditions(prompts, torch.tensor([[size, size]]).expand(len(latents), 2),
                                          torch.zeros(len(latents), 2, dtype=torch.int64), (size, size))
    prediction = unet(noisy, timesteps, encoder_hidden_states=prompts.hidden, added_cond_kwargs=added).sample
    target = diffusion.target(scheduler.config.prediction_type, alphas_cumprod, latents, noise, timesteps)
    return diffusion.denoising_loss(prediction, target)


@torch.no_grad()
def held_out_denoising_loss(unet, scheduler, conditioning: PromptConditioning, latents, prompts, seed: int,
                            repeats: int = 4) -> float:
    """The mean noise-prediction MSE over ``repeats`` fixed draws of timestep and noise per image."""
    generator = torch.Generator().manual_seed(seed + 12345)
    total = 0.0
    for _ in range(repeats):
        draws = diffusion.draw(generator, [latents.shape], scheduler.config.num_train_timesteps)
        total += _denoising_loss(unet, scheduler, conditioning, latents, prompts, draws.noise[0], draws.timesteps).item()
    return total / repeats


def held_out_photo_crops(seed: int, count: int = 64) -> torch.Tensor:
    photo, generator = load_photo(VAE_HELD_OUT_PHOTO), torch.Generator().manual_seed(seed)
    return torch.stack([random_crop(photo, generator) for _ in range(count)])


@torch.no_grad()
def vae_psnr(vae, images: torch.Tensor) -> float:
    """Reconstruction PSNR (dB) of images in [-1, 1] through the posterior mean, on the [0, 1] scale."""
    reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = F.mse_loss(reconstruction * 0.5 + 0.5, images * 0.5 + 0.5).item()
    return 10 * math.log10(1.0 / mse)


def write_pretrained(path, recipe: PretrainRecipe, log=print) -> dict[str, float]:
    """Run ``pretrain`` and write its weights atomically to ``path``, recipe and metrics in the metadata."""
    state, metrics = pretrain(recipe, log)
    metadata = {"format": PRETRAINED_FORMAT, "recipe": json.dumps(asdict(recipe), sort_keys=True),
                "metrics": json.dumps(metrics, sort_keys=True)}
    write_atomically(path, save(state, metadata=metadata))
    return metrics
