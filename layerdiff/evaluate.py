"""``python -m layerdiff.evaluate``: evaluation commands over files on disk.

    python -m layerdiff.evaluate matting --pred DIR --gt DIR [--trimap DIR] [--json OUT]

``matting`` scores predicted alpha mattes against ground truth with the Deep Image Matting
errors (:mod:`layerdiff.metrics.matting`: SAD and Grad and Conn reported / 1000, MSE as a
mean), over each trimap's unknown band (value 128) or the whole image without ``--trimap``.
Files are 8-bit grey PNGs matched by name across the folders (:mod:`layerdiff.formats.matte`).
It prints a table and, with ``--json``, writes
``{"files": {name: {"sad", "mse", "grad", "conn"}}, "mean": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from layerdiff.files import write_atomically
from layerdiff.formats.matte import matched_matte_files, read_matte
from layerdiff.metrics.matting import METRICS, matting_errors


def evaluate_matting(predictions: Path, targets: Path, trimaps: Path | None = None) -> dict:
    """The errors of every matched file and their means over files."""
    files = {}
    for name, predicted, truth, band in matched_matte_files(predictions, targets, trimaps):
        prediction, target = read_matte(predicted), read_matte(truth)
        trimap = read_matte(band) if band is not None else None
        try:
            files[name] = matting_errors(prediction, target, trimap)
        except ValueError as error:
            sources = f"{predicted}, {truth}" + (f", {band}" if band is not None else "")
            raise ValueError(f"{name} ({sources}): {error}") from error
    mean = {metric: sum(errors[metric] for errors in files.values()) / len(files) for metric in METRICS}
    return {"files": files, "mean": mean}


def format_table(results: dict) -> str:
    width = max(len("mean"), *(len(name) for name in results["files"]))
    header = f"{'file':<{width}}  {'SAD':>10}  {'MSE':>10}  {'Grad':>10}  {'Conn':>10}"
    rows = [header, "-" * len(header)]
    for name, errors in [*results["files"].items(), ("mean", results["mean"])]:
        if name == "mean":
            rows.append("-" * len(header))
        rows.append(f"{name:<{width}}  " + "  ".join(f"{errors[metric]:>10.5f}" for metric in METRICS))
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerdiff.evaluate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    matting = commands.add_parser(
        "matting", help="DIM matting errors (SAD, MSE, Grad, Conn) of predicted alpha mattes",
        description="Score predicted alpha mattes against ground truth with the Deep Image Matting errors: SAD, Grad "
                    "and Conn / 1000, MSE as a mean over the region (the trimap's 128 band, or the whole image).")
    matting.add_argument("--pred", type=Path, required=True, help="folder of predicted mattes (8-bit grey PNG)")
    matting.add_argument("--gt", type=Path, required=True, help="folder of ground-truth mattes, same file names")
    matting.add_argument("--trimap", type=Path, help="folder of trimaps (128 = unknown), same names; default: whole image")
    matting.add_argument("--json", type=Path, help="also write the per-file and mean errors to this JSON file")
    args = parser.parse_args(argv)
    try:
        results = evaluate_matting(args.pred, args.gt, args.trimap)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json is not None:
        write_atomically(args.json, (json.dumps(results, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
