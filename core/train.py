"""Training: history → replayed features → LightGBM with a time-based split → model directory.

Offline only: lightgbm (and tqdm for the progress bar) are imported inside `train`; the
report it writes (core/report.py) imports matplotlib likewise.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from core.evaluation import average_precision, recall_at_fpr, roc_auc, threshold_at_fpr
from core.features import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURE_SET_VERSION
from core.history import History
from core.model import MANIFEST_FILE, MODEL_FILE, Thresholds
from core.replay import replay_features
from core.report import gain_importance, write_report


@dataclass(frozen=True, slots=True)
class TrainResult:
    out_dir: Path
    model_version: str
    metrics: dict[str, float]
    thresholds: dict[str, float]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def _fingerprint(history: History) -> str:
    digest = hashlib.sha256()
    for arr in (history.event_time_ms, history.amount_minor, history.is_fraud):
        digest.update(np.ascontiguousarray(arr).tobytes())
    digest.update("\n".join(history.transaction_id.tolist()).encode())
    return digest.hexdigest()[:16]


def train(
    history: History,
    out_dir: Path,
    *,
    valid_fraction: float = 0.2,
    label_delay_ms: int | None = None,
    seed: int = 7,
    num_boost_round: int = 400,
    early_stopping_rounds: int = 40,
    review_fpr: float = 0.01,
    decline_fpr: float = 0.001,
    progress: bool = True,
) -> TrainResult:
    """Fit a model on `history` and write it to `out_dir`.

    The last `valid_fraction` of the history's time span is the validation period:
    early stopping, metrics and thresholds come from it, never from a random split.
    Thresholds: DECLINE where at most `decline_fpr` of legitimate validation
    transactions would be declined, REVIEW likewise at `review_fpr`.
    """
    import lightgbm as lgb
    from tqdm import tqdm

    if len(history) < 100:
        raise ValueError(f"need at least 100 transactions to train, got {len(history)}")
    with tqdm(total=len(history), desc="features", unit="txn", disable=not progress, mininterval=0.5) as bar:
        X = replay_features(history, label_delay_ms=label_delay_ms, on_progress=bar.update)
    y = history.is_fraud.astype(np.float64)
    t = history.event_time_ms
    split_ms = int(t[0] + (1.0 - valid_fraction) * (t[-1] - t[0]))
    train_idx = t < split_ms
    valid_idx = ~train_idx
    if y[train_idx].sum() == 0 or y[valid_idx].sum() == 0:
        raise ValueError("both the training and the validation period need fraud examples; use a longer history")

    params: dict[str, Any] = {
        "objective": "binary",
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 40,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 2,
        "verbose": -1,
    }
    dtrain = lgb.Dataset(X[train_idx], y[train_idx], feature_name=list(FEATURE_NAMES),
                         categorical_feature=list(CATEGORICAL_FEATURES), free_raw_data=False,
                         params={"verbose": -1})
    dvalid = lgb.Dataset(X[valid_idx], y[valid_idx], reference=dtrain)
    with tqdm(total=num_boost_round, desc="boosting", unit="tree", disable=not progress) as bar:
        booster = lgb.train(
            params, dtrain, num_boost_round=num_boost_round, valid_sets=[dvalid], valid_names=["valid"],
            callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False), lambda env: bar.update(1)],
        )
    p_valid = np.asarray(booster.predict(X[valid_idx], num_iteration=booster.best_iteration), dtype=np.float64)
    yv = y[valid_idx]
    metrics = {
        "roc_auc": roc_auc(yv, p_valid),
        "average_precision": average_precision(yv, p_valid),
        "recall_at_fpr_0.1%": recall_at_fpr(yv, p_valid, 0.001),
        "recall_at_fpr_1%": recall_at_fpr(yv, p_valid, 0.01),
        "valid_fraud_rate": float(yv.mean()),
    }
    review = min(max(threshold_at_fpr(yv, p_valid, review_fpr), 0.0), 1.0)
    decline = min(max(threshold_at_fpr(yv, p_valid, decline_fpr), review), 1.0)
    thresholds = {"review": review, "decline": decline}

    out_dir.mkdir(parents=True, exist_ok=True)
    model_text = booster.model_to_string(num_iteration=booster.best_iteration)
    model_version = "gbm-" + hashlib.sha256(model_text.encode()).hexdigest()[:12]
    (out_dir / MODEL_FILE).write_text(model_text)
    manifest = {
        "model_version": model_version,
        "feature_set_version": FEATURE_SET_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "categorical_features": list(CATEGORICAL_FEATURES),
        "objective": "binary",
        "thresholds": thresholds,
        "threshold_policy": {"review_fpr": review_fpr, "decline_fpr": decline_fpr},
        "training": {
            "rows": int(train_idx.sum()),
            "validation_rows": int(valid_idx.sum()),
            "train_from": _iso(int(t[0])),
            "valid_from": _iso(split_ms),
            "valid_until": _iso(int(t[-1])),
            "fraud_rate": float(y.mean()),
            "label_delay_ms": label_delay_ms,
            "data_fingerprint": _fingerprint(history),
            "best_iteration": int(booster.best_iteration or booster.current_iteration()),
            "params": params,
        },
        "metrics": metrics,
        "versions": {"lightgbm": lgb.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "created_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
    }
    (out_dir / MANIFEST_FILE).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    write_report(out_dir, yv, p_valid, t[valid_idx], thresholds=Thresholds(review=review, decline=decline),
                 model_version=model_version, data="the validation period (held out from training)",
                 feature_importance=gain_importance(booster, iteration=booster.best_iteration))
    return TrainResult(out_dir=out_dir, model_version=model_version, metrics=metrics, thresholds=thresholds)
