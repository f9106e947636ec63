"""``python -m data round {generate,review,add}``: the human-in-the-loop round of LayerDiffusion sec. 3.4
(docs/data-engine.md). Registered in ``data.__main__``; the work is in ``data.rounds``, ``data.review``
and ``data.round_shards``."""

from __future__ import annotations

import argparse
import os

ROUND_DESCRIPTION = """\
A human-in-the-loop round (LayerDiffusion sec. 3.4): generate images with the current model, pick the
good ones in a web page, add the picks to the training data with a higher sampling weight, retrain.

  generate  ROUND_DIR: N images from prompts drawn from a prompt file, through train.py predict,
            and round.json (model, settings, every sample's prompt and seed)
  review    serve the review page of ROUND_DIR (pick / reject / undo; saved as decided)
  add       write the picked samples of ROUND_DIR into shards, with their sampling weight

A whole round, step by step: docs/data-engine.md.
"""

GENERATE_DESCRIPTION = """\
Generate COUNT images into ROUND_DIR (a new folder) with `python train.py predict`: prompts are drawn
at random (with replacement, reproducibly with --seed) from PROMPT_FILE, one per line; image i gets
seed SEED + i. The -c files are the recipe train.py predict runs with: the model's training recipe
and overlays, then the predict overlay, e.g. for the demo:

  python -m data round generate rounds/round-1 \\
      --checkpoint outputs/demo/latent_diffusion/checkpoints/last.ckpt \\
      --prompt-file prompts.txt --count 10000 \\
      -c configs/latent_diffusion.yaml -c configs/demo/latent_diffusion.yaml \\
      -c configs/predict.yaml -c configs/demo/predict.yaml \\
      -- --data.init_args.settings.steps 20 --trainer.devices 4

Arguments after -- go to train.py as they are (settings, devices; not prompts or seeds). Writes
ROUND_DIR/generated/ (the PNGs, prompt, seed and settings in their text chunks; previews/),
ROUND_DIR/prompts.txt (the drawn prompts) and, last, ROUND_DIR/round.json.
"""

REVIEW_DESCRIPTION = """\
Serve the review page of ROUND_DIR and print its URL, which holds a random access token (every
request without it is refused). The page shows each sample on a checkerboard, on black, on white
and its alpha, with its prompt; p picks, x rejects, u undoes, arrows move (or the buttons).
Every decision is appended to ROUND_DIR/review.jsonl and fsynced as it is made, so a closed page,
a stopped or killed server, or a reviewer coming back later resumes at the first undecided sample.
Several reviewers can open the same URL at once. Stop the server with Ctrl-C.
"""

ADD_DESCRIPTION = """\
Write the picked samples of the reviewed ROUND_DIR into shards in OUT_DIR, as `python -m data write`
writes any cut-out (resized to --size or kept at their own size, images without a transparent or
visible pixel dropped, colour padded under zero alpha, shards written atomically). The caption is
the prompt; each sample's metadata (json) carries sampling_weight (--weight) and round (name,
sample id, status "picked", prompt, seed, checkpoint); index.json records the round and weight.
Train on them beside the base data: --data.init_args.train_shards BASE,OUT_DIR. Exit status 1
when nothing was written; a round nobody reviewed, or with no pick, is an error.
"""


def add_round_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``round`` and its subcommands on ``python -m data``'s command parsers."""
    round_parser = commands.add_parser("round", help="human-in-the-loop rounds: generate, review, add picks",
                                       description=ROUND_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = round_parser.add_subparsers(title="steps", required=True, metavar="STEP")
    raw = argparse.RawDescriptionHelpFormatter

    generate = steps.add_parser("generate", help="generate a round's images with the current model",
                                description=GENERATE_DESCRIPTION, formatter_class=raw)
    generate.add_argument("round_dir", metavar="ROUND_DIR", help="the new round's folder")
    generate.add_argument("--checkpoint", required=True, metavar="CKPT", help="the model: a training checkpoint")
    generate.add_argument("--prompt-file", required=True, metavar="PROMPTS", help="UTF-8 text, one prompt per line")
    generate.add_argument("--count", type=int, required=True, metavar="N", help="images to generate")
    generate.add_argument("--seed", type=int, default=0, help="draws the prompts; image i gets seed SEED + i (default 0)")
    generate.add_argument("-c", "--config", action="append", default=[], metavar="CONFIG", required=True,
                          help="a recipe file for train.py predict (repeat: stacked left to right)")
    generate.set_defaults(run=_generate, takes_train_arguments=True)

    review = steps.add_parser("review", help="serve the review page (pick / reject / undo)",
                              description=REVIEW_DESCRIPTION, formatter_class=raw)
    review.add_argument("round_dir", metavar="ROUND_DIR", help="a folder made by `round generate`")
    review.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; use an SSH tunnel from others)")
    review.add_argument("--port", type=int, default=0, help="port (default 0: any free port; the URL says which)")
    review.set_defaults(run=_review)

    add = steps.add_parser("add", help="write a reviewed round's picks into shards with a sampling weight",
                           description=ADD_DESCRIPTION, formatter_class=raw)
    add.add_argument("round_dir", metavar="ROUND_DIR", help="a reviewed round folder")
    add.add_argument("out_dir", metavar="OUT_DIR", help="folder for shard-NNNNNN.tar and index.json (new, or this round's)")
    add.add_argument("--weight", type=float, default=2.0,
                     help="sampling weight of every picked sample (default 2.0, the paper's for a new round; others weigh 1)")
    add.add_argument("--size", type=int, help="square size in pixels (default: each image's own size)")
    add.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    cores = os.cpu_count() or 1
    add.add_argument("--workers", type=int, default=cores, help=f"decode/pad processes (default: {cores}, the cores)")
    add.set_defaults(run=_add)


def _generate(args: argparse.Namespace) -> int:
    from data.rounds import generate_round

    manifest = generate_round(args.round_dir, checkpoint=args.checkpoint, prompt_file=args.prompt_file, count=args.count,
                              configs=args.config, seed=args.seed, train_arguments=args.train_arguments)
    print(f"{args.round_dir}: {len(manifest.samples)} images and round.json; review them with "
          f"`python -m data round review {args.round_dir}`")
    return 0


def _review(args: argparse.Namespace) -> int:
    from data.review import serve

    serve(args.round_dir, host=args.host, port=args.port, announce=lambda line: print(line, flush=True))
    return 0


def _add(args: argparse.Namespace) -> int:
    from data.round_shards import add_round

    report = add_round(args.round_dir, args.out_dir, weight=args.weight, size=args.size,
                       samples_per_shard=args.samples_per_shard, workers=args.workers)
    print(report.summary())
    return 0 if report.written else 1
