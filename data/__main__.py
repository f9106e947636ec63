"""Command-line tools for layerdiff shards: ``python -m data <command> --help`` (commands below)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from data.round_cli import add_round_commands
from data.synthesis_cli import add_synthesis_commands

DESCRIPTION = """\
Tools for layerdiff's webdataset shards (schema: data/schema.py).

  write     convert a folder of RGBA PNGs (+ same-stem .txt captions), of layered
            sources (NAME.fg.png + NAME.bg.png, layered .psd files) or a matting data
            set (image or foreground folder + alpha folder), into shards
  validate  read every sample of some shards, check the schema, print statistics
  filter    drop samples (alpha, aesthetic, CLIP score, near-duplicates), caption them
            with a local model, record every score in the samples' metadata
  demo      build demo shards from OpenMoji emoji over scikit-image photos (offline)
  cache-latents
            turn image shards into cached shards (adjusted latents, optionally text
            embeddings) that latent diffusion training reads without running the encoders
  pretrain-base
            pretrain the embedded tiny model's VAE and UNet on the demo's RGB images
            (the weights of embedded:tiny-sdxl-pretrained)
  round     a human-in-the-loop round (LayerDiffusion sec. 3.4): generate images with the
            current model, review them in a web page, add the picks to the training data
  synthesize-layers
            make layered shards (fg, bg, blend) from transparent foregrounds and prompt
            triples by inpainting (LayerDiffusion sec. 3.4); resumable, on every device
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

FILTER_DESCRIPTION = """\
Read the image shards SRC and write the samples that pass the chosen filters to OUT, with
every score recorded in the sample's JSON (scores: {name: value}). Steps run in this order,
whatever the order of --filter (details in data/filters.py):

  alpha      LayerDiffusion sec. 3.4: no transparent pixel or no visible pixel is dropped
             (the writer's own check); records the visible fraction as scores.alpha
  aesthetic  the LAION aesthetic predictor (--aesthetic-head) on the CLIP image embedding
             (--clip-model); drops scores under --threshold aesthetic=MIN
  caption    with --caption-model: a local image-text-to-text model writes txt (the
             foreground caption; --keep-captions keeps non-empty ones) and captioned_by;
             asked to describe the object in one short sentence (--caption-prompt)
  clip       CLIP score: cosine similarity of the image and caption embeddings; drops
             scores under --threshold clip=MIN (and, then, empty captions)
  dedup      near-duplicates: 64-bit dHash of the foreground over grey, cropped to its
             visible pixels; a sample within --threshold dedup=BITS (default 4) of a kept
             one is dropped, naming it; records scores.dhash

Models load from local paths only; nothing is downloaded. Corrupt members are dropped and
reported; a sample with a bad sampling_weight stops the run with its shard and key. Shards
are written atomically, then OUT/filter_report.json: counts per step and examples with
shard, key and why. Exit status 1 when nothing is left, 2 on bad arguments.
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # after "--": arguments for train.py, passed on as they are (`round generate`)
    train_arguments = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if "--" in argv and not getattr(args, "takes_train_arguments", False):
        parser.error("only `round generate` takes arguments after --")
    args.train_arguments = train_arguments
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


def _filter(args: argparse.Namespace) -> int:
    from data.captions import DEFAULT_PROMPT, Captioner
    from data.filters import build_steps, filter_shards, parse_thresholds
    from data.spec import resolve_shards

    names = [name.strip() for item in args.filter for name in item.split(",") if name.strip()]
    thresholds = parse_thresholds(args.threshold, names)
    shards = resolve_shards(args.shards)
    captioner = None
    if args.caption_model:
        captioner = Captioner(args.caption_model, prompt=args.caption_prompt or DEFAULT_PROMPT,
                              max_new_tokens=args.max_new_tokens, device=args.device, batch_size=args.batch_size)
    steps = build_steps(names, thresholds, clip_model=args.clip_model, aesthetic_head=args.aesthetic_head,
                        captioner=captioner, keep_captions=args.keep_captions, device=args.device)
    started = time.perf_counter()
    report = filter_shards(shards, args.out_dir, steps, batch_size=args.batch_size,
                           samples_per_shard=args.samples_per_shard, examples=args.examples)
    print(report.summary())
    print(f"{args.out_dir}: {report.written} samples in {time.perf_counter() - started:.1f} s; "
          f"every drop with shard and key (up to {args.examples} per step) in {args.out_dir}/filter_report.json")
    return 0 if report.written else 1


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

    filtering = commands.add_parser(
        "filter", help="drop samples by alpha, aesthetic score, CLIP score and near-duplicates; caption them",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=FILTER_DESCRIPTION,
    )
    filtering.add_argument("shards", metavar="SRC", help="image shards spec: a directory, .tar file, brace pattern, "
                           "glob, comma-separated list, or embedded:openmoji-demo-64/train")
    filtering.add_argument("out_dir", metavar="OUT", help="folder for the filtered shards, index.json and "
                           "filter_report.json (not the folder of SRC)")
    filtering.add_argument("--filter", action="append", default=[], metavar="NAME",
                           help="alpha, aesthetic, clip or dedup; repeat it or separate with commas")
    filtering.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                           help="aesthetic=MIN_SCORE, clip=MIN_COSINE, dedup=MAX_DIFFERING_BITS (default 4 of 64); "
                           "aesthetic and clip without one only record their scores")
    filtering.add_argument("--clip-model", metavar="DIR", help="local transformers CLIP folder (aesthetic, clip)")
    filtering.add_argument("--aesthetic-head", metavar="FILE", help="the aesthetic predictor's weights, .pth or "
                           ".safetensors (e.g. LAION's sac+logos+ava1-l14-linearMSE.pth over ViT-L/14)")
    filtering.add_argument("--caption-model", metavar="DIR", help="local image-text-to-text model folder (LLaVA-class): "
                           "writes each sample's caption (txt)")
    filtering.add_argument("--caption-prompt", help="what the captioner is asked (default: data.captions.DEFAULT_PROMPT)")
    filtering.add_argument("--keep-captions", action="store_true", help="caption only samples whose caption is empty")
    filtering.add_argument("--max-new-tokens", type=int, default=60, help="longest caption in tokens (default 60)")
    filtering.add_argument("--batch-size", type=int, default=16, help="samples scored at once (default 16)")
    filtering.add_argument("--samples-per-shard", type=int, default=1000, help="samples per output shard (default 1000)")
    filtering.add_argument("--examples", type=int, default=20, help="dropped samples listed per step (default 20)")
    filtering.add_argument("--device", default="cpu", help="torch device of the models (default cpu)")
    filtering.set_defaults(run=_filter)

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

    add_round_commands(commands)
    add_synthesis_commands(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
