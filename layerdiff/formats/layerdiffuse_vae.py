"""The LayerDiffuse transparent VAE files: the latent transparency encoder ``E`` and the
transparency decoder ``D`` (``layerdiff.models.transparency``), reading and writing.

The files are plain state dicts of the released modules, which every consumer builds at the
default widths and loads strictly: encoder keys ``blocks.{0,2,...,16}.{weight,bias}``, decoder
keys in diffusers-block names (``conv_in``, ``latent_conv_in``, ``down_blocks.*``, ...). They
come in two released flavours (:data:`FLAVOURS`), which differ in the encoder's output scale:

* ``layerdiffusion``: ``vae_transparent_{encoder,decoder}.safetensors`` (SD1.5:
  ``layer_sd15_vae_transparent_*``), read by the Forge extension, ComfyUI-layerdiffuse and the
  diffusers port (rootonchair/diffuser_layerdiffuse), which use the encoder's output as it is;
* ``diffusers_cli``: ``ld_diffusers_sdxl_vae_transparent_{encoder,decoder}.safetensors``, read
  by lllyasviel's LayerDiffuse_DiffusersCLI, which multiplies the encoder's output by 300.

Our encoder applies the 300 itself (``LatentTransparencyEncoder.offset_scale``), so its state
dict is the ``diffusers_cli`` file; the ``layerdiffusion`` file has the factor folded into the
last convolution (weight and bias times 300), and reading it divides it out again.

Our safetensors metadata (all strings, besides :mod:`layerdiff.formats.provenance`):
``format = "layerdiffuse"``, ``decoder_config`` (JSON of the ``TransparencyDecoder`` arguments)
in both files; in encoder files ``offset_scale`` (the factor the file's consumer applies) and
``input_convention`` (the padded colour the encoder expects: ``"straight"`` or ``"released"``).
Files without them are the released ones: released decoder shape, ``"released"`` input, the
scale of their flavour, told by the file name.

Lightning checkpoints of ``TransparentVAEModule`` hold the parts under ``transparent_encoder.``
and ``transparent_decoder.``; decoder widths and depth are read off the weights, head size and
group count from the ``decoder_attention_head_dim`` / ``decoder_norm_num_groups``
hyper-parameters (or the released values).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors.torch import load_file, save_file

from layerdiff.formats.checkpoints import exported_state, find_hyperparameter, read_checkpoint
from layerdiff.formats.provenance import provenance, read_metadata, tensors_for_file
from layerdiff.models.transparency import (
    RELEASED_DECODER_WIDTHS,
    InputConvention,
    LatentTransparencyEncoder,
    TransparencyDecoder,
)

ENCODER_PREFIX = "transparent_encoder."
DECODER_PREFIX = "transparent_decoder."
RELEASED_DECODER_CONFIG = {
    "block_out_channels": list(RELEASED_DECODER_WIDTHS),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "norm_num_groups": 4,
}
# The last convolution of the encoder, where the layerdiffusion flavour folds the factor.
_HEAD = "blocks.16"
FlavourName = Literal["layerdiffusion", "diffusers_cli"]


@dataclass(frozen=True)
class Flavour:
    """File names of one released flavour and the factor its consumers apply to ``E``'s output."""

    encoder_file: str
    decoder_file: str
    offset_scale: float


FLAVOURS: dict[FlavourName, Flavour] = {
    "layerdiffusion": Flavour("vae_transparent_encoder.safetensors", "vae_transparent_decoder.safetensors", 1.0),
    "diffusers_cli": Flavour(
        "ld_diffusers_sdxl_vae_transparent_encoder.safetensors",
        "ld_diffusers_sdxl_vae_transparent_decoder.safetensors",
        300.0,
    ),
}
ENCODER_FILENAME = FLAVOURS["layerdiffusion"].encoder_file
DECODER_FILENAME = FLAVOURS["layerdiffusion"].decoder_file
# The file holding our encoder's state dict unchanged.
UNFOLDED_ENCODER_FILENAME = FLAVOURS["diffusers_cli"].encoder_file
# Read, never written (an SD1.5 export is named like the SDXL one): the released SD1.5 files.
_RELEASED_SD15 = Flavour(
    "layer_sd15_vae_transparent_encoder.safetensors", "layer_sd15_vae_transparent_decoder.safetensors", 1.0
)
# Folder lookup order: the file holding our weights unchanged first, so round trips are exact.
_READ_ORDER = (FLAVOURS["diffusers_cli"], FLAVOURS["layerdiffusion"], _RELEASED_SD15)


