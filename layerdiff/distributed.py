"""Sharded training with FSDP2, applied from outside the model code (DESIGN §5).

Three pieces:

* :func:`parallelize` shards a LightningModule's *trained* parts over a device mesh:
  activation checkpointing and ``torch.compile`` per block, ``fully_shard`` per block, then
  each part as a root. The modules call it (through :func:`shard_trained_parts`) from
  ``configure_model`` when the trainer runs a ``ModelParallelStrategy``; under DDP or on one
  device nothing changes.
* :class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` for pure data-parallel FSDP2
  (the whole world is one sharding group), with the sharding settings as its typed
  arguments (``configs/strategy/fsdp.yaml``) and crash-safe sharded checkpoints.
* :func:`read_sharded_checkpoint` / :func:`consolidate_checkpoint`: a sharded checkpoint
  folder as one in-memory checkpoint / one single-file Lightning ``.ckpt``, the form DDP
  resumes from and ``LightningModule.load_from_checkpoint`` reads
  (``python -m layerdiff.export consolidate``).

The sharded checkpoint folder is Lightning's: ``torch.distributed.checkpoint`` files holding
``state_dict`` and ``optimizer_<i>`` (each rank writes its shards), plus ``meta.pt`` written by
rank 0 with everything else (loops, callbacks, schedulers, hyper-parameters). Two additions:

* sharded tensors outside the model and optimizers (the EMA callback's averages of sharded
  parameters) go into the distributed files too, under ``sharded_entries`` keyed by their
  JSON path in the checkpoint; ``meta.pt`` keeps :data:`SHARDED_PLACEHOLDER` in their place.
  A ``torch.save`` of rank 0's copy would keep only rank 0's shards.
* a save writes into a hidden sibling folder and rank 0 renames it into place only once
  every file is complete (``meta.pt`` last, itself written to a temporary name first), so a
  crash mid-save leaves the previous checkpoint (``last.ckpt`` overwritten every few steps)
  intact and never a folder that looks valid but is not.

Everything in ``meta.pt`` is rank 0's, as in a DDP checkpoint, which rank 0 alone writes:
state that differs per rank must be gathered by its owner before saving (as
``LatentDiffusionModule.on_save_checkpoint`` gathers every rank's noise stream). Routing such
values through the distributed files instead would not help: DCP keeps one copy of a
non-tensor value that every rank saves under the same key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

SHARDED_ENTRIES = "sharded_entries"
SHARDED_PLACEHOLDER = "<sharded tensor: stored in the distributed checkpoint files, see sharded_entries>"
# Precisions whose compute FSDP2 can take over: bf16-mixed all-gathers bf16 parameters on CUDA.
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed")


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
    """How :func:`parallelize` shards (set through :class:`FSDP2Strategy`).

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
    from torch.distributed._composable import checkpoint
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
                checkpoint(block)
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


def shard_trained_parts(
    module: LightningModule, parts: Sequence[nn.Module], own_dtype: Sequence[nn.Module] = ()
) -> None:
    """``configure_model`` of the layerdiff modules: :func:`parallelize` their trained parts
    when the trainer runs a ``ModelParallelStrategy`` (settings from :class:`FSDP2Strategy`,
    defaults for Lightning's own class); nothing under other strategies or when the parts
    are sharded already (``configure_model`` runs again for every fit/validate call) or no
    trainer is attached."""
    from torch.distributed.fsdp import FSDPModule

    # load_from_checkpoint calls configure_model with no trainer attached
    strategy = module._trainer.strategy if module._trainer is not None else None
    if not isinstance(strategy, ModelParallelStrategy) or any(isinstance(part, FSDPModule) for part in parts):
        return
    precision = module.trainer.precision
    if precision not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"trainer.precision {precision!r} is not supported with sharded training; use 'bf16-mixed' "
            "(bf16 compute, float32 master weights and gradient reduction) or '32-true'."
        )
    mesh = module.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"{type(strategy).__name__} here has a tensor-parallel size of {mesh['tensor_parallel'].size()}, but "
            "layerdiff models shard data-parallel only; use layerdiff.distributed.FSDP2Strategy "
            "(-c configs/strategy/fsdp.yaml), or ModelParallelStrategy(data_parallel_size=<world size>, "
            "tensor_parallel_size=1)."
        )
    checkpointed = [type(part).__name__ for part in parts if _uses_own_checkpointing(part)]
    settings = strategy.sharding_settings() if isinstance(strategy, FSDP2Strategy) else ShardingSettings()
    if checkpointed and settings.activation_checkpointing:
        raise ValueError(
            f"{', '.join(checkpointed)} already recompute activations (the model's gradient_checkpointing) and the "
            "strategy's activation_checkpointing would recompute them again; set "
            "model.init_args.gradient_checkpointing: false (configs/strategy/fsdp.yaml does) or "
            "trainer.strategy.init_args.activation_checkpointing: false."
        )
    if precision == "bf16-mixed" and strategy.root_device.type == "cuda":
        settings = dataclasses.replace(settings, param_dtype=torch.bfloat16)
    parallelize(parts, mesh["data_parallel"], settings, own_dtype)


