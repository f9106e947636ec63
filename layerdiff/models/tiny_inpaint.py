"""The embedded tiny SDXL inpainting model (``embedded:tiny-sdxl-inpaint``), built offline.

The layered-data synthesis (``python -m data synthesize-layers``, LayerDiffusion sec. 3.4)
inpaints with an SDXL inpainting model such as ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``.
Tests and demos need one without a model hub, loaded through the same ``from_pretrained`` call,
so this builds the real layout: a ``StableDiffusionXLInpaintPipeline`` folder whose UNet takes
9 input channels (the noisy latent 4 + the mask 1 + the masked image's latent 4, in that
order, as diffusers concatenates them) and whose other parts are the tiny SDXL's own (VAE,
both text encoders, generated tokenizers, scheduler), copied from its folder.

The UNet has the tiny SDXL UNet's architecture and **random weights** (seeded): it exercises
every code path and shape, it does not inpaint anything meaningful.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from layerdiff.models.tiny import make_unet

# Part of the cache folder name, beside the tiny SDXL's version: bump it when the build changes.
TINY_INPAINT_VERSION = 1

LATENT_CHANNELS = 4
MASK_CHANNELS = 1
# What diffusers' inpainting pipelines feed the UNet: latent, mask, masked-image latent.
INPAINT_UNET_IN_CHANNELS = LATENT_CHANNELS + MASK_CHANNELS + LATENT_CHANNELS


def make_inpaint_unet(seed: int) -> UNet2DConditionModel:
    """The tiny SDXL UNet's architecture with 9 input channels, random weights from ``seed``."""
    config = {**make_unet().config, "in_channels": INPAINT_UNET_IN_CHANNELS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(config)


def build_tiny_sdxl_inpaint(out_dir: Path, base_folder: Path, seed: int = 0) -> Path:
    """Write the inpainting model to ``out_dir`` atomically, with the parts of the tiny SDXL at
    ``base_folder`` (a ``save_pretrained`` folder) and a new 9-channel UNet; return ``out_dir``.

    As ``build_tiny_sdxl``: staged in a hidden sibling folder and renamed into place, so
    ``out_dir`` is complete or absent; ``FileExistsError`` if it exists (then it is complete).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(errno.EEXIST, "model folder already exists", str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        base = StableDiffusionXLPipeline.from_pretrained(base_folder, local_files_only=True)
        pipeline = StableDiffusionXLInpaintPipeline(
            vae=base.vae,
            text_encoder=base.text_encoder,
            text_encoder_2=base.text_encoder_2,
            tokenizer=base.tokenizer,
            tokenizer_2=base.tokenizer_2,
            unet=make_inpaint_unet(seed),
            scheduler=base.scheduler,
            # As the released SDXL inpainting model: six size/crop ids, no aesthetic score.
            requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=True,
        )
        pipeline.save_pretrained(staging)
        try:
            os.rename(staging, out_dir)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, "model folder appeared during the build", str(out_dir)) from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
