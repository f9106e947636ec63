"""Several layers of one image denoised together by one UNet (LayerDiffusion arXiv:2402.17113
sec. 3.3, eq. 8-9): each layer has its own LoRA on the attention projections, and attention is
shared between the layers of a sample.

A UNet batch of ``B`` samples with ``L`` layers holds ``B * L`` latents, sample-major with the
layers inner (``(b l)``: sample 0's layers, then sample 1's), so classifier-free guidance can
concatenate an unconditional and a conditional batch without splitting a sample. Every
attention module of the UNet gets a :class:`LayerSharingUnit` as its diffusers attention
processor, registered inside the UNet, so the units train, shard and checkpoint as UNet
parameters. Three sharing modes:

* ``none``: each layer attends only to itself (eq. 8: independent LoRA models in one batch);
* ``concat`` (eq. 9): in self-attention, each layer's queries attend to the keys and values
  of every layer of its sample (one SDPA call over ``L * N`` tokens); cross-attention stays per
  layer, with that layer's prompt;
* ``frame`` (the released SD1.5 joint model): each layer's own attention, then an extra
  attention across the layers at each token (LayerNorm, projection in, attention over the layer
  axis, projection out, added residually; no positional embedding), in every attention module.

A unit may also read a condition image (the released conditional SD1.5 models, ``use_control``):
with ``control_channels``, each layer gets a projection of the condition's feature map at the
unit's token count (:mod:`layerdiff.models.control_encoder`), added to that layer's rows of the
unit's input before attention and kept in its output, as the released units do. The features of
a forward come in ``cross_attention_kwargs={"control": ControlEncoder()(image)}``.

Per-layer LoRAs are here rather than as peft adapters because peft selects one adapter per
forward, not one per batch row while training. Parameter names follow the released
attention-sharing units (``to_q_lora.{layer}.down``, ``temporal_q``, ``control_convs.{layer}``,
...), so the released layouts are renamings (``layerdiff.formats.layer_sharing``,
``layerdiff.formats.layer_conditional``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from layerdiff.models.control_encoder import ControlFeatures, control_projection, frame_controls

SharingMode = Literal["none", "concat", "frame"]
SHARING_MODES: tuple[str, ...] = ("none", "concat", "frame")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")  # the released units adapt all four, in both attentions


class LowRankDelta(nn.Module):
    """``up(down(x)) * scale``: one layer's LoRA update of one projection (Hu et al. 2021,
    arXiv:2106.09685 eq. 3). ``up`` starts at zero, so the base model is unchanged until trained."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        self.scale = scale
        nn.init.normal_(self.down.weight, std=1.0 / rank)  # peft's "gaussian" initialisation
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, C]`` -> ``[B, heads, N, C / heads]`` for SDPA."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention of ``[B, N, C]`` tensors, never materialising the
    attention matrix (SDPA picks a fused kernel)."""
    out = F.scaled_dot_product_attention(_heads(query, heads), _heads(key, heads), _heads(value, heads))
    return out.transpose(1, 2).flatten(2)


class LayerSharingUnit(nn.Module):
    """The attention processor of one attention module for ``layers`` jointly denoised layers.

    Called by diffusers' ``Attention`` as ``processor(attn, hidden_states, encoder_hidden_states)``;
    ``hidden_states`` is ``[B * L, N, C]``, layers inner. ``lora_projections`` are the projections
    adapted (of ``PROJECTIONS``); the frame-attention parts exist only in ``frame`` mode, with the
    output projection zero-initialised so a new unit changes nothing. With ``control_channels``
    (the control encoder's width) it has ``control_convs``, one per layer, also zero at the end,
    and needs the condition's features in every forward (``control``).
    """

    def __init__(
        self,
        attn: nn.Module,
        layers: int,
        mode: SharingMode,
        rank: int,
        alpha: float | None = None,
        lora_projections: Sequence[str] = PROJECTIONS,
        control_channels: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in SHARING_MODES:
            raise ValueError(f"attention sharing must be one of {SHARING_MODES}; got {mode!r}")
        if layers < 1 or rank < 1:
            raise ValueError(f"need at least one layer and a LoRA rank >= 1; got layers={layers}, rank={rank}")
        unknown = set(lora_projections) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"per-layer LoRAs adapt the attention projections {PROJECTIONS}; got {sorted(unknown)}")
        self.layers, self.mode, self.heads = layers, mode, attn.heads
        self.is_cross_attention = attn.is_cross_attention
        scale = (alpha or rank) / rank
        linears = {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}
        for name in lora_projections:
            linear = linears[name]
            deltas = [LowRankDelta(linear.in_features, linear.out_features, rank, scale) for _ in range(layers)]
            setattr(self, f"{name}_lora", nn.ModuleList(deltas))
        if mode == "frame":
            hidden = attn.to_k.out_features
            self.temporal_n = nn.LayerNorm(hidden, eps=1e-6)
            self.temporal_i, self.temporal_q, self.temporal_k, self.temporal_v, self.temporal_o = (
                nn.Linear(hidden, hidden) for _ in range(5)
            )
            nn.init.zeros_(self.temporal_o.weight)
            nn.init.zeros_(self.temporal_o.bias)
        # released: hidden_size = to_k's output width, one projection per frame
        self.control_convs = None if control_channels is None else nn.ModuleList(
            control_projection(attn.to_k.out_features, control_channels) for _ in range(layers))

    def project(self, name: str, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)`` plus each layer's LoRA update on its own rows of ``x`` (``[B * L, ...]``)."""
        out = linear(x)
        deltas = getattr(self, f"{name}_lora", None)
        if deltas is None:
            return out
        per_layer = x.unflatten(0, (-1, self.layers))
        update = torch.stack([delta(per_layer[:, layer]) for layer, delta in enumerate(deltas)], dim=1)
        return out + update.flatten(0, 1)

    # diffusers passes an attention keyword argument only if the processor's __call__ names it: so ``control``
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, control=None,
                 **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, control)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        control: ControlFeatures | None = None,
    ) -> torch.Tensor:
        if hidden_states.ndim != 3 or attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None:
            raise NotImplementedError(
                "layer sharing supports the transformer-block attention of SD1.5/SDXL UNets (token input, no mask, "
                "no group or spatial norm); this attention module is of another kind"
            )
        if hidden_states.shape[0] % self.layers:
            raise ValueError(f"a batch of {hidden_states.shape[0]} rows is not whole samples of {self.layers} layers")
        added = self.control(control, hidden_states)
        hidden_states = hidden_states + added if added is not None else hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = self.project("to_q", attn.to_q, hidden_states)
        key = self.project("to_k", attn.to_k, context)
        value = self.project("to_v", attn.to_v, context)
        if self.mode == "concat" and encoder_hidden_states is None:
            # eq. 9: a sample's layers are one sequence of L * N tokens
            query, key, value = (x.unflatten(0, (-1, self.layers)).flatten(1, 2) for x in (query, key, value))
            attended = _attend(query, key, value, self.heads).unflatten(1, (self.layers, -1)).flatten(0, 1)
        else:
            attended = _attend(query, key, value, self.heads)
        out = attn.to_out[1](self.project("to_out", attn.to_out[0], attended))
        if self.mode == "frame":
            out = out + self.frame_attention(hidden_states + out)
        return out + added if added is not None else out  # released: the control stays in the residual stream

    def control(self, features: ControlFeatures | None, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The per-layer control for ``hidden_states`` (``[B * L, N, C]``), None without control."""
        if (features is None) != (self.control_convs is None):
            raise ValueError(
                "these layer-sharing units read a condition image: call the UNet with cross_attention_kwargs="
                "{'control': ControlEncoder()(image)}" if features is None else
                "control features were given (cross_attention_kwargs['control']) to units without control: "
                "install them with add_layer_sharing(..., control_channels=ControlEncoder.channels)"
            )
        if features is None:
            return None
        rows, tokens = hidden_states.shape[:2]
        return frame_controls(self.control_convs, features, rows // self.layers, tokens).to(hidden_states)

    def frame_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention across the layers at each token: ``[B * L, N, C]`` in and out."""
        tokens = x.shape[1]
        h = self.temporal_i(self.temporal_n(x))
        h = h.unflatten(0, (-1, self.layers)).transpose(1, 2).flatten(0, 1)  # [(B N), L, C]
        h = _attend(self.temporal_q(h), self.temporal_k(h), self.temporal_v(h), self.heads)
        h = self.temporal_o(h).unflatten(0, (-1, tokens)).transpose(1, 2).flatten(0, 1)
        return h


def attention_module_names(unet: UNet2DConditionModel) -> list[str]:
    """The UNet's attention modules (``...transformer_blocks.0.attn1``), in diffusers' order."""
    return [name.removesuffix(".processor") for name in unet.attn_processors]


def add_layer_sharing(
    unet: UNet2DConditionModel,
    layers: int,
    mode: SharingMode,
    rank: int,
    alpha: float | None = None,
    lora_projections: Sequence[str] = PROJECTIONS,
    control_channels: int | None = None,
) -> dict[str, LayerSharingUnit]:
    """Freeze ``unet`` and give every attention module a :class:`LayerSharingUnit` (trainable),
    returned by module name; with ``control_channels`` (``ControlEncoder.channels``) the units read
    a condition image's features, passed in each forward as ``cross_attention_kwargs={"control": ...}``."""
    unet.requires_grad_(False)
    units = {}
    for name in attention_module_names(unet):
        attn = unet.get_submodule(name)
        units[name] = LayerSharingUnit(attn, layers, mode, rank, alpha, lora_projections, control_channels)
        attn.set_processor(units[name])
    return units


def sharing_units(unet: UNet2DConditionModel) -> dict[str, LayerSharingUnit]:
    """The units :func:`add_layer_sharing` installed, by attention module name; empty if none."""
    return {name: processor for name, processor in
            ((name.removesuffix(".processor"), processor) for name, processor in unet.attn_processors.items())
            if isinstance(processor, LayerSharingUnit)}