def _uses_own_checkpointing(part: nn.Module) -> bool:
    # diffusers blocks carry a ``gradient_checkpointing`` flag (enable_gradient_checkpointing)
    return any(getattr(submodule, "gradient_checkpointing", False) is True for submodule in part.modules())


# -- the strategy ------------------------------------------------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel training (FSDP2) over all devices of all nodes.

    Lightning's ``ModelParallelStrategy`` with the tensor-parallel size fixed to 1, the
    sharding settings that :func:`parallelize` applies, and sharded checkpoint folders that
    are written atomically and carry sharded callback state (see the module docstring).
    Resume with ``--ckpt_path <folder>``; the folder may come from another world size.

    Args:
        activation_checkpointing: recompute each block's activations in backward
            (instead of the model's own ``gradient_checkpointing``, which must then be off).
        compile: ``torch.compile`` each block.
        reshard_after_forward: free gathered parameters after forward and gather again in
            backward (less memory); ``False`` keeps them until backward (less communication).
        process_group_backend: ``nccl``/``gloo``; by default the device's.
        timeout: collective timeout (saving a large checkpoint takes a while).
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        compile: bool = False,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile
        self.reshard_after_forward = reshard_after_forward

    def sharding_settings(self) -> ShardingSettings:
        return ShardingSettings(self.activation_checkpointing, self.compile, self.reshard_after_forward)

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the node count (tensor
        # parallelism within nodes); with tensor-parallel size 1 it is every process.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options.")
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(f".{path.name}.partial")
        optimizers = checkpoint.pop("optimizer_states", [])
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{index}": optimizer for index, optimizer in enumerate(optimizers)})
        state[SHARDED_ENTRIES], metadata = split_sharded_entries(checkpoint)
        if self.is_global_zero:
            remove_path(staging)  # left by a crashed save
        self.barrier("FSDP2Strategy.save_checkpoint")
        _distributed_checkpoint_save(state, staging)  # returns on rank 0 once every rank's files are written
        if self.is_global_zero:
            scratch = staging / f".{_METADATA_FILENAME}.partial"
            torch.save(metadata, scratch)
            os.replace(scratch, staging / _METADATA_FILENAME)
            replace_path(staging, path)
        self.barrier("FSDP2Strategy.save_checkpoint")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is not a sharded checkpoint folder (one with {_METADATA_FILENAME}); {type(self).__name__} "
                "resumes from the folders it writes. A single-file checkpoint (a DDP run's, or `python -m "
                "layerdiff.export consolidate` output) resumes under the recipe's default strategy; to start a "
                "sharded run from its weights, use it as the model's initialisation instead."
            )
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        # Keys the module left out of the checkpoint (frozen weights) are not read: its
        # load_state_dict decides what may be missing, with its own strictness.
        model_state = {
            key: value for key, value in get_model_state_dict(self.model).items() if f"state_dict.{key}" in stored
        }
        loaded = {"state_dict": model_state}
        _distributed_checkpoint_load(loaded, path)
        self.lightning_module.load_state_dict(loaded["state_dict"], strict=self.lightning_module.strict_loading)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            _distributed_checkpoint_load(optimizer_state, path)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=optimizer_state[key], options=StateDictOptions(cpu_offload=True)
            )

        metadata = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=weights_only)
        trainer = self.lightning_module.trainer
        if trainer.state.fn != TrainerFn.FITTING:
            return metadata  # validate/test/predict restore the weights only; callback state keeps its placeholders
        # Sharded entries live in callback states (the EMA's averages); load them into the
        # tensors this run holds there now.
        live = {"callbacks": {callback.state_key: callback.state_dict() for callback in trainer.callbacks}}
        targets = {}
        for entry_path in placeholder_paths(metadata):
            target = _value_at(live, entry_path)
            if not isinstance(target, DTensor):
                raise ValueError(
                    f"{path} holds a sharded tensor at {'/'.join(map(str, entry_path))}, but this run has no sharded "
                    "tensor there to load it into; resume with the same callbacks and model settings."
                )
            targets[json.dumps(entry_path)] = target
        if targets:
            _distributed_checkpoint_load({SHARDED_ENTRIES: targets}, path)  # in place, into the live tensors
            insert_sharded_entries(metadata, targets)
        return metadata


def _value_at(nested: Mapping[str, Any], path: list) -> Any:
    """``nested[path[0]][path[1]]...``, or None where the path leads nowhere."""
    value: Any = nested
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


# -- checkpoint folders --------------------------------------------------------------------


def is_sharded_checkpoint(path: Path) -> bool:
    """A sharded checkpoint folder is complete exactly when it has ``meta.pt`` (written last)."""
    return path.is_dir() and (path / _METADATA_FILENAME).is_file()


