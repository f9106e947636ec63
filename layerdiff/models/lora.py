"""Named LoRA adapters on a diffusers UNet (peft), the one place adapters are created.

One UNet may carry several adapters by name (a foreground and a background LoRA for joint
layers, LayerDiffusion arXiv:2402.17113 sec. 3.3; a community style LoRA at inference); each
trains or exports on its own. The released LayerDiffuse models adapt the four projections of
self- and cross-attention, at rank 256.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig

DEFAULT_ADAPTER = "layerdiff"
RELEASED_LORA_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)  # fmt: skip


def add_lora(
    unet: torch.nn.Module,
    name: str = DEFAULT_ADAPTER,
    rank: int = 256,
    alpha: float | None = None,
    targets: Sequence[str] = RELEASED_LORA_TARGETS,
) -> None:
    """Add the adapter ``name`` (scale ``alpha / rank``, ``alpha`` defaulting to the rank) on the
    modules whose names end with ``targets``; the base weights are frozen.

    Its up factors start at zero (peft's "gaussian" init), so the UNet is unchanged until trained.
    """
    if rank < 1:
        raise ValueError(f"a LoRA's rank must be >= 1; got {rank} for adapter {name!r}")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights="gaussian"),
        adapter_name=name,
    )

