"""Alpha mattes and trimaps on disk: 8-bit single-channel PNGs, one per image, matched across
folders by file name (the layout of AM-2k, P3M-10k, Distinctions-646 and the DIM test set).

A grey PNG (mode ``L``) is read as it is; an RGB or RGBA PNG whose three colour channels are
equal everywhere (and which is opaque) is read as its grey channel, because several data sets
store mattes that way. Anything else (16-bit, colour, palette with colours, transparency) is
refused with the file's name and a way to convert it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

MATTE_SUFFIXES = (".png",)


def read_matte(path: str | Path) -> np.ndarray:
    """The matte in ``path`` as ``uint8`` ``H x W``."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot be read as an image ({error})") from error
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if image.mode in ("RGB", "RGBA"):
        pixels = np.asarray(image)
        if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all() and (
            image.mode == "RGB" or (pixels[..., 3] == 255).all()
        ):
            return pixels[..., 0].copy()
        what = "a colour image" if image.mode == "RGB" else "a colour or transparent image"
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        what = "a 16-bit (or 32-bit) image"
    else:
        what = f"a {image.mode} image"
    raise ValueError(
        f"{path}: is {what}, not an 8-bit grey matte. Convert it to 8-bit grey, e.g. "
        f"`PIL.Image.open(path).convert('L')` for a colour matte or `(array / 257).round().astype('uint8')` for "
        "16-bit values, and save it as PNG"
    )


def write_matte(path: str | Path, matte: np.ndarray) -> None:
    """Write a ``uint8`` ``H x W`` matte as an 8-bit grey PNG."""
    if matte.dtype != np.uint8 or matte.ndim != 2:
        raise ValueError(f"a matte is uint8 H x W, got {matte.dtype} with shape {matte.shape}")
    Image.fromarray(matte, mode="L").save(path)


def matte_files(folder: str | Path) -> dict[str, Path]:
    """The mattes in ``folder`` by file stem (``name.png`` -> ``name``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = {path.stem: path for path in sorted(folder.iterdir()) if path.suffix.lower() in MATTE_SUFFIXES}
    if not files:
        raise ValueError(f"{folder}: holds no .png mattes")
    return files


def matched_matte_files(predictions: str | Path, targets: str | Path, trimaps: str | Path | None = None
                        ) -> list[tuple[str, Path, Path, Path | None]]:
    """``(name, prediction, target, trimap)`` for every name, the folders matched by file stem;
    a name missing from any folder is an error that lists the first few."""
    folders = {"--pred": matte_files(predictions), "--gt": matte_files(targets)}
    if trimaps is not None:
        folders["--trimap"] = matte_files(trimaps)
    names = set(folders["--gt"])
    problems = []
    for flag, files in folders.items():
        for other_flag, other in folders.items():
            missing = sorted(set(other) - set(files))
            if missing and flag != other_flag:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                problems.append(f"{flag} lacks {len(missing)} name(s) that {other_flag} has: {shown}")
    if problems:
        raise ValueError("the folders do not hold the same file names:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return [(name, folders["--pred"][name], folders["--gt"][name], folders["--trimap"][name] if trimaps else None)
            for name in sorted(names)]
