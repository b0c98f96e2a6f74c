"""Files that are either the old version or the new one, never half of each; and background
work (a snapshot's writing) spread in time so that a busy process barely feels it."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

WRITE_CHUNK = 1 << 20  # bytes per write of a paced file: ~0.1–0.3 ms of the kernel's copying


class Pacer:
    """Keeps a background thread's work to a `share` of the wall clock, in short slices.

    Call `pace()` after each slice of work (a chunk of a file, a few thousand records): it
    sleeps for as long as the slice took, times (1 / share − 1). Sleeping gives the GIL away,
    so an event loop and a pipeline thread in the same process wait at most one slice for it,
    instead of the interpreter's switch interval each time, for as long as the work lasts.
    The work takes 1 / share as long. share = 1: no pause at all (a final snapshot at
    shutdown, when nothing else is waiting).

    PostgreSQL spreads a checkpoint's writes over its interval for the same reason
    (`checkpoint_completion_target`).
    """

    def __init__(self, share: float = 1.0, *, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"a pacer's share of the time is in (0, 1], got {share}")
        self._factor = 1.0 / share - 1.0
        self._clock, self._sleep = clock, sleep
        self._since = clock()
        self.slept_s = 0.0

    def pause_s(self) -> float:
        """The pause owed for the slice since the last call (0 at share 1); the next slice is
        counted from the end of that pause. For a caller that sleeps its own way (an event loop)."""
        now = self._clock()
        pause = (now - self._since) * self._factor
        self._since = now + pause
        self.slept_s += pause
        return pause

    def pace(self) -> None:
        """The slice since the last call is done: sleep in proportion to it."""
        pause = self.pause_s()
        if pause > 0:
            self._sleep(pause)


class PacedFile:
    """A binary file whose writes go in WRITE_CHUNK slices, each followed by `pacer.pace()`.

    Everything else (tell, seek, flush, fileno…) is the wrapped file's, so writers that seek
    back to patch a header (zipfile, under np.savez) work as they do on the file itself.
    """

    def __init__(self, f: BinaryIO, pacer: Pacer) -> None:
        self._f, self._pacer = f, pacer

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK):
            self._f.write(view[start:start + WRITE_CHUNK])
            self._pacer.pace()
        return len(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_atomically(path: Path, write: Callable[[BinaryIO], None], *, sync_dir: bool = False,
                     pacer: Pacer | None = None) -> None:
    """Write `path` through `write(file)`: into a temporary file beside it, fsync, rename.

    A crash at any point leaves the previous file intact (and no temporary file when the
    write itself fails). With `sync_dir`, the directory is synced after the rename, so the
    rename survives a power cut too (needed when another file is renamed after this one
    and that order matters). With a `pacer`, `write` gets a `PacedFile`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f if pacer is None else PacedFile(f, pacer))  # type: ignore[arg-type]  # a file, by delegation
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


def write_npz(f: BinaryIO, arrays: dict[str, np.ndarray], *, pacer: Pacer | None = None) -> None:
    """What `np.savez(f, **arrays)` writes (an uncompressed zip of .npy files, which `np.load`
    reads), without holding the GIL through 16 MiB copies: each array's bytes go straight from
    its memory in WRITE_CHUNK slices (zlib's CRC and the file's write give the GIL away), each
    followed by `pacer.pace()`. Object arrays are refused, as np.savez refuses them unpickled."""
    pacer = pacer or Pacer()
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, value in arrays.items():
            array = np.ascontiguousarray(value)
            if array.dtype.hasobject:
                raise ValueError(f"array {key!r} holds Python objects; only plain dtypes are written")
            with z.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                raw = array.reshape(-1).view(np.uint8).data
                for start in range(0, len(raw), WRITE_CHUNK):
                    member.write(raw[start:start + WRITE_CHUNK])
                    pacer.pace()
