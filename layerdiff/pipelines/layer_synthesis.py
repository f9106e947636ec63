"""Multi-layer samples by inpainting (LayerDiffusion arXiv:2402.17113 sec. 3.4, "Multi-layer Dataset").

From a transparent foreground and a prompt triple (foreground / whole image / background, the
background prompt saying "nothing", e.g. "nothing in a kitchen"), two inpainting passes with a
diffusers inpainting pipeline (SDXL or SD1.5, hub id or folder):

1. **blend**: every pixel whose alpha is below one is inpainted with the whole-image prompt;
   the foreground is then composited over the result with its alpha, so pixels the foreground
   covers fully keep its colour exactly (the pipeline redraws the whole image through the VAE);
2. **background**: the alpha is inverted and eroded by ``erosion_radius`` pixels (equivalently,
   the visible foreground dilated), and that region of the blend is inpainted with the
   background prompt; outside it the background is the blend itself, where the foreground is
   fully transparent, so there ``blend == foreground over background`` holds exactly.

Every sample has its own ``torch.Generator`` seeded with its seed, drawing the blend's noise and
then the background's, so a sample's images do not depend on which others share its batch
(up to floating-point rounding of batched kernels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoPipelineForInpainting, DiffusionPipeline, UNet2DConditionModel
from huggingface_hub import hf_hub_download
from scipy.ndimage import distance_transform_edt

from layerdiff.models.base import (
    MODEL_CONFIG_FILE,
    MODEL_INDEX_FILE,
    BaseModelNotFoundError,
    locate_component,
    unet_architecture,
)
from layerdiff.models.tiny_inpaint import INPAINT_UNET_IN_CHANNELS
from layerdiff.rgba import composite

# diffusers' pipelines need sides divisible by the VAE's downsampling factor.
SIZE_MULTIPLE = 8
INPAINTING_EXAMPLES = ("diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (SDXL)",
                       "stable-diffusion-v1-5/stable-diffusion-inpainting (SD1.5)",
                       "embedded:tiny-sdxl-inpaint (random weights, for trials)")


class NotAnInpaintingModelError(ValueError):
    """The model given for inpainting is another kind of model (e.g. a text-to-image one)."""


@dataclass(frozen=True)
class SynthesisSettings:
    """How every sample is inpainted; recorded in each sample's provenance.

    Attributes:
        size: side of the square samples in pixels (foregrounds are scaled to cover it and
            centre-cropped), a multiple of 8.
        steps: denoising steps of each inpainting pass (the pipeline runs ``steps * strength``).
        guidance_scale: classifier-free guidance of both passes.
        strength: how far the inpainted region is noised; the SDXL inpainting model's card
            advises just below 1.
        erosion_radius: pixels the inverted alpha is eroded by before the background pass:
            a margin around the object, so that its soft edges and shadow-free rim are
            inpainted too; the pipeline samples the mask at 1/8 resolution, so keep it >= 8
            at full size.
        negative_prompt: the negative prompt of both passes ("": none).
    """

    size: int = 1024
    steps: int = 25
    guidance_scale: float = 7.0
    strength: float = 0.99
    erosion_radius: int = 16
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.size <= 0 or self.size % SIZE_MULTIPLE:
            problems.append(f"size {self.size} must be a positive multiple of {SIZE_MULTIPLE}")
        if self.steps < 1:
            problems.append(f"steps {self.steps} must be at least 1")
        if not 0.0 < self.strength <= 1.0:
            problems.append(f"strength {self.strength} must be in (0, 1]")
        if self.erosion_radius < 0:
            problems.append(f"erosion radius {self.erosion_radius} must be >= 0 pixels")
        if problems:
            raise ValueError("synthesis settings: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def blend_masks(alpha: np.ndarray) -> np.ndarray:
    """Where the blend pass inpaints (1): every pixel of ``alpha`` ([B, 1, H, W], [0, 1]) below one."""
    return (alpha < 1.0).astype(np.float32)


def background_masks(alpha: np.ndarray, erosion_radius: int) -> np.ndarray:
    """Where the background pass inpaints (1): pixels within ``erosion_radius`` of a visible one.

    The inverted alpha (what stays) eroded by a disk of that radius: a pixel stays only when
    every visible pixel is farther than the radius (Euclidean distance).
    """
    masks = np.empty_like(alpha, dtype=np.float32)
    for index, image in enumerate(alpha[:, 0]):
        visible = image > 0
        if not visible.any():
            masks[index, 0] = 0.0
            continue
        distance_to_visible = distance_transform_edt(~visible)
        masks[index, 0] = (distance_to_visible <= erosion_radius).astype(np.float32)
    return masks


def load_inpainting_pipeline(model: str, *, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """The diffusers inpainting pipeline of ``model`` (hub id, ``save_pretrained`` folder or
    ``embedded:`` name), SDXL or SD1.5 by its model index, through ``from_pretrained``.

    Its UNet is checked first: an inpainting UNet takes 9 input channels; anything else raises
    ``NotAnInpaintingModelError`` naming the config it was read from.
    """
    try:
        source, local_only = locate_component(model, "unet", MODEL_CONFIG_FILE)
    except BaseModelNotFoundError as error:
        raise BaseModelNotFoundError(
            f"inpainting model {model!r} not found: {str(error).splitlines()[0]}\nGive --model a local diffusers folder "
            "(e.g. `hf download diffusers/stable-diffusion-xl-1.0-inpainting-0.1 --local-dir DIR` on a machine with "
            "internet), a Hub id in the Hugging Face cache, or embedded:tiny-sdxl-inpaint to try the machinery"
        ) from error
    unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", local_files_only=local_only)
    channels = unet_config.get("in_channels")
    if channels != INPAINT_UNET_IN_CHANNELS:
        where = _component_file(source, "unet", MODEL_CONFIG_FILE, local_only)
        raise NotAnInpaintingModelError(
            f"{model!r} is not an inpainting model: its UNet ({where}) takes {channels} input channels, an "
            f"inpainting UNet takes {INPAINT_UNET_IN_CHANNELS} (noisy latent 4 + mask 1 + masked-image latent 4). "
            f"Give an inpainting model with --model, e.g. {', '.join(INPAINTING_EXAMPLES)}"
        )
    source, local_only = locate_component(model, None, MODEL_INDEX_FILE)
    extra = {} if unet_architecture(unet_config) == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipeline = AutoPipelineForInpainting.from_pretrained(source, dtype=dtype, local_files_only=local_only, **extra)
    pipeline.set_progress_bar_config(disable=True)  # the synthesis run shows progress per batch
    return pipeline


def _component_file(source: str, subfolder: str, name: str, local_only: bool) -> str:
    """The local path of a located component file (a folder's, or the Hub cache's copy)."""
    if Path(source).is_dir():
        return str(Path(source) / subfolder / name)
    return hf_hub_download(source, name, subfolder=subfolder, local_files_only=True)


@dataclass
class SynthesizedLayers:
    """One batch's results, ``[B, 3, H, W]`` in [0, 1] on the CPU, float32."""

    blend: torch.Tensor
    background: torch.Tensor


