"""Inference for DiffuMatting (arXiv:2403.06168): text -> an object on a green screen -> its
cutout. Sampling is the transparent generator's (diffusers' pipelines and schedulers, the same
seeds); the latents are decoded by the plain VAE into the green-screen image, and the matte is
read off the decoder's features by the matting head (sec. 3.5) and refined against the known
backing colour (GreenPost), or, without a head, pulled off the screen by the chroma key
(``layerdiff.keying``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from layerdiff.keying import chroma_key_alpha, estimate_foreground, head_matte, refine_matte, unmix_foreground
from layerdiff.models import codec
from layerdiff.models.base import TextEncoders
from layerdiff.models.matting_head import MattingHead, decode_with_features
from layerdiff.pipelines.transparent import GeneratedImage, GenerationSettings, TransparentImageGenerator


class GreenScreenGenerator(TransparentImageGenerator):
    """Text -> ``GeneratedImage``s whose ``rgb``/``alpha`` are the cutout, with what it was made
    from as ``extras`` (written to folders of those names, the same file names in each):
    ``screen`` (the green-screen image) and ``alpha`` (its final matte: with ``screen``, an image +
    alpha matting data set) and, with a matting head, ``alpha_head`` (the head's matte before
    refinement).

    The matte: the head's (``matting_head``), refined with the backing colour when ``refine`` is
    set (``layerdiff.keying.refine_matte``), the colour decontaminated by foreground estimation;
    without a head, the chroma key, and colour unmixing for the colour.

    Args:
        unet, vae, text_encoders, base_model, base_revision: as for ``TransparentImageGenerator``.
        key_colour: the backing colour the model was trained on, 0-255 (pure green).
        prompt_template: applied to each prompt, as the training captions were (``GreenScreen``'s
            ``caption_template``); a prompt that already holds its words is left as it is.
        matting_head: the trained head, or ``None`` for the chroma key.
        refine: refine the head's matte against the backing colour (GreenPost).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: TextEncoders,
        base_model: str,
        base_revision: str | None = None,
        key_colour: tuple[int, int, int] = (0, 255, 0),
        prompt_template: str = "green background, {caption}",
        matting_head: MattingHead | None = None,
        refine: bool = True,
    ) -> None:
        super().__init__(unet, vae, text_encoders, None, base_model, base_revision)
        self.key = tuple(value / 255.0 for value in key_colour)
        self.key_colour = tuple(key_colour)
        self.prompt_template = prompt_template
        self.matting_head = matting_head
        self.refine = refine

    def templated(self, prompt: str) -> str:
        fixed = self.prompt_template.replace("{caption}", "").strip(" ,").lower()
        return prompt if fixed in prompt.lower() else self.prompt_template.format(caption=prompt)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.matting_head is None:
            screen = codec.decode_opaque(self.pipeline.vae, latents)
            alpha = chroma_key_alpha(screen, self.key)
            return alpha, unmix_foreground(screen, alpha, self.key), {"screen": screen, "alpha": alpha}
        screen, features = decode_with_features(self.pipeline.vae, codec.vae_latent(self.pipeline.vae, latents))
        head_alpha = head_matte(self.matting_head, screen, features).to(screen.dtype)
        if self.refine:
            alpha, foreground = refine_matte(screen, head_alpha, self.key)
        else:
            alpha, foreground = head_alpha, estimate_foreground(screen, head_alpha)
        return alpha, foreground, {"screen": screen, "alpha": alpha, "alpha_head": head_alpha}

    def model_parameters(self) -> dict[str, Any]:
        matte = "chroma key" if self.matting_head is None else "matting head" + (" + GreenPost" if self.refine else "")
        return {**super().model_parameters(), "key_colour": list(self.key_colour), "matte": matte}

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], settings: GenerationSettings,
                 indices: Sequence[int] | None = None) -> list[GeneratedImage]:
        images = super().__call__([self.templated(prompt) for prompt in prompts], seeds, settings, indices)
        for image, prompt in zip(images, prompts):
            image.parameters["prompt_as_given"] = prompt
        return images
