"""DiffuMatting (Hu et al., ECCV 2024, arXiv:2403.06168): fine-tune an SD1.5 / SDXL UNet to draw
objects on a pure green screen with detailed edges, and train the matting head that reads their
alpha off the VAE decoder. The noise loss, two of the paper's losses (sec. 3.3-3.4) and the
head's matting losses (sec. 3.5)."""

from __future__ import annotations

from typing import Literal, TypedDict

import torch

from layerdiff import diffusion, losses
from layerdiff.batches import ImageBatch
from layerdiff.keying import chroma_key_alpha, head_matte, unmix_foreground
from layerdiff.models import codec
from layerdiff.models.attention import TokenAttention, capture_token_attention
from layerdiff.models.base import load_unet
from layerdiff.models.lora import DEFAULT_ADAPTER, RELEASED_LORA_TARGETS, add_lora
from layerdiff.models.matting_head import MattingHead, MattingHeadConfig, decode_with_features
from layerdiff.models.text import PromptEmbeddings, keyword_token_weights
from layerdiff.modules.base import TrainedParts
from layerdiff.modules.diffusion_objective import DiffusionObjective
from layerdiff.optim import LearningRateSchedule, OptimizerName
from layerdiff.pipelines import CommunityLora, GeneratedImage, PromptBatch
from layerdiff.pipelines.green_screen import GreenScreenGenerator


class GreenBackgroundLoss(TypedDict, total=False):
    """The green-background control loss (sec. 3.3); keys left out take these defaults.

    Keys:
        weight: its weight in the total (1.0; 0 switches it off and captures nothing).
        downsampling: the cross-attention maps used, by their size relative to the latent
            (``(2, 4)``: SD1.5's 32 and 16 px maps at 512 px, SDXL's 64 and 32 at 1024). The
            paper does not say which; the coarse maps are where a token's attention is known to
            follow its object (Prompt-to-Prompt's 16 x 16), the finest are mostly texture.
        normalisation: ``max`` (each map divided by its own spatial maximum) or ``none`` (raw
            softmax probabilities). With ``none`` the token must take all of a background pixel's
            attention from the other 76, which fights the text's meaning; ``max`` asks only that
            the green token attend where the background is, relative to where it attends most.
    """

    weight: float
    downsampling: tuple[int, ...]
    normalisation: Literal["max", "none"]


class TransitionBoundaryLoss(TypedDict, total=False):
    """The transition-boundary (detail-enhancement) loss (sec. 3.4); defaults as below.

    Keys:
        weight: its weight in the total (0.1; 0 switches it off).
        space: ``latent`` (Sobel maps of the UNet's clean-latent estimate against the target
            latent, as the paper's description reads: no decode, so it costs nothing) or ``image`` (the estimate decoded by the
            frozen VAE, with gradients, against the training image: the paper's "synthesized
            image", at the price of a decoder forward and backward per step).
        band_width: pixels either side of a change in alpha that count as the boundary (2).
    Each sample's term is weighted by ``alpha_bar_t``, so an estimate at high noise (mostly
    noise, amplified by ``1 / sqrt(alpha_bar_t)``) does not swamp the others.
    """

    weight: float
    space: Literal["latent", "image"]
    band_width: int


class MattingHeadTraining(TypedDict, total=False):
    """The matting head (sec. 3.5, ``layerdiff.models.matting_head``), trained beside the UNet on
    the same green composites: the frozen decoder decodes each composite's latent and the head
    predicts its alpha. Its parameters are its own, so it learns the same whatever the UNet does.

    Keys:
        weight: multiplies its terms in the total (1.0); 0 trains no head, and generation then
            keys the matte off the screen.
        width, depth: the head's shape (32, 2).
        learning_rate: its own (1e-3): it starts from nothing, where the UNet is fine-tuned.
        alpha, gradient, composition: weights of DIM's alpha-prediction and compositional losses
            and of the gradient loss (``layerdiff.losses``; 1.0, 1.0, 0.5: DIM weighs its two
            terms 0.5 each; the gradient term keeps thin edges from being averaged away).
    """

    weight: float
    width: int
    depth: int
    learning_rate: float
    alpha: float
    gradient: float
    composition: float


