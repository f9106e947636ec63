"""Command-line tools for layerdiff shards: ``python -m data {write,validate,demo,cache-latents,synthesize-layers} --help``."""

from __future__ import annotations

import argparse
import os
import sys
import time

DESCRIPTION = """\
Tools for layerdiff's webdataset shards (schema: data/schema.py).

  write     convert a folder of RGBA PNGs (+ same-stem .txt captions), of layered
            sources (NAME.fg.png + NAME.bg.png, layered .psd files) or a matting data
            set (image or foreground folder + alpha folder), into shards
  validate  read every sample of some shards, check the schema, print statistics
  demo      build demo shards from OpenMoji emoji over scikit-image photos (offline)
  cache-latents
            turn image shards into cached shards (adjusted latents, optionally text
            embeddings) that latent diffusion training reads without running the encoders
  pretrain-base
            pretrain the embedded tiny model's VAE and UNet on the demo's RGB images
            (the weights of embedded:tiny-sdxl-pretrained)
  synthesize-layers
            make layered shards (fg, bg, blend) from transparent foregrounds and prompt
            triples by inpainting (LayerDiffusion sec. 3.4); resumable, on every device
"""

SYNTHESIZE_DESCRIPTION = """\
LayerDiffusion sec. 3.4: for every transparent foreground and its prompt triple, an inpainting
model (SDXL or SD1.5, e.g. diffusers/stable-diffusion-xl-1.0-inpainting-0.1) draws
  1. the blend: every pixel with alpha below one, with the whole-image prompt; the
     foreground is composited back over it, so it is kept exactly;
  2. the background: the inverted alpha eroded by --erosion-radius pixels, inpainted in the
     blend with the background prompt ("nothing in a kitchen"); elsewhere it is the blend;
and writes layered shards (fg.png, bg.png, blend.png, the three captions, provenance: model,
seed, settings, input). Check them with `python -m data validate OUT_DIR`.

FOREGROUNDS: RGBA shards (a shards spec of local .tar files, e.g. `python -m data write`
output) or a folder of RGBA PNGs (e.g. `train.py predict` output of a transparent model,
whose PNGs carry their prompt as a text chunk, used as the foreground caption).

--prompts: JSONL, one object per line (blank lines skipped):
  {"foreground": "a glass vase", "blend": "a glass vase on a kitchen table",
   "background": "nothing on a kitchen table"}
blend and background are required; foreground is optional (default: the foreground's own
caption). With a "key" on every line, each foreground gets the line with its key (its
sample key, or its PNG path below the folder without .png); without keys, foreground i
gets line i mod (number of lines). A broken line stops the run naming file and line,
unless --skip-broken-prompts.

Dropped and counted: foregrounds without alpha, fully opaque (nothing to inpaint) or empty
(nothing to keep), unreadable ones, those without a prompt line for their key.

Resumable: each output shard is written atomically with a record of the items it holds
(OUT_DIR/records/); run the same command again after a kill and it skips finished shards
and redoes the rest; index.json is written when every shard is finished. Item i has seed
--seed + i, so the output does not depend on --devices or on interruptions. With
--devices N > 1 the unfinished shards are dealt out to N processes (DDP, one per device).
"""

