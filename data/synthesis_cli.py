"""``python -m data synthesize-layers``: its options and help (the run itself is :mod:`data.synthesize`)."""

from __future__ import annotations

import argparse

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


def add_synthesis_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``synthesize-layers`` on the ``python -m data`` parser."""
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