def infer_decoder_shape(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``block_out_channels`` and ``layers_per_block`` of the decoder these weights belong to."""
    widths = []
    while (key := f"down_blocks.{len(widths)}.resnets.0.conv2.weight") in state_dict:
        widths.append(int(state_dict[key].shape[0]))
    if not widths:
        raise ValueError("not a transparency decoder state dict: no 'down_blocks.0.resnets.0.conv2.weight'")
    resnets = {key.split(".")[3] for key in state_dict if key.startswith("down_blocks.0.resnets.")}
    return {"block_out_channels": widths, "layers_per_block": len(resnets)}


def encoder_state_for(encoder: LatentTransparencyEncoder, flavour: Flavour) -> dict[str, torch.Tensor]:
    """``encoder``'s weights as ``flavour``'s consumers run them: the part of our output scale
    they do not apply themselves folded into the last convolution (in float32)."""
    fold = encoder.offset_scale / flavour.offset_scale
    state = dict(encoder.state_dict())
    if fold != 1.0:
        for name in ("weight", "bias"):
            state[f"{_HEAD}.{name}"] = state[f"{_HEAD}.{name}"].float() * fold
    return state


def save_transparent_vae(
    encoder: LatentTransparencyEncoder,
    decoder: TransparencyDecoder,
    out_dir: str | PathLike,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    flavours: Iterable[FlavourName] = tuple(FLAVOURS),
) -> dict[FlavourName, tuple[Path, Path]]:
    """Write the encoder and decoder files of each of ``flavours`` into ``out_dir``.

    ``metadata`` (e.g. the training hyper-parameters) is stored as JSON under
    ``layerdiff_config``. Returns each flavour's ``(encoder path, decoder path)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = {"format": "layerdiffuse", "decoder_config": json.dumps(decoder.config)}
    decoder_tensors = tensors_for_file(decoder.state_dict(), dtype)
    paths = {}
    for name in flavours:
        flavour = FLAVOURS[name]
        encoder_metadata = {
            **shared,
            **provenance("transparent_encoder", metadata),
            "offset_scale": repr(flavour.offset_scale),
            "input_convention": encoder.input_convention,
        }
        encoder_path, decoder_path = out_dir / flavour.encoder_file, out_dir / flavour.decoder_file
        save_file(tensors_for_file(encoder_state_for(encoder, flavour), dtype), encoder_path, metadata=encoder_metadata)
        save_file(decoder_tensors, decoder_path, metadata={**shared, **provenance("transparent_decoder", metadata)})
        paths[name] = (encoder_path, decoder_path)
    return paths


def encoder_file_conventions(path: Path) -> tuple[float, InputConvention]:
    """``(offset_scale, input_convention)`` of an encoder file: from our metadata, or, for the
    released files, from the file name and the released input convention."""
    metadata = read_metadata(path)
    if "offset_scale" in metadata:
        convention = metadata.get("input_convention")
        if convention not in get_args(InputConvention):
            raise ValueError(
                f"{path}: input_convention {convention!r} in its metadata is none of {get_args(InputConvention)}"
            )
        return float(metadata["offset_scale"]), convention
    if "component" in metadata:  # a layerdiff export of format version 1: our weights unchanged
        return LatentTransparencyEncoder.offset_scale, "straight"
    for flavour in _READ_ORDER:
        if path.name == flavour.encoder_file:
            return flavour.offset_scale, "released"
    raise ValueError(
        f"{path}: a transparency encoder file without layerdiff metadata must keep its released name, which "
        "tells whether its consumer multiplies the output by 300: "
        + " or ".join(f"{flavour.encoder_file} (x{flavour.offset_scale:g})" for flavour in _READ_ORDER[:2])
        + "."
    )


def _check_compatible(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, strict: bool
) -> None:
    """Raise readable errors before ``load_state_dict`` would raise unreadable ones."""
    expected = module.state_dict()
    for key, expected_tensor in expected.items():
        tensor = state_dict.get(key)
        if tensor is not None and tuple(tensor.shape) != tuple(expected_tensor.shape):
            if isinstance(module, TransparencyDecoder):
                advice = (
                    f"The file was written for other decoder widths: build TransparencyDecoder with "
                    f"{infer_decoder_shape(state_dict)} (training config: decoder_block_out_channels, "
                    "decoder_layers_per_block)."
                )
            else:
                advice = "The encoder layout is fixed, so this is not a LayerDiffuse transparency encoder file."
            raise ValueError(
                f"{path}: key {key!r} has shape {list(tensor.shape)} in the file but "
                f"{list(expected_tensor.shape)} in the model. {advice}"
            )
    if not strict:
        return
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        prefixed = any(key.startswith((ENCODER_PREFIX, DECODER_PREFIX)) for key in unexpected)
        raise ValueError(
            f"{path}: {len(missing)} missing keys (e.g. {missing[:3]}) and {len(unexpected)} unexpected "
            f"keys (e.g. {unexpected[:3]})."
            + (
                " This looks like a training checkpoint; export it with "
                "`python -m layerdiff.export transparent-vae` first."
                if prefixed
                else ""
            )
        )


def _first_existing(directory: Path, names: Sequence[str]) -> Path:
    # None there: the layerdiffusion name, the one an error message should ask for.
    return next((directory / name for name in names if (directory / name).is_file()), directory / names[1])


def transparent_vae_files(directory_or_files: str | PathLike | Sequence[str | PathLike]) -> tuple[Path, Path]:
    """The ``(encoder, decoder)`` files of a folder (either flavour's names) or of a given pair."""
    if isinstance(directory_or_files, (str, PathLike)):
        directory = Path(directory_or_files)
        return (
            _first_existing(directory, [flavour.encoder_file for flavour in _READ_ORDER]),
            _first_existing(directory, [flavour.decoder_file for flavour in _READ_ORDER]),
        )
    encoder_path, decoder_path = (Path(path) for path in directory_or_files)
    return encoder_path, decoder_path


def load_transparent_vae(
    encoder: LatentTransparencyEncoder | None,
    decoder: TransparencyDecoder | None,
    directory_or_files: str | PathLike | Sequence[str | PathLike],
    strict: bool = True,
) -> None:
    """Load released or exported transparent VAE files into existing modules (e.g. to initialise training).

    ``directory_or_files`` is a folder holding the files (either flavour) or an
    ``(encoder_file, decoder_file)`` pair. Pass ``None`` for a module to leave it untouched. The
    encoder takes the file's output scale (unfolded) and input convention. Shape mismatches
    always raise, naming the key, both shapes and the configuration to change; ``strict``
    governs missing and unexpected keys.
    """
    encoder_path, decoder_path = transparent_vae_files(directory_or_files)
    for module, path in ((encoder, encoder_path), (decoder, decoder_path)):
        if module is None:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"transparent VAE file not found: {path}")
        state_dict = load_file(path)
        _check_compatible(module, state_dict, path, strict)
        if isinstance(module, LatentTransparencyEncoder):
            offset_scale, module.input_convention = encoder_file_conventions(path)
            unfold = offset_scale / module.offset_scale
            if unfold != 1.0:
                state_dict.update(
                    {key: tensor.float() * unfold for key, tensor in state_dict.items() if key.startswith(f"{_HEAD}.")}
                )
        module.load_state_dict(state_dict, strict=strict)


