"""What a server starts from: its models, and the state and idempotency records it kept
across a restart (written by `write_snapshot`, restored by `restore_state` and
`restore_idempotency`). Nothing here stops a start-up: whatever cannot be used is logged
with the reason and replaced by its safe default (no model: fallback rules; no state:
empty state; no records: none).
"""

from __future__ import annotations

import logging
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.encode import KEY_SCHEME, KeyHasher
from core.errors import ModelLoadError
from core.features import FEATURE_SET_VERSION, EntityState
from core.features.store import VersionedStore, load_snapshot, save_snapshot
from core.files import Pacer
from core.model import LoadedModel, load_model_dir
from service.runtime.config import Settings
from service.serving.idempotency import IdempotencyCache, Remembered
from service.serving.idempotency_store import RECORDS_FILE, load_records, save_records

log = logging.getLogger("fraudscore.app")
SNAPSHOT_FILE = "state.npz"
# Refused snapshots kept beside the state (`state.npz.refused-<UTC time>`), newest first; older ones deleted.
REFUSED_KEPT = 3


def warn_about_training(model: LoadedModel, hasher: KeyHasher, *, when: str) -> None:
    """Warnings about how `model` was trained that bear on its answers here: on simulated data (its
    manifest's training.data.source starts with "simulated": such a model knows the simulator's
    fraud, not yours), or on features hashed under another identifier key than this server's
    (its manifest's `id_key`): the seen-before flags, distinct counts and table neighbourhoods it
    learnt from differ from those it is served. Never logs a key or its fingerprint."""
    training: Any = model.manifest.get("training")
    data = training.get("data") if isinstance(training, dict) else None
    source = data.get("source") if isinstance(data, dict) else None
    if isinstance(source, str) and source.startswith("simulated"):
        log.warning("the model making decisions was trained on simulated data, not on real transactions; "
                    "train one on your own labelled history before relying on its decisions",
                    extra={"model_version": model.version, "training_source": source[:64], "when": when})
    id_key: Any = model.manifest.get("id_key")
    if not isinstance(id_key, dict) or "fingerprint" not in id_key:
        log.info("the model does not record which identifier key its training features were hashed with "
                 "(trained before models recorded it); if it was not this server's FRAUDSCORE_ID_HASH_KEY, "
                 "retrain with it", extra={"model_version": model.version, "when": when})
    elif id_key.get("fingerprint") != hasher.fingerprint or id_key.get("scheme") != KEY_SCHEME:
        log.warning("the model was trained on features hashed with another identifier key than this server's "
                    "FRAUDSCORE_ID_HASH_KEY: seen-before flags, distinct counts and shared table slots differ "
                    "between its training and its serving; retrain with the server's key set "
                    "(docs/training.md, \"One key everywhere\")",
                    extra={"model_version": model.version, "when": when})


def load_model(path: Path | None, hasher: KeyHasher) -> tuple[LoadedModel | None, str]:
    """The model, or None and the fallback reason (the service then answers from the fallback rules)."""
    if path is None:
        return None, "no_model"
    if not path.exists():
        log.error("model directory not found; serving from fallback rules", extra={"model_dir": str(path)})
        return None, "no_model"
    try:
        model = load_model_dir(path)
    except ModelLoadError as exc:
        log.error("model refused; serving from fallback rules", extra={"model_dir": str(path), "reason": exc.reason})
        return None, "model_load_failed"
    warn_about_training(model, hasher, when="start-up")
    return model, ""


def load_challenger(path: Path | None, hasher: KeyHasher) -> LoadedModel | None:
    """The challenger model, or None (logged why) when unset, missing or refused: never fails start-up."""
    if path is None:
        return None
    if not path.exists():
        log.error("challenger model directory not found; running without a challenger",
                  extra={"challenger_model_dir": str(path)})
        return None
    try:
        model = load_model_dir(path)
    except Exception as exc:  # a challenger must never stop the service from starting
        reason = exc.reason if isinstance(exc, ModelLoadError) else f"{exc.__class__.__name__}: {exc}"
        log.error("challenger model refused; running without a challenger",
                  extra={"challenger_model_dir": str(path), "reason": reason})
        return None
    log.info("challenger model loaded; scored in shadow, never answered",
             extra={"challenger_model_dir": str(path), "model_version": model.version})
    warn_about_training(model, hasher, when="challenger start-up")
    return model


def restore_state(settings: Settings, hasher: KeyHasher) -> EntityState:
    """State from the last snapshot, or empty (with a clear log line) when there is none or it is unusable."""
    if settings.state_dir is not None:
        path = settings.state_dir / SNAPSHOT_FILE
        if path.exists():
            try:
                state = load_snapshot(path, feature_set_version=FEATURE_SET_VERSION, hasher=hasher)
                log.info("state restored", extra={"path": str(path), "cards": state.card.occupancy()})
                if (state.card.capacity, state.merchant.capacity) != (settings.card_capacity, settings.entity_capacity):
                    log.warning("restored state keeps the snapshot's capacities, not the configured ones; "
                                "delete the snapshot to start over with the new capacities",
                                extra={"card_capacity": state.card.capacity,
                                       "entity_capacity": state.merchant.capacity})
                return state
            except ValueError as exc:
                kept = set_aside(path)
                log.error("state snapshot refused; starting with empty state. It was moved aside, not deleted "
                          "(the next snapshot would overwrite it): to go back to it, stop the server with the "
                          "setting it was made with (FRAUDSCORE_ID_HASH_KEY, this build's kernels) and move "
                          "it back to the state file", extra={
                              "path": str(path), "reason": str(exc), "moved_to": str(kept) if kept else None,
                              "refused_copies_kept": REFUSED_KEPT})
    return EntityState.empty(card_capacity=settings.card_capacity, merchant_capacity=settings.entity_capacity,
                             customer_capacity=settings.entity_capacity, device_capacity=settings.entity_capacity,
                             ip_capacity=settings.entity_capacity)


