"""Cross-attention maps of chosen text tokens, captured during the UNet's forward for a loss
(DiffuMatting arXiv:2403.06168 sec. 3.3: the "green" token's map against the background mask).

:func:`capture_token_attention` wraps the processor of every cross-attention module (``attn2``)
in a :class:`TokenAttentionCapture`. The wrapped processor still computes the module's output
(SDPA, a LoRA under it, a layer-sharing unit: whatever was installed), so outputs are
unchanged; the wrapper adds, only at the map sizes asked for and only while a
:class:`TokenAttention` recording is open (``TokenAttentionCaptures.record``), the softmax attention of each query on the weighted
tokens: the logits against the 77 text keys, their log-sum-exp, and one weighted column per
sample. Self-attention is not touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from torch import nn


class TokenAttention:
    """One recording: ``token_weights`` ``[B, T]`` (which text tokens, e.g. from
    ``keyword_token_weights``), the latent size, the map downsampling factors to keep; after the
    forward, ``maps`` holds one ``[B, h, w]`` map per captured layer, averaged over heads."""

    def __init__(self, token_weights: torch.Tensor, latent_size: tuple[int, int], downsampling: Sequence[int]) -> None:
        self.token_weights = token_weights
        self.latent_size = latent_size
        self.sizes = {(latent_size[0] // factor) * (latent_size[1] // factor): factor for factor in downsampling
                      if latent_size[0] % factor == 0 and latent_size[1] % factor == 0}
        self.maps: list[torch.Tensor] = []

    def wants(self, tokens: int) -> tuple[int, int] | None:
        factor = self.sizes.get(tokens)
        return None if factor is None else (self.latent_size[0] // factor, self.latent_size[1] // factor)


class TokenAttentionCapture(nn.Module):
    """The processor of one cross-attention module: ``inner`` computes the output; while a
    recording is open, the weighted tokens' attention map is appended to it."""

    def __init__(self, inner) -> None:
        super().__init__()
        # A processor that is an nn.Module (a layer-sharing unit) stays registered under this one.
        self.inner = inner
        self.recording: TokenAttention | None = None

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        recording = self.recording
        if recording is not None and encoder_hidden_states is not None and hidden_states.ndim == 3:
            size = recording.wants(hidden_states.shape[1])
            if size is not None:
                recording.maps.append(self.token_map(attn, hidden_states, encoder_hidden_states, recording.token_weights)
                                      .unflatten(1, size))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    @staticmethod
    def token_map(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  token_weights: torch.Tensor) -> torch.Tensor:
        """``sum_j w_j softmax(q k^T / sqrt(d))_j`` averaged over heads: ``[B, N]``."""
        context = attn.norm_cross(encoder_hidden_states) if attn.norm_cross is not None else encoder_hidden_states
        query, key = attn.to_q(hidden_states), attn.to_k(context)
        heads = attn.heads
        query = query.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, heads, N, d]
        key = key.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, heads, T, d]
        if getattr(attn, "norm_q", None) is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        logits = (query @ key.transpose(-1, -2)).float() * (attn.scale if hasattr(attn, "scale") else
                                                            1.0 / math.sqrt(query.shape[-1]))
        probabilities = logits.softmax(dim=-1)  # [B, heads, N, T]: T is the text's 77 tokens
        weights = token_weights.to(probabilities)[:, None, None, :]
        return (probabilities * weights).sum(dim=-1).mean(dim=1)


class TokenAttentionCaptures:
    """The wrappers :func:`capture_token_attention` installed, opened and closed together.

    A recording stays open until the next one (or :meth:`stop`): under gradient checkpointing
    the backward pass re-runs the forward of each block and must capture the same maps again,
    in the same order, for the saved tensors to match.
    """

    def __init__(self, captures: Sequence[TokenAttentionCapture]) -> None:
        self.captures = list(captures)

    def record(self, attention: TokenAttention) -> TokenAttention:
        for capture in self.captures:
            capture.recording = attention
        return attention

    def stop(self) -> None:
        for capture in self.captures:
            capture.recording = None


def capture_token_attention(unet: UNet2DConditionModel) -> TokenAttentionCaptures:
    """Wrap every cross-attention module's processor (idempotent)."""
    captures = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "set_processor"):
            processor = module.processor
            if not isinstance(processor, TokenAttentionCapture):
                processor = TokenAttentionCapture(processor)
                module.set_processor(processor)
            captures.append(processor)
    if not captures:
        raise ValueError("the UNet has no cross-attention modules (attn2) whose maps could be captured")
    return TokenAttentionCaptures(captures)
