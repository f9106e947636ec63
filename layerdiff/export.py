"""Interop with the released LayerDiffuse files (DESIGN §3).

Transparent VAE files, readable by the released ``lib_layerdiffuse/vae.py`` and its ComfyUI,
Forge and diffusers ports (which build the default-width modules and load strictly):

* ``vae_transparent_encoder.safetensors``: ``LatentTransparencyEncoder.state_dict()``,
  keys ``blocks.{0,2,...,16}.{weight,bias}``.
* ``vae_transparent_decoder.safetensors``: ``TransparencyDecoder.state_dict()``, the
  diffusers-block names (``conv_in``, ``latent_conv_in``, ``down_blocks.*``, ``mid_block.*``,
  ``up_blocks.*``, ``conv_norm_out``, ``conv_out``).

Their safetensors metadata (all strings) carries ``format = "layerdiffuse"``, ``component``,
``layerdiff_version``, ``decoder_config`` (JSON of the ``TransparencyDecoder`` arguments) and
``layerdiff_config`` (JSON of the training hyper-parameters, when known).

Lightning checkpoints: the training module holds the encoder as ``transparent_encoder`` and the
decoder as ``transparent_decoder``, so their keys in ``ckpt["state_dict"]`` start with
``transparent_encoder.`` / ``transparent_decoder.``; other keys (frozen VAE, discriminator) are
ignored. When the run kept an exponential moving average (``callbacks.EMA``), its averages, stored
in ``ckpt["callbacks"]``, replace the raw weights (``use_ema=False`` / ``--no-ema`` keeps the raw
ones). Decoder widths and depth are read off the weights themselves; head size and
group count, which no weight shape reveals, come from the hyper-parameters
``decoder_attention_head_dim`` / ``decoder_norm_num_groups`` (at any nesting depth) or default
to the released values. Both single-file checkpoints and Lightning's distributed checkpoint
folders (FSDP2 / ``ModelParallelStrategy``) are read.

UNet weights (LoRAs in the diffusers/peft and Forge/ComfyUI layouts, full fine-tunes as diffusers
UNet folders) live in :mod:`layerdiff.export_lora`; this module's CLI exports them too::

    python -m layerdiff.export transparent-vae --checkpoint last.ckpt --out DIR [--dtype fp16] [--no-ema]
    python -m layerdiff.export lora --checkpoint last.ckpt --out DIR [--format both] [--dtype fp16] [--no-ema]
    python -m layerdiff.export unet --checkpoint last.ckpt --out DIR [--dtype fp16] [--no-ema]
    python -m layerdiff.export consolidate --checkpoint last.ckpt --out last-full.ckpt

``consolidate`` turns a sharded checkpoint folder into one single-file Lightning checkpoint
(``layerdiff.distributed.consolidate_checkpoint``): what ``load_from_checkpoint`` reads and a
DDP or single-device run resumes from.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from layerdiff.models.transparency import (
    RELEASED_DECODER_WIDTHS,
    LatentTransparencyEncoder,
    TransparencyDecoder,
)

ENCODER_FILENAME = "vae_transparent_encoder.safetensors"
DECODER_FILENAME = "vae_transparent_decoder.safetensors"
ENCODER_PREFIX = "transparent_encoder."
DECODER_PREFIX = "transparent_decoder."
FORMAT_VERSION = "1"
RELEASED_DECODER_CONFIG = {
    "block_out_channels": list(RELEASED_DECODER_WIDTHS),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "norm_num_groups": 4,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The key under which callbacks.EMA stores its averages (parameter name -> tensor) in its callback
# state; exports find the EMA state in ``ckpt["callbacks"]`` by it.
EMA_AVERAGES_KEY = "averaged_parameters"
# Wrappers that activation checkpointing and torch.compile insert into parameter names.
_WRAPPER_SEGMENT = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")


def _layerdiff_version() -> str:
    try:
        return version("layerdiff")
    except PackageNotFoundError:  # running from a source checkout
        return "unknown"


def infer_decoder_shape(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``block_out_channels`` and ``layers_per_block`` of the decoder these weights belong to."""
    widths = []
    while (key := f"down_blocks.{len(widths)}.resnets.0.conv2.weight") in state_dict:
        widths.append(int(state_dict[key].shape[0]))
    if not widths:
        raise ValueError("not a transparency decoder state dict: no 'down_blocks.0.resnets.0.conv2.weight'")
    resnets = {key.split(".")[3] for key in state_dict if key.startswith("down_blocks.0.resnets.")}
    return {"block_out_channels": widths, "layers_per_block": len(resnets)}


