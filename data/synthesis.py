"""Inputs of ``python -m data synthesize-layers``: prompt triples, foregrounds, and the work plan.

**Prompt file** (JSONL): one JSON object per line, blank lines skipped::

    {"foreground": "a glass vase", "blend": "a glass vase on a kitchen table", "background": "nothing on a kitchen table"}
    {"key": "00000003_vase", "blend": "a vase in a garden", "background": "nothing in a garden"}

``blend`` (the whole image) and ``background`` are required; ``foreground`` is optional (missing
or empty: the foreground's own caption, i.e. its shard's ``txt`` or the ``prompt`` text chunk of
a generated PNG); ``key`` is optional; any other field is an error (a typo would otherwise be lost).

**Matching**: if any line has a ``key``, every line must have one, and each foreground gets
the line whose key equals its own (its sample key in the shards, or its PNG's path below the
folder without ``.png``); a foreground without a line is dropped and counted, lines that match
no foreground are counted. Without keys, foreground number ``i`` (input order) gets line
``i mod n``: the prompts are cycled.

**Foregrounds**: local RGBA shards (a shards spec: ``python -m data write`` output), or a
folder of RGBA PNGs such as ``train.py predict``'s output with ``RGBAPredictionWriter``.

**Plan**: item ``i`` is the ``i``-th foreground in input order, with its prompts and the seed
``seed + i``; output shard ``j`` holds items ``j * samples_per_shard`` up to the next shard's.
The plan depends only on the inputs and settings, so a resumed run redoes exactly the same items.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from data.spec import resolve_shards

PROMPT_FIELDS = ("foreground", "blend", "background")
REQUIRED_PROMPT_FIELDS = ("blend", "background")
KEY_FIELD = "key"
PNG_SUFFIX = ".png"

# Reasons an item is dropped (the summary groups by them).
NO_PROMPT_FOR_KEY = "no prompt line with this foreground's key"
BROKEN_PROMPT_LINE = "broken prompt line"


class PromptFileError(ValueError):
    """The prompt file has a line that is not a prompt triple; the message names file and line."""


@dataclass(frozen=True)
class PromptTriple:
    """One line of the prompt file (``line``: its number, from 1)."""

    blend: str
    background: str
    foreground: str = ""
    key: str | None = None
    line: int = 0


@dataclass(frozen=True)
class PromptFile:
    """The triples of a prompt file and its broken lines (``"FILE:LINE: problem"``) when skipped."""

    path: Path
    triples: list[PromptTriple]
    broken: list[str]
    sha256: str


def read_prompt_file(path: str | Path, *, skip_broken: bool = False) -> PromptFile:
    """Parse the JSONL prompt file (format in the module docstring).

    A broken line raises ``PromptFileError`` naming the file and line, unless ``skip_broken``,
    which leaves it out and lists it in ``broken``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist: give a JSONL file, one object per line like "
                                '{"foreground": "a cat", "blend": "a cat on a sofa", "background": "nothing on a sofa"}')
    data = path.read_bytes()
    triples, broken = [], []
    first_line_of_key: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            triple = _parse_line(raw, number)
            if triple.key is not None and triple.key in first_line_of_key:
                raise ValueError(f"key {triple.key!r} again (first on line {first_line_of_key[triple.key]}); "
                                 "each foreground gets one line")
        except ValueError as problem:
            where = f"{path}, line {number}: {problem}"
            if not skip_broken:
                raise PromptFileError(f"prompt file {where}. Fix the line, or pass --skip-broken-prompts to leave "
                                      "broken lines out (they are counted)") from None
            broken.append(where)
            continue
        if triple.key is not None:
            first_line_of_key[triple.key] = number
        triples.append(triple)
    keyed = [triple for triple in triples if triple.key is not None]
    if keyed and len(keyed) != len(triples):
        unkeyed = next(triple for triple in triples if triple.key is None)
        raise PromptFileError(
            f"prompt file {path}: line {keyed[0].line} has a \"key\" but line {unkeyed.line} has none; either every "
            "line names its foreground's key (matching by key) or none does (prompts are cycled over the foregrounds)"
        )
    if not triples:
        raise PromptFileError(f"prompt file {path} has no prompt lines" + (f" that parse ({len(broken)} broken)" if broken
                                                                          else ""))
    return PromptFile(path, triples, broken, hashlib.sha256(data).hexdigest())


def _parse_line(raw: bytes, number: int) -> PromptTriple:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"a JSON {type(entry).__name__}, expected an object with fields {', '.join(PROMPT_FIELDS)}")
    unknown = sorted(set(entry) - {*PROMPT_FIELDS, KEY_FIELD})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are "
                         f"{', '.join(PROMPT_FIELDS)} and optionally {KEY_FIELD}")
    missing = [name for name in REQUIRED_PROMPT_FIELDS if name not in entry]
    if missing:
        raise ValueError(f"missing {' and '.join(map(repr, missing))} (required: {', '.join(REQUIRED_PROMPT_FIELDS)})")
    for name in (*PROMPT_FIELDS, KEY_FIELD):
        if name in entry and not isinstance(entry[name], str):
            raise ValueError(f"field {name!r} is a JSON {type(entry[name]).__name__}, expected a string")
    if entry.get(KEY_FIELD) == "":
        raise ValueError("empty \"key\"")
    return PromptTriple(entry["blend"], entry["background"], entry.get("foreground", ""), entry.get(KEY_FIELD), number)


