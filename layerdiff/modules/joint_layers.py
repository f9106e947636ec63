"""Joint multi-layer generation (LayerDiffusion arXiv:2402.17113 sec. 3.3, eq. 8-9): the layers
of one image (a transparent foreground in the adjusted latent space, an opaque background and
blend in the plain one) are denoised together by one frozen UNet, each layer with its own LoRA,
attention shared between the layers of a sample (``layerdiff.models.layer_sharing``); and the
conditional modes of sec. 3.3, where some layers are given clean (t = 0) and the others
generated, mixed per sample in one model."""

from __future__ import annotations

from typing import Literal, TypedDict

import torch

from layerdiff import diffusion
from layerdiff.batches import Layer, LayeredBatch
from layerdiff.formats.layer_conditional import conditional_task, load_released_conditional
from layerdiff.formats.layer_sharing import load_layer_sharing
from layerdiff.formats.unet_delta import apply_unet_delta, is_unet_delta
from layerdiff.models import codec
from layerdiff.models.base import load_unet
from layerdiff.models.control_encoder import CONTROL_KWARG, ControlEncoder
from layerdiff.models.conv_in import LATENT_CHANNELS, grow_conv_in
from layerdiff.models.layer_sharing import PROJECTIONS, SharingMode, add_layer_sharing
from layerdiff.models.text import PromptEmbeddings
from layerdiff.modules.base import TrainedParts
from layerdiff.modules.diffusion_objective import DiffusionObjective
from layerdiff.optim import LearningRateSchedule, OptimizerName
from layerdiff.pipelines.composition import CompositionBatch, compose
from layerdiff.pipelines.joint_layers import GeneratedLayers, JointLayerGenerator, LayerPromptBatch


class LayerMismatchError(ValueError):
    """A batch's layers are not the layers the model was built for."""


class LayerMode(TypedDict):
    """One way of using a training sample (LD sec. 3.3): ``given`` names the layers given clean
    (at t = 0, not denoised, no loss), ``[]`` is joint generation; ``probability`` is the share of
    samples trained so. E.g. ``[{given: [], probability: 0.5}, {given: [foreground], probability:
    0.25}, {given: [background], probability: 0.25}]``: one model that generates both layers, a
    background for a given foreground and a foreground for a given background."""

    given: list[str]
    probability: float


JOINT_ONLY = [LayerMode(given=[], probability=1.0)]


def mode_name(given: list[str] | tuple[str, ...]) -> str:
    """``joint``, or ``given_<layer>[+<layer>]`` (the metric prefix of a mode)."""
    return "given_" + "+".join(given) if given else "joint"


