"""Diffusion on adjusted latents (LayerDiffusion sec. 3.2): fine-tune an SD1.5 / SDXL UNet,
as a LoRA or fully, so that it generates in the latent-transparency space of a trained
transparency encoder, and text goes in, a transparent image comes out."""

from __future__ import annotations

from typing import Literal

import torch

from layerdiff import diffusion
from layerdiff.batches import CachedBatch, ImageBatch
from layerdiff.formats.lora import load_lora_into_unet
from layerdiff.models import codec
from layerdiff.models.base import load_unet
from layerdiff.models.lora import DEFAULT_ADAPTER, RELEASED_LORA_TARGETS, add_lora
from layerdiff.models.text import PromptEmbeddings
from layerdiff.modules.diffusion_objective import DiffusionObjective
from layerdiff.optim import LearningRateSchedule, OptimizerName
from layerdiff.pipelines import CommunityLora, GeneratedImage, PromptBatch, TransparentImageGenerator


class LatentDiffusionModule(DiffusionObjective):
    """Trains the base UNet on adjusted latents ``x_a`` with LD eq. 7.

    Batches come from ``data.ShardDataModule``: image batches (``rgb``, ``alpha``) are encoded
    on the fly through the frozen VAE and the transparency encoder; cached batches
    (``latent``, optionally ``prompt_hidden``/``prompt_pooled``) skip that. Both give the same
    loss for the same seed.

    Args:
        transparent_vae: the trained transparency encoder/decoder: an export folder (ours or
            the released LayerDiffuse files) or a ``TransparentVAEModule`` checkpoint.
        base_model: diffusers model (hub id, local folder, or ``embedded:tiny-sdxl``), SDXL
            or SD1.5; the architecture is read from its UNet config.
        base_revision: hub revision of ``base_model``.
        lora_rank: rank of the peft LoRA on ``lora_targets``; ``None`` fine-tunes the whole
            UNet instead. The released model: rank 256 on the attention projections.
        lora_alpha: LoRA scale numerator (scale = alpha / rank); defaults to the rank.
        lora_targets: module-name suffixes the LoRA adapts.
        init_lora: a LoRA file (diffusers/peft, Forge/ComfyUI ``::lora::`` or kohya layout,
            e.g. the released ``layer_xl_transparent_attn.safetensors``) to start the adapter
            from; its modules and rank must be the adapter's.
        prediction_type: ``epsilon`` or ``v_prediction``; ``None`` keeps the base model's.
        min_snr_gamma: Min-SNR-gamma loss weighting (5 is the paper's value); ``None`` = off.
        noise_offset: scale of per-channel offset noise added to the noise (0 = off).
        caption_dropout: probability of training a sample on the empty caption, which
            classifier-free guidance needs.
        optimizer: ``adamw`` or bitsandbytes ``adamw8bit``.
        learning_rate: peak learning rate (paper: 1e-5).
        betas: Adam betas.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        lr_schedule: after warm-up: ``constant``, ``linear`` or ``cosine`` decay to zero at
            the trainer's last step.
        gradient_checkpointing: recompute UNet activations in backward to save memory.
        seed: base seed of the noise/timestep/dropout generators; each data-parallel rank
            derives its own from it and its rank.
        community_loras: diffusers/peft LoRA files stacked on the model, each with its weight,
            when generating with ``train.py predict`` (not in training or its samples).
        decode_augmentation: decode generated latents with the released 8-way flip/rotation
            median (slower, cleaner alpha).
        max_non_finite_steps: consecutive steps with a non-finite loss or gradient (each
            skipped, with no update) after which training stops with an error.
    """

    def __init__(
        self,
        transparent_vae: str,
        base_model: str = "stabilityai/stable-diffusion-xl-base-1.0",
        base_revision: str | None = None,
        lora_rank: int | None = 256,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = RELEASED_LORA_TARGETS,
        init_lora: str | None = None,
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
        community_loras: list[CommunityLora] | None = None,
        decode_augmentation: bool = False,
        max_non_finite_steps: int = 5,
    ) -> None:
        super().__init__(max_non_finite_steps=max_non_finite_steps, seed=seed)
        if lora_rank is not None and lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, or null for a full fine-tune; got {lora_rank}")
        if init_lora is not None and lora_rank is None:
            raise ValueError("init_lora starts a LoRA adapter: set lora_rank to the file's rank (null fine-tunes the whole UNet)")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability in [0, 1]; got {caption_dropout}")
        self.save_hyperparameters()

        self.load_base(transparent_vae, base_model, base_revision, prediction_type)
        # from_pretrained returns eval mode, which Lightning keeps: the trained part is set to train.
        self.unet = load_unet(base_model, revision=base_revision).train()
        if lora_rank is not None:
            add_lora(self.unet, DEFAULT_ADAPTER, lora_rank, lora_alpha, lora_targets)
            if init_lora is not None:
                load_lora_into_unet(self.unet, init_lora, DEFAULT_ADAPTER)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

        self._image_generator: TransparentImageGenerator | None = None

    # -- conditioning and latents ------------------------------------------------------

    def _prompt_embeddings(self, batch: ImageBatch | CachedBatch, drop: torch.Tensor) -> PromptEmbeddings:
        if isinstance(batch, CachedBatch) and batch.prompt_hidden is not None:
            prompts = PromptEmbeddings(batch.prompt_hidden, batch.prompt_pooled)
        else:
            prompts = self.encode_prompts(batch.caption, batch.token_ids)
        return self.conditioning.drop(prompts, drop)

    @torch.no_grad()
    def diffusion_latents(self, batch: ImageBatch | CachedBatch) -> torch.Tensor:
        """The adjusted latents ``x_a`` on the UNet's scale: cached, or encoded now."""
        if isinstance(batch, CachedBatch):
            return batch.latent
        return self.plain_and_adjusted_latents(batch)[1]

    @torch.no_grad()
    def plain_and_adjusted_latents(self, batch: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen VAE's latents ``x`` and the adjusted ``x_a`` of the same images, from one
        encoding, both on the UNet's scale."""
        plain, adjusted = codec.encode_adjusted(self.vae, self.transparent_encoder, batch.rgb, batch.alpha)
        return codec.diffusion_latent(self.vae, plain), codec.diffusion_latent(self.vae, adjusted)

    def _added_conditions(self, batch: ImageBatch | CachedBatch, prompts: PromptEmbeddings, latents: torch.Tensor) -> dict | None:
        target_size = tuple(side * self.vae_scale_factor for side in latents.shape[-2:])
        return self.conditioning.added_conditions(prompts, batch.original_size, batch.crop_top_left, target_size)

    # -- the objective -------------------------------------------------------------------

    def compute_loss(
        self, batch: ImageBatch | CachedBatch, generator: torch.Generator, latents: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """LD eq. 7 on one batch (on ``latents`` in place of its adjusted latents, if given);
        every random draw comes from ``generator`` (on the CPU, so a seed gives the same noise
        on any device), in a fixed order."""
        latents = self.diffusion_latents(batch) if latents is None else latents
        hp, alphas_cumprod = self.hparams, self.noise_scheduler.alphas_cumprod
        draws = diffusion.draw(generator, [latents.shape], self.num_train_timesteps, hp.caption_dropout, hp.noise_offset)
        timesteps = draws.timesteps.to(latents.device)
        noise = draws.noise[0].to(latents.device, latents.dtype)

        prompts = self._prompt_embeddings(batch, draws.drop[0])
        noisy = diffusion.add_noise(alphas_cumprod, latents, noise, timesteps)
        prediction = self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=prompts.hidden,
            added_cond_kwargs=self._added_conditions(batch, prompts, latents),
        ).sample

        weights = self.loss_weights(timesteps)
        target = diffusion.target(self.prediction_type, alphas_cumprod, latents, noise, timesteps)
        return {"loss": diffusion.denoising_loss(prediction, target, weights)}

    def training_step(self, batch: ImageBatch | CachedBatch, batch_idx: int) -> torch.Tensor | None:
        loss = self.compute_loss(batch, self.generator("noise"))["loss"]
        if self.skip_non_finite({"diffusion": loss}):
            return None  # Lightning then skips backward and the update
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch.caption))
        return loss

    def validation_step(self, batch: ImageBatch | CachedBatch, batch_idx: int) -> torch.Tensor:
        generator = self._validation_generator
        if not isinstance(batch, ImageBatch):
            loss = self.compute_loss(batch, generator)["loss"]
            self.log("val/loss", loss, prog_bar=True, batch_size=len(batch.caption), sync_dist=True)
            return loss
        plain_latents, adjusted_latents = self.plain_and_adjusted_latents(batch)
        draws = generator.get_state()
        loss = self.compute_loss(batch, generator, latents=adjusted_latents)["loss"]
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch.caption), sync_dist=True)
        # LD sec. 3.1's premise, measured: the same draws on the plain latents x. A pretrained
        # UNet that has never seen the offset should find both about equally hard.
        after = generator.get_state()
        generator.set_state(draws)
        plain = self.compute_loss(batch, generator, latents=plain_latents)["loss"]
        generator.set_state(after)
        self.log("val/loss_plain", plain, batch_size=len(batch.caption), sync_dist=True)
        return loss

    # -- generation: train.py predict and the TransparentSamples callback ------------------

    def image_generator(self) -> TransparentImageGenerator:
        """Text -> RGBA with this module's parts (shared, so it always sees the current weights)."""
        if self._image_generator is None:
            self._image_generator = TransparentImageGenerator(
                self.unet,
                self.vae,
                self.text_encoders,
                self.transparent_decoder,
                self.hparams.base_model,
                self.hparams.base_revision,
                self.hparams.decode_augmentation,
            )
        return self._image_generator

    def on_predict_start(self) -> None:
        # After the checkpoint is restored: the extra adapters are not part of its state.
        for lora in self.hparams.community_loras or []:
            self.image_generator().add_community_lora(lora)

    def on_predict_end(self) -> None:
        self.image_generator().remove_community_loras()

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[GeneratedImage]:
        return self.image_generator()(batch.prompts, batch.seeds, batch.settings, batch.indices)
