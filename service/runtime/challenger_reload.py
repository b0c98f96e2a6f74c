"""Champion/challenger: the challenger model directory watched and hot-swapped like the champion's.

The challenger (FRAUDSCORE_CHALLENGER_MODEL_DIR) only ever feeds metrics
(service/serving/challenger.py, `record_challenger`), so swapping it risks no answer; what matters
is that a team can put a new candidate in shadow without a restart. Checked on the
Reloader's task (SIGHUP, or every FRAUDSCORE_MODEL_RELOAD_S like the champion), loaded and
warmed off the event loop, swapped with one assignment the pipeline reads once per batch.
A directory that cannot be used keeps the challenger in shadow (or none), logged and
counted in `fraudscore_challenger_reloads_total{result="refused"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import numpy as np

from core.encode import KeyHasher
from core.errors import ModelLoadError
from core.features import NUM_FEATURES
from core.model import LoadedModel, load_model_dir
from service.runtime.metrics import Metrics
from service.runtime.reload import RulesStamp, content_changed, model_stamp
from service.runtime.restore import warn_about_training
from service.serving.pipeline import Pipeline

log = logging.getLogger("fraudscore.challenger")


class ChallengerReload:
    """`check` swaps a changed, usable challenger directory into `pipeline`."""

    def __init__(self, directory: Path, seen: RulesStamp | None, *, pipeline: Pipeline, metrics: Metrics) -> None:
        self.directory = directory
        self._seen = seen  # the stamp of the files in use (or last refused): polling acts on change only
        self._pipeline = pipeline
        self._metrics = metrics
        for result in ("ok", "refused"):  # exported from zero, so rate() and alerts see the first one
            metrics.challenger_reloads.labels(result)

    async def check(self, *, forced: bool) -> bool:
        """Load the challenger if its files changed; True when swapped in. `forced` (SIGHUP) checks
        now, but unchanged files are not loaded again."""
        stamp = await asyncio.to_thread(model_stamp, self.directory, self._seen)
        if not content_changed(stamp, self._seen):
            self._seen = stamp
            return False
        self._seen = stamp  # refused files are not retried until they change again
        trigger = "signal" if forced else "file_changed"
        old = self._pipeline.challenger
        old_version = old.version if old is not None else ""
        try:
            new = await asyncio.to_thread(_load_and_warm, self.directory, self._pipeline.hasher)
        except Exception as exc:
            self._metrics.challenger_reloads.labels("refused").inc()
            reason = exc.reason if isinstance(exc, ModelLoadError) else f"{exc.__class__.__name__} while loading"
            log.error("challenger refused; the previous challenger stays in shadow", extra={
                "challenger_model_dir": str(self.directory), "trigger": trigger, "reason": reason,
                "model_version": old_version})
            return False
        self._pipeline.challenger = new  # read once per batch by the pipeline thread
        self._metrics.challenger_reloads.labels("ok").inc()
        info = self._metrics.challenger_info
        info.labels(new.version).set(1)  # the new label first: a scrape never sees none
        if old_version and old_version != new.version:
            with contextlib.suppress(KeyError):
                info.remove(old_version)
        log.info("challenger reloaded; scored in shadow, never answered", extra={
            "challenger_model_dir": str(self.directory), "trigger": trigger, "old_model_version": old_version,
            "new_model_version": new.version})
        return True


def _load_and_warm(directory: Path, hasher: KeyHasher) -> LoadedModel:
    """Worker thread: the model, checked against this build's features, and its prediction compiled."""
    model = load_model_dir(directory)  # refuses another feature set, naming both versions
    warn_about_training(model, hasher, when="challenger reload")
    model.forest.predict(np.zeros((2, NUM_FEATURES)))
    return model