def load_transparency_models(
    source: str | PathLike, use_ema: bool = True
) -> tuple[LatentTransparencyEncoder, TransparencyDecoder]:
    """A trained encoder and decoder from an export folder (ours or the released files) or a
    ``TransparentVAEModule`` checkpoint (``.ckpt`` file or sharded folder; its EMA weights when
    it has them and ``use_ema``, as the export would write).

    Decoder shape comes from the export's ``decoder_config`` metadata, or from the weights and
    hyper-parameters of a checkpoint; the released files (no metadata) are the released shape.
    """
    path = Path(source)
    encoder_path, decoder_path = transparent_vae_files(path)
    if encoder_path.is_file() or decoder_path.is_file():
        metadata = read_metadata(decoder_path) if decoder_path.is_file() else {}
        decoder_config = RELEASED_DECODER_CONFIG
        if "decoder_config" in metadata:
            decoder_config = json.loads(metadata["decoder_config"])
        encoder, decoder = LatentTransparencyEncoder(), TransparencyDecoder(**decoder_config)
        load_transparent_vae(encoder, decoder, path)
        return encoder, decoder
    if not path.exists():
        raise FileNotFoundError(
            f"transparent VAE not found: {path}. Give a folder with {ENCODER_FILENAME} and {DECODER_FILENAME} "
            "(an export or the released LayerDiffuse files) or a TransparentVAEModule checkpoint."
        )
    return transparency_models_from_checkpoint(read_checkpoint(path), path, use_ema)


