"""Human-in-the-loop rounds (LayerDiffusion sec. 3.4, "Base Dataset"): the current model generates
images from random prompts, a person picks the good ones (``data.review``), and the picks go back
into training with a higher sampling weight (the paper: about 1k of 10k, twice as likely).

A round folder holds:

``round.json``    the manifest (``RoundManifest``): the round's name, the model (checkpoint, recipe
                  files, every ``train.py predict`` argument), the generation settings, and per
                  sample its id, image file, prompt and seed, in generation order;
``prompts.txt``   the drawn prompts, one per sample, as ``train.py predict`` read them;
``generated/``    what ``train.py predict`` wrote: ``<index>_seed<seed>_<prompt>.png`` (RGBA, prompt,
                  seed and settings in its PNG text chunks) and ``previews/``;
``review.jsonl``  the reviewers' decisions (``data.review_journal``).

The commands (``python -m data round --help``) are in ``data.round_cli``; docs/data-engine.md
walks through a whole round.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerdiff.files import write_atomically

MANIFEST_NAME = "round.json"
PROMPTS_NAME = "prompts.txt"
GENERATED_FOLDER = "generated"
MANIFEST_FORMAT = "layerdiff-round/1"
SAMPLE_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # also a valid shard key and a URL path segment
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREDICT_HINT = ("the -c files must make a prediction recipe: the model's training recipe and its overlays, then "
                "configs/predict.yaml (and configs/demo/predict.yaml for the demo), as for `python train.py predict`")


class RoundError(ValueError):
    """A round cannot be made or used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class RoundSample:
    """One generated image: ``file`` is relative to the round folder."""

    id: str
    index: int
    file: str
    prompt: str
    seed: int


@dataclass
class RoundManifest:
    """What ``round.json`` records (``extra``: further fields, kept as they are)."""

    name: str
    samples: list[RoundSample]
    model: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, round_dir: str | os.PathLike) -> Path:
        """Write ``round.json`` into ``round_dir`` atomically."""
        path = Path(round_dir) / MANIFEST_NAME
        payload = {"format": MANIFEST_FORMAT, "name": self.name, "model": self.model, "settings": self.settings,
                   **self.extra, "samples": [asdict(sample) for sample in self.samples]}
        write_atomically(path, (json.dumps(payload, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
        return path


def load_round(round_dir: str | os.PathLike) -> RoundManifest:
    """Read and check ``round_dir/round.json``: sample ids unique and safe, every image inside the folder and present."""
    folder = Path(round_dir)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST_NAME}, so it is not a round folder"
        raise FileNotFoundError(f"{folder} {what}: make a round with `python -m data round generate {folder} ...` "
                                "(docs/data-engine.md)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RoundError(f"{path} is not valid JSON ({error}); it is written by `python -m data round generate`, "
                         "restore it from a backup or generate the round again") from None
    if not isinstance(payload, dict) or payload.get("format") != MANIFEST_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise RoundError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r} (a round.json of "
                         "`python -m data round generate`)")
    root = folder.resolve()
    samples, seen = [], set()
    for number, entry in enumerate(payload.get("samples") or [], start=1):
        try:
            sample = RoundSample(id=str(entry["id"]), index=int(entry["index"]), file=str(entry["file"]),
                                 prompt=str(entry["prompt"]), seed=int(entry["seed"]))
        except (KeyError, TypeError, ValueError) as error:
            raise RoundError(f"{path}: sample {number} lacks or mistypes {error} (needs id, index, file, prompt, "
                             "seed)") from None
        image = (folder / sample.file).resolve()
        if not SAMPLE_ID.match(sample.id) or sample.id in seen:
            raise RoundError(f"{path}: sample {number} has id {sample.id!r}, which is repeated or not of "
                             f"{SAMPLE_ID.pattern}")
        if Path(sample.file).is_absolute() or root not in image.parents:
            raise RoundError(f"{path}: sample {sample.id}'s file {sample.file!r} is outside the round folder; "
                             "a round's images live in it (paths relative to it)")
        if not image.is_file():
            raise FileNotFoundError(f"{path}: sample {sample.id}'s image {folder / sample.file} is missing; put it "
                                    "back, or generate the round again")
        seen.add(sample.id)
        samples.append(sample)
    if not samples:
        raise RoundError(f"{path} lists no samples; generate the round again")
    known = ("format", "name", "model", "settings", "samples")
    return RoundManifest(str(payload.get("name") or folder.name), samples, dict(payload.get("model") or {}),
                         dict(payload.get("settings") or {}), {k: v for k, v in payload.items() if k not in known})


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a prompt file: one per line, UTF-8, blank lines skipped, surrounding space dropped.

    A line that is not UTF-8 or holds a control character (a binary file, a pasted terminal
    escape) is refused with the file and line number, since a silently mangled prompt would
    be generated 10k times."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (working directory {Path.cwd()}); give a text "
                                "file with one prompt per line")
    prompts = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as error:
            raise RoundError(f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                             f"{error.start + 1}); save the prompt file as UTF-8") from None
        line = line.removeprefix("\ufeff") if number == 1 else line  # a byte-order mark some editors write
        for column, character in enumerate(line, start=1):
            if character != "\t" and unicodedata.category(character) in ("Cc", "Zl", "Zp"):
                raise RoundError(f"{path}:{number}: control character U+{ord(character):04X} at column {column}; a "
                                 "prompt is one line of plain text: remove it")
        if line.strip():
            prompts.append(line.strip())
    if not prompts:
        raise RoundError(f"prompt file {path} holds no prompts (only blank lines); write one prompt per line")
    return prompts


