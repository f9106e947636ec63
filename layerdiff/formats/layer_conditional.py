"""The released SD1.5 conditional attention-sharing files, ``layer_sd15_fg2bg.safetensors`` and
``layer_sd15_bg2fg.safetensors``: two jointly denoised layers (frames) whose units also read a
condition layer (:mod:`layerdiff.models.control_encoder`), as the released
``AttentionSharingPatcher(unet, frames=2, use_control=True).load_state_dict(sd, strict=True)``
reads them.

What each holds (the released pipelines give the frames' prompts in this order and the
condition image to ``set_control``):

* ``fg2bg``: frames (background, blend), conditioned on a foreground;
* ``bg2fg``: frames (foreground, blend), conditioned on a background.

Keys: the units as in the released joint file, ``hookers.layers.{i}.{param}`` with the module
order and per-unit names of :mod:`layerdiff.formats.layer_sharing`, each unit with
``control_convs.{frame}.{0,2}.{weight,bias}`` besides its LoRAs and frame attention, and the
control encoder's ``kwargs_encoder.blocks_{0..3}.{conv}.{weight,bias}``. The up factors hold the
LoRA scale, as in every layer-sharing file. No metadata is needed to read one; the files written
here also name their task under :data:`METADATA_KEY`, and loading refuses another task's file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import UNet2DConditionModel

from layerdiff.formats.layer_sharing import (
    RELEASED_JOINT_FILENAME,
    RELEASED_PREFIX,
    FileKey,
    export_units,
    import_units,
    installed_units,
    read_layer_file,
    released_unit_key,
    released_units_problem,
    unit_settings,
    write_layer_file,
)
from layerdiff.formats.provenance import provenance, read_metadata
from layerdiff.models.control_encoder import ControlEncoder

ENCODER_PREFIX = "kwargs_encoder."  # the released AttentionSharingPatcher's name for its encoder
METADATA_KEY = "layerdiff.layer_conditional"
COMPONENT = "unet_layer_conditional"


class ConditionalTask(NamedTuple):
    """One released conditional model: its file name, its frames in order, what conditions them."""

    filename: str
    frames: tuple[str, ...]
    condition: str


RELEASED_CONDITIONAL = {
    "fg2bg": ConditionalTask("layer_sd15_fg2bg.safetensors", ("background", "blend"), "foreground"),
    "bg2fg": ConditionalTask("layer_sd15_bg2fg.safetensors", ("foreground", "blend"), "background"),
}
RELEASED_CONDITIONAL_FRAMES = 2


def conditional_task(frames: Sequence[str], condition: str) -> str:
    """The released task whose frames are ``frames`` (any order) conditioned on ``condition``."""
    for name, task in RELEASED_CONDITIONAL.items():
        if sorted(task.frames) == sorted(frames) and task.condition == condition:
            return name
    raise ValueError(f"layers {list(frames)} conditioned on {condition!r} are none of the released conditional models "
                     f"({', '.join(f'{name}: {list(t.frames)} on {t.condition}' for name, t in RELEASED_CONDITIONAL.items())})")


def _task(task: str) -> ConditionalTask:
    if task not in RELEASED_CONDITIONAL:
        raise ValueError(f"the released conditional models are {sorted(RELEASED_CONDITIONAL)}; got task {task!r}")
    return RELEASED_CONDITIONAL[task]


def released_conditional_problem(
    unet: UNet2DConditionModel, encoder: ControlEncoder, task: str, layer_names: Sequence[str] | None = None
) -> str | None:
    """Why the units and ``encoder`` cannot be in the released ``task`` layout, or None if they
    can. ``layer_names``, if given, must be the task's frames in some order."""
    frames = _task(task).frames
    instead = (f"the conditional files hold add_layer_sharing(<SD1.5 UNet>, {RELEASED_CONDITIONAL_FRAMES}, 'frame', "
               "rank, control_channels=ControlEncoder.channels) units")
    problem = released_units_problem(unet, instead)
    if problem:
        return problem
    unit, layers = next(iter(installed_units(unet).values())), unit_settings(unet).layers
    if unit.control_convs is None:
        return (f"these units have no control inputs: {instead} (units without control are the joint model's, "
                f"{RELEASED_JOINT_FILENAME}: layerdiff.formats.layer_sharing.save_released_joint)")
    if layers != RELEASED_CONDITIONAL_FRAMES:
        return f"the conditional files hold {RELEASED_CONDITIONAL_FRAMES} frames {frames}; these units denoise {layers} layers"
    width = unit.control_convs[0][0].in_channels
    if width != encoder.channels:
        return f"the units' control projections read {width} channels; the encoder gives {encoder.channels}: {instead}"
    if layer_names is not None and sorted(layer_names) != sorted(frames):
        return f"the {task} frames are {frames}; the layers are {list(layer_names)}: name them so"
    return None