def split_sharded_entries(checkpoint: Mapping[str, Any]) -> tuple[dict[str, DTensor], dict[str, Any]]:
    """``(sharded, rest)``: the DTensors anywhere in ``checkpoint``'s nested dicts by JSON
    path, and ``checkpoint`` with :data:`SHARDED_PLACEHOLDER` in their place (the dicts on
    the way to a DTensor are copied; everything else, e.g. ``AttributeDict`` hyper-parameters,
    is kept as it is)."""
    sharded: dict[str, DTensor] = {}

    def walk(value: Any, where: list) -> Any:
        if isinstance(value, DTensor):
            sharded[json.dumps(where)] = value
            return SHARDED_PLACEHOLDER
        if isinstance(value, Mapping) and _holds_dtensor(value):
            return {key: walk(item, [*where, key]) for key, item in value.items()}
        if isinstance(value, (list, tuple)) and _holds_dtensor(value):
            raise TypeError(
                f"sharded tensors in a {type(value).__name__} at {'/'.join(map(str, where))} cannot be checkpointed; "
                "keep them in a dict (by name)."
            )
        return value

    return sharded, walk(checkpoint, [])


def _holds_dtensor(value: Any) -> bool:
    if isinstance(value, DTensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_dtensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_dtensor(item) for item in value)
    return False


def placeholder_paths(metadata: Any, where: list | None = None) -> Iterator[list]:
    """Paths of the :data:`SHARDED_PLACEHOLDER` values in ``metadata``."""
    where = where or []
    if isinstance(metadata, str) and metadata == SHARDED_PLACEHOLDER:
        yield where
    elif isinstance(metadata, Mapping):
        for key, value in metadata.items():
            yield from placeholder_paths(value, [*where, key])


def insert_sharded_entries(metadata: dict[str, Any], entries: Mapping[str, torch.Tensor]) -> None:
    """Put each entry back at its JSON path in ``metadata``, in place."""
    for encoded, tensor in entries.items():
        *parents, last = json.loads(encoded)
        container = metadata
        for key in parents:
            container = container[key]
        if not (isinstance(container.get(last), str) and container[last] == SHARDED_PLACEHOLDER):
            raise ValueError(f"sharded entry {encoded} has no placeholder in {_METADATA_FILENAME}")
        container[last] = tensor


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(source: Path, destination: Path) -> None:
    """Move ``source`` to ``destination``, replacing a file or folder there. A folder cannot
    be renamed over a non-empty one, so the old one is renamed aside first; a crash between
    the two renames leaves both complete under hidden names and nothing half-written."""
    retired = destination.with_name(f".{destination.name}.replaced")
    remove_path(retired)
    if destination.exists() or destination.is_symlink():
        os.replace(destination, retired)
    os.replace(source, destination)
    remove_path(retired)


# -- consolidation -------------------------------------------------------------------------


def read_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint folder as one full checkpoint dict, on the CPU, in one process:
    ``state_dict`` with whole tensors, sharded callback state (EMA averages) back in place,
    and ``optimizer_states`` in ``torch.optim`` form (state keyed by parameter index), the
    layout of a single-file Lightning checkpoint. Needs the whole checkpoint in memory."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a complete sharded checkpoint folder (no {_METADATA_FILENAME}); "
            "an interrupted save leaves none, so use the previous checkpoint."
        )
    stored: dict[str, Any] = {}
    reader = FileSystemReader(str(path))
    _load_state_dict(stored, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    # Lightning's checkpoints pickle hyper-parameters (AttributeDict, paths): trusted files only.
    checkpoint = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=False)
    insert_sharded_entries(checkpoint, stored.pop(SHARDED_ENTRIES, {}))
    checkpoint["state_dict"] = stored.pop("state_dict", {})
    indices = sorted(int(key.removeprefix("optimizer_")) for key in stored if key.startswith("optimizer_"))
    checkpoint["optimizer_states"] = [index_optimizer_state(stored.pop(f"optimizer_{index}")) for index in indices]
    return checkpoint


def index_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A distributed optimizer state dict (keyed by parameter names) in ``torch.optim`` form
    (parameters numbered across the param groups in order), as ``Optimizer.load_state_dict``
    takes it."""
    groups, per_parameter, index = [], {}, 0
    for group in state["param_groups"]:
        numbers = []
        for name in group["params"]:
            if name in state["state"]:
                per_parameter[index] = state["state"][name]
            numbers.append(index)
            index += 1
        groups.append({**group, "params": numbers})
    return {"state": per_parameter, "param_groups": groups}


def consolidate_checkpoint(folder: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write a sharded checkpoint folder as one single-file Lightning checkpoint, atomically."""
    checkpoint = read_sharded_checkpoint(folder)
    out_file = Path(out_file)
    if out_file.resolve() == Path(folder).resolve():
        raise ValueError(f"--out {out_file} is the checkpoint folder itself; give a new file name")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_file.with_name(f".{out_file.name}.partial")
    torch.save(checkpoint, scratch)
    replace_path(scratch, out_file)
    return out_file