# The paper gives no weights. These make each term start near the noise loss's size on the demo
# (pretrained tiny model, held-out batch, weight 1: noise 0.15-0.29, green 0.20, boundary 1.2-1.6).
GREEN_DEFAULTS = GreenBackgroundLoss(weight=1.0, downsampling=(2, 4), normalisation="max")
BOUNDARY_DEFAULTS = TransitionBoundaryLoss(weight=0.1, space="latent", band_width=2)
HEAD_DEFAULTS = MattingHeadTraining(weight=1.0, width=32, depth=2, learning_rate=1e-3, alpha=1.0, gradient=1.0,
                                    composition=0.5)


class DiffuMattingModule(DiffusionObjective):
    trained = TrainedParts(exported=("unet", "matting_head"))

    """Trains the base UNet (a LoRA, or fully) on green-screen images with the noise loss (LD
    eq. 7, on the plain VAE latents), the green-background control loss and the transition
    boundary loss (``layerdiff.losses``), and the matting head on the same images:
    ``L = L_noise + w_green L_green + w_boundary L_boundary + w_head L_head``.

    Batches are image batches whose ``rgb`` is the object over the key colour and ``alpha`` its
    matte ``M``: ``data.transforms.GreenScreen`` as the data module's ``sample_transform`` makes
    them from RGBA shards and puts the keyword into every caption. A caption (not dropped for
    classifier-free guidance) without the keyword is an error naming the sample.

    Args:
        base_model: diffusers model (hub id, local folder, or ``embedded:tiny-sdxl``), SDXL or
            SD1.5.
        base_revision: hub revision of ``base_model``.
        lora_rank: rank of the peft LoRA on ``lora_targets``; ``None`` fine-tunes the whole UNet.
        lora_alpha: LoRA scale numerator (scale = alpha / rank); defaults to the rank.
        lora_targets: module-name suffixes the LoRA adapts.
        keyword: the caption word whose cross-attention the green-background loss supervises.
        key_colour: the backing colour of the training images (``GreenScreen``'s ``colour``),
            which generation keys the matte off.
        prompt_template: what generation does to a prompt (``GreenScreen``'s ``caption_template``).
        green_loss: :class:`GreenBackgroundLoss` settings.
        boundary_loss: :class:`TransitionBoundaryLoss` settings.
        matting_head: :class:`MattingHeadTraining` settings.
        refine_matte: when generating, refine the head's matte against the key colour (GreenPost,
            ``layerdiff.keying.refine_matte``).
        prediction_type: ``epsilon`` or ``v_prediction``; ``None`` keeps the base model's.
        min_snr_gamma: Min-SNR-gamma weighting of the noise loss; ``None`` = off.
        noise_offset: scale of per-channel offset noise (0 = off).
        caption_dropout: probability of training a sample on the empty caption (its green loss
            is then left out: the empty caption has no keyword).
        optimizer: ``adamw`` or bitsandbytes ``adamw8bit``.
        learning_rate: peak learning rate.
        betas: Adam betas.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        lr_schedule: ``constant``, ``linear`` or ``cosine`` after warm-up.
        gradient_checkpointing: recompute UNet activations in backward to save memory.
        seed: base seed of the noise/timestep/dropout generators (per rank).
        community_loras: diffusers/peft LoRA files stacked on the model, each with its weight,
            when generating with ``train.py predict`` (a style on top of the green screen).
        max_non_finite_steps: consecutive non-finite steps (each skipped) before training stops.
    """

    def __init__(
        self,
        base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        base_revision: str | None = None,
        lora_rank: int | None = 64,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = RELEASED_LORA_TARGETS,
        keyword: str = "green",
        key_colour: tuple[int, int, int] = (0, 255, 0),
        prompt_template: str = "green background, {caption}",
        green_loss: GreenBackgroundLoss | None = None,
        boundary_loss: TransitionBoundaryLoss | None = None,
        matting_head: MattingHeadTraining | None = None,
        refine_matte: bool = True,
        prediction_type: Literal["epsilon", "v_prediction"] | None = None,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        caption_dropout: float = 0.1,
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        lr_schedule: LearningRateSchedule = "constant",
        gradient_checkpointing: bool = False,
        seed: int = 0,
        community_loras: list[CommunityLora] | None = None,
        max_non_finite_steps: int = 5,
    ) -> None:
        super().__init__(max_non_finite_steps=max_non_finite_steps, seed=seed)
        if lora_rank is not None and lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, or null for a full fine-tune; got {lora_rank}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability in [0, 1]; got {caption_dropout}")
        self.green = _settings("green_loss", GREEN_DEFAULTS, green_loss)
        self.boundary = _settings("boundary_loss", BOUNDARY_DEFAULTS, boundary_loss)
        self.head_settings = _settings("matting_head", HEAD_DEFAULTS, matting_head)
        if not self.green["downsampling"] or any(factor < 1 for factor in self.green["downsampling"]):
            raise ValueError(f"green_loss.downsampling must list factors >= 1; got {self.green['downsampling']}")
        self.save_hyperparameters()

        self.load_base(None, base_model, base_revision, prediction_type)
        self.unet = load_unet(base_model, revision=base_revision).train()
        if lora_rank is not None:
            add_lora(self.unet, DEFAULT_ADAPTER, lora_rank, lora_alpha, lora_targets)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.attention = capture_token_attention(self.unet)
        self.matting_head = None
        if self.head_settings["weight"]:
            config = MattingHeadConfig.for_vae(self.vae, width=self.head_settings["width"], depth=self.head_settings[
                "depth"], key_colour=tuple(value / 255.0 for value in key_colour))
            self.matting_head = MattingHead(config)
        self.keyword_ids = self.text_encoders.tokenizers[0](keyword, add_special_tokens=False).input_ids
        self._image_generator: GreenScreenGenerator | None = None

    # -- the objective -------------------------------------------------------------------

    def compute_loss(self, batch: ImageBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The three terms and their weighted sum on one batch; every random draw from ``generator``."""
        if not isinstance(batch, ImageBatch):
            raise TypeError(f"DiffuMattingModule trains on image batches (green composites with their alpha), got a "
                            f"{type(batch).__name__}: use image shards with data.transforms.GreenScreen")
        hp, alphas_cumprod = self.hparams, self.noise_scheduler.alphas_cumprod
        with torch.no_grad():
            vae_latents = codec.encode_opaque(self.vae, batch.rgb)
            latents = codec.diffusion_latent(self.vae, vae_latents)
        draws = diffusion.draw(generator, [latents.shape], self.num_train_timesteps, hp.caption_dropout, hp.noise_offset)
        timesteps = draws.timesteps.to(latents.device)
        noise = draws.noise[0].to(latents.device, latents.dtype)
        dropped = draws.drop[0]
        # Without the green loss nothing reads the keyword, and a caption need not hold it (a style LoRA's data).
        token_weights = self._keyword_weights(batch, dropped) if self.green["weight"] else torch.zeros(len(batch), 1)

        prompts = self.conditioning.drop(self.encode_prompts(batch.caption, batch.token_ids), dropped)
        noisy = diffusion.add_noise(alphas_cumprod, latents, noise, timesteps)
        attention = self.attention.record(TokenAttention(token_weights.to(latents.device), tuple(latents.shape[-2:]),
                                                         self.green["downsampling"] if self.green["weight"] else ()))
        prediction = self._unet(noisy, timesteps, prompts, batch, latents)

        target = diffusion.target(self.prediction_type, alphas_cumprod, latents, noise, timesteps)
        terms = {"noise": diffusion.denoising_loss(prediction, target, self.loss_weights(timesteps))}
        total = terms["noise"]
        if self.green["weight"]:
            terms["green"] = self._green_loss(attention.maps, batch.alpha, (~dropped).to(latents.device))
            total = total + self.green["weight"] * terms["green"]
        if self.boundary["weight"]:
            clean = diffusion.clean_estimate(self.prediction_type, alphas_cumprod, noisy, prediction.float(), timesteps)
            terms["boundary"] = self._boundary_loss(clean, latents, batch, alphas_cumprod[timesteps.cpu()])
            total = total + self.boundary["weight"] * terms["boundary"]
        if self.matting_head is not None:
            terms.update(self._matting_terms(vae_latents, batch))
            total = total + self.head_settings["weight"] * terms["matte"]
        terms["loss"] = total
        return terms

    def _matting_terms(self, vae_latents: torch.Tensor, batch: ImageBatch) -> dict[str, torch.Tensor]:
        """The head's loss on the frozen decode of the composites' own latents (DIM eq. 1-2 and
        the gradient loss), and, for the record, the chroma key's and the head's alpha MSE."""
        settings, key = self.head_settings, self.matting_head.config.key_colour
        image, features = decode_with_features(self.vae, vae_latents)
        alpha_hat = head_matte(self.matting_head, image, features)
        alpha = batch.alpha.to(alpha_hat)
        foreground = unmix_foreground(batch.rgb.to(alpha_hat), alpha, key)  # exact: the composite was made from it
        backing = alpha_hat.new_tensor(key).reshape(1, 3, 1, 1)
        terms = {"matte_alpha": losses.alpha_prediction_loss(alpha_hat, alpha),
                 "matte_gradient": losses.gradient_loss(alpha_hat, alpha),
                 "matte_composition": losses.composition_loss(alpha_hat, foreground, backing, batch.rgb.to(alpha_hat))}
        terms["matte"] = sum(settings[name.removeprefix("matte_")] * terms[name] for name in list(terms))
        terms["alpha_mse_head"] = (alpha_hat.detach() - alpha).square().mean()
        terms["alpha_mse_key"] = (chroma_key_alpha(image.to(alpha), key) - alpha).square().mean()
        return terms

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": list(self.trained_parameters(("unet",)))}]
        if self.matting_head is not None:
            groups.append({"params": list(self.matting_head.parameters()), "lr": self.head_settings["learning_rate"]})
        return groups

    def _unet(self, noisy, timesteps, prompts: PromptEmbeddings, batch: ImageBatch, latents) -> torch.Tensor:
        target_size = tuple(side * self.vae_scale_factor for side in latents.shape[-2:])
        added = self.conditioning.added_conditions(prompts, batch.original_size, batch.crop_top_left, target_size)
        return self.unet(noisy, timesteps, encoder_hidden_states=prompts.hidden, added_cond_kwargs=added).sample

    def _keyword_weights(self, batch: ImageBatch, dropped: torch.Tensor) -> torch.Tensor:
        token_ids = batch.token_ids[0] if batch.token_ids is not None else self.text_encoders.tokenizers[0](
            list(batch.caption), padding="max_length", max_length=self.text_encoders.tokenizers[0].model_max_length,
            truncation=True, return_tensors="pt").input_ids
        weights = keyword_token_weights(token_ids.cpu(), self.keyword_ids)
        missing = [row for row in range(len(batch)) if not dropped[row] and not weights[row].any()]
        if missing:
            row = missing[0]
            raise ValueError(
                f"sample {batch.key[row]}: its caption {batch.caption[row]!r} has no {self.hparams.keyword!r} token (or it "
                "was cut off at the tokenizer's length), so the green-background loss has nothing to supervise: set "
                "`data.init_args.sample_transform: data.transforms.GreenScreen` (it starts each caption with 'green "
                "background, '), "
                f"or write the keyword into the captions ({len(missing)} of {len(batch)} samples in this batch)")
        return weights * (~dropped)[:, None]

    def _green_loss(self, maps: list[torch.Tensor], alpha: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        if not maps:
            raise ValueError(f"no cross-attention map of the UNet has a size in green_loss.downsampling="
                             f"{self.green['downsampling']} for this latent size: choose factors at which the UNet "
                             "has cross-attention (SD1.5: 1, 2, 4, 8; SDXL: 2, 4)")
        if self.green["normalisation"] == "max":
            maps = [attention / attention.flatten(1).amax(dim=1).clamp_min(1e-8)[:, None, None] for attention in maps]
        return losses.green_background_loss(maps, 1.0 - alpha, kept.float())

    def _boundary_loss(self, clean: torch.Tensor, latents: torch.Tensor, batch: ImageBatch, alpha_bar: torch.Tensor):
        band = losses.transition_band(batch.alpha, self.boundary["band_width"])
        weights = alpha_bar.to(clean.device, torch.float32)
        if self.boundary["space"] == "image":
            decoded = codec.decode_pixels(self.vae, codec.vae_latent(self.vae, clean.to(latents.dtype)))
            return losses.transition_boundary_loss(decoded, batch.rgb, band, weights)
        return losses.transition_boundary_loss(clean, latents, band, weights)

    def training_step(self, batch: ImageBatch, batch_idx: int) -> torch.Tensor | None:
        terms = self.compute_loss(batch, self.generator("noise"))
        if self.skip_non_finite(terms):
            return None  # Lightning then skips backward and the update
        size = len(batch.caption)
        self.log("train/loss", terms["loss"].detach(), prog_bar=True, batch_size=size)
        for name in _LOGGED_TERMS:
            if name in terms:
                self.log(f"train/{name}", terms[name].detach(), batch_size=size)
        return terms["loss"]

    def validation_step(self, batch: ImageBatch, batch_idx: int) -> torch.Tensor:
        terms = self.compute_loss(batch, self._validation_generator)
        size = len(batch.caption)
        self.log("val/loss", terms["loss"], prog_bar=True, batch_size=size, sync_dist=True)
        for name in _LOGGED_TERMS:
            if name in terms:
                self.log(f"val/{name}", terms[name], batch_size=size, sync_dist=True)
        return terms["loss"]

    def on_validation_end(self) -> None:
        self.attention.stop()  # a generation after validation must not capture
        super().on_validation_end()

    # -- generation: train.py predict and the sample callbacks -----------------------------

    def image_generator(self) -> GreenScreenGenerator:
        """Text -> green screen -> keyed cutout with this module's parts (shared, never copied)."""
        if self._image_generator is None:
            hp = self.hparams
            self._image_generator = GreenScreenGenerator(self.unet, self.vae, self.text_encoders, hp.base_model,
                                                         hp.base_revision, tuple(hp.key_colour), hp.prompt_template,
                                                         self.matting_head, hp.refine_matte)
        self.attention.stop()
        return self._image_generator

    def on_predict_start(self) -> None:
        # After the checkpoint is restored: the extra adapters are not part of its state.
        for lora in self.hparams.community_loras or []:
            self.image_generator().add_community_lora(lora)

    def on_predict_end(self) -> None:
        self.image_generator().remove_community_loras()

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[GeneratedImage]:
        return self.image_generator()(batch.prompts, batch.seeds, batch.settings, batch.indices)


_LOGGED_TERMS = ("noise", "green", "boundary", "matte", "alpha_mse_head", "alpha_mse_key")


def _settings(name: str, defaults: dict, given: dict | None) -> dict:
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise ValueError(f"{name} has no setting {sorted(unknown)}; it takes {sorted(defaults)}")
    settings = {**defaults, **(given or {})}
    if isinstance(settings.get("downsampling"), list):
        settings["downsampling"] = tuple(settings["downsampling"])
    return settings
