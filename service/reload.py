"""Rules hot reload: on SIGHUP, or when polling sees the rules file change, a new ruleset is
parsed, validated and warmed off the event loop, then swapped in whole between batches.

Why it is atomic: a `Scorer` is immutable and holds one ruleset; the pipeline thread reads
`Pipeline.scorer` once per batch and the event-loop fallback once per call, so a swap (one
reference assignment) changes which scorer the *next* batch or call uses, and no answer
is ever made from two rulesets. A file that fails to load or to evaluate is refused: the
scorer in use stays, and the refusal is logged (with RulesLoadError's reason, which names
the rule and the problem) and counted in `fraudscore_rules_reloads_total{result="refused"}`.

Why polling and not inotify: no extra dependency, and it follows Kubernetes ConfigMap
updates, which swap a `..data` symlink to a new directory rather than write the file (an
inotify watch on the old inode never fires). So the content decides: every
`FRAUDSCORE_RULES_RELOAD_S` the file is stat'ed through its symlinks, and read and hashed
only when its (mtime, size, inode, device) moved; a reload happens only when the hash did.
The named list files of the ruleset in use are watched the same way, with the rules file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from core.encode import KeyHasher
from core.errors import RulesLoadError
from core.features import FEATURE_SET_VERSION
from core.rules import Ruleset
from core.rules_file import load_ruleset, parse_ruleset
from core.scoring import Scorer
from service.metrics import Metrics
from service.pipeline import Pipeline, warm_up

log = logging.getLogger("fraudscore.rules")


def load_rules(path: Path | None, *, hasher: KeyHasher | None = None) -> Ruleset:
    """The configured rules file, or the packaged defaults. `hasher` hashes the named lists: the
    server's own (FRAUDSCORE_ID_HASH_KEY); KeyHasher() by default, as offline replay uses."""
    if path is None:
        data = resources.files("service").joinpath("defaults/rules.json").read_bytes()
        return parse_ruleset(data, source="service/defaults/rules.json", hasher=hasher)
    return load_ruleset(path, hasher=hasher)


_UNREAD = (-1, -1, -1, -1)


@dataclass(frozen=True, slots=True)
class FileStamp:
    """One watched file: its stat (cheap) and its content's hash (decisive)."""

    path: Path
    stat: tuple[int, int, int, int]  # st_mtime_ns, st_size, st_ino, st_dev; all -1 when unreadable or not stat'ed
    digest: str                      # sha256 of the content, or "unreadable: <why>"


@dataclass(frozen=True, slots=True)
class RulesStamp:
    """What polling compares: the rules file's stamp, then each list file's of the ruleset in use."""

    files: tuple[FileStamp, ...]

    @property
    def digest(self) -> tuple[tuple[Path, str], ...]:
        """The content of every file: equal digests mean nothing to reload."""
        return tuple((f.path, f.digest) for f in self.files)


def _file_stamp(path: Path, previous: FileStamp | None) -> FileStamp:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap swap shows up as another inode
    except OSError as exc:
        return FileStamp(path, _UNREAD, f"unreadable: {exc.strerror}")
    stat = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
    if previous is not None and previous.stat == stat:
        return previous
    try:
        return FileStamp(path, stat, hashlib.sha256(path.read_bytes()).hexdigest())
    except OSError as exc:
        return FileStamp(path, _UNREAD, f"unreadable: {exc.strerror}")


def rules_stamp(path: Path, previous: RulesStamp | None = None, *, list_files: Sequence[Path] = ()) -> RulesStamp:
    """The stamp of the rules file and `list_files`; a file's content is read only when its stat
    differs from its stamp in `previous`."""
    before = {f.path: f for f in previous.files} if previous is not None else {}
    return RulesStamp(tuple(_file_stamp(p, before.get(p)) for p in (path, *list_files)))


def loaded_stamp(before: RulesStamp, ruleset: Ruleset) -> RulesStamp:
    """The stamp of what was loaded: the rules file's taken `before` loading, and each list file's
    hash of the content the loader read (not yet stat'ed: the next poll stats and compares them)."""
    return RulesStamp((before.files[0], *(FileStamp(p, _UNREAD, d) for p, d in ruleset.list_files)))


