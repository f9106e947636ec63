"""Inference for joint layers (LayerDiffusion arXiv:2402.17113 sec. 3.3): a prompt per layer ->
one layer set per seed (transparent foreground, background, blend, ...), all layers of a sample
denoised together by the UNet with its layer-sharing units; or, conditionally, some layers given
as images and the others generated around them.

A given layer is prepared exactly as training prepared it (``read_layer_image``: the shards'
crop, padding and 8-bit rounding; ``codec.layer_latent``) and enters every step of every sampler
as its clean latent at t = 0 (``diffusion.given_layers``), bypassing the sampler's input scaling,
in the unconditional branch of classifier-free guidance as in the conditional one.

The loop is written out rather than a diffusers pipeline's, because each layer has its own
prompt, its own negative prompt and its own guidance scale. It uses diffusers' schedulers
(``make_scheduler``: Euler, Euler ancestral, DPM++, DDIM), and the unconditional input is the
empty caption's embedding, the same the training's caption dropout used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from torch import nn

from layerdiff import diffusion
from layerdiff.models import codec
from layerdiff.models.base import TextEncoders, detect_architecture
from layerdiff.models.control_encoder import CONTROL_KWARG
from layerdiff.models.conv_in import LATENT_CHANNELS
from layerdiff.models.text import PromptConditioning, PromptEmbeddings
from layerdiff.pipelines.controlnet import check_controlnet, control_image, controlnet_residuals, load_controlnet
from layerdiff.pipelines.transparent import GenerationSettings, load_scheduler_config, make_scheduler
from layerdiff.rgba import load_rgba, prepare_foreground, resize_and_crop


@dataclass
class LayerPromptBatch:
    """Layer sets to generate: per sample its run position, a prompt per layer name and a seed;
    ``guidance`` optionally overrides ``settings.guidance_scale`` per layer; ``given`` maps layers
    given as images (an image file, the same for every sample) to their paths."""

    indices: list[int]
    prompts: list[dict[str, str]]
    seeds: list[int]
    settings: GenerationSettings
    guidance: dict[str, float] = field(default_factory=dict)
    given: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class GeneratedLayers:
    """One generated layer set: ``layers`` maps each name to a float CPU tensor in [0, 1],
    ``4 x H x W`` straight RGBA for transparent layers, ``3 x H x W`` RGB for opaque ones."""

    index: int
    seed: int
    prompts: dict[str, str]
    layers: dict[str, torch.Tensor]
    parameters: dict[str, Any]


def read_layer_image(path: str, width: int, height: int,
                     transparent: bool | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer given as an image file, as the training shards hold such a layer: scaled to cover
    ``width x height`` and centre-cropped, 8-bit, a transparent layer with its colour padded under
    alpha 0 (``transparent`` None: as the file is). ``([3, H, W], [1, H, W] or None)`` in [0, 1]."""
    if transparent is None:
        with Image.open(path) as image:
            transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if transparent:
        rgba = load_rgba(path)  # names the file when it has no alpha
        rgba = prepare_foreground(resize_and_crop(rgba, width, height)[0])
    else:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA", "PA") and image.getchannel("A").getextrema()[0] < 255:
                raise ValueError(f"{path}: has transparent pixels, but it is given as an opaque layer; flatten it onto "
                                 "a background first (or give it as the transparent layer)")
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        rgba = resize_and_crop(np.concatenate([rgb, np.ones_like(rgb[..., :1])], axis=-1), width, height)[0]
    pixels = torch.from_numpy(np.rint(np.clip(rgba, 0.0, 1.0) * 255.0) / 255.0).float().permute(2, 0, 1)
    return pixels[:3], pixels[3:] if transparent else None


