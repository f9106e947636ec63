"""Inference: text -> transparent (RGBA) images from a trained latent-transparency model.

A diffusers ``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline`` is assembled around the
parts a LightningModule already holds (its UNet with the trained peft adapter, the frozen VAE
and text encoders), so sampling is exactly diffusers' (schedulers, classifier-free guidance,
SDXL size conditioning). It stops at the latents (``output_type="latent"``); those are
decoded by the transparency decoder (``codec.decode_rgba``) instead of the plain VAE decode.

Community LoRAs in the diffusers/peft format stack on the same UNet as extra peft adapters,
each with its own weight, next to the trained adapter at weight 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import nn

from layerdiff.formats.lora import lora_file
from layerdiff.models import codec
from layerdiff.models.base import (
    SCHEDULER_CONFIG_FILE,
    Architecture,
    TextEncoders,
    detect_architecture,
    load_component,
)
from layerdiff.pipelines.community_lora import CommunityLora, IncompatibleLoraError, check_lora_fits
from layerdiff.pipelines.controlnet import ControlNetGuide, check_controlnet, control_image, load_controlnet

SchedulerName = Literal["euler", "euler_a", "dpm++", "dpm++_karras", "ddim"]
# Each sampler is its diffusers class plus the settings that make it that sampler; everything
# else (beta schedule, prediction type, timestep spacing) comes from the base model's config.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
}
# The transparency decoder's UNet halves the latent three more times.
SIZE_MULTIPLE = 64

# The components of a pipeline that LoRA files address by key prefix (diffusers' naming).
LORA_COMPONENTS: dict[Architecture, tuple[str, ...]] = {
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "sd15": ("unet", "text_encoder"),
}


def check_size(width: int, height: int) -> None:
    """Generated sizes must be multiples of ``SIZE_MULTIPLE`` (64)."""
    sides = {"width": width, "height": height}
    bad = [f"{name} {value}" for name, value in sides.items() if value <= 0 or value % SIZE_MULTIPLE]
    if bad:
        width, height = (max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE) for value in (width, height))
        raise ValueError(
            f"Image size: {' and '.join(bad)} is not a positive multiple of {SIZE_MULTIPLE}, which the "
            f"transparency decoder needs; use e.g. width {width}, height {height}."
        )


@dataclass
class GenerationSettings:
    """Sampling settings shared by a batch of prompts.

    Args:
        width: image width in pixels, a multiple of 64; ``None`` = the base model's native
            size (UNet sample size x VAE scale, as diffusers: 1024 for SDXL, 512 for SD1.5,
            64 for the embedded tiny model).
        height: image height in pixels, a multiple of 64; ``None`` as for ``width``.
        steps: denoising steps.
        guidance_scale: classifier-free guidance scale (1 = no guidance).
        negative_prompt: what to steer away from; empty = the model's unconditional
            embedding (SDXL: zeros, as diffusers' ``force_zeros_for_empty_prompt``).
        scheduler: the sampler, one of ``SCHEDULERS``.
        controlnet: a ControlNet steering the structure (:class:`ControlNetGuide`: model, control
            image, scale; for joint layers, the layer it steers), or ``None``.
    """

    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance_scale: float = 7.0
    negative_prompt: str = ""
    scheduler: SchedulerName = "euler"
    controlnet: ControlNetGuide | None = None

    def __post_init__(self) -> None:
        # an unset side stands for the native size, checked when resolved
        check_size(*(SIZE_MULTIPLE if side is None else side for side in (self.width, self.height)))
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1; got {self.steps}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")


@dataclass
class PromptBatch:
    """A batch of images to generate (what ``predict_step`` receives): parallel lists of
    their run positions, prompts and seeds, plus the settings they share."""

    indices: list[int]
    prompts: list[str]
    seeds: list[int]
    settings: GenerationSettings

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class GeneratedImage:
    """One generated transparent image and everything needed to make it again.

    ``rgb`` (``3 x H x W``) and ``alpha`` (``1 x H x W``) are float CPU tensors in [0, 1];
    colour is straight (not premultiplied). ``parameters`` holds the prompt, seed, settings,
    base model and LoRAs, as recorded in the PNG's metadata; ``extras`` further ``3 x H x W``
    images of the same generation, by name, that the writer saves beside it.
    """

    index: int
    prompt: str
    seed: int
    rgb: torch.Tensor
    alpha: torch.Tensor
    parameters: dict[str, Any]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. the green screen it was keyed from


def load_scheduler_config(base_model: str, revision: str | None = None) -> dict[str, Any]:
    """The base model's ``scheduler/scheduler_config.json`` as a dict."""
    return dict(load_component(DDPMScheduler.load_config, base_model, "scheduler", SCHEDULER_CONFIG_FILE, revision))


def make_scheduler(name: SchedulerName, base_config: dict[str, Any]) -> SchedulerMixin:
    """Sampler ``name`` on the base model's noise schedule (``from_config``, as diffusers'
    documented way of swapping schedulers)."""
    scheduler_class, settings = SCHEDULERS[name]
    return scheduler_class.from_config(base_config, **settings)


def build_pipeline(
    architecture: Architecture,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoders: TextEncoders,
    scheduler: SchedulerMixin,
) -> DiffusionPipeline:
    """A diffusers pipeline over the given (shared, not copied) components."""
    if architecture == "sdxl":
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoders.encoders[0],
            text_encoder_2=text_encoders.encoders[1],
            tokenizer=text_encoders.tokenizers[0],
            tokenizer_2=text_encoders.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,  # applies to decoded images only; we stop at latents
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoders.encoders[0],
            tokenizer=text_encoders.tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)  # Lightning shows progress per batch
    return pipeline


