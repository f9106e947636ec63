"""Inference for DiffuMatting (arXiv:2403.06168): text -> an object on a green screen -> its
cutout. Sampling is the transparent generator's (diffusers' pipelines and schedulers, the same
seeds); the latents are decoded by the plain VAE into the green-screen image, and the matte is
pulled off the known backing colour (``layerdiff.keying``: the chroma key and colour unmixing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from layerdiff.keying import chroma_key_alpha, unmix_foreground
from layerdiff.models import codec
from layerdiff.models.base import TextEncoders
from layerdiff.pipelines.transparent import GeneratedImage, GenerationSettings, TransparentImageGenerator


class GreenScreenGenerator(TransparentImageGenerator):
    """Text -> ``GeneratedImage``s whose ``rgb``/``alpha`` are the keyed cutout, with the
    green-screen image it was keyed from and its matte as ``extras["screen"]`` and
    ``extras["alpha"]`` (written to ``screen/`` and ``alpha/``: a matting data set).

    Args:
        unet, vae, text_encoders, base_model, base_revision: as for ``TransparentImageGenerator``.
        key_colour: the backing colour the model was trained on, 0-255 (pure green).
        prompt_template: applied to each prompt, as the training captions were (``GreenScreen``'s
            ``caption_template``); a prompt that already holds its words is left as it is.
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
    ) -> None:
        super().__init__(unet, vae, text_encoders, None, base_model, base_revision)
        self.key = tuple(value / 255.0 for value in key_colour)
        self.key_colour = tuple(key_colour)
        self.prompt_template = prompt_template

    def templated(self, prompt: str) -> str:
        fixed = self.prompt_template.replace("{caption}", "").strip(" ,").lower()
        return prompt if fixed in prompt.lower() else self.prompt_template.format(caption=prompt)

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        screen = codec.decode_opaque(self.pipeline.vae, latents)
        alpha = chroma_key_alpha(screen, self.key)
        # screen/ + alpha/ with the same file names: the image + alpha layout matting trainers read
        return alpha, unmix_foreground(screen, alpha, self.key), {"screen": screen, "alpha": alpha}

    def model_parameters(self) -> dict[str, Any]:
        return {**super().model_parameters(), "key_colour": list(self.key_colour), "matte": "chroma key"}

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], settings: GenerationSettings,
                 indices: Sequence[int] | None = None) -> list[GeneratedImage]:
        images = super().__call__([self.templated(prompt) for prompt in prompts], seeds, settings, indices)
        for image, prompt in zip(images, prompts):
            image.parameters["prompt_as_given"] = prompt
        return images