class LayerSynthesizer:
    """Blend and background of foregrounds by two inpainting passes (see the module docstring)."""

    def __init__(self, pipeline: DiffusionPipeline, settings: SynthesisSettings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.architecture = unet_architecture(pipeline.unet.config)

    @torch.no_grad()
    def __call__(
        self,
        foregrounds: torch.Tensor,
        blend_prompts: list[str],
        background_prompts: list[str],
        seeds: list[int],
    ) -> SynthesizedLayers:
        """``foregrounds``: ``[B, 4, H, W]`` straight RGBA in [0, 1] at the settings' size."""
        size = self.settings.size
        if foregrounds.shape[1:] != (4, size, size):
            raise ValueError(f"foregrounds must be [B, 4, {size}, {size}] (the settings' size), got {list(foregrounds.shape)}")
        foregrounds = foregrounds.float().cpu()
        rgb, alpha = foregrounds[:, :3], foregrounds[:, 3:]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        # Under the mask the pipeline sees grey: what it gets there does not matter.
        known = composite(rgb, alpha, torch.full_like(rgb, 0.5))
        inpainted = self._inpaint(known, blend_masks(alpha.numpy()), blend_prompts, generators)
        blend = composite(rgb, alpha, inpainted)
        hole = background_masks(alpha.numpy(), self.settings.erosion_radius)
        inpainted = self._inpaint(blend, hole, background_prompts, generators)
        background = torch.where(torch.from_numpy(hole) > 0, inpainted, blend)
        return SynthesizedLayers(blend=blend, background=background)

    def _inpaint(self, images: torch.Tensor, masks: np.ndarray, prompts: list[str], generators: list) -> torch.Tensor:
        settings = self.settings
        size_conditions = {"original_size": (settings.size, settings.size), "target_size": (settings.size, settings.size)}
        device = self.pipeline.device
        result = self.pipeline(
            prompt=prompts,
            image=images.to(device),
            mask_image=torch.from_numpy(masks).to(device),
            height=settings.size,
            width=settings.size,
            strength=settings.strength,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            negative_prompt=[settings.negative_prompt] * len(prompts) if settings.negative_prompt else None,
            generator=generators,
            output_type="pt",
            **(size_conditions if self.architecture == "sdxl" else {}),
        ).images
        return result.float().cpu().clamp(0.0, 1.0)
