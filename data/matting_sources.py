"""Matting data sets for ``python -m data write``: images and their alpha mattes, in two folders.

A *matting set* is a folder (the source folder itself or any folder under it, e.g. one per
split: ``train/``, ``test/``) that holds an **alpha folder** beside a **colour folder**; any
matting set under the source folder puts the writer in matting mode, where every sample is
an RGBA cut-out made of a colour file and its matte. Folder names are matched ignoring case:

* alpha folder: ``alpha``, ``alphas``, ``mask``, ``matte``, ``GT``: 8-bit grey mattes, read
  with ``layerdiff.formats.matte.read_matte`` (RGB with three equal channels is accepted);
* foreground folder: ``fg``, ``foreground``: the straight foreground colour, used as it is
  (Distinctions-646 ``FG/`` + ``GT/``, Adobe Composition-1k ``fg/`` + ``alpha/``);
* image folder: ``image``, ``images``, ``original``, ``original_image``, ``blurred_image``,
  ``merged``, ``im``: the object photographed over a real background (AM-2k ``original/`` +
  ``mask/``, P3M-10k ``blurred_image/`` + ``mask/``), so the foreground colour is estimated
  from image and matte with pymatting's multi-level ``estimate_foreground_ml``; where the
  matte is fully opaque the image is the foreground and is kept exactly.

Where a set has both a foreground and an image folder, the given foreground is used. The
set's other folders (``trimap/``, ``bg/``, an unused image folder) are not read, and the
search does not go inside a set. Files are ``.png``, ``.jpg`` or ``.jpeg`` in either folder
(or in subfolders of it), matched by their path without the suffix (AM-2k's
``original/x.jpg`` with ``mask/x.png``); the caption is ``NAME.txt`` beside the colour file.
Colour files are read as RGB (an alpha channel of their own is ignored: the matte is the alpha).

Per-file problems raise ``MattingProblem`` (a ``LayerProblem``: a reason that groups it and a
message naming the file and the fix), or ``UnreadableLayerError`` for files that do not decode;
the writer drops and counts them. ``pair_files`` returns unmatched files (an image without
matte, a matte without image, two files of one name) the same way, as orphans.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.layered_sources import LayerProblem, UnreadableLayerError
from layerdiff.formats.matte import read_matte

ALPHA_FOLDERS = ("alpha", "alphas", "mask", "matte", "gt")
FOREGROUND_FOLDERS = ("fg", "foreground")
IMAGE_FOLDERS = ("image", "images", "original", "original_image", "blurred_image", "merged", "im")
MATTING_SUFFIXES = (".png", ".jpg", ".jpeg")

FOREGROUND_LAYOUT = "foreground + alpha"
IMAGE_LAYOUT = "image + alpha"

NO_MATTE = "image without matte"
NO_IMAGE = "matte without image"
SHARED_NAME = "two files of one name"
MATTE_SIZE_MISMATCH = "matte and image differ in size"
MATTE_NOT_GREY = "matte is not 8-bit grey"


class MattingProblem(LayerProblem):
    """One image and matte cannot become a sample; ``reason`` groups it, the message says why and how to fix."""


@dataclass(frozen=True)
class MattingSet:
    """A folder holding an ``alpha`` folder beside a ``colour`` folder (foreground or image, per
    ``layout``); ``unread`` are its other subfolders."""

    folder: Path
    alpha: Path
    colour: Path
    layout: str
    unread: tuple[Path, ...] = ()


@dataclass(frozen=True)
class MattingSource:
    """One sample of a matting set: a ``colour`` file (foreground or image) and its ``matte``."""

    colour: Path
    matte: Path
    matting_set: MattingSet


def find_matting_sets(src: Path) -> list[MattingSet]:
    """Every matting set under ``src`` (``src`` included), in sorted order.

    Raises ``ValueError`` for a folder with two alpha folders, or two colour folders of the
    kind it would read (``fg/`` and ``FG/``), which cannot be told apart.
    """
    found = []
    for folder, subfolders, _ in os.walk(src):
        subfolders.sort()
        matting_set = _matting_set(Path(folder), subfolders)
        if matting_set is not None:
            found.append(matting_set)
            subfolders.clear()  # the set's folders (pair, trimaps, backgrounds) are not searched for more sets
    return found


def _matting_set(folder: Path, subfolders: list[str]) -> MattingSet | None:
    def named(names: tuple[str, ...]) -> list[str]:
        return [name for name in subfolders if name.lower() in names]

    alphas, foregrounds, images = named(ALPHA_FOLDERS), named(FOREGROUND_FOLDERS), named(IMAGE_FOLDERS)
    if not alphas or not (foregrounds or images):
        return None
    colours, layout = (foregrounds, FOREGROUND_LAYOUT) if foregrounds else (images, IMAGE_LAYOUT)
    for role, names in (("alpha", alphas), ("foreground" if foregrounds else "image", colours)):
        if len(names) > 1:
            raise ValueError(
                f"{folder} holds {len(names)} {role} folders ({', '.join(names)}), so which one to read is ambiguous: "
                "keep one and move the others out of the source folder")
    unread = tuple(folder / name for name in subfolders if name not in (alphas[0], colours[0]))
    return MattingSet(folder, folder / alphas[0], folder / colours[0], layout, unread)


def pair_files(matting_set: MattingSet, root: Path) -> tuple[list[MattingSource], list[tuple[Path, str, str]]]:
    """Match the set's colour files with its mattes by name; return the pairs and the orphans.

    An orphan is ``(file, reason, message)``: a colour file without matte, a matte without
    colour file, or a name that two files of one folder share (``x.png`` and ``x.jpg``),
    reported once. Messages name files relative to ``root``.
    """
    colours, mattes = _files_by_name(matting_set.colour), _files_by_name(matting_set.alpha)
    role = "foreground" if matting_set.layout == FOREGROUND_LAYOUT else "image"
    sources, orphans = [], []
    for name in sorted(set(colours) | set(mattes)):
        colour_files, matte_files = colours.get(name, []), mattes.get(name, [])
        shared = next((files for files in (colour_files, matte_files) if len(files) > 1), None)
        if shared:
            orphans.append((shared[0], SHARED_NAME, (
                f"{', '.join(_relative(path, root) for path in shared)} share one name, so which one to read is "
                "ambiguous: keep one of them")))
        elif not matte_files:
            orphans.append((colour_files[0], NO_MATTE, (
                f"{_relative(colour_files[0], root)} has no matte {name}.png (or .jpg) in "
                f"{_relative(matting_set.alpha, root)}/: add its matte, or move the {role} out of the source folder")))
        elif not colour_files:
            orphans.append((matte_files[0], NO_IMAGE, (
                f"{_relative(matte_files[0], root)} has no {role} {name}.png (or .jpg) in "
                f"{_relative(matting_set.colour, root)}/: add it, or move the matte out of the source folder")))
        else:
            sources.append(MattingSource(colour_files[0], matte_files[0], matting_set))
    return sources, orphans


def _files_by_name(folder: Path) -> dict[str, list[Path]]:
    """The image files under ``folder`` by their path below it without the suffix (``sub/x``)."""
    by_name: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in MATTING_SUFFIXES and path.is_file():
            by_name.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    return by_name


def read_matting_source(source: MattingSource, root: Path) -> tuple[np.ndarray, dict[str, str]]:
    """The sample's float RGBA (foreground colour, the matte as alpha) at the source's size, and its provenance.

    Raises ``MattingProblem`` for a matte that is not 8-bit grey or not the image's size and
    ``UnreadableLayerError`` for a file that does not decode.
    """
    matting_set = source.matting_set
    colour_name, matte_name = _relative(source.colour, root), _relative(source.matte, root)
    colour = _read_rgb(source.colour, colour_name)
    matte = _read_matte(source.matte, matte_name)
    if matte.shape != colour.shape[:2]:
        raise MattingProblem(MATTE_SIZE_MISMATCH, (
            f"{colour_name} is {colour.shape[1]}x{colour.shape[0]} but its matte {matte_name} is "
            f"{matte.shape[1]}x{matte.shape[0]}: a matte covers its image pixel for pixel; export both at one size"))
    alpha = matte.astype(np.float32) / 255.0
    foreground = colour if matting_set.layout == FOREGROUND_LAYOUT else estimate_foreground(colour, alpha)
    provenance = {
        "layout": matting_set.layout,
        "colour_folder": _relative(matting_set.colour, root),
        "alpha_folder": _relative(matting_set.alpha, root),
        "matte": matte_name,
        "foreground": "given" if matting_set.layout == FOREGROUND_LAYOUT else "estimated (pymatting estimate_foreground_ml)",
    }
    return np.concatenate([foreground, alpha[..., None]], axis=-1).astype(np.float32), provenance


def estimate_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The foreground colour of float RGB ``image`` (the object over some background) under float ``alpha``.

    pymatting's multi-level estimate (Germer et al., "Fast Multi-Level Foreground Estimation",
    2020) solves ``image = alpha * F + (1 - alpha) * B`` for smooth ``F`` and ``B``; where alpha
    is 1 that equation gives ``F = image``, which is kept exactly.
    """
    from pymatting import estimate_foreground_ml  # imports numba (about a second): only this layout needs it

    estimate = estimate_foreground_ml(image.astype(np.float64), alpha.astype(np.float64))
    foreground = np.clip(estimate, 0.0, 1.0).astype(np.float32)
    opaque = alpha >= 1.0
    foreground[opaque] = image[opaque]
    return foreground


def _read_rgb(path: Path, name: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as error:  # noqa: BLE001 - any decode failure of one input file is reported, not fatal
        raise UnreadableLayerError(f"{name}: {type(error).__name__}: {error}") from error


def _read_matte(path: Path, name: str) -> np.ndarray:
    try:
        return read_matte(path)
    except ValueError as error:
        # read_matte chains the decoder's error when the file does not decode; unchained, it refused the format.
        if error.__cause__ is not None:
            raise UnreadableLayerError(f"{name}: {error.__cause__}") from error
        raise MattingProblem(MATTE_NOT_GREY, str(error)) from error
    except Exception as error:  # noqa: BLE001 - see _read_rgb
        raise UnreadableLayerError(f"{name}: {type(error).__name__}: {error}") from error


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
