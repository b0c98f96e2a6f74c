"""Files that are either the old version or the new one, never half of each."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], None], *, sync_dir: bool = False) -> None:
    """Write `path` through `write(file)`: into a temporary file beside it, fsync, rename.

    A crash at any point leaves the previous file intact (and no temporary file when the
    write itself fails). With `sync_dir`, the directory is synced after the rename, so the
    rename survives a power cut too (needed when another file is renamed after this one
    and that order matters).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        # Not every platform can open a directory; there the rename's durability is the OS's.
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
