"""What every objective that fine-tunes a diffusion UNet shares: the frozen base it loads (VAE,
transparency codec, text encoders, noise schedule), its optimizer and learning-rate schedule,
and the fixed validation noise. A subclass builds its UNet (LoRA or adapters) and writes its
``compute_loss`` with the pure step of ``layerdiff.diffusion``."""

from __future__ import annotations

import torch

from layerdiff import diffusion
from layerdiff.batches import TokenIds
from layerdiff.formats.layerdiffuse_vae import load_transparency_models
from layerdiff.models.base import detect_architecture, freeze, load_scheduler, load_text_encoders, load_vae
from layerdiff.models.text import CaptionTokenizer, PromptConditioning, PromptEmbeddings
from layerdiff.modules.base import FrozenBaseModule, TrainedParts
from layerdiff.optim import build_lr_schedule, build_optimizer
from layerdiff.resume import rank_seed


class DiffusionObjective(FrozenBaseModule):
    """A UNet (``self.unet``, the trained part) over a frozen SD1.5 / SDXL base.

    Subclasses call :meth:`load_base` in their constructor, then set ``self.unet``; their
    hyperparameters must include the optimizer settings read by ``configure_optimizers``
    (``optimizer``, ``learning_rate``, ``betas``, ``weight_decay``, ``warmup_steps``,
    ``lr_schedule``) and ``min_snr_gamma``.
    """

    trained = TrainedParts(exported=("unet",))
    generators = ("noise",)  # timesteps, noise and caption dropout of training steps

    def load_base(self, transparent_vae: str | None, base_model: str, base_revision: str | None,
                  prediction_type: str | None) -> None:
        """The frozen parts: VAE, transparency encoder and decoder (none for an objective on opaque
        images: ``transparent_vae=None``), text encoders, scheduler."""
        self.architecture = detect_architecture(base_model, revision=base_revision)
        self.vae = freeze(load_vae(base_model, revision=base_revision))
        self.transparent_encoder = self.transparent_decoder = None
        if transparent_vae is not None:
            encoder, decoder = load_transparency_models(transparent_vae)
            self.transparent_encoder, self.transparent_decoder = freeze(encoder), freeze(decoder)
        self.text_encoders = load_text_encoders(base_model, revision=base_revision)
        self.text_encoder_modules = torch.nn.ModuleList(freeze(encoder) for encoder in self.text_encoders.encoders)
        self.conditioning = PromptConditioning(self.text_encoders)
        self.noise_scheduler = load_scheduler(base_model, revision=base_revision)
        self.prediction_type = prediction_type or self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def encode_prompts(self, captions: list[str], token_ids: TokenIds | None = None) -> PromptEmbeddings:
        return self.conditioning.encode(captions, self.device, token_ids)

    def loader_batch_transform(self) -> CaptionTokenizer:
        """What the DataLoader workers run on each batch (``data.ShardDataModule`` asks for it): the
        captions' tokenization, so the training step only encodes them."""
        return CaptionTokenizer(self.text_encoders.tokenizers)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample Min-SNR-gamma weights when ``min_snr_gamma`` is set, else ``None``."""
        gamma = self.hparams.min_snr_gamma
        if gamma is None:
            return None
        snr = diffusion.signal_to_noise_ratio(self.noise_scheduler.alphas_cumprod, timesteps)
        return diffusion.min_snr_weights(snr, gamma, self.prediction_type)

    def on_validation_epoch_start(self) -> None:
        # The same timesteps and noise at every validation, so val/loss curves compare.
        self._validation_generator = torch.Generator().manual_seed(rank_seed(self.hparams.seed + 1, self.global_rank))

    def parameter_groups(self) -> list[dict]:
        """What the optimizer steps, as torch parameter groups: one group of every trained
        parameter at the recipe's settings. A subclass with a part that needs its own learning
        rate (one trained from scratch beside a fine-tuned UNet) returns more groups."""
        return [{"params": list(self.trained_parameters())}]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.parameter_groups(), hp.optimizer, hp.learning_rate, tuple(hp.betas), hp.weight_decay)
        schedule = build_lr_schedule(optimizer, hp.lr_schedule, hp.warmup_steps, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