def save_transparent_vae(
    encoder: LatentTransparencyEncoder,
    decoder: TransparencyDecoder,
    out_dir: str | PathLike,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Path, Path]:
    """Write the released-format encoder and decoder files into ``out_dir``.

    ``metadata`` (e.g. the training hyper-parameters) is stored as JSON under
    ``layerdiff_config``; values JSON cannot encode are written as their ``str()``.
    Returns the encoder and decoder paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / ENCODER_FILENAME, out_dir / DECODER_FILENAME)
    for module, path, component in zip((encoder, decoder), paths, ("transparent_encoder", "transparent_decoder")):
        file_metadata = {
            "format": "layerdiffuse",
            "decoder_config": json.dumps(decoder.config),
            **layerdiff_metadata(component, metadata),
        }
        save_file(tensors_for_file(module.state_dict(), dtype), path, metadata=file_metadata)
    return paths


def layerdiff_metadata(component: str, training_config: Mapping[str, Any] | None) -> dict[str, str]:
    """Provenance strings for an exported file's safetensors metadata.

    ``training_config`` (e.g. the training hyper-parameters) is stored as JSON under
    ``layerdiff_config``; values JSON cannot encode are written as their ``str()``.
    """
    metadata = {"component": component, "format_version": FORMAT_VERSION, "layerdiff_version": _layerdiff_version()}
    if training_config is not None:
        metadata["layerdiff_config"] = json.dumps(training_config, default=str, sort_keys=True)
    return metadata


def tensors_for_file(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies in ``dtype``, as safetensors writes them."""
    return {key: value.detach().to("cpu", dtype).contiguous() for key, value in state_dict.items()}


def read_metadata(path: str | PathLike) -> dict[str, str]:
    """The safetensors metadata of an exported file (empty for the released files)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


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


def load_transparent_vae(
    encoder: LatentTransparencyEncoder | None,
    decoder: TransparencyDecoder | None,
    directory_or_files: str | PathLike | Sequence[str | PathLike],
    strict: bool = True,
) -> None:
    """Load released or exported transparent VAE files into existing modules (e.g. to initialise training).

    ``directory_or_files`` is a folder holding both files, or an ``(encoder_file, decoder_file)``
    pair. Pass ``None`` for a module to leave it untouched. Shape mismatches always raise, naming
    the key, both shapes and the configuration to change; ``strict`` governs missing and
    unexpected keys.
    """
    if isinstance(directory_or_files, (str, PathLike)):
        directory = Path(directory_or_files)
        encoder_path, decoder_path = directory / ENCODER_FILENAME, directory / DECODER_FILENAME
    else:
        encoder_path, decoder_path = (Path(path) for path in directory_or_files)

    for module, path in ((encoder, encoder_path), (decoder, decoder_path)):
        if module is None:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"transparent VAE file not found: {path}")
        state_dict = load_file(path)
        _check_compatible(module, state_dict, path, strict)
        module.load_state_dict(state_dict, strict=strict)


# -- Lightning checkpoints ---------------------------------------------------------------


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        # A sharded (FSDP2) checkpoint folder: consolidated in memory.
        from layerdiff.distributed import read_sharded_checkpoint

        return read_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Lightning pickles hyper-parameters (AttributeDict, paths, namespaces), which the
    # weights-only unpickler refuses: export only checkpoints you trust.
    return torch.load(path, map_location="cpu", weights_only=False)


def trained_state_dict(contents: Mapping[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint's ``state_dict``, with the EMA callback's averages in place of the raw
    weights when the checkpoint has them and ``use_ema``."""
    state_dict = dict(contents.get("state_dict", {}))
    if not use_ema:
        return state_dict
    averages = [
        state[EMA_AVERAGES_KEY]
        for state in contents.get("callbacks", {}).values()
        if isinstance(state, Mapping) and EMA_AVERAGES_KEY in state
    ]
    if not averages:
        return state_dict
    unknown = sorted(set(averages[0]) - set(state_dict))
    if len(averages) > 1 or unknown:
        raise ValueError(
            f"the checkpoint's EMA state does not match its weights ({len(averages)} EMA states; averaged "
            f"parameters missing from state_dict: {unknown[:3]}). Export the raw weights with --no-ema "
            "(use_ema=False)."
        )
    state_dict.update(averages[0])
    return state_dict


