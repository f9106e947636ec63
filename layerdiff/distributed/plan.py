"""The sharding plan: which submodules of a model's trained parts become FSDP2 units.

:func:`parallelize` shards trained parts over a device mesh: activation checkpointing and
``torch.compile`` per block, ``fully_shard`` per block (or, in a block under a LoRA, over its
factors only), then each part as a root. Frozen weights stay whole on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from layerdiff.compat import checkpoint_activations


def _block_types() -> tuple[type[nn.Module], ...]:
    """The diffusers blocks each sharded as one unit: the resnets, transformer blocks and
    resamplers of the UNet and of the transparency decoder, and the decoder's attention
    blocks (a transformer block's own attention layers stay inside their block)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    return ResnetBlock2D, BasicTransformerBlock, Attention, Downsample2D, Upsample2D


@dataclasses.dataclass(frozen=True)
class ShardingSettings:
    """How :func:`parallelize` shards (set through ``FSDP2Strategy``).

    Args:
        activation_checkpointing: recompute each block's activations in backward.
        compile: ``torch.compile`` each block.
        reshard_after_forward: free each block's gathered parameters after its forward and
            gather them again in backward (ZeRO-3); ``False`` keeps them from forward to
            backward (ZeRO-2: one all-gather fewer per unit and step, more memory). Roots
            always keep theirs until backward.
        param_dtype: dtype parameters are gathered and computed in (``None``: their own);
            gradients are always reduced in float32.
    """

    activation_checkpointing: bool = False
    compile: bool = False
    reshard_after_forward: bool = True
    param_dtype: torch.dtype | None = None


def parallelize(
    parts: Sequence[nn.Module],
    mesh: DeviceMesh,
    settings: ShardingSettings,
    own_dtype: Sequence[nn.Module] = (),
) -> None:
    """Shard the trained ``parts`` of a model with FSDP2 over the 1-D ``mesh``, in place.

    For each part, bottom-up (the order ``fully_shard`` needs):

    1. every outermost block of a diffusers block type (resnets, transformer blocks,
       attention blocks, resamplers) gets activation checkpointing and ``torch.compile`` if
       ``settings`` asks, then becomes one FSDP unit: its parameters are sharded across the
       mesh, gathered just before its forward and, with ``reshard_after_forward``, freed
       after it;
    2. the part itself becomes a root unit holding its remaining parameters (the stems,
       output heads and norms between blocks), gathered from its forward to the end of
       backward. Each part is its own root, so parts that train separately (a GAN's
       generator and discriminator) shard separately. After a no-grad forward (validation,
       sampling) a root stays gathered until the next backward; code that changes weights
       in between calls :func:`reshard` first.

    Frozen and trainable parameters never share a unit. Frozen parameters are not sharded
    at all: they stay whole on every rank, as under DDP, because sharding pays off through
    what trainable parameters carry besides themselves (float32 gradient and two Adam
    moments: 12 of their 16 bytes per parameter), and frozen weights would instead cost an
    all-gather per block in every forward and again in every recomputation. That includes
    the base weights under a LoRA: in a block that holds both, the unit is the group of its
    submodules that own trainable parameters (the ``lora_A``/``lora_B`` layers), one
    ``fully_shard`` over that list, so a transformer block's LoRA factors are gathered in
    one collective while its base projections stay replicated, ignored by FSDP.

    With ``settings.param_dtype`` (bf16 on CUDA) units gather and compute in that dtype and
    reduce gradients in float32, with float32 sharded master weights for the optimizer.
    Parts in ``own_dtype`` keep their parameters' dtype. The discriminator needs it twice:
    its BatchNorm layers keep float32 running statistics, which bf16 parameters do not
    combine with; and FSDP2 fixes a unit's gradient dtype from ``requires_grad`` at the
    unit's first forward, which for the discriminator comes while Lightning's
    ``toggle_optimizer`` has frozen it (the generator's adversarial term), so it would later
    get bf16 gradients assigned to float32 parameters.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if mesh.ndim != 1:
        raise ValueError(f"parallelize shards over a 1-D data-parallel mesh; got a {mesh.ndim}-D mesh {mesh}")
    casting = MixedPrecisionPolicy(param_dtype=settings.param_dtype, reduce_dtype=torch.float32)
    keep = {id(module) for module in own_dtype}
    for part in parts:
        if isinstance(part, FSDPModule):
            raise ValueError(f"{type(part).__name__} is sharded already; parallelize each part once.")
        if not any(parameter.requires_grad for parameter in part.parameters()):
            raise ValueError(
                f"{type(part).__name__} has no trainable parameters; parallelize shards trained parts only."
            )
        options = {
            "mesh": mesh,
            "reshard_after_forward": settings.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float32) if id(part) in keep else casting,
        }
        for block in outermost_blocks(part):
            if settings.activation_checkpointing:
                checkpoint_activations(block)
            if settings.compile:
                block.compile()
            unit = trainable_unit(block)
            if unit:
                fully_shard(unit if len(unit) > 1 else unit[0], **options)
        frozen = {parameter for parameter in part.parameters() if not parameter.requires_grad}
        # A root keeps its gathered parameters from forward to backward (FSDP2's default for
        # roots: backward needs them first); the adaptive GAN weight differentiates with
        # respect to the decoder's last layer, which must be the gathered tensor used in forward.
        root_reshard = None if settings.reshard_after_forward else False
        fully_shard(part, ignored_params=frozen, **{**options, "reshard_after_forward": root_reshard})


def outermost_blocks(module: nn.Module) -> list[nn.Module]:
    """The submodules of a block type that are not inside another one, in module order."""
    block_types = _block_types()
    blocks: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, block_types):
                blocks.append(child)
            else:
                visit(child)

    visit(module)
    return blocks


def trainable_unit(block: nn.Module) -> list[nn.Module]:
    """What of ``block`` forms its FSDP unit: ``[block]`` when all of it trains, nothing when
    none of it does, else the submodules whose own parameters train (a LoRA's factors)."""
    parameters = list(block.parameters())
    if all(parameter.requires_grad for parameter in parameters):
        return [block]
    owners = []
    for name, submodule in block.named_modules():
        own = list(submodule.parameters(recurse=False))
        trained = [parameter.requires_grad for parameter in own]
        if any(trained) and not all(trained):
            raise ValueError(
                f"{type(block).__name__}.{name} holds frozen and trainable parameters itself; FSDP2 units "
                "here keep them apart, so freeze or train its parameters together."
            )
        if own and all(trained):
            owners.append(submodule)
    return owners


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit in ``module`` (no-op without FSDP).

    Code that writes into sharded parameters between a forward and the next (the EMA
    callback swapping averages in and out) calls this first: a unit kept gathered after a
    no-grad forward would otherwise run its next forward on the stale gathered copy.
    """
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()
