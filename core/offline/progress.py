"""Progress of long offline work (simulate, train, replay, evaluate, backtest), on stderr.

On a terminal, a tqdm bar. Anywhere else (a log file, a pipe, a CI job, a Kubernetes Job's
log) a bar is hundreds of carriage-return redraws in one line, so instead a plain line every
`every_s` seconds and one at the end. Offline only: the serving path never imports this.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

LINE_EVERY_S = 5.0


class Lines:
    """A progress bar's interface, written as a line every `every_s` seconds and at the end."""

    def __init__(self, total: int, desc: str, unit: str, *, stream: TextIO, every_s: float = LINE_EVERY_S) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._stream, self._every_s = stream, every_s
        self._started = self._printed = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._printed >= self._every_s:
            self._printed = now
            self._line(now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = now - self._started
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        rate = f", {self.n / elapsed:,.0f} {self.unit}/s" if elapsed > 0 else ""
        print(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}{share}, {elapsed:.0f} s{rate}",
              file=self._stream, flush=True)

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(total: int, desc: str, unit: str, *, enabled: bool = True, stream: TextIO | None = None,
             every_s: float = LINE_EVERY_S) -> Any:
    """A context manager with `update(n)`: a tqdm bar when `stream` (default stderr) is a terminal,
    else `Lines`; nothing when not `enabled`."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return _Off()
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        from tqdm import tqdm  # a training-only dependency, loaded only when drawing a bar

        return tqdm(total=total, desc=desc, unit=unit, file=stream, mininterval=0.5)
    return Lines(total, desc, unit, stream=stream, every_s=every_s)