def _submodule_state(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {
        _WRAPPER_SEGMENT.sub("", key[len(prefix):]): tensor
        for key, tensor in state_dict.items()
        if key.startswith(prefix)
    }


def _find_hyperparameter(hyperparameters: Any, name: str) -> Any:
    """First value stored under ``name`` in possibly nested mappings (depth-first), else None."""
    if isinstance(hyperparameters, Mapping):
        if name in hyperparameters:
            return hyperparameters[name]
        for value in hyperparameters.values():
            found = _find_hyperparameter(value, name)
            if found is not None:
                return found
    return None


def export_transparent_vae_checkpoint(
    checkpoint: str | PathLike, out_dir: str | PathLike, dtype: torch.dtype = torch.float32, use_ema: bool = True
) -> tuple[Path, Path]:
    """Extract encoder and decoder from a Lightning checkpoint into the released file format
    (the EMA weights when the checkpoint has them and ``use_ema``)."""
    checkpoint_path = Path(checkpoint)
    contents = _read_checkpoint(checkpoint_path)
    encoder, decoder = _transparency_models_from_checkpoint(contents, checkpoint_path, use_ema)
    hyperparameters = dict(contents.get("hyper_parameters", {}))
    return save_transparent_vae(encoder, decoder, out_dir, metadata=hyperparameters, dtype=dtype)


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
    if (path / ENCODER_FILENAME).is_file() or (path / DECODER_FILENAME).is_file():
        decoder_path = path / DECODER_FILENAME
        metadata = read_metadata(decoder_path) if decoder_path.is_file() else {}
        decoder_config = json.loads(metadata["decoder_config"]) if "decoder_config" in metadata else RELEASED_DECODER_CONFIG
        encoder, decoder = LatentTransparencyEncoder(), TransparencyDecoder(**decoder_config)
        load_transparent_vae(encoder, decoder, path)
        return encoder, decoder
    if not path.exists():
        raise FileNotFoundError(
            f"transparent VAE not found: {path}. Give a folder with {ENCODER_FILENAME} and {DECODER_FILENAME} "
            "(an export or the released LayerDiffuse files) or a TransparentVAEModule checkpoint."
        )
    return _transparency_models_from_checkpoint(_read_checkpoint(path), path, use_ema)


def _transparency_models_from_checkpoint(
    contents: Mapping[str, Any], checkpoint_path: Path, use_ema: bool
) -> tuple[LatentTransparencyEncoder, TransparencyDecoder]:
    state_dict = trained_state_dict(contents, use_ema)
    hyperparameters = dict(contents.get("hyper_parameters", {}))
    encoder_state = _submodule_state(state_dict, ENCODER_PREFIX)
    decoder_state = _submodule_state(state_dict, DECODER_PREFIX)
    if not encoder_state or not decoder_state:
        raise ValueError(
            f"{checkpoint_path}: no '{ENCODER_PREFIX}*' / '{DECODER_PREFIX}*' weights in the checkpoint's "
            "state_dict; is it a TransparentVAEModule checkpoint?"
        )
    decoder_config = {
        **infer_decoder_shape(decoder_state),
        "attention_head_dim": _find_hyperparameter(hyperparameters, "decoder_attention_head_dim")
        or RELEASED_DECODER_CONFIG["attention_head_dim"],
        "norm_num_groups": _find_hyperparameter(hyperparameters, "decoder_norm_num_groups")
        or RELEASED_DECODER_CONFIG["norm_num_groups"],
    }
    encoder = LatentTransparencyEncoder()
    decoder = TransparencyDecoder(**decoder_config)
    encoder.load_state_dict(encoder_state, strict=True)
    decoder.load_state_dict(decoder_state, strict=True)
    return encoder, decoder


def main(argv: Sequence[str] | None = None) -> int:
    # Imported here: export_lora builds on this module's checkpoint helpers.
    from layerdiff import export_lora

    parser = argparse.ArgumentParser(
        prog="python -m layerdiff.export", description="Export trained layerdiff weights into released formats."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    transparent = commands.add_parser(
        "transparent-vae",
        help="write vae_transparent_{encoder,decoder}.safetensors from a TransparentVAEModule checkpoint",
    )
    lora = commands.add_parser(
        "lora",
        help=f"write the UNet LoRA of a checkpoint as diffusers/peft {export_lora.DIFFUSERS_LORA_FILENAME} "
        "and/or in the Forge/ComfyUI layout of the released LayerDiffuse LoRAs",
    )
    lora.add_argument(
        "--format", choices=("diffusers", "forge", "both"), default="both", help="which layouts to write"
    )
    unet = commands.add_parser(
        "unet",
        help="write the fine-tuned UNet (a LoRA checkpoint: base UNet with the LoRA fused in) as a diffusers "
        "UNet folder that UNet2DConditionModel.from_pretrained loads",
    )
    consolidate = commands.add_parser(
        "consolidate",
        help="write a sharded (FSDP2) checkpoint folder as one single-file Lightning checkpoint, which "
        "load_from_checkpoint reads and DDP or single-device runs resume from",
    )
    consolidate.add_argument("--checkpoint", required=True, type=Path, help="sharded checkpoint folder")
    consolidate.add_argument("--out", required=True, type=Path, help="the .ckpt file to write")
    for command in (transparent, lora, unet):
        command.add_argument("--checkpoint", required=True, type=Path, help="Lightning .ckpt file or sharded folder")
        command.add_argument("--out", required=True, type=Path, help="output folder")
        command.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="tensor dtype in the files")
        command.add_argument(
            "--no-ema", dest="use_ema", action="store_false", help="export the raw weights even if the run kept an EMA"
        )
    for command in (lora, unet):
        command.add_argument(
            "--base-model",
            help="base model (hub id or folder) to read the UNet from, instead of the checkpoint's base_model "
            "hyper-parameter (e.g. when it was a path on another machine)",
        )
    args = parser.parse_args(argv)
    if args.command == "consolidate":
        from layerdiff.distributed import consolidate_checkpoint

        print(f"wrote {consolidate_checkpoint(args.checkpoint, args.out)}")
        return 0
    dtype = DTYPES[args.dtype]

    if args.command == "lora":
        formats = ("diffusers", "forge") if args.format == "both" else (args.format,)
        paths = export_lora.export_lora_checkpoint(
            args.checkpoint, args.out, formats, dtype, use_ema=args.use_ema, base_model=args.base_model
        )
        print("\n".join(f"wrote {path}" for path in paths))
        return 0
    if args.command == "unet":
        folder = export_lora.export_unet_checkpoint(
            args.checkpoint, args.out, dtype, use_ema=args.use_ema, base_model=args.base_model
        )
        print(f"wrote {folder}")
        return 0

    encoder_path, decoder_path = export_transparent_vae_checkpoint(args.checkpoint, args.out, dtype, args.use_ema)
    config = json.loads(read_metadata(decoder_path)["decoder_config"])
    print(f"wrote {encoder_path}\nwrote {decoder_path}")
    if config != RELEASED_DECODER_CONFIG:
        print(
            f"note: decoder config {config} differs from the released {RELEASED_DECODER_CONFIG}; "
            "ComfyUI/Forge/diffusers LayerDiffuse loaders assume the released one."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