def set_aside(path: Path, *, keep: int = REFUSED_KEPT) -> Path | None:
    """Rename a refused file to `<name>.refused-<UTC time>[-n]` beside it, and delete all but the
    `keep` most recently modified such copies, never the one just made (an operator's own
    `<name>.refused-backup` is not one of them). None (logged) when it cannot be renamed: the next
    snapshot replaces it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = f"{path.name}.refused-"
    ours = re.compile(re.escape(prefix) + r"\d{8}T\d{6}Z(?:-(\d+))?")
    same_second = [int(m.group(1) or 1) for p in path.parent.glob(f"{prefix}{stamp}*")
                   if (m := ours.fullmatch(p.name))]
    n = max(same_second) + 1 if same_second else 1  # after the newest copy of this second
    target = path.with_name(prefix + stamp + (f"-{n}" if n > 1 else ""))
    try:
        os.replace(path, target)
    except OSError as exc:
        log.error("refused state snapshot could not be moved aside; the next snapshot will replace it",
                  extra={"path": str(path), "error": exc.strerror})
        return None
    copies = [p for p in path.parent.glob(prefix + "*") if ours.fullmatch(p.name) and p != target]
    copies.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)  # not by name: clocks jump
    for old in copies[max(keep - 1, 0):]:
        try:
            old.unlink()
        except OSError as exc:
            log.warning("old refused snapshot not deleted", extra={"path": str(old), "error": exc.strerror})
    return target


def restore_idempotency(settings: Settings, answers: IdempotencyCache[bytes, bytes],
                        outcomes: IdempotencyCache[bool, bool]) -> None:
    """Saved answers and outcome reports, if intact; restored whether or not the state snapshot was.

    Records without the state they describe make a retry return its first answer without
    counting (the count went with the state): no transaction counts twice. The reverse,
    state without its records, would count retries twice; a refused records file cannot
    be helped, and the state is kept all the same (losing every entity's history would cost
    more than counting a few retries twice), with an error saying so.
    """
    if settings.state_dir is None:
        return
    path = settings.state_dir / RECORDS_FILE
    if not path.exists():
        if (settings.state_dir / SNAPSHOT_FILE).exists():
            log.warning("no idempotency records beside the state snapshot; retries of transactions scored "
                        "before this restart will be scored and counted again", extra={"path": str(path)})
        return
    try:
        saved = load_records(path)
    except ValueError as exc:
        log.error("idempotency records refused; starting with no idempotency records: retries of transactions "
                  "scored before this restart will be scored and counted again",
                  extra={"path": str(path), "reason": str(exc)})
        return
    kept_answers, kept_outcomes = answers.restore(saved.answers), outcomes.restore(saved.outcomes)
    log.info("idempotency records restored", extra={
        "path": str(path), "answers": kept_answers, "outcomes": kept_outcomes,
        "dropped_expired_or_over_bound": len(saved.answers) + len(saved.outcomes) - kept_answers - kept_outcomes})


def open_state(settings: Settings, hasher: KeyHasher) -> EntityState | VersionedStore:
    """The shared store at `state_url` when set (its rows namespaced by feature set and identifier
    key), else this process's tables, restored from the last snapshot (`restore_state`)."""
    if settings.state_url is None:
        return restore_state(settings, hasher)
    from service.state.redis_store import namespace_for, open_redis_store, redacted

    timeout_s = settings.state_timeout_ms / 1000.0
    store = open_redis_store(settings.state_url, namespace=namespace_for(FEATURE_SET_VERSION, hasher.fingerprint),
                             ttl_s=settings.state_ttl_s, timeout_s=timeout_s, hold_wait_s=timeout_s,
                             ca_file=settings.state_ca_file)
    log.info("entity state in a shared store", extra={"store": redacted(settings.state_url),
                                                      "ttl_s": settings.state_ttl_s,
                                                      "timeout_ms": settings.state_timeout_ms})
    return store


def write_snapshot(state_dir: Path, state: EntityState | None, hasher: KeyHasher, answers: Remembered[bytes],
                    outcomes: Remembered[bool], pacer: Pacer | None = None) -> None:
    """Records first, then state: if the records cannot be written, the state is not either.
    With a `pacer`, both are encoded and written in slices with pauses between. `state` None:
    a shared store holds it, only the records are this process's to keep."""
    save_records(state_dir / RECORDS_FILE, answers=answers, outcomes=outcomes, pacer=pacer)
    if state is None:
        return
    save_snapshot(state, state_dir / SNAPSHOT_FILE, feature_set_version=FEATURE_SET_VERSION, hasher=hasher,
                  pacer=pacer)
