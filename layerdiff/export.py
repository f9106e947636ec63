"""``python -m layerdiff.export``: trained weights out of Lightning checkpoints into the files
other tools read (the formats themselves live in :mod:`layerdiff.formats`)::

    python -m layerdiff.export transparent-vae --checkpoint last.ckpt --out DIR [--flavour both] [--dtype fp16]
        [--no-ema]
    python -m layerdiff.export lora --checkpoint last.ckpt --out DIR [--format all] [--dtype fp16] [--no-ema]
    python -m layerdiff.export unet --checkpoint last.ckpt --out DIR [--dtype fp16] [--no-ema]
    python -m layerdiff.export layer-sharing --checkpoint last.ckpt --out DIR [--dtype fp16] [--no-ema]
    python -m layerdiff.export matting-head --checkpoint last.ckpt --out DIR [--dtype fp16] [--no-ema]
    python -m layerdiff.export conditional --checkpoint last.ckpt --out DIR [--dtype fp16] [--no-ema]
    python -m layerdiff.export consolidate --checkpoint last.ckpt --out last-full.ckpt

``transparent-vae`` writes the encoder and decoder files of each released flavour
(:mod:`layerdiff.formats.layerdiffuse_vae`); ``lora`` the UNet LoRA in the diffusers/peft,
Forge/ComfyUI-layerdiffuse and ComfyUI (kohya) layouts (:mod:`layerdiff.formats.lora`);
``unet`` the fine-tuned UNet as a diffusers folder (:mod:`layerdiff.formats.unet`);
``layer-sharing`` a joint-layer checkpoint's units in layerdiff's layout, one diffusers LoRA per
layer and, for SD1.5 frame mode with the released three layers, the released
``layer_sd15_joint.safetensors`` (:mod:`layerdiff.formats.layer_sharing`); ``matting-head`` a
``DiffuMattingModule``'s matting head (:mod:`layerdiff.formats.matting_head`; its UNet exports
with ``lora`` or ``unet``); ``conditional`` a joint-layer checkpoint trained with
``concat_conditions`` (LD Fig. 4) as the released SDXL ``::diff::`` file
(:mod:`layerdiff.formats.unet_delta`: ``layer_xl_fg2ble.safetensors`` and its kin).
``consolidate`` turns a sharded checkpoint folder into one single-file Lightning checkpoint:
what ``load_from_checkpoint`` reads and a DDP or single-device run resumes from. Checkpoints are
``.ckpt`` files or sharded folders; the run's EMA weights are exported when it kept an EMA.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from layerdiff.distributed import consolidate_checkpoint
from layerdiff.formats.checkpoints import find_hyperparameter, read_checkpoint
from layerdiff.formats.layer_checkpoints import read_joint_checkpoint
from layerdiff.formats.layer_conditional import RELEASED_CONDITIONAL, conditional_task, save_released_conditional
from layerdiff.formats.layer_sharing import (
    LAYER_LORA_SUFFIX,
    LAYER_SHARING_FILENAME,
    RELEASED_JOINT_FILENAME,
    layer_lora,
    released_joint_problem,
    save_layer_loras,
    save_layer_sharing,
    save_released_joint,
)
from layerdiff.formats.layerdiffuse_vae import (
    FLAVOURS,
    RELEASED_DECODER_CONFIG,
    FlavourName,
    save_transparent_vae,
    transparency_models_from_checkpoint,
)
from layerdiff.formats.lora import (
    COMFYUI_LORA_FILENAMES,
    DIFFUSERS_LORA_FILENAME,
    FORGE_LORA_FILENAMES,
    LoraFormat,
    fuse_lora,
    save_comfyui_lora,
    save_diffusers_lora,
    save_forge_lora,
)
from layerdiff.formats.matting_head import MATTING_HEAD_FILENAME, matting_head_from_checkpoint, save_matting_head
from layerdiff.formats.unet import read_unet_checkpoint, save_unet_folder, trained_unet
from layerdiff.formats.unet_delta import RELEASED_CONDITIONAL_FILES, apply_unet_delta, is_unet_delta, save_unet_delta
from layerdiff.models.base import MODEL_CONFIG_FILE, detect_architecture, load_component, load_unet
from layerdiff.models.conv_in import LATENT_CHANNELS, grow_conv_in

CONDITIONAL_FILENAME = "layerdiff_conditional.safetensors"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_FORMATS: dict[str, tuple[LoraFormat, ...]] = {
    "diffusers": ("diffusers",),
    "forge": ("forge",),
    "comfyui": ("comfyui",),
    "both": ("diffusers", "forge"),
    "all": ("diffusers", "forge", "comfyui"),
}
VAE_FLAVOURS: dict[str, tuple[FlavourName, ...]] = {**{name: (name,) for name in FLAVOURS}, "both": tuple(FLAVOURS)}


def export_transparent_vae_checkpoint(
    checkpoint: str | PathLike,
    out_dir: str | PathLike,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    flavours: Sequence[FlavourName] = tuple(FLAVOURS),
) -> list[Path]:
    """Encoder and decoder of a ``TransparentVAEModule`` checkpoint in each released flavour."""
    path = Path(checkpoint)
    contents = read_checkpoint(path)
    encoder, decoder = transparency_models_from_checkpoint(contents, path, use_ema)
    hyperparameters = dict(contents.get("hyper_parameters", {}))
    written = save_transparent_vae(encoder, decoder, out_dir, hyperparameters, dtype, flavours)
    if decoder.config != RELEASED_DECODER_CONFIG:
        print(
            f"note: decoder config {decoder.config} differs from the released {RELEASED_DECODER_CONFIG}; "
            "ComfyUI/Forge/diffusers LayerDiffuse loaders assume the released one."
        )
    return [file for pair in written.values() for file in pair]


def export_lora_checkpoint(
    checkpoint: str | PathLike,
    out_dir: str | PathLike,
    formats: Sequence[LoraFormat] = LORA_FORMATS["all"],
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    base_model: str | None = None,
) -> list[Path]:
    """A LoRA checkpoint's adapter in each of ``formats``. The scale comes from the
    ``lora_alpha`` hyper-parameter (unset: the rank); the original-UNet layouts need the base
    model's UNet config (read from ``base_model``, by default the checkpoint's)."""
    read = read_unet_checkpoint(checkpoint, use_ema, base_model)
    lora = read.lora()
    if not lora:
        raise ValueError(
            f"{checkpoint}: the checkpoint's UNet weights hold no LoRA (a full fine-tune?); "
            "export it with `python -m layerdiff.export unet`."
        )
    out_dir = Path(out_dir)
    paths = []
    if "diffusers" in formats:
        paths.append(save_diffusers_lora(lora, out_dir, read.hyperparameters, dtype))
    original_layouts = {
        "forge": (save_forge_lora, FORGE_LORA_FILENAMES),
        "comfyui": (save_comfyui_lora, COMFYUI_LORA_FILENAMES),
    }
    wanted = [layout for layout in original_layouts if layout in formats]
    if wanted:
        unet_config = load_component(
            UNet2DConditionModel.load_config, read.base_model, "unet", MODEL_CONFIG_FILE, read.base_revision
        )
        architecture = detect_architecture(read.base_model, revision=read.base_revision)
        for layout in wanted:
            save, filenames = original_layouts[layout]
            paths.append(save(lora, unet_config, out_dir / filenames[architecture], read.hyperparameters, dtype))
    return paths


def export_layer_sharing_checkpoint(
    checkpoint: str | PathLike,
    out_dir: str | PathLike,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    base_model: str | None = None,
) -> list[Path]:
    """A joint-layer checkpoint's units in layerdiff's layout, each layer's LoRA for diffusers
    and, where the units fit it, the released SD1.5 joint file."""
    read = read_joint_checkpoint(checkpoint, use_ema, base_model)
    out_dir = Path(out_dir)
    if read.control_layer is not None:  # the released SD1.5 fg2bg / bg2fg design: only its released layout holds it
        task = conditional_task(read.layer_names, read.control_layer)
        return [save_released_conditional(out_dir / RELEASED_CONDITIONAL[task].filename, read.unet, read.control_encoder,
                                          task, read.layer_names, read.hyperparameters, dtype)]
    paths = [save_layer_sharing(out_dir / LAYER_SHARING_FILENAME, read.unet, read.layer_names, read.hyperparameters, dtype)]
    paths += save_layer_loras(out_dir, read.unet, read.layer_names, read.hyperparameters, dtype)
    problem = released_joint_problem(read.unet, read.layer_names)
    if problem is None:
        paths.append(save_released_joint(out_dir / RELEASED_JOINT_FILENAME, read.unet, read.layer_names,
                                         read.hyperparameters, dtype))
    else:
        print(f"note: no {RELEASED_JOINT_FILENAME}: {problem}")
    return paths


def export_conditional_checkpoint(
    checkpoint: str | PathLike,
    out_dir: str | PathLike,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    base_model: str | None = None,
) -> list[Path]:
    """A channel-conditioned joint-layer checkpoint (one generated layer, ``concat_conditions``)
    as a ``::diff::`` file against the base model's UNet: the UNet it started from (``base_unet``
    and an ``init_from`` file included) with the layer's LoRA fused in and the trained ``conv_in``.
    Named as the released file when its conditions and layer are a released variant's."""
    joint = read_joint_checkpoint(checkpoint, use_ema, base_model)
    hyperparameters = joint.hyperparameters
    conditions = tuple(find_hyperparameter(hyperparameters, "concat_conditions") or ())
    if not conditions or len(joint.layer_names) != 1 or find_hyperparameter(hyperparameters, "attention_sharing") == "frame":
        raise ValueError(f"{checkpoint}: not a channel-conditioned model (one generated layer, concat_conditions set, "
                         f"no frame attention: got layers {joint.layer_names}, concat_conditions {list(conditions)}); "
                         "export joint models with `python -m layerdiff.export layer-sharing`")
    read = read_unet_checkpoint(checkpoint, use_ema, base_model)
    base_unet, init_from = (find_hyperparameter(hyperparameters, name) for name in ("base_unet", "init_from"))
    reference = load_unet(read.base_model, revision=read.base_revision)
    trained = load_unet(base_unet, subfolder=None) if base_unet else load_unet(read.base_model, revision=read.base_revision)
    for unet in (reference, trained):
        grow_conv_in(unet, LATENT_CHANNELS * len(conditions))
    if init_from and is_unet_delta(init_from):
        apply_unet_delta(trained, init_from)
    fuse_lora(trained, layer_lora(joint.unet, 0))
    trained.conv_in.load_state_dict({name: read.unet_state[f"conv_in.{name}"] for name in ("weight", "bias")})
    matching = [variant for variant in RELEASED_CONDITIONAL_FILES.values()
                if variant.conditions == conditions and variant.generates == joint.layer_names[0]]
    filename = matching[0].filename if matching and detect_architecture(read.base_model) == "sdxl" else CONDITIONAL_FILENAME
    path = save_unet_delta(trained.state_dict(), reference.state_dict(), trained.config, Path(out_dir) / filename,
                           hyperparameters, dtype)
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m layerdiff.export", description="Export trained layerdiff weights into released formats."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    transparent = commands.add_parser(
        "transparent-vae",
        help="write the transparent VAE encoder/decoder files of a TransparentVAEModule checkpoint in the released "
        f"flavours ({', '.join(f'{name}: {flavour.encoder_file}' for name, flavour in FLAVOURS.items())})",
    )
    transparent.add_argument(
        "--flavour", choices=sorted(VAE_FLAVOURS), default="both", help="which released flavours to write"
    )
    lora = commands.add_parser(
        "lora",
        help=f"write the UNet LoRA of a checkpoint as diffusers/peft {DIFFUSERS_LORA_FILENAME}, in the "
        "Forge/ComfyUI-layerdiffuse layout of the released LayerDiffuse LoRAs and with the kohya keys ComfyUI's "
        "LoRA loader reads",
    )
    lora.add_argument(
        "--format",
        choices=sorted(LORA_FORMATS),
        default="all",
        help="which layouts to write (both: diffusers and forge; all: also comfyui)",
    )
    unet = commands.add_parser(
        "unet",
        help="write the fine-tuned UNet (a LoRA checkpoint: base UNet with the LoRA fused in) as a diffusers "
        "UNet folder that UNet2DConditionModel.from_pretrained loads",
    )
    layer_sharing = commands.add_parser(
        "layer-sharing",
        help=f"write a JointLayerLoRAModule checkpoint's layer-sharing units as {LAYER_SHARING_FILENAME}, one "
        f"diffusers LoRA per layer (<layer>{LAYER_LORA_SUFFIX}) and, for SD1.5 frame mode with the layers "
        f"foreground/background/blend, the released {RELEASED_JOINT_FILENAME}; a model with a control_layer as the "
        f"released {' / '.join(task.filename for task in RELEASED_CONDITIONAL.values())}",
    )
    conditional = commands.add_parser(
        "conditional",
        help="write a joint-layer checkpoint trained with concat_conditions (one generated layer) as a ::diff:: "
        f"file: the released name ({', '.join(v.filename for v in RELEASED_CONDITIONAL_FILES.values())}) where it "
        f"is one of those SDXL variants, else {CONDITIONAL_FILENAME}",
    )
    matting_head = commands.add_parser(
        "matting-head",
        help=f"write a DiffuMattingModule checkpoint's matting head as {MATTING_HEAD_FILENAME} (its shape and key colour "
        "in the metadata)",
    )
    consolidate = commands.add_parser(
        "consolidate",
        help="write a sharded (FSDP2) checkpoint folder as one single-file Lightning checkpoint, which "
        "load_from_checkpoint reads and DDP or single-device runs resume from",
    )
    consolidate.add_argument("--checkpoint", required=True, type=Path, help="sharded checkpoint folder")
    consolidate.add_argument("--out", required=True, type=Path, help="the .ckpt file to write")
    for command in (transparent, lora, unet, layer_sharing, matting_head, conditional):
        command.add_argument("--checkpoint", required=True, type=Path, help="Lightning .ckpt file or sharded folder")
        command.add_argument("--out", required=True, type=Path, help="output folder")
        command.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="tensor dtype in the files")
        command.add_argument(
            "--no-ema", dest="use_ema", action="store_false", help="export the raw weights even if the run kept an EMA"
        )
    for command in (lora, unet, layer_sharing, conditional):
        command.add_argument(
            "--base-model",
            help="base model (hub id or folder) to read the UNet from, instead of the checkpoint's base_model "
            "hyper-parameter (e.g. when it was a path on another machine)",
        )
    args = parser.parse_args(argv)

    if args.command == "consolidate":
        paths = [consolidate_checkpoint(args.checkpoint, args.out)]
    elif args.command == "transparent-vae":
        flavours = VAE_FLAVOURS[args.flavour]
        paths = export_transparent_vae_checkpoint(args.checkpoint, args.out, DTYPES[args.dtype], args.use_ema, flavours)
    elif args.command == "lora":
        formats = LORA_FORMATS[args.format]
        paths = export_lora_checkpoint(
            args.checkpoint, args.out, formats, DTYPES[args.dtype], use_ema=args.use_ema, base_model=args.base_model
        )
    elif args.command == "layer-sharing":
        paths = export_layer_sharing_checkpoint(
            args.checkpoint, args.out, DTYPES[args.dtype], use_ema=args.use_ema, base_model=args.base_model
        )
    elif args.command == "conditional":
        paths = export_conditional_checkpoint(args.checkpoint, args.out, DTYPES[args.dtype], args.use_ema, args.base_model)
    elif args.command == "matting-head":
        head, hyperparameters = matting_head_from_checkpoint(args.checkpoint, args.use_ema)
        paths = [save_matting_head(head, args.out, hyperparameters, DTYPES[args.dtype])]
    else:
        read = read_unet_checkpoint(args.checkpoint, args.use_ema, args.base_model)
        unet = trained_unet(read, args.checkpoint)
        paths = [save_unet_folder(unet, args.out, read.hyperparameters, DTYPES[args.dtype])]
    print("\n".join(f"wrote {path}" for path in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