def _unit_key(unet: UNet2DConditionModel, encoder: ControlEncoder, task: str, layer_names: Sequence[str] | None) -> FileKey:
    """The released key of each unit parameter, frames in the task's order; an error if they do not fit."""
    if problem := released_conditional_problem(unet, encoder, task, layer_names):
        raise ValueError(problem)
    frames = _task(task).frames
    return released_unit_key(range(RELEASED_CONDITIONAL_FRAMES) if layer_names is None else [
        frames.index(name) for name in layer_names])


def _encoder_parameters(encoder: ControlEncoder) -> dict[str, torch.Tensor]:
    return {f"{ENCODER_PREFIX}{name}": tensor for name, tensor in encoder.state_dict(keep_vars=True).items()}


def released_conditional_state(
    unet: UNet2DConditionModel, encoder: ControlEncoder, task: str, layer_names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The units and ``encoder`` in the released ``task`` layout (frames = the units' layers, in
    their order, or reordered to the task's frames when ``layer_names`` is given)."""
    units = export_units(unet, _unit_key(unet, encoder, task, layer_names))
    return {**units, **{key: tensor.detach() for key, tensor in _encoder_parameters(encoder).items()}}


def save_released_conditional(
    path: str | PathLike,
    unet: UNet2DConditionModel,
    encoder: ControlEncoder,
    task: str,
    layer_names: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``layer_sd15_{task}.safetensors`` (any name): the released keys, the task in the metadata."""
    state = released_conditional_state(unet, encoder, task, layer_names)
    layout = {"task": task, **_task(task)._asdict()}
    return write_layer_file(path, state, {**provenance(COMPONENT, metadata), METADATA_KEY: json.dumps(layout)}, dtype)


def _wrong_file(tensors: Mapping[str, torch.Tensor], source: str, task: str, rank: int) -> str | None:
    """Why ``tensors`` are not a released conditional file for rank-``rank`` units, or None."""
    first = f"{RELEASED_PREFIX}0.to_q_lora."
    frames = {key[len(first):].split(".")[0] for key in tensors if key.startswith(first)}
    if not any(key.startswith(ENCODER_PREFIX) for key in tensors):
        joint = (f" ({len(frames)} frames without control: the joint model, {RELEASED_JOINT_FILENAME}, which "
                 "layerdiff.formats.layer_sharing.load_released_joint reads)" if len(frames) == 3 else "")
        return f"{source} holds no control encoder ({ENCODER_PREFIX}*): it is not a conditional attention-sharing file{joint}"
    if len(frames) != RELEASED_CONDITIONAL_FRAMES:
        return (f"{source} holds {len(frames)} frames; the conditional files hold {RELEASED_CONDITIONAL_FRAMES} "
                f"(the {task} frames {_task(task).frames})")
    down = tensors.get(f"{first}0.down.weight")
    if down is not None and down.shape[0] != rank:
        return (f"{source} holds rank-{down.shape[0]} LoRAs; the units are rank {rank}. Install the units with "
                f"rank={down.shape[0]} (the released files are rank 256).")
    return None


def _other_task(path: Path, task: str) -> str | None:
    """The task a file says (our metadata) or is named (the released names) for, if not ``task``."""
    written = read_metadata(path).get(METADATA_KEY)
    if written is not None:
        other = json.loads(written)["task"]
        return other if other != task else None
    named = [name for name, released in RELEASED_CONDITIONAL.items() if released.filename == path.name]
    return named[0] if named and named[0] != task else None


def load_released_conditional(
    unet: UNet2DConditionModel,
    encoder: ControlEncoder,
    path_or_state: str | PathLike | Mapping[str, torch.Tensor],
    task: str,
    layer_names: Sequence[str] | None = None,
) -> None:
    """Initialise the units and ``encoder`` from a released conditional file (or its state dict),
    e.g. the released ``layer_sd15_fg2bg.safetensors`` for ``task="fg2bg"``. Strict: any missing,
    unexpected or differently shaped key is an error naming the file and key, and nothing is set."""
    is_state = isinstance(path_or_state, Mapping)
    source = "the given released conditional state dict" if is_state else str(path_or_state)
    tensors = dict(path_or_state) if is_state else read_layer_file(path_or_state)
    unit_key = _unit_key(unet, encoder, task, layer_names)
    if problem := _wrong_file(tensors, source, task, unit_settings(unet).rank):
        raise ValueError(problem)
    other = None if is_state else _other_task(Path(path_or_state), task)
    if other is not None:
        raise ValueError(f"{source} is the {other} model (frames {RELEASED_CONDITIONAL[other].frames}, conditioned on "
                         f"the {RELEASED_CONDITIONAL[other].condition}); load it with task={other!r}")
    import_units(unet, unit_key, tensors, source, f"Is it a released SD1.5 conditional ({task}) attention-sharing file?",
                 others=_encoder_parameters(encoder))
