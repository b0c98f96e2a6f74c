"""Training: history → replayed features → LightGBM with a time-based split → model directory.

Offline only: lightgbm (and tqdm for a terminal's progress bar) are imported inside `train`; the
report it writes (core/offline/report.py) imports matplotlib likewise.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from core.encode import KEY_SCHEME, KeyHasher
from core.errors import TrainingError
from core.features import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURE_SET_VERSION
from core.history.table import History
from core.history.times import iso_ms
from core.model import MANIFEST_FILE, MODEL_FILE, Thresholds
from core.offline.evaluation import (
    average_precision,
    recall_at_fpr,
    roc_auc,
    threshold_at_fpr,
    threshold_at_rate,
)
from core.offline.replay import replay_features
from core.offline.report import gain_importance, write_report

# What the validation period is judged by when early stopping: average precision weighs the
# rare class; log loss and AUC are dominated by the legitimate majority.
EARLY_STOPPING_METRIC = "average_precision"
MIN_ROWS = 100


@dataclass(frozen=True, slots=True)
class TrainResult:
    out_dir: Path
    model_version: str
    metrics: dict[str, float]
    thresholds: dict[str, float]


@dataclass(frozen=True, slots=True)
class TimeSplit:
    """Which rows train and which validate; rows in between (a gap) only feed the features."""

    train: np.ndarray  # boolean masks over the history's rows
    valid: np.ndarray
    train_until_ms: int  # exclusive
    valid_from_ms: int  # inclusive

    @property
    def gap(self) -> np.ndarray:
        gap: np.ndarray = ~(self.train | self.valid)
        return gap


def time_split(
    event_time_ms: np.ndarray,
    *,
    valid_from_ms: int | None = None,
    train_until_ms: int | None = None,
    valid_fraction: float = 0.2,
) -> TimeSplit:
    """Split a history by event time only: train on `t < train_until`, validate on `t >= valid_from`.

    By default the last `valid_fraction` of the time span validates (or, with only
    `train_until`, everything from it) and training runs up to it. A `train_until` before `valid_from` leaves a gap, e.g. the weeks before the
    validation period whose labels were not yet final. Raises `TrainingError` for a split
    that overlaps or leaves a side empty.
    """
    t = event_time_ms
    first, last = int(t.min()), int(t.max())  # rows come in arrival order: a late event may come last
    if valid_from_ms is None:
        default = int(first + (1.0 - valid_fraction) * (last - first))
        valid_from_ms = default if train_until_ms is None else max(default, train_until_ms)
    if train_until_ms is None:
        train_until_ms = valid_from_ms
    span = f"the history runs from {iso_ms(first)} to {iso_ms(last)}"
    if train_until_ms > valid_from_ms:
        raise TrainingError(f"--train-until ({iso_ms(train_until_ms)}) is after --valid-from "
                            f"({iso_ms(valid_from_ms)}): the model would train on the period that judges it; "
                            "set --train-until at or before --valid-from")
    if not first < train_until_ms:
        raise TrainingError(f"no training rows before --train-until {iso_ms(train_until_ms)}; {span}")
    if not valid_from_ms <= last:
        raise TrainingError(f"no validation rows from --valid-from {iso_ms(valid_from_ms)}; {span}")
    split = TimeSplit(train=t < train_until_ms, valid=t >= valid_from_ms,
                      train_until_ms=train_until_ms, valid_from_ms=valid_from_ms)
    for name, rows, flag in (("training", split.train, "--train-until"), ("validation", split.valid, "--valid-from")):
        if rows.sum() < MIN_ROWS:
            raise TrainingError(f"the {name} period holds {int(rows.sum())} rows, fewer than {MIN_ROWS}: too few to "
                                f"{'learn from' if name == 'training' else 'judge a model on'}; move {flag} ({span})")
    return split


def operating_thresholds(y: np.ndarray, p: np.ndarray, *, review_rate: float, decline_fpr: float) -> Thresholds:
    """DECLINE where at most `decline_fpr` of legitimate rows are declined; REVIEW below it so
    that at most `review_rate` of all rows land in REVIEW (between the two thresholds)."""
    decline = min(max(threshold_at_fpr(y, p, decline_fpr), 0.0), 1.0)
    declined = float(np.mean(p >= decline)) if p.size else 0.0
    review = min(max(threshold_at_rate(p, declined + review_rate), 0.0), decline)
    return Thresholds(review=review, decline=decline)


def _fingerprint(history: History) -> str:
    """A hash of the rows read and kept: what changes the features or the labels changes it."""
    digest = hashlib.sha256()
    for arr in (history.event_time_ms, history.amount_minor, history.is_fraud, history.fraud_reported_time_ms):
        digest.update(np.ascontiguousarray(arr).tobytes())
    for ids in (history.transaction_id, history.card_id, history.merchant_id):
        digest.update("\x1f".join(ids.tolist()).encode() + b"\x1e")
    return digest.hexdigest()[:16]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("fraudscore", "lightgbm", "numpy", "numba", "pyarrow"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:  # pragma: no cover - a source checkout without its metadata
            versions[package] = "unknown"
    return versions


def train(
    history: History,
    out_dir: Path,
    *,
    valid_from_ms: int | None = None,
    train_until_ms: int | None = None,
    valid_fraction: float = 0.2,
    label_delay_ms: int | None = None,
    seed: int = 7,
    num_boost_round: int = 400,
    early_stopping_rounds: int = 40,
    review_rate: float = 0.005,
    decline_fpr: float = 0.001,
    fraud_weight: float = 1.0,
    data_source: str = "an in-memory history",
    data_read: Mapping[str, Any] | None = None,
    hasher: KeyHasher | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fit a model on `history` and write it, its manifest and its report to `out_dir`.

    Every row is replayed through the serving feature kernels (labels visible only once
    reported, or after `label_delay_ms`); rows before `train_until_ms` train, rows from
    `valid_from_ms` validate (`time_split`): early stopping on the validation period's
    average precision, metrics and thresholds from it, never from a random split.
    `fraud_weight` > 1 weighs fraud rows up (LightGBM's scale_pos_weight); the default 1
    keeps the probabilities calibrated (docs/training.md says why). `data_source` says in
    words where the history came from; `data_read` (`ReadReport.as_dict()`, what reading
    its file kept and dropped) goes into the manifest and the report. `hasher` is the serving
    key's (FRAUDSCORE_ID_HASH_KEY; the development key by default): features computed under
    another key differ from the server's, so the manifest records the key's fingerprint
    (never the key) and the server warns when its own differs.
    """
    import lightgbm as lgb

    from core.offline.progress import progress as progress_bar

    if len(history) < MIN_ROWS:
        raise TrainingError(f"need at least {MIN_ROWS} transactions to train, got {len(history)}")
    if not (0.0 <= review_rate < 1.0 and 0.0 <= decline_fpr < 1.0 and fraud_weight > 0.0):
        raise TrainingError(f"expected 0 ≤ review rate < 1, 0 ≤ decline FPR < 1 and fraud weight > 0, got "
                            f"{review_rate}, {decline_fpr} and {fraud_weight}")
    split = time_split(history.event_time_ms, valid_from_ms=valid_from_ms, train_until_ms=train_until_ms,
                       valid_fraction=valid_fraction)
    y = history.is_fraud.astype(np.float64)
    for name, rows in (("training", split.train), ("validation", split.valid)):
        if y[rows].sum() == 0:
            raise TrainingError(f"the {name} period ({int(rows.sum())} rows) holds no fraud; a model cannot "
                                "learn or be judged without it: use a longer history or move --valid-from")
    with progress_bar(len(history), "features", "txn", enabled=progress) as bar:
        X = replay_features(history, hasher=hasher, label_delay_ms=label_delay_ms, on_progress=bar.update)

    params: dict[str, Any] = {
        "objective": "binary",
        "metric": [EARLY_STOPPING_METRIC],
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 40,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "scale_pos_weight": fraud_weight,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 2,
        "verbose": -1,
    }
    dtrain = lgb.Dataset(X[split.train], y[split.train], feature_name=list(FEATURE_NAMES),
                         categorical_feature=list(CATEGORICAL_FEATURES), free_raw_data=False,
                         params={"verbose": -1})
    dvalid = lgb.Dataset(X[split.valid], y[split.valid], reference=dtrain)
    with progress_bar(num_boost_round, "boosting", "tree", enabled=progress) as bar:
        booster = lgb.train(
            params, dtrain, num_boost_round=num_boost_round, valid_sets=[dvalid], valid_names=["valid"],
            callbacks=[lgb.early_stopping(early_stopping_rounds, first_metric_only=True, verbose=False),
                       lambda env: bar.update(1)],
        )
    p_valid = np.asarray(booster.predict(X[split.valid], num_iteration=booster.best_iteration), dtype=np.float64)
    yv = y[split.valid]
    thresholds = operating_thresholds(yv, p_valid, review_rate=review_rate, decline_fpr=decline_fpr)
    declined = p_valid >= thresholds.decline
    reviewed = (p_valid >= thresholds.review) & ~declined
    metrics = {
        "roc_auc": roc_auc(yv, p_valid),
        "average_precision": average_precision(yv, p_valid),
        "recall_at_fpr_0.1%": recall_at_fpr(yv, p_valid, 0.001),
        "recall_at_fpr_1%": recall_at_fpr(yv, p_valid, 0.01),
        "valid_fraud_rate": float(yv.mean()),
        "valid_review_rate": float(reviewed.mean()),
        "valid_decline_fpr": float(declined[yv == 0].mean()),
        "valid_recall_decline": float(declined[yv == 1].mean()),
        "valid_recall_review_or_decline": float((declined | reviewed)[yv == 1].mean()),
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    model_text = booster.model_to_string(num_iteration=booster.best_iteration)
    model_version = "gbm-" + hashlib.sha256(model_text.encode()).hexdigest()[:12]
    t = history.event_time_ms
    manifest = {
        "model_version": model_version,
        "feature_set_version": FEATURE_SET_VERSION,
        # Which key the identifiers were hashed with: its scheme and fingerprint, never the key.
        "id_key": {"scheme": KEY_SCHEME, "fingerprint": (hasher or KeyHasher()).fingerprint},
        "feature_names": list(FEATURE_NAMES),
        "categorical_features": list(CATEGORICAL_FEATURES),
        "objective": "binary",
        "thresholds": {"review": thresholds.review, "decline": thresholds.decline},
        "threshold_policy": {"review_rate": review_rate, "decline_fpr": decline_fpr},
        "training": {
            "rows": int(split.train.sum()),
            "validation_rows": int(split.valid.sum()),
            "gap_rows": int(split.gap.sum()),
            "train_from": iso_ms(int(t.min())),
            "train_until": iso_ms(split.train_until_ms),
            "valid_from": iso_ms(split.valid_from_ms),
            "valid_until": iso_ms(int(t.max())),
            "fraud_rate": float(y[split.train].mean()),
            "label_delay_ms": label_delay_ms,
            "data_fingerprint": _fingerprint(history),
            "data": {"source": data_source, **(data_read or {})},
            "class_imbalance": {"fraud_weight": fraud_weight, "early_stopping_metric": EARLY_STOPPING_METRIC},
            "seed": seed,
            "best_iteration": int(booster.best_iteration or booster.current_iteration()),
            "params": params,
        },
        "metrics": metrics,
        "versions": _versions(),
        "created_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
    }
    (out_dir / MODEL_FILE).write_text(model_text)
    (out_dir / MANIFEST_FILE).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    write_report(out_dir, yv, p_valid, t[split.valid], thresholds=thresholds,
                 model_version=model_version,
                 data="the validation period: held out from training, but early stopping and the thresholds were "
                      "chosen on it, so these numbers are slightly optimistic (`fraudscore evaluate` on later data "
                      "gives an unbiased view)",
                 feature_importance=gain_importance(booster, iteration=booster.best_iteration),
                 data_read=data_read)
    return TrainResult(out_dir=out_dir, model_version=model_version, metrics=metrics,
                       thresholds={"review": thresholds.review, "decline": thresholds.decline})