def _fit(image: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """An in-memory layer ``[C, H, W]`` scaled and centre-cropped to the generation size, as a file is."""
    if tuple(image.shape[-2:]) == (settings.height, settings.width):
        return image
    rgba = image.permute(1, 2, 0).float().cpu().numpy()
    if rgba.shape[2] == 3:
        rgba = np.concatenate([rgba, np.ones_like(rgba[..., :1])], axis=-1)
    fitted = torch.from_numpy(resize_and_crop(rgba, settings.width, settings.height)[0]).permute(2, 0, 1)
    return fitted if image.shape[0] == 4 else fitted[:3]


def layer_noise(seed: int, layers: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A sample's initial noise ``[L, *shape]`` from its own CPU generator (same on any device)."""
    return torch.randn((layers, *shape), generator=torch.Generator().manual_seed(int(seed)))


class JointLayerGenerator:
    """Prompts per layer -> layer sets with a UNet carrying ``LayerSharingUnit``s.

    The parts are shared with their owner (a LightningModule), so device moves and loaded
    checkpoints are seen here.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: TextEncoders,
        transparent_decoder: nn.Module,
        layers: Sequence[str],
        transparent_layers: Sequence[str],
        base_model: str,
        base_revision: str | None = None,
        decode_augmentation: bool = False,
        transparent_encoder: nn.Module | None = None,
        given_sets: Sequence[Sequence[str]] = ((),),
        concat_conditions: Sequence[str] = (),
        control_encoder: nn.Module | None = None,
        control_layer: str | None = None,
    ) -> None:
        self.unet, self.vae, self.transparent_decoder = unet, vae, transparent_decoder
        self.transparent_encoder = transparent_encoder
        self.given_sets = {tuple(sorted(given)) for given in given_sets}  # the conditions the model was trained for
        self.concat_conditions = tuple(concat_conditions)  # given as images, fed as extra input channels
        self.control_encoder, self.control_layer = control_encoder, control_layer  # given as an image, read by the units
        self.conditions = self.concat_conditions + ((control_layer,) if control_layer else ())
        self.conditioning = PromptConditioning(text_encoders)
        self.layers, self.transparent_layers = tuple(layers), tuple(transparent_layers)
        self.architecture = detect_architecture(base_model, revision=base_revision)
        self.base_model, self.base_revision = base_model, base_revision
        self.decode_augmentation = decode_augmentation
        self.scheduler_config = load_scheduler_config(base_model, base_revision)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def _prompts(self, texts: list[str]) -> PromptEmbeddings:
        return self.conditioning.encode(texts, self.unet.device)

    def _check(self, batch: LayerPromptBatch) -> None:
        if len(batch.prompts) != len(batch.seeds):
            raise ValueError(f"{len(batch.prompts)} layer prompts but {len(batch.seeds)} seeds; give one seed per sample")
        for prompts in batch.prompts:  # a condition layer's prompt is allowed, and unused
            unknown = sorted(set(prompts) - set(self.layers) - set(self.conditions))
            if unknown:
                raise ValueError(f"prompts for layers {unknown}, but this model generates layers {list(self.layers)}")
        unknown = sorted(set(batch.guidance) - set(self.layers))
        if unknown:
            raise ValueError(f"guidance for layers {unknown}, but this model generates layers {list(self.layers)}")
        missing = [name for name in self.conditions if name not in batch.given]
        if missing:
            raise ValueError(f"this model generates {list(self.layers)} conditioned on {list(self.conditions)}: give "
                             f"{missing} as images (data.init_args.given_layers: {{{missing[0]}: path}})")
        if tuple(sorted(set(batch.given) - set(self.conditions))) not in self.given_sets:
            trained = [sorted(given) or "none (joint)" for given in sorted(self.given_sets)]
            raise ValueError(f"layers {sorted(set(batch.given) - set(self.conditions))} given as images, but this "
                             "model was trained with given layers "
                             f"{trained} (its modes): give one of those sets, or train the mode (model.init_args.modes)")

    def _given_latents(self, given: dict[str, str], settings: GenerationSettings) -> dict[str, tuple[torch.Tensor, ...]]:
        """Each given layer's pixels (``[3 or 4, H, W]``) and latent (``[1, 4, h, w]``)."""
        pixels = {}
        for name, path in given.items():
            transparent = None if name in self.conditions else name in self.transparent_layers
            rgb, alpha = read_layer_image(path, settings.width, settings.height, transparent)
            pixels[name] = rgb if alpha is None else torch.cat([rgb, alpha])
        return self._encode(pixels)

    def _latents_of_pixels(self, pixels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        """:meth:`_encode` of layers in memory, first prepared as ``read_layer_image`` prepares a
        file: a transparent layer's colour padded under alpha 0, every layer rounded to 8 bits."""
        prepared = {}
        for name, image in pixels.items():
            if name not in self.conditions and name in self.transparent_layers and image.shape[0] == 4:
                image = torch.from_numpy(prepare_foreground(image.permute(1, 2, 0).float().cpu().numpy())).permute(2, 0, 1)
            prepared[name] = torch.round(image.clamp(0.0, 1.0) * 255.0) / 255.0
        return self._encode(prepared)

    def _encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Each given layer's pixels and latent (``None`` for a condition layer: its latent or
        features are made from the pixels by ``_condition_channels`` / ``_control``)."""
        prepared, device, dtype = {}, self.vae.device, self.vae.dtype
        for name, image in pixels.items():
            if name in self.conditions:
                prepared[name] = (image, None)
                continue
            transparent = name in self.transparent_layers
            if image.shape[0] != (4 if transparent else 3):
                raise ValueError(f"given layer {name!r} has {image.shape[0]} channels; the model's {name} is "
                                 f"{'transparent (RGBA)' if transparent else 'opaque (RGB)'}")
            rgb, alpha = image[None, :3].to(device, dtype), image[None, 3:].to(device, dtype) if transparent else None
            prepared[name] = (image, codec.layer_latent(self.vae, self.transparent_encoder, rgb, alpha))
        return prepared

    @torch.no_grad()
    def __call__(self, batch: LayerPromptBatch, given_pixels: dict[str, torch.Tensor] | None = None,
                 start_pixels: dict[str, torch.Tensor] | None = None, strength: float = 1.0) -> list[GeneratedLayers]:
        """One layer set per ``(prompts, seed)``; a layer without a prompt gets the empty one.
        ``given_pixels`` gives layers as images in memory (``[3 or 4, H, W]`` in [0, 1], the
        generation size), as ``batch.given`` does from files. With ``strength < 1`` the generated
        layers start from ``start_pixels`` (``[B, 3 or 4, H, W]`` per layer) noised to that share of
        the schedule and are redrawn from there (SDEdit, Meng et al. 2022)."""
        given_pixels = dict(given_pixels or {})
        batch = replace(batch, given={**batch.given, **{name: "<in memory>" for name in given_pixels}})
        self._check(batch)
        settings = batch.settings
        native = self.unet.config.sample_size * self.vae_scale_factor
        settings = replace(settings, width=settings.width or native, height=settings.height or native)
        count, samples, device, dtype = len(self.layers), len(batch), self.unet.device, self.unet.dtype
        shape = (LATENT_CHANNELS, settings.height // self.vae_scale_factor, settings.width // self.vae_scale_factor)

        prompts, added, scales, guided = self._embeddings(batch, settings)
        rows = prompts.hidden.shape[0]

        given = self._given_latents({name: path for name, path in batch.given.items() if name not in given_pixels}, settings)
        given.update(self._latents_of_pixels({name: _fit(image, settings) for name, image in given_pixels.items()}))
        conditions = self._condition_channels(given, rows)
        attention_inputs = self._control(given)
        steering = self._controlnet(settings, samples, guided, given)
        given_rows = torch.tensor([name in given for name in self.layers] * samples, device=device)  # of the generated
        clean = torch.zeros((samples * count, *shape), device=device, dtype=dtype)
        for index, name in enumerate(self.layers):
            if name in given:
                clean[index::count] = given[name][1].to(device, dtype)
        mask = given_rows.repeat(rows // len(given_rows))

        scheduler = make_scheduler(settings.scheduler, self.scheduler_config)
        scheduler.set_timesteps(settings.steps, device=device)
        latents = torch.cat([layer_noise(seed, count, shape) for seed in batch.seeds]).to(device, dtype)
        timesteps = scheduler.timesteps
        if strength < 1.0:
            first = min(round(settings.steps * (1.0 - strength)), settings.steps - 1)
            timesteps = timesteps[first:]
            if hasattr(scheduler, "set_begin_index"):  # sigma-indexed samplers; DDIM reads the timestep itself
                scheduler.set_begin_index(first)
            latents = scheduler.add_noise(self._start_latents(start_pixels or {}, given, samples), latents,
                                          timesteps[:1].expand(len(latents)))
        else:
            latents = latents * scheduler.init_noise_sigma
        latents = torch.where(given_rows[:, None, None, None], clean, latents)
        # Ancestral samplers draw fresh noise each step: from per-row generators, so a sample
        # depends on its own seed only.
        step_generators = [torch.Generator().manual_seed(int(seed) * 1009 + 1 + layer)
                           for seed in batch.seeds for layer in range(count)]
        scales = scales.to(device, dtype)[:, None, None, None]
        for timestep in timesteps:
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            model_input, row_timesteps = self._with_given(model_input, timestep, clean, mask, guided)
            residuals = {}
            if steering is not None:
                controlnet, image, scale, rows_steered = steering
                down, mid = controlnet_residuals(controlnet, model_input, row_timesteps, prompts.hidden, added, image,
                                                 scale, rows_steered)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            if conditions is not None:
                model_input = torch.cat([model_input, conditions], dim=1)
            prediction = self.unet(model_input, row_timesteps, encoder_hidden_states=prompts.hidden,
                                   added_cond_kwargs=added, cross_attention_kwargs=attention_inputs, **residuals).sample
            if guided:
                without, with_prompt = prediction.chunk(2)
                prediction = without + scales * (with_prompt - without)
            latents = scheduler.step(prediction, timestep, latents, generator=step_generators).prev_sample
            latents = torch.where(given_rows[:, None, None, None], clean, latents)  # a given layer never moves
        return self._decode(latents.unflatten(0, (samples, count)), batch, settings, given)

    def _embeddings(self, batch: LayerPromptBatch, settings: GenerationSettings):
        """Each row's prompt embeddings (``(b l)``, the unconditional half first when guided), SDXL's
        added conditions, the guidance scale per row and whether to guide."""
        texts = [prompts.get(name, "") for prompts in batch.prompts for name in self.layers]  # (b l)
        conditional = self._prompts(texts)
        # a given layer is the same condition in both branches: its own prompt in the unconditional one too
        unconditional = self._prompts([prompts.get(name, "") if name in batch.given else settings.negative_prompt
                                       for prompts in batch.prompts for name in self.layers])
        scales = torch.tensor([batch.guidance.get(name, settings.guidance_scale) for name in self.layers] * len(batch))
        guided = bool((scales != 1.0).any())
        prompts = (PromptEmbeddings(torch.cat([unconditional.hidden, conditional.hidden]),
                                    None if conditional.pooled is None else torch.cat([unconditional.pooled, conditional.pooled]))
                   if guided else conditional)
        sizes = torch.tensor([[settings.height, settings.width]] * prompts.hidden.shape[0], device=self.unet.device)
        added = self.conditioning.added_conditions(prompts, sizes, torch.zeros_like(sizes), (settings.height, settings.width))
        return prompts, added, scales, guided

    def _condition_channels(self, given: dict[str, tuple[torch.Tensor, ...]], rows: int) -> torch.Tensor | None:
        """The concat conditions' latents (``codec.condition_latent``, as training's), for every UNet row alike."""
        if not self.concat_conditions:
            return None
        latents = []
        for name in self.concat_conditions:
            image = given[name][0].to(self.vae.device, self.vae.dtype)[None]
            latents.append(codec.condition_latent(self.vae, image[:, :3], image[:, 3:] if image.shape[1] == 4 else None))
        return torch.cat(latents, dim=1).expand(rows, -1, -1, -1).to(self.unet.dtype)

    def _start_latents(self, pixels: dict[str, torch.Tensor], given: dict, samples: int) -> torch.Tensor:
        """Every layer's latent to redraw from, ``[B * L, 4, h, w]`` (a given layer's is replaced later)."""
        latents = []
        for name in self.layers:
            if name in given:
                latents.append(given[name][1].expand(samples, -1, -1, -1))
                continue
            if name not in pixels:
                raise ValueError(f"redrawing (strength < 1) needs every generated layer's start image; {name!r} has none")
            image = pixels[name].to(self.vae.device, self.vae.dtype)
            alpha = image[:, 3:] if name in self.transparent_layers else None
            latents.append(codec.layer_latent(self.vae, self.transparent_encoder, image[:, :3], alpha))
        return torch.stack(latents, dim=1).flatten(0, 1).to(self.unet.dtype)

    def _controlnet(self, settings: GenerationSettings, samples: int, guided: bool, given: dict) -> tuple | None:
        """The ControlNet, its image, scale and the UNet rows it steers (one layer, both guidance halves)."""
        guide = settings.controlnet
        if not guide:
            return None
        layer = guide.get("layer") or next(name for name in self.layers if name not in given)
        if layer not in self.layers or layer in given:
            raise ValueError(f"the ControlNet steers layer {layer!r}, which this model does not generate here "
                             f"(it generates {[name for name in self.layers if name not in given]})")
        controlnet = load_controlnet(guide["model"]).to(self.unet.device, self.unet.dtype)
        check_controlnet(controlnet, self.unet.config)
        rows = torch.tensor([name == layer for name in self.layers] * samples * (2 if guided else 1), device=self.unet.device)
        image = control_image(guide["image"], settings.width, settings.height).to(self.unet.device, self.unet.dtype)
        return controlnet, image, float(guide.get("scale", 1.0)), rows

    def _control(self, given: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, Any] | None:
        """The control layer's features (one image for every row, both guidance branches)."""
        if self.control_encoder is None:
            return None
        image = given[self.control_layer][0].to(self.unet.device, self.unet.dtype)[None]
        return {CONTROL_KWARG: self.control_encoder(codec.condition_image(image[:, :3], image[:, 3:] if image.shape[1] == 4
                                                                          else None))}

    @staticmethod
    def _with_given(model_input: torch.Tensor, timestep: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor,
                    guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Given rows as training prepared them (``diffusion.given_layers``): the clean latent at
        t = 0, unscaled by the sampler, in both halves of a guided batch."""
        clean = torch.cat([clean, clean]) if guided else clean
        given = mask[:, None].to(model_input.device)
        prepared, timesteps = diffusion.given_layers(clean[:, None], model_input[:, None],
                                                     timestep.expand(len(model_input)), given)
        return prepared[:, 0], timesteps[:, 0]

    def _decode(self, latents: torch.Tensor, batch: LayerPromptBatch, settings: GenerationSettings,
                given: dict[str, tuple[torch.Tensor, ...]]) -> list[GeneratedLayers]:
        decoded: dict[str, torch.Tensor] = {}
        for index, name in enumerate(self.layers):
            layer_latents = latents[:, index].to(self.vae.dtype)
            if name in given:  # the image itself, not its decode
                decoded[name] = given[name][0].float().cpu()[None].expand(len(latents), -1, -1, -1)
            elif name in self.transparent_layers:
                alpha, rgb = codec.decode_rgba(self.vae, self.transparent_decoder, layer_latents, self.decode_augmentation)
                decoded[name] = torch.cat([rgb, alpha], dim=1).float().cpu()
            else:
                decoded[name] = codec.decode_opaque(self.vae, layer_latents).float().cpu()
        for name in self.conditions:  # the conditions belong to the set (the layered file shows them)
            decoded[name] = given[name][0].float().cpu()[None].expand(len(latents), -1, -1, -1)
        shared = {**asdict(settings), "guidance": dict(batch.guidance), "base_model": self.base_model,
                  "base_revision": self.base_revision, "layers": list(self.layers), "given": dict(batch.given),
                  "decode_augmentation": self.decode_augmentation}
        return [
            GeneratedLayers(
                index=index,
                seed=int(seed),
                prompts={name: prompts.get(name, "") for name in self.layers},
                layers={name: images[row] for name, images in decoded.items()},
                parameters={"prompts": {name: prompts.get(name, "") for name in self.layers}, "seed": int(seed), **shared},
            )
            for row, (index, prompts, seed) in enumerate(zip(batch.indices, batch.prompts, batch.seeds))
        ]