def transparency_models_from_checkpoint(
    contents: Mapping[str, Any], checkpoint_path: Path, use_ema: bool = True
) -> tuple[LatentTransparencyEncoder, TransparencyDecoder]:
    """Encoder and decoder of a read ``TransparentVAEModule`` checkpoint (:func:`read_checkpoint`).

    The encoder's input convention is that of the weights the run started from
    (``init_from``), ``"straight"`` for a run from scratch.
    """
    hyperparameters = dict(contents.get("hyper_parameters", {}))
    encoder_state = exported_state(contents, ENCODER_PREFIX.rstrip("."), checkpoint_path, use_ema)
    decoder_state = exported_state(contents, DECODER_PREFIX.rstrip("."), checkpoint_path, use_ema)
    if not encoder_state or not decoder_state:
        raise ValueError(
            f"{checkpoint_path}: no '{ENCODER_PREFIX}*' / '{DECODER_PREFIX}*' weights in the checkpoint's "
            "state_dict; is it a TransparentVAEModule checkpoint?"
        )
    decoder_config = {
        **infer_decoder_shape(decoder_state),
        "attention_head_dim": find_hyperparameter(hyperparameters, "decoder_attention_head_dim")
        or RELEASED_DECODER_CONFIG["attention_head_dim"],
        "norm_num_groups": find_hyperparameter(hyperparameters, "decoder_norm_num_groups")
        or RELEASED_DECODER_CONFIG["norm_num_groups"],
    }
    encoder = LatentTransparencyEncoder(_initial_input_convention(hyperparameters, checkpoint_path))
    decoder = TransparencyDecoder(**decoder_config)
    encoder.load_state_dict(encoder_state, strict=True)
    decoder.load_state_dict(decoder_state, strict=True)
    return encoder, decoder


def _initial_input_convention(hyperparameters: Mapping[str, Any], checkpoint_path: Path) -> InputConvention:
    init_from = find_hyperparameter(hyperparameters, "init_from")
    if init_from is None:
        return "straight"
    encoder_path, _ = transparent_vae_files(init_from)
    if not encoder_path.is_file():
        raise FileNotFoundError(
            f"{checkpoint_path}: the run started from {init_from}, whose encoder file tells the input convention "
            f"the weights expect, but {encoder_path} is not there; make it available at that path."
        )
    return encoder_file_conventions(encoder_path)[1]