class RulesReloader:
    """Watches the rules file (polling every `interval_s`, 0 = only on `request`) and swaps
    a validated, warmed `Scorer` into `pipeline`. One reload at a time, on one task."""

    def __init__(self, path: Path | None, seen: RulesStamp | None, *, pipeline: Pipeline, hasher: KeyHasher,
                 metrics: Metrics, interval_s: float, reasons_method: str) -> None:
        self.path = path
        self._seen = seen  # the stamp of the content in use (or last refused): polling acts on change only
        self._pipeline = pipeline
        self._hasher = hasher
        self._metrics = metrics
        self._interval_s = interval_s
        self._reasons_method = reasons_method
        self._requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        for result in ("ok", "refused"):  # exported from zero, so rate() and alerts see the first one
            metrics.rules_reloads.labels(result)

    def request(self) -> None:
        """Reload now, whether or not the file changed (SIGHUP). Event loop only."""
        self._requested.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rules-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), timeout=self._interval_s or None)
            forced = self._requested.is_set()
            self._requested.clear()  # SIGHUPs during the reload below coalesce into one more
            try:
                await self._check(forced=forced)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rules reload check failed; the current rules stay, watching on")

    async def _check(self, *, forced: bool) -> bool:
        """Reload if the file changed (or `forced`); True when a new scorer was swapped in."""
        path = self.path
        if path is None:
            if forced:
                log.info("reload requested but no rules file is configured (FRAUDSCORE_RULES_FILE); "
                         "the packaged rules stay")
            return False
        lists = [p for p, _ in self._pipeline.scorer.ruleset.list_files]
        stamp = await asyncio.to_thread(lambda: rules_stamp(path, self._seen, list_files=lists))
        if not forced and self._seen is not None and stamp.digest == self._seen.digest:
            self._seen = stamp  # touched, or replaced by the same content: nothing to do
            return False
        self._seen = stamp  # refused content is not retried until it changes again (or SIGHUP)
        trigger = "signal" if forced else "file_changed"
        old = self._pipeline.scorer
        try:
            # Off the event loop: parsing may compile code, and warming runs the kernels once.
            new = await asyncio.to_thread(self._build, path, old)
        except Exception as exc:
            self._metrics.rules_reloads.labels("refused").inc()
            # RulesLoadError's reason names the rule and the problem; any other error's text is
            # not ours to judge, so only its class is logged.
            reason = exc.reason if isinstance(exc, RulesLoadError) else f"{exc.__class__.__name__} while loading"
            log.error("rules refused; the previous ruleset stays in use", extra={
                "path": str(path), "trigger": trigger, "reason": reason, "ruleset_version": old.ruleset.version})
            return False
        self._seen = loaded_stamp(stamp, new.ruleset)  # now watching the new ruleset's list files
        self._swap(old, new)
        log.info("rules reloaded", extra={
            "path": str(path), "trigger": trigger, "old_ruleset_version": old.ruleset.version,
            "new_ruleset_version": new.ruleset.version, "rules": len(new.ruleset.rules.rules),
            "fallback_rules": len(new.ruleset.fallback.rules)})
        return True

    def _build(self, path: Path, old: Scorer) -> Scorer:
        """Worker thread: the new ruleset with the model in use, validated and evaluated once."""
        scorer = Scorer(old.model, load_ruleset(path, hasher=self._hasher), reasons_method=self._reasons_method)
        warm_up(scorer, self._hasher)  # a throwaway state: the real one is the pipeline thread's
        return scorer

    def _swap(self, old: Scorer, new: Scorer) -> None:
        self._pipeline.scorer = new  # read once per batch by the pipeline thread: the next batch uses it
        self._metrics.rules_reloads.labels("ok").inc()
        info = self._metrics.model_info
        model_version = new.model.version if new.model is not None else ""
        # New labels first, then the old removed: a scrape never sees no version at all.
        info.labels(model_version, new.ruleset.version, FEATURE_SET_VERSION).set(1)
        if old.ruleset.version != new.ruleset.version:
            with contextlib.suppress(KeyError):
                info.remove(model_version, old.ruleset.version, FEATURE_SET_VERSION)