class JointLayerLoRAModule(DiffusionObjective):
    trained = TrainedParts(exported=("unet", "control_encoder"))

    """Trains one LoRA per layer on a frozen SD1.5 / SDXL UNet with attention sharing, on
    ``LayeredBatch``es (``data.ShardDataModule(require_layers=True)``).

    The loss is LD eq. 9: the squared error on the layers' concatenated noise, i.e. the mean of
    eq. 8's per-layer errors (each logged as ``train/loss_{layer}``). The layers of a sample
    share a timestep; each has its own noise and its own caption dropout, so classifier-free
    guidance can be applied per layer.

    Args:
        transparent_vae: the trained transparency encoder/decoder (an export folder, ours or
            the released LayerDiffuse files, or a ``TransparentVAEModule`` checkpoint); encodes
            the ``transparent_layers`` and decodes them when generating.
        base_model: diffusers model (hub id, local folder or ``embedded:tiny-sdxl``), SDXL or SD1.5.
        base_revision: hub revision of ``base_model``.
        base_unet: a diffusers UNet folder to start from instead of ``base_model``'s UNet, frozen
            like it: the transparent-image model of sec. 3.2 that the paper extends to layers
            (``python -m layerdiff.export unet`` of a full fine-tune).
        layers: the layers denoised together, top first, by their batch names (``foreground``,
            ``background``, ``blend``); 2 for SDXL fg + bg, 3 for the released SD1.5 joint model.
        transparent_layers: the layers with alpha, encoded into the adjusted latent space; the
            others are opaque and use the plain VAE latent.
        attention_sharing: ``concat`` (eq. 9: self-attention over every layer's tokens),
            ``frame`` (the released SD1.5 design: attention across layers at each token) or
            ``none`` (independent layers, the ablation baseline).
        lora_rank: rank of each layer's LoRA (the paper: 256).
        lora_alpha: LoRA scale numerator (scale = alpha / rank); defaults to the rank, as released.
        lora_projections: attention projections adapted, in self- and cross-attention.
        modes: the joint and conditional modes trained, each with its share of the samples
            (:class:`LayerMode`); default: joint only. Validation measures every mode on every
            held-out sample (``val/<mode>/loss_<layer>``).
        concat_conditions: layers of the batch that condition the generated ones through extra
            UNet input channels (LD Fig. 4; ``conv_in`` grows by 4 zero-initialised channels per
            layer and trains): e.g. ``layers: [blend]`` with ``[foreground]`` is the released
            SDXL fg2ble model, ``layers: [foreground]`` with ``[background, blend]`` bgble2fg.
        control_layer: a layer of the batch that conditions the generated ones through a control
            encoder read by every layer-sharing unit (the released SD1.5 conditional models:
            ``layers: [background, blend]`` with ``foreground`` is fg2bg, ``[foreground, blend]``
            with ``background`` bg2fg; ``attention_sharing: frame``).
        init_from: a layer-sharing file to start the units from: the released
            ``layer_sd15_joint.safetensors`` or ``python -m layerdiff.export layer-sharing``'s
            ``layerdiff_layer_sharing.safetensors`` (or its folder); it must fit the units (mode,
            layers, rank).
        prediction_type: ``epsilon`` or ``v_prediction``; ``None`` keeps the base model's.
        min_snr_gamma: Min-SNR-gamma loss weighting; ``None`` = off.
        noise_offset: scale of per-channel offset noise (0 = off).
        caption_dropout: probability, per layer and sample, of training on the empty caption.
        optimizer: ``adamw`` or bitsandbytes ``adamw8bit``.
        learning_rate: peak learning rate (paper: 1e-5).
        betas: Adam betas.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        lr_schedule: ``constant``, ``linear`` or ``cosine`` after warm-up.
        gradient_checkpointing: recompute UNet activations in backward to save memory.
        seed: base seed of the noise/timestep/dropout generators (per rank).
        decode_augmentation: decode generated transparent layers with the released 8-way median.
        max_non_finite_steps: consecutive non-finite steps (each skipped) before stopping.
    """

    def __init__(
        self,
        transparent_vae: str,
        base_model: str = "stabilityai/stable-diffusion-xl-base-1.0",
        base_revision: str | None = None,
        base_unet: str | None = None,
        layers: tuple[str, ...] = ("foreground", "background"),
        transparent_layers: tuple[str, ...] = ("foreground",),
        attention_sharing: SharingMode = "concat",
        lora_rank: int = 256,
        lora_alpha: float | None = None,
        lora_projections: tuple[str, ...] = PROJECTIONS,
        modes: list[LayerMode] | None = None,
        concat_conditions: tuple[str, ...] = (),
        control_layer: str | None = None,
        init_from: str | None = None,
        prediction_type: Literal["epsilon", "v_prediction"] | None = None,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        caption_dropout: float = 0.1,
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        lr_schedule: LearningRateSchedule = "constant",
        gradient_checkpointing: bool = False,
        seed: int = 0,
        decode_augmentation: bool = False,
        max_non_finite_steps: int = 5,
    ) -> None:
        super().__init__(max_non_finite_steps=max_non_finite_steps, seed=seed)
        layers, transparent_layers = tuple(layers), tuple(transparent_layers)
        if len(layers) < 1 or len(set(layers)) != len(layers):
            raise ValueError(f"layers must name each layer once, top first, e.g. [foreground, background]; got {list(layers)}")
        stray = [name for name in transparent_layers if name not in layers]
        if stray:
            raise ValueError(f"transparent_layers {stray} are not among layers {list(layers)}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability in [0, 1]; got {caption_dropout}")
        self.save_hyperparameters()
        self.layers, self.transparent_layers = layers, transparent_layers
        self.concat_conditions = tuple(concat_conditions)
        if set(self.concat_conditions) & set(layers) or len(set(self.concat_conditions)) != len(self.concat_conditions):
            raise ValueError(f"concat_conditions {list(self.concat_conditions)} must be distinct layers of the batch that "
                             f"are not generated (layers {list(layers)})")
        self.control_layer = control_layer
        if control_layer is not None and (control_layer in layers or control_layer in self.concat_conditions):
            raise ValueError(f"control_layer {control_layer!r} must be a layer of the batch that is not generated "
                             f"(layers {list(layers)}) nor a concat condition")
        self.modes = _checked_modes(modes or JOINT_ONLY, layers)
        self.given_masks = torch.tensor([[name in mode["given"] for name in layers] for mode in self.modes])  # [M, L]

        self.load_base(transparent_vae, base_model, base_revision, prediction_type)
        unet_source = {"pretrained": base_unet, "subfolder": None} if base_unet else {"pretrained": base_model}
        self.unet = load_unet(**unet_source, revision=None if base_unet else base_revision).train()
        if self.concat_conditions:
            grow_conv_in(self.unet, LATENT_CHANNELS * len(self.concat_conditions))
        if init_from is not None and is_unet_delta(init_from):  # a released ::diff:: file: part of the start
            apply_unet_delta(self.unet, init_from)
        add_layer_sharing(self.unet, len(layers), attention_sharing, lora_rank, lora_alpha, lora_projections,
                          control_channels=None if control_layer is None else ControlEncoder.channels)
        self.control_encoder = None if control_layer is None else ControlEncoder()
        if self.concat_conditions:
            self.unet.conv_in.requires_grad_(True)  # the new channels learn; the base weights under them too
        if init_from is not None and control_layer is not None:
            load_released_conditional(self.unet, self.control_encoder, init_from, conditional_task(layers, control_layer),
                                      layers)
        elif init_from is not None and not is_unet_delta(init_from):
            load_layer_sharing(self.unet, init_from, layers)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self._generator: JointLayerGenerator | None = None

    # -- latents -------------------------------------------------------------------------

    def _batch_layers(self, batch: LayeredBatch) -> list[Layer]:
        if not isinstance(batch, LayeredBatch):
            raise LayerMismatchError(
                f"JointLayerLoRAModule trains on layered batches, got {type(batch).__name__}: set "
                "`data.init_args.require_layers: true` and use shards with bg.png/blend.png (python -m data write --help)"
            )
        found = [layer.name for layer in batch.layers]
        conditions = self.concat_conditions + ((self.control_layer,) if self.control_layer else ())
        missing = [name for name in self.layers + conditions if name not in found]
        if missing:
            raise LayerMismatchError(f"the batch (keys {batch.key[:3]}...) has layers {found}, not {missing}; "
                                     f"the model was built for layers {list(self.layers)}")
        chosen = [batch.layer(name) for name in self.layers]
        for layer in chosen:
            transparent = layer.name in self.transparent_layers
            if transparent != (layer.alpha is not None):
                raise LayerMismatchError(
                    f"layer {layer.name!r} of the batch (keys {batch.key[:3]}...) has {layer.pixels.shape[1]} channels, but "
                    f"the model treats it as {'transparent (RGBA)' if transparent else 'opaque (RGB)'}: "
                    "fix `model.init_args.transparent_layers`"
                )
        return chosen

    @torch.no_grad()
    def diffusion_latents(self, layers: list[Layer]) -> torch.Tensor:
        """Every layer's latent on the UNet's scale, ``[B, L, 4, h, w]``: the transparent layers'
        adjusted latents ``x_a``, the opaque layers' plain VAE latents (``codec.layer_latent``, as
        generation prepares a given layer)."""
        return torch.stack([codec.layer_latent(self.vae, self.transparent_encoder, layer.rgb, layer.alpha)
                            for layer in layers], dim=1)

    @torch.no_grad()
    def condition_latents(self, batch: LayeredBatch) -> torch.Tensor | None:
        """The ``concat_conditions`` layers' latents as extra input channels, ``[B, 4 C, h, w]``."""
        if not self.concat_conditions:
            return None
        return torch.cat([codec.condition_latent(self.vae, batch.layer(name).rgb, batch.layer(name).alpha)
                          for name in self.concat_conditions], dim=1)

    def layer_prompts(self, layers: list[Layer], drop: torch.Tensor) -> PromptEmbeddings:
        """Each layer's caption embeddings (dropped to the empty caption where ``drop[l, b]``),
        as one ``[B * L]`` batch, layers inner."""
        per_layer = [self.conditioning.drop(self.encode_prompts(layer.caption, layer.token_ids), drop[index])
                     for index, layer in enumerate(layers)]
        hidden = torch.stack([prompts.hidden for prompts in per_layer], dim=1).flatten(0, 1)
        pooled = None if per_layer[0].pooled is None else torch.stack([p.pooled for p in per_layer], dim=1).flatten(0, 1)
        return PromptEmbeddings(hidden, pooled)

    # -- the objective -------------------------------------------------------------------

    def compute_loss(self, batch: LayeredBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """LD eq. 9 on one batch (``loss``: over the layers denoised) and eq. 8's term of each
        layer (``loss_{layer}``; NaN for a layer no sample generated), each sample in a mode drawn
        by its probability."""
        return self._losses(batch, generator, None)["train"]

    def mode_losses(self, batch: LayeredBatch, generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
        """:meth:`compute_loss`'s terms with every sample in each mode in turn, on the same draws,
        by mode name (:func:`mode_name`): how well the model does each of its tasks."""
        return self._losses(batch, generator, list(range(len(self.modes))))

    def _losses(self, batch: LayeredBatch, generator: torch.Generator,
                modes: list[int] | None) -> dict[str, dict[str, torch.Tensor]]:
        layers = self._batch_layers(batch)
        latents = self.diffusion_latents(layers)
        samples, count = latents.shape[:2]
        hp, alphas_cumprod = self.hparams, self.noise_scheduler.alphas_cumprod
        draws = diffusion.draw(generator, [latents[:, 0].shape] * count, self.num_train_timesteps,
                               hp.caption_dropout, hp.noise_offset)
        timesteps = draws.timesteps.to(latents.device)
        noise = torch.stack(draws.noise, dim=1).to(latents.device, latents.dtype)
        noisy = diffusion.add_noise(alphas_cumprod, latents.flatten(0, 1), noise.flatten(0, 1),
                                    timesteps.repeat_interleave(count)).unflatten(0, (samples, count))
        prompts = self.layer_prompts(layers, draws.drop)
        target_size = tuple(side * self.vae_scale_factor for side in latents.shape[-2:])
        added = self.conditioning.added_conditions(prompts, batch.original_size.repeat_interleave(count, dim=0),
                                                   batch.crop_top_left.repeat_interleave(count, dim=0), target_size)
        if modes is None:  # one mode needs no draw, so a joint-only model's steps are as before modes existed
            drawn = (diffusion.draw_modes(generator, [m["probability"] for m in self.modes], samples)
                     if len(self.modes) > 1 else torch.zeros(samples, dtype=torch.long))
            runs = {"train": self.given_masks[drawn]}
        else:
            runs = {mode_name(self.modes[m]["given"]): self.given_masks[m].expand(samples, count) for m in modes}
        conditions = self.condition_latents(batch)
        attention_inputs = None
        if self.control_encoder is not None:  # the condition image's features, read by every unit
            control = batch.layer(self.control_layer)
            attention_inputs = {CONTROL_KWARG: self.control_encoder(codec.condition_image(control.rgb, control.alpha))}
        results = {}
        for name, given in runs.items():
            model_input, layer_timesteps = diffusion.given_layers(latents, noisy, timesteps, given)
            rows, model_input = layer_timesteps.flatten(), model_input.flatten(0, 1)
            if conditions is not None:  # the same conditions beside every layer of a sample
                model_input = torch.cat([model_input, conditions.repeat_interleave(count, dim=0)], dim=1)
            prediction = self.unet(model_input, rows, encoder_hidden_states=prompts.hidden,
                                   added_cond_kwargs=added, cross_attention_kwargs=attention_inputs).sample
            target = diffusion.target(self.prediction_type, alphas_cumprod, latents.flatten(0, 1), noise.flatten(0, 1), rows)
            total, per_layer = diffusion.layer_losses(prediction.unflatten(0, (samples, count)),
                                                      target.unflatten(0, (samples, count)), ~given,
                                                      self.loss_weights(timesteps))
            results[name] = {"loss": total, **{f"loss_{layer}": per_layer[i] for i, layer in enumerate(self.layers)}}
        return results

    def training_step(self, batch: LayeredBatch, batch_idx: int) -> torch.Tensor | None:
        losses = self.compute_loss(batch, self.generator("noise"))
        if self.skip_non_finite({"diffusion": losses["loss"]}):
            return None  # Lightning then skips backward and the update
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=len(batch))
        # a layer that no sample of this batch generated has no term (NaN): not logged
        self.log_dict({f"train/{name}": value.detach() for name, value in losses.items()
                       if name != "loss" and value.isfinite()}, batch_size=len(batch))
        return losses["loss"]

    def validation_step(self, batch: LayeredBatch, batch_idx: int) -> torch.Tensor:
        per_mode = self.mode_losses(batch, self._validation_generator)
        logged = _expected_terms(per_mode, self.modes, self.layers)  # each term's mean over the modes' shares
        if len(self.modes) > 1:
            logged.update({f"{mode}/{name}": value for mode, terms in per_mode.items() for name, value in terms.items()
                           if value.isfinite()})
        self.log("val/loss", logged.pop("loss"), prog_bar=True, batch_size=len(batch), sync_dist=True)
        self.log_dict({f"val/{name}": value for name, value in logged.items()}, batch_size=len(batch), sync_dist=True)
        return per_mode[mode_name(self.modes[0]["given"])]["loss"]

    # -- generation: train.py predict and the layer-samples callback -----------------------

    def layer_generator(self) -> JointLayerGenerator:
        """Prompts per layer -> layer sets, with this module's parts (shared, current weights)."""
        if self._generator is None:
            self._generator = JointLayerGenerator(
                self.unet, self.vae, self.text_encoders, self.transparent_decoder, self.layers, self.transparent_layers,
                self.hparams.base_model, self.hparams.base_revision, self.hparams.decode_augmentation,
                self.transparent_encoder, [mode["given"] for mode in self.modes], self.concat_conditions,
                self.control_encoder, self.control_layer,
            )
        return self._generator

    def predict_step(self, batch: LayerPromptBatch | CompositionBatch, batch_idx: int) -> list[GeneratedLayers]:
        if isinstance(batch, CompositionBatch):
            return compose(self.layer_generator(), batch)
        return self.layer_generator()(batch)


def _checked_modes(modes: list[LayerMode], layers: tuple[str, ...]) -> list[LayerMode]:
    checked, seen = [], set()
    for mode in modes:
        given = tuple(mode.get("given") or ())
        probability = float(mode.get("probability", 0.0))
        stray = [name for name in given if name not in layers]
        if stray or len(set(given)) != len(given):
            raise ValueError(f"mode {dict(mode)}: given layers must be distinct layers of {list(layers)}; got {list(given)}")
        if len(given) == len(layers):
            raise ValueError(f"mode {dict(mode)} gives every layer, so it generates nothing; leave at least one out")
        if probability <= 0 or given in seen:
            raise ValueError(f"mode {dict(mode)}: each mode once, with a probability > 0")
        seen.add(given)
        checked.append(LayerMode(given=list(given), probability=probability))
    total = sum(mode["probability"] for mode in checked)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"the modes' probabilities add up to {total:g}, not 1: {[dict(mode) for mode in checked]}")
    return checked


def _expected_terms(per_mode: dict[str, dict[str, torch.Tensor]], modes: list[LayerMode],
                    layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``loss`` and each ``loss_{layer}`` averaged over the modes by their shares (a layer's over
    the modes that generate it): what training's loss is in expectation on these draws."""
    shares = {mode_name(mode["given"]): mode["probability"] for mode in modes}
    expected = {"loss": sum(shares[name] * terms["loss"] for name, terms in per_mode.items())}
    for layer in layers:
        generating = [name for name, terms in per_mode.items() if terms[f"loss_{layer}"].isfinite()]
        if generating:
            weight = sum(shares[name] for name in generating)
            expected[f"loss_{layer}"] = sum(shares[name] * per_mode[name][f"loss_{layer}"] for name in generating) / weight
    return expected