class TransparentImageGenerator:
    """Text -> RGBA images with a trained UNet and transparency decoder.

    The parts are shared with their owner (a LightningModule), not copied: device moves,
    checkpoint loads and peft adapters of the owner are seen here.

    Args:
        unet: the denoiser, with its trained peft adapter(s) if it is a LoRA fine-tune.
        vae: the frozen base VAE (its decoder feeds the transparency decoder).
        text_encoders: the base model's tokenizers and text encoders.
        transparent_decoder: the trained transparency decoder ``D``.
        base_model: the base model's name (for its scheduler config and the metadata).
        base_revision: hub revision of ``base_model``.
        decode_augmentation: decode with the released 8-way flip/rotation median.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: TextEncoders,
        transparent_decoder: nn.Module,
        base_model: str,
        base_revision: str | None = None,
        decode_augmentation: bool = False,
    ) -> None:
        self.architecture = detect_architecture(base_model, revision=base_revision)
        self.base_model = base_model
        self.base_revision = base_revision
        self.transparent_decoder = transparent_decoder
        self.decode_augmentation = decode_augmentation
        self.scheduler_config = load_scheduler_config(base_model, base_revision)
        self.pipeline = build_pipeline(
            self.architecture, unet, vae, text_encoders, make_scheduler("euler", self.scheduler_config)
        )
        # Adapters present now are the trained ones: always at full weight.
        self.trained_adapters = list(getattr(unet, "peft_config", {}))
        self.community_loras: dict[str, CommunityLora] = {}

    def add_community_lora(self, lora: CommunityLora) -> None:
        """Load ``lora`` onto the UNet (and text encoders, if it adapts them) as a new adapter.

        Raises ``FileNotFoundError`` for a missing file and ``IncompatibleLoraError`` when its
        layers do not match this base model, before anything is changed.
        """
        weights_path = lora_file(lora["path"])
        try:
            state_dict, _ = self.pipeline.lora_state_dict(str(weights_path))
        except (OSError, ValueError) as error:
            raise IncompatibleLoraError(f"Community LoRA {weights_path} could not be read as a LoRA: {error}") from error
        components = {name: getattr(self.pipeline, name) for name in LORA_COMPONENTS[self.architecture]}
        check_lora_fits(weights_path, state_dict, components, self.base_model, self.architecture)
        adapter_name = f"community_{len(self.community_loras)}"
        self.pipeline.load_lora_weights(str(weights_path), adapter_name=adapter_name)
        self.community_loras[adapter_name] = {"path": lora["path"], "weight": lora.get("weight", 1.0)}
        # Loading makes the new adapter the only active one; activate all with their weights.
        community_weights = [item["weight"] for item in self.community_loras.values()]
        self.pipeline.set_adapters(
            self.trained_adapters + list(self.community_loras),
            adapter_weights=[1.0] * len(self.trained_adapters) + community_weights,
        )

    def remove_community_loras(self) -> None:
        """Delete the community adapters again; the trained adapters stay active at weight 1."""
        if not self.community_loras:
            return
        self.pipeline.delete_adapters(list(self.community_loras))
        self.community_loras.clear()
        if self.trained_adapters:
            self.pipeline.set_adapters(self.trained_adapters)

    def model_parameters(self) -> dict[str, Any]:
        """What the images depend on besides prompt, seed and settings."""
        return {
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "loras": list(self.community_loras.values()),
            "decode_augmentation": self.decode_augmentation,
        }

    def _with_controlnet(self, settings: GenerationSettings) -> tuple[DiffusionPipeline, dict[str, Any]]:
        """The pipeline to sample with and its ControlNet arguments: diffusers' ControlNet pipeline
        over the same (shared) components when ``settings.controlnet`` is set."""
        if not settings.controlnet:
            return self.pipeline, {}
        guide = settings.controlnet
        unet = self.pipeline.unet
        controlnet = load_controlnet(guide["model"]).to(unet.device, unet.dtype)
        check_controlnet(controlnet, unet.config)
        kind = StableDiffusionXLControlNetPipeline if self.architecture == "sdxl" else StableDiffusionControlNetPipeline
        pipeline = kind.from_pipe(self.pipeline, controlnet=controlnet)
        pipeline.set_progress_bar_config(disable=True)
        image = control_image(guide["image"], settings.width, settings.height)
        return pipeline, {"image": image, "controlnet_conditioning_scale": float(guide.get("scale", 1.0))}

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Generated latents -> ``(alpha, rgb, extras)``: here the transparency decoder's RGBA."""
        alpha, rgb = codec.decode_rgba(self.pipeline.vae, self.transparent_decoder, latents, self.decode_augmentation)
        return alpha, rgb, {}

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: GenerationSettings,
        indices: Sequence[int] | None = None,
    ) -> list[GeneratedImage]:
        """One image per ``(prompt, seed)``; image ``i`` depends only on its own prompt and seed.

        The initial noise of each image comes from its own CPU ``torch.Generator`` seeded with
        its seed, so a seed gives the same image on any device and in any batch (up to
        floating-point rounding, which differs between batch sizes and devices).
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt.")
        indices = list(range(len(prompts))) if indices is None else list(indices)
        native = self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor
        settings = replace(
            settings,
            width=native if settings.width is None else settings.width,
            height=native if settings.height is None else settings.height,
        )
        self.pipeline.scheduler = make_scheduler(settings.scheduler, self.scheduler_config)
        pipeline, steering = self._with_controlnet(settings)
        latents = pipeline(
            **steering,
            prompt=list(prompts),
            negative_prompt=[settings.negative_prompt] * len(prompts) if settings.negative_prompt else None,
            width=settings.width,
            height=settings.height,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds],
            output_type="latent",
        ).images
        alpha, rgb, extras = self.decode(latents.to(self.pipeline.vae.dtype))
        alpha, rgb = alpha.float().cpu(), rgb.float().cpu()
        extras = {name: image.float().cpu() for name, image in extras.items()}
        shared = {**asdict(settings), **self.model_parameters()}
        return [
            GeneratedImage(
                index=index,
                prompt=prompt,
                seed=int(seed),
                rgb=rgb[row],
                alpha=alpha[row],
                parameters={"prompt": prompt, "seed": int(seed), **shared},
                extras={name: image[row] for name, image in extras.items()},
            )
            for row, (index, prompt, seed) in enumerate(zip(indices, prompts, seeds))
        ]
