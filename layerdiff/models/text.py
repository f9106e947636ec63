"""Text conditioning of SD1.5 and SDXL UNets, as the diffusers pipelines compute it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from layerdiff.batches import Batch, CachedBatch, LayeredBatch, TokenIds
from layerdiff.models.base import TextEncoders


@dataclass
class PromptEmbeddings:
    """What the UNet's cross-attention (and, for SDXL, its added condition) receives.

    ``hidden`` is ``[B, 77, D]``: SD1.5's last hidden state, or SDXL's two encoders'
    penultimate hidden states concatenated (768 + 1280 = 2048 for real SDXL).
    ``pooled`` is SDXL's projected pooled embedding of the second encoder ``[B, 1280]``,
    ``None`` for SD1.5.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, mask: torch.Tensor, replacement: PromptEmbeddings) -> PromptEmbeddings:
        """Rows where ``mask`` is True taken from ``replacement`` (broadcast from one row)."""
        hidden = torch.where(mask[:, None, None], replacement.hidden.expand_as(self.hidden), self.hidden)
        pooled = None
        if self.pooled is not None:
            pooled = torch.where(mask[:, None], replacement.pooled.expand_as(self.pooled), self.pooled)
        return PromptEmbeddings(hidden, pooled)


def tokenize_prompts(tokenizers: Sequence[PreTrainedTokenizerBase], prompts: Sequence[str]) -> TokenIds:
    """Each tokenizer's ids of ``prompts``, padded and truncated to its length, as the diffusers
    pipelines tokenize. Cheap and picklable, so the DataLoader workers run it (``CaptionTokenizer``)."""
    return tuple(
        tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        for tokenizer in tokenizers
    )


@torch.no_grad()
def encode_tokens(text_encoders: TextEncoders, token_ids: TokenIds, device: torch.device | None = None) -> PromptEmbeddings:
    """Encode each tokenizer's ids with its encoder.

    SDXL (two encoders): concatenated penultimate hidden states plus the second encoder's
    projected pooled output, as ``StableDiffusionXLPipeline.encode_prompt`` with
    ``clip_skip=None``. SD1.5 (one encoder): the last hidden state.
    """
    sdxl = len(text_encoders.encoders) == 2
    hidden_states, pooled = [], None
    for ids, encoder in zip(token_ids, text_encoders.encoders, strict=True):
        output = encoder(ids.to(device or encoder.device), output_hidden_states=sdxl)
        if sdxl:
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected pooled embedding (text_embeds)
        else:
            hidden_states.append(output.last_hidden_state)
    return PromptEmbeddings(torch.cat(hidden_states, dim=-1), pooled)


def encode_prompts(text_encoders: TextEncoders, prompts: Sequence[str], device: torch.device | None = None) -> PromptEmbeddings:
    """Tokenise and encode ``prompts`` (``tokenize_prompts`` then ``encode_tokens``)."""
    return encode_tokens(text_encoders, tokenize_prompts(text_encoders.tokenizers, prompts), device)


def keyword_token_weights(token_ids: torch.Tensor, keyword_ids: Sequence[int]) -> torch.Tensor:
    """Where a keyword (e.g. "green", one or several tokens) sits in each caption's token ids:
    ``[B, T]`` weights, ``1 / len(keyword_ids)`` on the tokens of its first occurrence (a caption
    template puts it first, where truncation cannot cut it), 0 elsewhere; a row without the
    keyword is all zeros."""
    length = len(keyword_ids)
    if length == 0:
        raise ValueError("the keyword has no tokens")
    weights = torch.zeros(token_ids.shape, dtype=torch.float32)
    windows = token_ids.unfold(1, length, 1)  # [B, T - length + 1, length]
    found = (windows == torch.as_tensor(keyword_ids, dtype=token_ids.dtype)).all(dim=-1)
    for row, starts in enumerate(found):
        positions = starts.nonzero()
        if len(positions):
            start = int(positions[0])
            weights[row, start:start + length] = 1.0 / length
    return weights


class CaptionTokenizer:
    """A loader batch transform: fills in the token ids of a batch's captions (each layer's, in a
    layered batch), so the DataLoader workers tokenize and the training step only encodes. A
    cached batch with its text embeddings needs none."""

    def __init__(self, tokenizers: Sequence[PreTrainedTokenizerBase]) -> None:
        self.tokenizers = tuple(tokenizers)

    def __call__(self, batch: Batch) -> Batch:
        if isinstance(batch, LayeredBatch):
            for layer in batch.layers:
                layer.token_ids = tokenize_prompts(self.tokenizers, layer.caption)
        elif not (isinstance(batch, CachedBatch) and batch.prompt_hidden is not None):
            batch.token_ids = tokenize_prompts(self.tokenizers, batch.caption)
        return batch


def sdxl_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int] | torch.Tensor
) -> torch.Tensor:
    """SDXL micro-conditioning ``[B, 6]``: original (h, w), crop (top, left), target (h, w).

    ``original_size`` and ``crop_top_left`` are ``[B, 2]`` from the shard metadata (the real
    source size and the crop taken from its resized copy); ``target_size`` is the training size.
    """
    batch = original_size.shape[0]
    target = torch.as_tensor(target_size, device=original_size.device).reshape(-1, 2).expand(batch, 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).to(torch.float32)


class PromptConditioning:
    """What a UNet is conditioned on besides its latent, the one home of caption dropout and
    SDXL's added condition for every objective (each layer of a joint model calls it).

    The empty caption's embedding, which dropped rows take (classifier-free guidance trains
    the unconditional model on it), is encoded once and kept.
    """

    def __init__(self, text_encoders: TextEncoders) -> None:
        self.text_encoders = text_encoders
        self._empty: PromptEmbeddings | None = None

    @property
    def sdxl(self) -> bool:
        return len(self.text_encoders.encoders) == 2

    def encode(self, captions: Sequence[str], device: torch.device | None = None,
               token_ids: TokenIds | None = None) -> PromptEmbeddings:
        """The embeddings of ``captions``, from their ``token_ids`` when the loader tokenized them."""
        if token_ids is None:
            token_ids = tokenize_prompts(self.text_encoders.tokenizers, captions)
        return encode_tokens(self.text_encoders, token_ids, device)

    def drop(self, prompts: PromptEmbeddings, dropped: torch.Tensor) -> PromptEmbeddings:
        """``prompts`` with the rows where ``dropped`` is True replaced by the empty caption's."""
        if not dropped.any():
            return prompts
        device = prompts.hidden.device
        if self._empty is None or self._empty.hidden.device != device:
            self._empty = self.encode([""], device)
        return prompts.select(dropped.to(device), self._empty)

    def added_conditions(
        self, prompts: PromptEmbeddings, original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]
    ) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` (pooled text and the six size/crop ids); ``None`` for SD1.5."""
        if not self.sdxl:
            return None
        time_ids = sdxl_time_ids(original_size, crop_top_left, target_size)
        return {"text_embeds": prompts.pooled, "time_ids": time_ids.to(prompts.pooled.dtype)}
