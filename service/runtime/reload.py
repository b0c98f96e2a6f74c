"""Hot reload of the rules and the model: on SIGHUP (both), or when polling sees the rules file
or the model directory change, the new ruleset or model is loaded, validated and warmed off the
event loop, then swapped in whole between batches.

Why it is atomic: a `Scorer` is immutable and holds one model and one ruleset; the pipeline
thread reads `Pipeline.scorer` once per batch and the event-loop fallback once per call, so a
swap (one reference assignment) changes which scorer the *next* batch or call uses, and no
answer is ever made from two rulesets or two models. A file that fails to load or to evaluate
is refused: the scorer in use stays, and the refusal is logged (with the error's reason: the
rule and the problem, or the model's feature-set version and this build's) and counted in
`fraudscore_rules_reloads_total` / `fraudscore_model_reloads_total{result="refused"}`.

Why the two never race: one task does every reload, one at a time, and each builds its new
`Scorer` from the one in use, so a new model keeps the latest rules and new rules the latest model.

Why polling and not inotify: no extra dependency, and it follows Kubernetes ConfigMap
updates, which swap a `..data` symlink to a new directory rather than write the file (an
inotify watch on the old inode never fires). So the content decides: every
`FRAUDSCORE_RULES_RELOAD_S` the file is stat'ed through its symlinks, and read and hashed
only when its (mtime, size, inode, device) moved; a reload happens only when the hash did.
The named list files of the ruleset in use are watched the same way, with the rules file; the
model directory's manifest.json and model.txt every `FRAUDSCORE_MODEL_RELOAD_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from core.encode import KeyHasher
from core.errors import ModelLoadError, RulesLoadError
from core.features import FEATURE_SET_VERSION
from core.model import MANIFEST_FILE, MODEL_FILE, load_model_dir
from core.rules.file import load_ruleset, parse_ruleset
from core.rules.ruleset import Ruleset
from core.scoring import Scorer
from service.runtime.metrics import Metrics
from service.runtime.restore import warn_about_training
from service.serving.pipeline import Pipeline
from service.serving.warm import warm_up

log = logging.getLogger("fraudscore.rules")
model_log = logging.getLogger("fraudscore.model")


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


def content_changed(stamp: RulesStamp, seen: RulesStamp | None) -> bool:
    """Whether `stamp`'s content differs from `seen`'s (nothing seen yet: it does)."""
    return seen is None or stamp.digest != seen.digest


def model_stamp(model_dir: Path, previous: RulesStamp | None = None) -> RulesStamp:
    """The stamp of a model directory: its manifest and its model file, read only when their stat moved."""
    return rules_stamp(model_dir / MANIFEST_FILE, previous, list_files=[model_dir / MODEL_FILE])


def loaded_stamp(before: RulesStamp, ruleset: Ruleset) -> RulesStamp:
    """The stamp of what was loaded: the rules file's taken `before` loading, and each list file's
    hash of the content the loader read (not yet stat'ed: the next poll stats and compares them)."""
    return RulesStamp((before.files[0], *(FileStamp(p, _UNREAD, d) for p, d in ruleset.list_files)))


class WatchTask:
    """A background task that a signal (`request`, from SIGHUP) or its own timer wakes; the
    subclass's `_run` is the loop. Event loop only."""

    task_name = "watch"

    def __init__(self) -> None:
        self._requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        """Check now (SIGHUP). Event loop only."""
        self._requested.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        raise NotImplementedError


class Reloader(WatchTask):
    """Watches the rules file (every `rules_interval_s`) and the model directory (every
    `model_interval_s`; 0 = only on `request`) and swaps a validated, warmed `Scorer` into
    `pipeline`; `extra_checks` run on the same loop. One reload at a time, on one task, for all."""

    def __init__(self, path: Path | None, seen: RulesStamp | None, *, pipeline: Pipeline, hasher: KeyHasher,
                 metrics: Metrics, interval_s: float, reasons_method: str, model_dir: Path | None = None,
                 model_seen: RulesStamp | None = None, model_interval_s: float = 0.0,
                 extra_checks: Mapping[str, tuple[float, Callable[..., Awaitable[bool]]]] | None = None) -> None:
        super().__init__()
        self.path = path
        self._seen = seen  # the stamp of the content in use (or last refused): polling acts on change only
        self.model_dir = model_dir
        self._model_seen = model_seen  # likewise for the model directory's two files
        self._pipeline = pipeline
        self._hasher = hasher
        self._metrics = metrics
        self._intervals_s = {"rules": interval_s, "model": model_interval_s}
        # Other watched things that must not reload at the same time as these (e.g. the
        # challenger, service/runtime/challenger_reload.py): name → (interval, check(forced=...)).
        self._checks: dict[str, Callable[..., Awaitable[bool]]] = {"rules": self._check, "model": self._check_model}
        for name, (every_s, check) in (extra_checks or {}).items():
            self._intervals_s[name] = every_s
            self._checks[name] = check
        self._reasons_method = reasons_method
        for result in ("ok", "refused"):  # exported from zero, so rate() and alerts see the first one
            metrics.rules_reloads.labels(result)
            metrics.model_reloads.labels(result)

    async def _run(self) -> None:
        checks = self._checks
        now = time.monotonic()
        due = {what: now + interval for what, interval in self._intervals_s.items() if interval > 0}
        while True:
            timeout = max(0.0, min(due.values()) - time.monotonic()) if due else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), timeout=timeout)
            forced = self._requested.is_set()
            self._requested.clear()  # SIGHUPs during the reloads below coalesce into one more
            now = time.monotonic()
            for what, check in checks.items():
                if not forced and due.get(what, now + 1) > now:
                    continue
                if what in due:
                    due[what] = now + self._intervals_s[what]
                try:
                    await check(forced=forced)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    (log if what == "rules" else model_log).exception(
                        "%s reload check failed; the one in use stays, watching on", what)

    async def _check(self, *, forced: bool) -> bool:
        """Reload the rules if the file changed (or `forced`); True when a new scorer was swapped in."""
        path = self.path
        if path is None:
            if forced:
                log.info("reload requested but no rules file is configured (FRAUDSCORE_RULES_FILE); "
                         "the packaged rules stay")
            return False
        lists = [p for p, _ in self._pipeline.scorer.ruleset.list_files]
        stamp = await asyncio.to_thread(lambda: rules_stamp(path, self._seen, list_files=lists))
        if not forced and not content_changed(stamp, self._seen):
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
        self._metrics.rules_reloads.labels("ok").inc()
        log.info("rules reloaded", extra={
            "path": str(path), "trigger": trigger, "old_ruleset_version": old.ruleset.version,
            "new_ruleset_version": new.ruleset.version, "rules": len(new.ruleset.rules.rules),
            "fallback_rules": len(new.ruleset.fallback.rules)})
        return True

    async def _check_model(self, *, forced: bool) -> bool:
        """Reload the model if its directory's files changed; True when swapped in. `forced` (SIGHUP)
        checks now, but an unchanged model is not loaded again: reloading the same forest would
        buy nothing and cost a load and a warm-up on every rules SIGHUP."""
        model_dir = self.model_dir
        if model_dir is None:
            if forced:
                model_log.info("reload requested but no model directory is configured (FRAUDSCORE_MODEL_DIR)")
            return False
        stamp = await asyncio.to_thread(model_stamp, model_dir, self._model_seen)
        if not content_changed(stamp, self._model_seen):
            self._model_seen = stamp
            return False
        self._model_seen = stamp  # a refused model is not retried until its files change again
        trigger = "signal" if forced else "file_changed"
        old = self._pipeline.scorer
        old_version = old.model.version if old.model is not None else ""
        try:
            # Off the event loop: loading reads and checks the files, warming runs every model kernel.
            new = await asyncio.to_thread(self._build_model, model_dir, old)
        except Exception as exc:
            self._metrics.model_reloads.labels("refused").inc()
            # ModelLoadError's reason says what is wrong (e.g. the model's feature-set version and
            # this build's); any other error's text is not ours to judge, so only its class is logged.
            reason = exc.reason if isinstance(exc, ModelLoadError) else f"{exc.__class__.__name__} while loading"
            model_log.error("model refused; the previous model stays in use", extra={
                "model_dir": str(model_dir), "trigger": trigger, "reason": reason, "model_version": old_version})
            return False
        self._swap(old, new)
        self._pipeline.fallback_reason = ""  # a service that started without a model now has one
        self._metrics.model_reloads.labels("ok").inc()
        self._metrics.model_loaded.set(1)
        model_log.info("model reloaded", extra={
            "model_dir": str(model_dir), "trigger": trigger, "old_model_version": old_version,
            "new_model_version": new.model.version if new.model is not None else ""})
        return True

    def _build(self, path: Path, old: Scorer) -> Scorer:
        """Worker thread: the new ruleset with the model in use, validated and evaluated once."""
        scorer = Scorer(old.model, load_ruleset(path, hasher=self._hasher), reasons_method=self._reasons_method)
        warm_up(scorer, self._hasher)  # a throwaway state: the real one is the pipeline thread's
        return scorer

    def _build_model(self, model_dir: Path, old: Scorer) -> Scorer:
        """Worker thread: the new model with the ruleset in use, checked and run once through
        prediction and both reason methods (pipeline.warm_up), so its first batch pays nothing extra."""
        model = load_model_dir(model_dir)
        warn_about_training(model, self._hasher, when="reload")
        scorer = Scorer(model, old.ruleset, reasons_method=self._reasons_method)
        warm_up(scorer, self._hasher)
        return scorer

    def _swap(self, old: Scorer, new: Scorer) -> None:
        self._pipeline.scorer = new  # read once per batch by the pipeline thread: the next batch uses it
        info = self._metrics.model_info
        versions = [(s.model.version if s.model is not None else "", s.ruleset.version) for s in (old, new)]
        # New labels first, then the old removed: a scrape never sees no version at all.
        info.labels(*versions[1], FEATURE_SET_VERSION).set(1)
        if versions[0] != versions[1]:
            with contextlib.suppress(KeyError):
                info.remove(*versions[0], FEATURE_SET_VERSION)
