"""Foreground captions from a local image-text-to-text model (LLaVA-class), for ``python -m data filter``.

The model folder is loaded through transformers' ``image-text-to-text`` pipeline (``save_pretrained``
layout: the model, its processor and tokenizer); nothing is downloaded. The model sees the foreground
composited over mid-grey (``data.scorers.on_grey``). With a chat template the prompt goes in as a
user message beside the image; without one the prompt is given as it is and must hold the model's
own image token (e.g. ``"<image>\\nDescribe the object."``). Generation is greedy, so a caption
depends on the image and the model alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data.scorers import existing_path

DEFAULT_PROMPT = "Describe the object in this image in one short sentence."


class Captioner:
    """Captions of uint8 RGB images from the image-text-to-text model in ``folder``.

    ``name`` (the folder's name) is what samples record as ``captioned_by``.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        prompt: str = DEFAULT_PROMPT,
        max_new_tokens: int = 60,
        device: str = "cpu",
        batch_size: int = 4,
    ):
        from transformers import pipeline

        folder = existing_path(folder, "captioning model folder", "give a local folder holding an image-text-to-text "
                               "model with its processor (e.g. a LLaVA model saved with save_pretrained)")
        try:
            self.pipeline = pipeline("image-text-to-text", model=str(folder), device=device)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot load an image-text-to-text model from {folder}: {error}. Fix: give a folder "
                             "written by save_pretrained of the model and of its processor") from error
        self.chat = getattr(self.pipeline.processor, "chat_template", None) is not None
        if not self.chat and not prompt.strip():
            raise ValueError(f"{folder} has no chat template, so the prompt is given as it is; it is empty. Fix: give "
                             "--caption-prompt with the model's image token, e.g. '<image>\\nDescribe the object.'")
        self.name = folder.resolve().name
        self.prompt = prompt
        self.generate = {"max_new_tokens": max_new_tokens, "do_sample": False}
        self.batch_size = batch_size

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        pictures = [Image.fromarray(image) for image in images]
        if self.chat:
            chats = [[{"role": "user", "content": [{"type": "image", "image": picture},
                                                   {"type": "text", "text": self.prompt}]}] for picture in pictures]
            outputs = self.pipeline(text=chats, generate_kwargs=self.generate, return_full_text=False,
                                    batch_size=self.batch_size)
        else:
            outputs = self.pipeline(images=pictures, text=[self.prompt] * len(pictures), generate_kwargs=self.generate,
                                    return_full_text=False, batch_size=self.batch_size)
        return [_text(output).strip() for output in outputs]


def _text(output: list[dict] | dict) -> str:
    """The generated text of one pipeline output (a list of one candidate, or the candidate)."""
    candidate = output[0] if isinstance(output, list) else output
    return str(candidate["generated_text"])
