"""Writing files so that a crash never leaves a partial file under the final name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write ``path`` through a handle on a temporary sibling, which is flushed to disk and
    renamed into place only when the block finishes; an exception (or a crash) leaves the
    previous file, if any, untouched and no partial file behind under ``path``.

    The sibling is in the same directory, so the rename never crosses file systems (the
    system temp directory often is another one, where a "move" is a copy).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_atomically(path: str | os.PathLike, payload: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(payload)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable; not every platform can open a directory."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