@dataclass(frozen=True)
class ForegroundRef:
    """Where one foreground is: a sample of a local shard (its members' data offsets and sizes,
    so it is read without scanning the shard) or a PNG file (``members`` empty)."""

    source: str
    key: str
    members: tuple[tuple[str, int, int], ...] = ()


def list_foregrounds(spec: str) -> list[ForegroundRef]:
    """Every foreground of ``spec`` in input order: a folder of PNGs (no ``*.tar`` in it; searched
    recursively, sorted) or a shards spec of local shards (read headers only)."""
    folder = Path(spec).expanduser().resolve()  # absolute: the plan must not depend on the working directory
    if folder.is_dir() and not any(folder.glob("*.tar")):
        paths = sorted(path for path in folder.rglob(f"*{PNG_SUFFIX}") if path.is_file())
        if not paths:
            raise FileNotFoundError(f"foreground folder {folder} holds no .tar shards and no .png files: give RGBA "
                                    "shards (python -m data write) or a folder of RGBA PNGs (train.py predict output)")
        return [ForegroundRef(str(path), path.relative_to(folder).with_suffix("").as_posix()) for path in paths]
    references = []
    for url in resolve_shards(spec):
        if not Path(url).is_file():
            raise ValueError(f"foreground shard {url!r} is not a local file: synthesis reads foregrounds by their "
                             "offsets in the shard; copy the shards to a local folder first")
        references += _shard_samples(str(Path(url).resolve()))
    return references


def _shard_samples(url: str) -> list[ForegroundRef]:
    samples: dict[str, list[tuple[str, int, int]]] = {}
    try:
        with tarfile.open(url, mode="r:") as archive:
            for info in archive:  # headers only: regular tar files are seeked past
                key, name = base_plus_ext(info.name)
                if info.isfile() and key is not None and not key.startswith("__"):
                    samples.setdefault(key, []).append((name.lower(), info.offset_data, info.size))
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"foreground shard {url} cannot be read as a tar file ({error}); check it with "
                         f"`python -m data validate {url}`") from error
    return [ForegroundRef(url, key, tuple(members)) for key, members in samples.items()]


def read_members(reference: ForegroundRef) -> dict[str, bytes]:
    """The member bytes of a shard sample, by field name."""
    with open(reference.source, "rb") as handle:
        members = {}
        for name, offset, size in reference.members:
            handle.seek(offset)
            members[name] = handle.read(size)
    return members


@dataclass(frozen=True)
class WorkItem:
    """One foreground to synthesise layers for (``dropped``: why not, decided when planning)."""

    index: int
    foreground: ForegroundRef
    prompts: PromptTriple | None
    seed: int
    dropped: str | None = None


@dataclass(frozen=True)
class Plan:
    """Every item and the output shards: shard ``j`` holds ``shards[j]`` (item indices)."""

    items: list[WorkItem]
    samples_per_shard: int
    unmatched_lines: list[int]  # prompt lines whose key matches no foreground

    @property
    def shards(self) -> list[range]:
        count = len(self.items)
        return [range(start, min(start + self.samples_per_shard, count)) for start in range(0, count, self.samples_per_shard)]

    def sha256(self) -> str:
        """A digest of what the plan makes: resuming with another plan would mix two runs."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(json.dumps(asdict(item), sort_keys=True).encode("utf-8"))
        digest.update(str(self.samples_per_shard).encode("utf-8"))
        return digest.hexdigest()


def plan_items(foregrounds: list[ForegroundRef], prompts: PromptFile, *, seed: int, samples_per_shard: int) -> Plan:
    """Match prompts to foregrounds (by key, or cycled) and number the items."""
    if samples_per_shard < 1:
        raise ValueError(f"samples per shard must be >= 1, got {samples_per_shard}")
    if not foregrounds:
        raise ValueError("no foregrounds to synthesise layers for")
    by_key = {triple.key: triple for triple in prompts.triples if triple.key is not None}
    items = []
    for index, reference in enumerate(foregrounds):
        if by_key:
            triple = by_key.get(reference.key)
            items.append(WorkItem(index, reference, triple, seed + index, None if triple else NO_PROMPT_FOR_KEY))
        else:
            items.append(WorkItem(index, reference, prompts.triples[index % len(prompts.triples)], seed + index))
    used = {reference.key for reference in foregrounds}
    unmatched = [triple.line for triple in by_key.values() if triple.key not in used]
    return Plan(items, samples_per_shard, unmatched)