def draw_prompts(prompts: list[str], count: int, seed: int) -> list[str]:
    """``count`` prompts drawn with replacement, the same for the same seed (each image also gets its own seed)."""
    return random.Random(seed).choices(prompts, k=count)


def generate_round(
    round_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike,
    prompt_file: str | os.PathLike,
    count: int,
    configs: list[str],
    seed: int = 0,
    train_arguments: Sequence[str] = (),
) -> RoundManifest:
    """Generate ``count`` images with ``train.py predict`` (a subprocess: the composition root sits above
    ``data``) from prompts drawn from ``prompt_file``; sample ``i`` has seed ``seed + i``. Writes the round
    folder (module docstring) and returns its manifest. ``train_arguments`` go to ``train.py`` after ours."""
    folder = Path(round_dir).expanduser().resolve()
    if (folder / MANIFEST_NAME).exists():
        raise RoundError(f"{folder} already holds a round ({MANIFEST_NAME}); a new round goes into a new folder, "
                         "so its reviewed decisions are never overwritten")
    checkpoint = Path(checkpoint).expanduser().resolve()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; give the model's last.ckpt")
    if count < 1:
        raise RoundError(f"--count must be at least 1, got {count}")
    if not configs:
        raise RoundError(f"no recipe given: {PREDICT_HINT}")
    missing = [config for config in configs if not Path(config).is_file()]
    if missing:
        raise FileNotFoundError(f"recipe file {missing[0]} does not exist (working directory {Path.cwd()})")
    prompt_path = Path(prompt_file).expanduser().resolve()
    prompts = draw_prompts(read_prompts(prompt_path), count, seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / PROMPTS_NAME, ("\n".join(prompts) + "\n").encode("utf-8"))
    arguments = ["predict", *(argument for config in configs for argument in ("-c", str(Path(config).resolve()))),
                 "--ckpt_path", str(checkpoint),
                 "--trainer.default_root_dir", str(folder),
                 "--data.init_args.prompts", "null",
                 "--data.init_args.prompt_file", str(folder / PROMPTS_NAME),
                 "--data.init_args.seeds", "null",
                 "--data.init_args.seed", str(seed),
                 "--data.init_args.images_per_prompt", "1",
                 *train_arguments]  # fmt: skip
    started = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "train", *arguments], env=_train_environment()).returncode
    if status != 0:
        raise RoundError(f"train.py predict failed with exit status {status} (its messages are above); {PREDICT_HINT}. "
                         f"The command was: python -m train {shlex.join(arguments)}")
    from layerdiff.cli import quiet_console

    quiet_console()  # before the import below brings in diffusers and transformers, which talk on import
    from callbacks.rgba_writer import file_stem  # the prediction writer's file names

    samples, settings = [], {}
    for index, prompt in enumerate(prompts):
        stem = file_stem(index, seed + index, prompt)
        image = folder / GENERATED_FOLDER / f"{stem}.png"
        text = _png_text(image)
        if text.get("prompt") != prompt or text.get("seed") != str(seed + index):
            raise RoundError(f"{image} shows prompt {text.get('prompt')!r} with seed {text.get('seed')}, not the drawn "
                             f"{prompt!r} with seed {seed + index}; arguments after -- must leave prompts and seeds alone")
        settings = settings or {key: _json_or_text(value) for key, value in text.items() if key not in ("prompt", "seed")}
        samples.append(RoundSample(stem, index, f"{GENERATED_FOLDER}/{stem}.png", prompt, seed + index))
    manifest = RoundManifest(
        name=folder.name, samples=samples, settings=settings,
        model={"checkpoint": str(checkpoint), "checkpoint_bytes": checkpoint.stat().st_size,
               "configs": [str(Path(config).resolve()) for config in configs], "train_arguments": arguments},
        extra={"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": seed, "count": count,
               "generation_seconds": round(time.perf_counter() - started, 1),
               "prompt_file": {"path": str(prompt_path), "sha256": hashlib.sha256(prompt_path.read_bytes()).hexdigest()}},
    )  # fmt: skip
    manifest.save(folder)
    return manifest


def _train_environment() -> dict[str, str]:
    # `python -m train` must import this checkout's train.py (and its data/, callbacks/), not another install's
    environment = dict(os.environ)
    if (PROJECT_ROOT / "train.py").is_file():
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), environment.get("PYTHONPATH")]))
    return environment


def _png_text(image: Path) -> dict[str, str]:
    from PIL import Image

    if not image.is_file():
        raise RoundError(f"train.py predict finished but did not write {image}: {PREDICT_HINT} (its "
                         "callbacks.RGBAPredictionWriter writes to ${trainer.default_root_dir}/generated)")
    with Image.open(image) as opened:
        return dict(opened.text)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
