"""What the security files share: the error naming a file that cannot be used, reading one, and
the polling loop that re-reads a file (a mounted Secret) when its content changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from core.errors import FraudscoreError
from service.runtime.config import ENV_PREFIX
from service.runtime.reload import RulesStamp, WatchTask, content_changed

log = logging.getLogger("fraudscore.security")


class SecurityConfigError(FraudscoreError):
    """A TLS or tokens file that cannot be used; the message names the setting and what to do."""

    def __init__(self, setting: str, path: Path, problem: str, remedy: str) -> None:
        self.setting, self.path, self.problem = setting, path, problem
        super().__init__(f"{ENV_PREFIX}{setting} ({path}): {problem}; {remedy}")


def read_secret_file(setting: str, path: Path, what: str) -> bytes:
    """The bytes of `path`, or SecurityConfigError naming `setting` and what was expected there."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(setting, path, f"no such file; expected {what}",
                                  "check the path and that the Secret is mounted there") from None
    except OSError as exc:
        raise SecurityConfigError(setting, path, f"cannot be read ({exc.strerror}); expected {what}",
                                  "make it readable by the server's user") from None


class FileWatch(WatchTask):
    """Calls `check` every `interval_s` (0: never) and on `request` (SIGHUP). A failing check is
    logged by class only and retried at the next tick; what is in use stays."""

    what = "file"

    def __init__(self, *, interval_s: float, seen: RulesStamp | None = None) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._seen = seen  # the stamp of the content in use (or last refused)

    def _changed(self, stamp: RulesStamp, *, forced: bool) -> bool:
        """Keep `stamp`; True when the content differs from the last one seen (or `forced`).
        Refused content is then not retried until it changes again."""
        changed = forced or content_changed(stamp, self._seen)
        self._seen = stamp
        return changed

    async def _run(self) -> None:
        while True:
            timeout = self._interval_s if self._interval_s > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), timeout=timeout)
            forced = self._requested.is_set()
            self._requested.clear()
            try:
                await self.check(forced=forced)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error(f"{self.what} check failed; what is in use stays", extra={"error": exc.__class__.__name__})

    async def check(self, *, forced: bool = False) -> bool:
        raise NotImplementedError