WRITE_DESCRIPTION = """\
Convert every image under SRC_DIR (recursively) into shards in OUT_DIR. Each image is resized
to cover the target size and centre-cropped (all layers of a sample alike); images without
alpha, without a transparent pixel or without a visible pixel are dropped and reported.
Shards are written atomically; a re-run overwrites the previous output.

Plain (single-layer) sources: NAME.png, RGBA, with the caption in NAME.txt.

Layered sources (LayerDiffusion's foreground / background / blend), chosen automatically
when SRC_DIR holds any *.fg.png, *.bg.png, *.blend.png or *.psd (plain NAME.png files
beside them are then an error):
  NAME.fg.png     foreground, RGBA                      caption NAME.fg.txt
  NAME.bg.png     background, RGB or opaque RGBA        caption NAME.bg.txt
  NAME.blend.png  optional whole image, RGB             caption NAME.txt
                  (without it: foreground composited over background)
  NAME.psd        layered Photoshop file: the topmost visible layer or group with pixels
                  is the foreground, the visible layers below it flattened are the
                  background, the PSD's composite is the blend; captions as above
A given blend must match foreground over background (mean and 99th-percentile error in
8-bit levels, tolerances in data/layered_sources.py); a mismatching blend, layers of
different sizes, a foreground without alpha or background, a single-layer PSD and
unreadable files are dropped and reported with the file and the fix.

Matting data sets (image + alpha matte, as RGBA cut-outs), chosen automatically when a
folder under SRC_DIR (e.g. each split: train/, test/) holds an alpha folder beside a
foreground or an image folder (folder names ignore case; other files in SRC_DIR are then
an error; accepted layouts in data/matting_sources.py):
  alpha folder    alpha, alphas, mask, matte, GT: 8-bit grey mattes (RGB with equal
                  channels accepted)
  foreground      fg, foreground: the straight foreground colour, used as it is
                  (Distinctions-646 FG/ + GT/, Composition-1k fg/ + alpha/)
  image           image, images, original, original_image, blurred_image, merged, im:
                  the object over a real background (AM-2k original/ + mask/, P3M-10k
                  blurred_image/ + mask/); the colour is estimated with pymatting's
                  estimate_foreground_ml (a foreground folder beside it wins)
Files (.png, .jpg, .jpeg) are matched by name across the two folders (original/x.jpg with
mask/x.png); the caption is NAME.txt beside the image; other folders beside them (trimap/,
bg/) are not read. An image without matte, a matte without image, a 16-bit or colour matte,
a matte of another size and unreadable files are dropped and reported with the file and
the fix.
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _write(args: argparse.Namespace) -> int:
    from data.writer import parse_buckets, write_folder

    buckets = parse_buckets(args.buckets) if args.buckets else None
    started = time.perf_counter()
    report = write_folder(
        args.src_dir, args.out_dir, size=args.size, buckets=buckets,
        samples_per_shard=args.samples_per_shard, workers=args.workers,
    )
    elapsed = time.perf_counter() - started
    print(report.summary())
    print(f"{args.out_dir}: {report.manifest.num_samples} samples in {elapsed:.1f} s "
          f"({report.manifest.num_samples / max(elapsed, 1e-9):.1f} images/s, {args.workers} worker(s))")
    return 0 if report.manifest.num_samples else 1


def _validate(args: argparse.Namespace) -> int:
    from data.spec import resolve_shards
    from data.validate import validate_shards

    urls = [url for spec in args.shards for url in resolve_shards(spec)]
    report = validate_shards(urls)
    print(report.format(listed=args.list))
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from data.demo import write_demo

    started = time.perf_counter()
    manifests = write_demo(
        args.out_dir, size=args.size, train=args.train, val=args.val, seed=args.seed,
        samples_per_shard=args.samples_per_shard, workers=args.workers,
    )
    elapsed = time.perf_counter() - started
    for split, manifest in manifests.items():
        print(f"{os.path.join(args.out_dir, split)}: {manifest.num_samples} samples in {len(manifest.shards)} shard(s)")
    print(f"built in {elapsed:.1f} s; see ATTRIBUTION.txt beside the shards (OpenMoji is CC BY-SA 4.0)")
    return 0


def _cache_latents(args: argparse.Namespace) -> int:
    import torch

    from data.latent_cache import LatentCacheEncoder, cache_latents

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {args.base_model} and the transparent VAE {args.transparent_vae} on {device}")
    encoder = LatentCacheEncoder(
        args.base_model, args.transparent_vae, text_embeddings=args.text_embeddings, dtype=args.dtype, device=device
    )
    report = cache_latents(args.shards, args.out_dir, encoder, batch_size=args.batch_size, progress=print)
    print(report.summary(listed=args.list))
    return 0 if report.samples else 1


def _pretrain_base(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from data.pretrain_base import PretrainRecipe, write_pretrained

    recipe = PretrainRecipe()
    overrides = {name: value for name, value in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps))
                 if value is not None}
    start = time.perf_counter()
    metrics = write_pretrained(args.out_file, replace(recipe, **overrides))
    print(f"wrote {args.out_file} in {time.perf_counter() - start:.0f} s; held out:")
    for name, value in metrics.items():
        print(f"  {name}: {value:.4f}")
    return 0


def _synthesize_layers(args: argparse.Namespace) -> int:
    from layerdiff.cli import quiet_console

    quiet_console()  # before diffusers is imported
    from data.synthesize import synthesize_layers
    from layerdiff.pipelines.layer_synthesis import SynthesisSettings

    settings = SynthesisSettings(size=args.size, steps=args.steps, guidance_scale=args.guidance, strength=args.strength,
                                 erosion_radius=args.erosion_radius, negative_prompt=args.negative_prompt)
    devices = args.devices if args.devices == "auto" else int(args.devices)
    report = synthesize_layers(
        args.foregrounds, args.prompts, args.out_dir, model=args.model, settings=settings, seed=args.seed,
        samples_per_shard=args.samples_per_shard, batch_size=args.batch_size, accelerator=args.accelerator,
        devices=devices, dtype=args.dtype, workers=args.workers, skip_broken_prompts=args.skip_broken_prompts,
    )
    if report is None:  # another rank than 0: rank 0 reports
        return 0
    print(report.summary())
    return 0 if report.complete and report.written else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    cores = os.cpu_count() or 1

    write = commands.add_parser(
        "write", help="convert a folder of RGBA PNGs, layered sources or a matting data set into shards",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=WRITE_DESCRIPTION,
    )
    write.add_argument("src_dir", metavar="SRC_DIR", help="folder of RGBA .png files, of layered sources or of a "
                       "matting data set (searched recursively)")
    write.add_argument("out_dir", metavar="OUT_DIR", help="folder for shard-NNNNNN.tar and index.json")
    write.add_argument("--size", type=int, default=1024, help="square target size in pixels (default 1024)")
    write.add_argument("--buckets", help="aspect buckets as WIDTHxHEIGHT list, e.g. 1024x1024,1152x896,896x1152; "
                       "each image goes to the bucket nearest its aspect ratio (overrides --size)")
    write.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    write.add_argument("--workers", type=int, default=cores, help=f"decode/pad processes (default: {cores}, the cores)")
    write.set_defaults(run=_write)

    validate = commands.add_parser(
        "validate", help="check shards against the schema and print statistics",
        description="Read every sample, check the schema, print sample count, image sizes, alpha coverage, "
        "caption lengths and every corrupt member with its shard and key. Exit status 1 on schema errors "
        "or corrupt members, 2 when the shards cannot be found.",
    )
    validate.add_argument("shards", nargs="+", metavar="SHARDS",
                          help="shard specs: directories, .tar files, brace patterns like "
                          "out/shard-{000000..000003}.tar, globs, or embedded:openmoji-demo-64/train")
    validate.add_argument("--list", type=int, default=20, help="problems listed per kind (default 20)")
    validate.set_defaults(run=_validate)

    demo = commands.add_parser(
        "demo", help="build demo shards from OpenMoji emoji and scikit-image photos",
        description="Build OUT_DIR/train and OUT_DIR/val: OpenMoji emoji (CC BY-SA 4.0) rendered with "
        "anti-aliased alpha, some with soft shadow / glow / smoke / glass effects, over random crops of "
        "scikit-image's photos, as fg / bg / blend triplets with captions. Validation emoji never occur in "
        "training. The output depends only on the arguments (not on --workers).",
    )
    demo.add_argument("out_dir", metavar="OUT_DIR", help="output folder (train/ and val/ are created inside)")
    demo.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    demo.add_argument("--train", type=int, default=2000, help="training samples (default 2000)")
    demo.add_argument("--val", type=int, default=128, help="validation samples (default 128)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--samples-per-shard", type=int, default=250, help="samples per shard (default 250)")
    demo.add_argument("--workers", type=int, default=cores, help=f"processes (default: {cores}, the cores)")
    demo.set_defaults(run=_demo)

    cache = commands.add_parser(
        "cache-latents", help="cache adjusted latents (and text embeddings) of image shards",
        description="For every image shard of SHARDS write a cached shard of the same name into OUT_DIR: per "
        "sample its caption and metadata unchanged, the adjusted latent of LayerDiffusion sec. 3.1 at the UNet's "
        "scale (latent.npy, [4, H/8, W/8]) and, with --text-embeddings, the prompt embeddings. Training reads "
        "OUT_DIR like image shards (--data.init_args.train_shards OUT_DIR) and skips the encoders. Shards are "
        "written atomically and finished shards are kept, so running the command again resumes it; "
        "OUT_DIR/latent_cache.json records the settings, and other settings for the same OUT_DIR are refused. "
        "Corrupt input members are skipped and counted.",
    )
    cache.add_argument("shards", metavar="SHARDS",
                       help="image shards spec: a directory, .tar file, brace pattern, glob, comma-separated list, "
                       "or embedded:openmoji-demo-64/train")
    cache.add_argument("out_dir", metavar="OUT_DIR", help="folder for the cached shards and latent_cache.json")
    cache.add_argument("--base-model", required=True,
                       help="the base model training will use: Hub id, local diffusers folder or embedded:tiny-sdxl")
    cache.add_argument("--transparent-vae", required=True,
                       help="trained transparency encoder: export folder (vae_transparent_encoder.safetensors) or "
                       "TransparentVAEModule checkpoint")
    cache.add_argument("--text-embeddings", action="store_true",
                       help="also store the captions' prompt embeddings (hidden states and, for SDXL, pooled); "
                       "training then needs no text encoders but cannot change the captions")
    cache.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                       help="stored precision (default float32, exact; float16 halves the size). Computation "
                       "is always float32")
    cache.add_argument("--batch-size", type=int, default=8, help="images encoded at once (default 8)")
    cache.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    cache.add_argument("--list", type=int, default=20, help="corrupt members listed at the end (default 20)")
    cache.set_defaults(run=_cache_latents)

    pretrain = commands.add_parser(
        "pretrain-base", help="pretrain the embedded tiny model (the weights of embedded:tiny-sdxl-pretrained)",
        description="Train the embedded tiny SDXL's VAE (autoencoder: reconstruction + KL) and its UNet (noise "
        "prediction, from scratch) on the demo's RGB images with captions, deterministically on one CPU thread "
        "(about 10 minutes), and write their fp16 weights with the recipe and held-out measurements in the "
        "metadata to OUT_FILE. The repository's layerdiff/models/tiny_sdxl_pretrained.safetensors is this "
        "command's output with the default recipe (data/pretrain_base.py).",
    )
    pretrain.add_argument("out_file", metavar="OUT_FILE", help="the .safetensors file to write")
    pretrain.add_argument("--vae-steps", type=int, help="VAE fitting steps (default: the recipe's)")
    pretrain.add_argument("--unet-steps", type=int, help="UNet training steps (default: the recipe's)")
    pretrain.set_defaults(run=_pretrain_base)

    synthesize = commands.add_parser(
        "synthesize-layers", help="layered shards from transparent foregrounds and prompt triples by inpainting",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=SYNTHESIZE_DESCRIPTION,
    )
    synthesize.add_argument("foregrounds", metavar="FOREGROUNDS",
                            help="RGBA shards (directory, .tar, brace pattern, glob) or a folder of RGBA PNGs")
    synthesize.add_argument("out_dir", metavar="OUT_DIR", help="folder for the layered shards (resumed if it holds a run)")
    synthesize.add_argument("--prompts", required=True, help="JSONL prompt triples (format above)")
    synthesize.add_argument("--model", required=True, help="inpainting model: Hub id, local diffusers folder or "
                            "embedded:tiny-sdxl-inpaint (random weights, for trials)")
    synthesize.add_argument("--size", type=int, default=1024, help="square sample size in pixels, a multiple of 8 "
                            "(default 1024; foregrounds are scaled to cover it and centre-cropped)")
    synthesize.add_argument("--steps", type=int, default=25, help="denoising steps per inpainting pass (default 25)")
    synthesize.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default 7.0)")
    synthesize.add_argument("--strength", type=float, default=0.99, help="inpainting strength (default 0.99)")
    synthesize.add_argument("--erosion-radius", type=int, default=16, help="pixels the inverted alpha is eroded by "
                            "for the background pass (default 16)")
    synthesize.add_argument("--negative-prompt", default="", help="negative prompt of both passes (default none)")
    synthesize.add_argument("--seed", type=int, default=0, help="item i is drawn with seed SEED + i (default 0)")
    synthesize.add_argument("--samples-per-shard", type=int, default=100, help="items per output shard (default 100)")
    synthesize.add_argument("--batch-size", type=int, default=4, help="foregrounds inpainted at once (default 4)")
    synthesize.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu (default auto)")
    synthesize.add_argument("--devices", default="auto", help="devices (processes) to share the shards: a number or "
                            "auto (default: every GPU, else one CPU process)")
    synthesize.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                            help="model precision (default: float16 on a GPU, else float32)")
    synthesize.add_argument("--workers", type=int, default=1, help="DataLoader processes reading foregrounds (default 1)")
    synthesize.add_argument("--skip-broken-prompts", action="store_true",
                            help="leave broken prompt lines out (counted) instead of stopping")
    synthesize.set_defaults(run=_synthesize_layers)
    return parser


if __name__ == "__main__":
    sys.exit(main())
