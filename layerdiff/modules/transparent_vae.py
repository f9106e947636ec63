"""Latent transparency (LayerDiffusion sec. 3.1): train the transparency encoder and decoder
around a frozen SD/SDXL VAE, with the identity, reconstruction and PatchGAN losses."""

from __future__ import annotations

from typing import Literal

import torch
from torchmetrics import MeanSquaredError
from torchmetrics.image import PeakSignalNoiseRatio

from layerdiff import losses
from layerdiff.batches import ImageBatch
from layerdiff.distributed import is_deferred, trained_part
from layerdiff.metrics import MaskedPSNR
from layerdiff.models import codec
from layerdiff.models.base import freeze, load_vae
from layerdiff.models.discriminator import PatchDiscriminator
from layerdiff.models.transparency import LatentTransparencyEncoder, TransparencyDecoder
from layerdiff.modules.base import FrozenBaseModule, TrainedParts
from layerdiff.optim import OptimizerName, build_optimizer


class TransparentVAEModule(FrozenBaseModule):
    """Trains ``E`` (latent offset encoder) and ``D`` (transparency decoder) of LD sec. 3.1.

    Encoding: ``x = mean(E*(I_p))`` and, as in the released code, the offset takes the place
    of the Gaussian sample noise: ``x_a = x + std * E(a, rgb)``. Decoding:
    ``[a_hat, rgb_hat] = D(D*(x_a), x_a)``. The latents here are the VAE's unscaled latents.

    Args:
        base_model: diffusers model (hub id or local folder, or ``embedded:tiny-sdxl``)
            whose ``vae`` subfolder is the frozen VAE ``E*``/``D*``.
        base_revision: hub revision of ``base_model``.
        decoder_block_out_channels: widths of the transparency decoder; the default is the
            released "UNet1024" layout, smaller widths are for tests and demos.
        decoder_layers_per_block: resnets per decoder down block.
        decoder_attention_head_dim: attention head size in the decoder's attention blocks.
        decoder_norm_num_groups: GroupNorm groups in the decoder.
        init_from: folder with ``vae_transparent_encoder.safetensors`` and
            ``vae_transparent_decoder.safetensors`` (released weights or our exports) to
            start from.
        reconstruction_weight: ``l_recon`` of LD eq. 6.
        identity_weight: ``l_identity`` of LD eq. 6.
        adversarial_weight: ``l_disc`` of LD eq. 6 (0 disables the discriminator).
        adaptive_adversarial_weight: scale the GAN term by the gradient-norm ratio at the
            decoder's last layer (latent diffusion's ``LPIPSWithDiscriminator``).
        discriminator_start_step: generator steps before the GAN terms switch on.
        discriminator_channels: PatchGAN base width.
        discriminator_layers: PatchGAN depth.
        discriminator_norm: normalisation layers in the PatchGAN.
        perceptual_weight: weight of an LPIPS term added to the reconstruction (0 = off).
        lpips_weights: local file with LPIPS-VGG weights; required when
            ``perceptual_weight > 0`` (see ``layerdiff.models.lpips``).
        optimizer: ``adamw`` or bitsandbytes ``adamw8bit``.
        learning_rate: generator learning rate (paper: 1e-5).
        discriminator_learning_rate: defaults to ``learning_rate``.
        betas: Adam betas.
        weight_decay: AdamW weight decay.
        gradient_clip_norm: clip each optimizer's gradients to this norm (manual
            optimisation: the Trainer's ``gradient_clip_val`` does not apply).
        gradient_checkpointing: recompute decoder activations in backward to save memory.
        validation_augmentation: decode with the 8-way flip/rotation median in validation,
            as released inference does.
        max_non_finite_steps: consecutive steps with a non-finite loss or gradient (each
            skipped, with no update) after which training stops with an error.
    """

    trained = TrainedParts(exported=("transparent_encoder", "transparent_decoder"), auxiliary=("discriminator",))

    def __init__(
        self,
        base_model: str = "stabilityai/stable-diffusion-xl-base-1.0",
        base_revision: str | None = None,
        decoder_block_out_channels: tuple[int, ...] = (32, 32, 64, 128, 256, 512, 512),
        decoder_layers_per_block: int = 2,
        decoder_attention_head_dim: int = 8,
        decoder_norm_num_groups: int = 4,
        init_from: str | None = None,
        reconstruction_weight: float = 1.0,
        identity_weight: float = 1.0,
        adversarial_weight: float = 0.01,
        adaptive_adversarial_weight: bool = True,
        discriminator_start_step: int = 0,
        discriminator_channels: int = 64,
        discriminator_layers: int = 3,
        discriminator_norm: Literal["batch", "group", "none"] = "batch",
        perceptual_weight: float = 0.0,
        lpips_weights: str | None = None,
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 1e-5,
        discriminator_learning_rate: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        gradient_clip_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        validation_augmentation: bool = False,
        max_non_finite_steps: int = 5,
    ) -> None:
        super().__init__(max_non_finite_steps=max_non_finite_steps)
        if perceptual_weight > 0 and lpips_weights is None:
            raise ValueError(
                "perceptual_weight > 0 needs LPIPS weights on disk: set model.init_args.lpips_weights "
                "to the converted file (see layerdiff/models/lpips.py), or set perceptual_weight: 0."
            )
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.vae = freeze(load_vae(base_model, revision=base_revision))
        # Trained parts: under sharded training only a node's first process builds them whole.
        self.transparent_encoder = trained_part(LatentTransparencyEncoder)
        self.transparent_decoder = trained_part(
            TransparencyDecoder,
            block_out_channels=tuple(decoder_block_out_channels),
            layers_per_block=decoder_layers_per_block,
            attention_head_dim=decoder_attention_head_dim,
            norm_num_groups=decoder_norm_num_groups,
        )
        if init_from is not None and not is_deferred(self.transparent_decoder):
            from layerdiff.formats.layerdiffuse_vae import load_transparent_vae

            load_transparent_vae(self.transparent_encoder, self.transparent_decoder, init_from)
        if gradient_checkpointing:
            self.transparent_decoder.enable_gradient_checkpointing()

        self.discriminator = (
            trained_part(
                PatchDiscriminator,
                in_channels=4,
                channels=discriminator_channels,
                layers=discriminator_layers,
                norm=discriminator_norm,
            )
            if adversarial_weight > 0
            else None
        )
        if perceptual_weight > 0:
            from layerdiff.models.lpips import LPIPS

            self.lpips = LPIPS.from_file(lpips_weights)

        self.val_alpha_mse = MeanSquaredError()
        self.val_rgb_psnr_visible = MaskedPSNR()
        self.val_identity_psnr = PeakSignalNoiseRatio(data_range=1.0)

    # -- the model ---------------------------------------------------------------------

    def encode(self, rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen VAE's latent ``x`` and the adjusted latent ``x_a`` (unscaled)."""
        return codec.encode_adjusted(self.vae, self.transparent_encoder, rgb, alpha)

    def decode_frozen(self, latent: torch.Tensor) -> torch.Tensor:
        return codec.decode_pixels(self.vae, latent)

    def decode_transparent(
        self, frozen_decode: torch.Tensor, latent: torch.Tensor, augmentation: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return codec.decode_transparent(self.transparent_decoder, frozen_decode, latent, augmentation)

    def reconstruct(self, rgb: torch.Tensor, alpha: torch.Tensor, augmentation: bool = False) -> dict[str, torch.Tensor]:
        """Full encode-decode pass; the image-logging callback and validation use it."""
        latent, adjusted = self.encode(rgb, alpha)
        adjusted_decode = self.decode_frozen(adjusted)
        alpha_hat, rgb_hat = self.decode_transparent(adjusted_decode, adjusted, augmentation)
        return {
            "alpha": alpha_hat.clamp(0.0, 1.0),
            "rgb": rgb_hat.clamp(0.0, 1.0),
            "adjusted_decode": adjusted_decode.clamp(0.0, 1.0),
            "original_decode": self.decode_frozen(latent).clamp(0.0, 1.0),
        }

    # -- training ------------------------------------------------------------------------

    def _discriminator_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.discriminator_start_step

    def training_step(self, batch: ImageBatch, batch_idx: int) -> None:
        rgb, alpha = batch.rgb, batch.alpha
        hp = self.hparams
        optimizers = self.optimizers()
        generator_optimizer, discriminator_optimizer = (
            optimizers if isinstance(optimizers, list) else (optimizers, None)
        )

        self.toggle_optimizer(generator_optimizer)
        latent, adjusted = self.encode(rgb, alpha)
        with torch.no_grad():
            original_decode = self.decode_frozen(latent)
        adjusted_decode = self.decode_frozen(adjusted)
        alpha_hat, rgb_hat = self.decode_transparent(adjusted_decode, adjusted)

        reconstruction = losses.reconstruction_loss(rgb_hat, alpha_hat, rgb, alpha)
        if hp.perceptual_weight > 0:
            reconstruction = reconstruction + hp.perceptual_weight * self.lpips(rgb_hat * 2 - 1, rgb * 2 - 1).mean()
        identity = losses.identity_loss(adjusted_decode, original_decode)
        fake = torch.cat([alpha_hat, rgb_hat], dim=1)

        adversarial = None
        if self._discriminator_active():
            adversarial = losses.generator_adversarial_loss(self.discriminator(fake * 2 - 1))
            if hp.adaptive_adversarial_weight:
                adaptive_weight = losses.adaptive_adversarial_weight(
                    reconstruction, adversarial, self.transparent_decoder.conv_out.weight
                )
                self.log("train/adaptive_weight", adaptive_weight)
                adversarial = adaptive_weight * adversarial
        generator_loss = losses.transparent_vae_generator_loss(
            reconstruction,
            identity,
            adversarial,
            reconstruction_weight=hp.reconstruction_weight,
            identity_weight=hp.identity_weight,
            adversarial_weight=hp.adversarial_weight,
        )
        terms = {"reconstruction": reconstruction, "identity": identity}
        if adversarial is not None:
            terms["adversarial"] = adversarial
        if self.skip_non_finite(terms):
            self.untoggle_optimizer(generator_optimizer)
            return
        generator_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(generator_loss)
        self._clip_and_step(generator_optimizer)
        self.untoggle_optimizer(generator_optimizer)

        self.log_dict(
            {
                "train/loss": generator_loss.detach(),
                "train/reconstruction": reconstruction.detach(),
                "train/identity": identity.detach(),
            },
            prog_bar=True,
        )
        if adversarial is None:
            return

        self.toggle_optimizer(discriminator_optimizer)
        real = torch.cat([alpha, rgb], dim=1)
        discriminator_loss = losses.hinge_discriminator_loss(
            self.discriminator(real * 2 - 1), self.discriminator(fake.detach() * 2 - 1)
        )
        if self.skip_non_finite({"discriminator": discriminator_loss}):
            self.untoggle_optimizer(discriminator_optimizer)
            return
        discriminator_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(discriminator_loss)
        self._clip_and_step(discriminator_optimizer, counts_as_step=False)
        self.untoggle_optimizer(discriminator_optimizer)
        self.log_dict({"train/adversarial": adversarial.detach(), "train/discriminator": discriminator_loss.detach()})

    def _clip_and_step(self, optimizer, counts_as_step: bool = True) -> None:
        """Clip and step. Lightning advances ``global_step`` on every optimizer step; the
        discriminator's step goes straight to the strategy (precision handling included) so
        that one training step stays one batch and one generator update, and ``max_steps``,
        ``val_check_interval`` and ``discriminator_start_step`` all count batches."""
        if self.hparams.gradient_clip_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_norm, gradient_clip_algorithm="norm")
        if counts_as_step:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)

    def configure_optimizers(self):
        hp = self.hparams
        generator_optimizer = build_optimizer(
            self.trained_parameters(self.trained.exported), hp.optimizer, hp.learning_rate, tuple(hp.betas), hp.weight_decay
        )
        if self.discriminator is None:
            return generator_optimizer
        discriminator_optimizer = build_optimizer(
            self.trained_parameters(self.trained.auxiliary),
            hp.optimizer,
            hp.discriminator_learning_rate or hp.learning_rate,
            tuple(hp.betas),
            hp.weight_decay,
        )
        return [generator_optimizer, discriminator_optimizer]

    # -- validation ------------------------------------------------------------------------

    def validation_step(self, batch: ImageBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        rgb, alpha = batch.rgb, batch.alpha
        outputs = self.reconstruct(rgb, alpha, augmentation=self.hparams.validation_augmentation)
        self.val_alpha_mse.update(outputs["alpha"], alpha)
        self.val_rgb_psnr_visible.update(outputs["rgb"], rgb, alpha > 0)
        self.val_identity_psnr.update(outputs["adjusted_decode"], outputs["original_decode"])
        self.log("val/alpha_mse", self.val_alpha_mse, prog_bar=True)
        self.log("val/rgb_psnr_visible", self.val_rgb_psnr_visible)
        self.log("val/identity_psnr", self.val_identity_psnr)
        return outputs
