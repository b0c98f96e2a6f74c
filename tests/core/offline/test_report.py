"""core.offline.report: the files train and evaluate write, their numbers against core.offline.evaluation, top-k by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from core.features import FEATURE_NAMES
from core.model import MANIFEST_FILE, MODEL_FILE, Thresholds
from core.offline.evaluation import average_precision, recall_at_fpr, roc_auc
from core.offline.report import (
    HISTOGRAM_FILE,
    METRICS_FILE,
    PR_CURVE_FILE,
    REPORT_FILE,
    model_file_importance,
    operating_point,
    top_k_precision_by_day,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DAY_MS = 86_400_000
JAN_1_2026_MS = 1_767_225_600_000


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def assert_report_files(out: Path) -> dict[str, Any]:
    for png in (PR_CURVE_FILE, HISTOGRAM_FILE):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE
        assert (out / png).stat().st_size > 5_000  # a drawn figure, not an empty canvas
    report = (out / REPORT_FILE).read_text()
    assert report.startswith("# Model report: ")
    assert "what it means" in report and f"]({PR_CURVE_FILE})" in report
    metrics: dict[str, Any] = read_json(out / METRICS_FILE)
    return metrics


def test_top_k_precision_per_day_by_hand() -> None:
    t = np.array([0, 1, 2, 3, DAY_MS, DAY_MS + 1], dtype=np.int64) + JAN_1_2026_MS
    score = np.array([0.9, 0.8, 0.1, 0.7, 0.5, 0.6])
    y = np.array([1, 0, 0, 1, 0, 1])
    # Day 1 ranks 0.9 (fraud), 0.8, 0.7 (fraud), 0.1; day 2 ranks 0.6 (fraud), 0.5.
    assert top_k_precision_by_day(y, score, t, 1) == {"2026-01-01": 1.0, "2026-01-02": 1.0}
    assert top_k_precision_by_day(y, score, t, 2) == {"2026-01-01": 0.5, "2026-01-02": 0.5}
    assert top_k_precision_by_day(y, score, t, 3) == {"2026-01-01": 2 / 3, "2026-01-02": 0.5}
    assert top_k_precision_by_day(y, score, t, 100) == {"2026-01-01": 0.5, "2026-01-02": 0.5}


def test_top_k_alerts_equal_scores_in_time_order() -> None:
    t = np.arange(3, dtype=np.int64) + JAN_1_2026_MS
    assert top_k_precision_by_day(np.array([1, 0, 0]), np.full(3, 0.5), t, 1) == {"2026-01-01": 1.0}
    assert top_k_precision_by_day(np.array([0, 1, 0]), np.full(3, 0.5), t, 1) == {"2026-01-01": 0.0}


def test_operating_point_by_hand() -> None:
    y = np.array([1, 1, 0, 0, 0])
    score = np.array([0.9, 0.2, 0.8, 0.1, 0.3])
    op = operating_point(y, score, 0.5)  # flags 0.9 (fraud) and 0.8 (legitimate)
    assert op == {"threshold": 0.5, "flagged": 2, "flag_rate": 0.4, "precision": 0.5, "recall": 0.5,
                  "false_positive_rate": 1 / 3}
    assert math.isnan(operating_point(y, score, 0.95)["precision"])  # nothing flagged


def test_metrics_json_matches_core_evaluation(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 5_000
    y = (rng.random(n) < 0.03).astype(np.int8)
    score = np.clip(rng.normal(0.2 + 0.5 * y, 0.15), 0.0, 1.0)
    t = np.sort(rng.integers(0, 4 * DAY_MS, n)) + JAN_1_2026_MS
    thresholds = Thresholds(review=0.5, decline=0.8)
    returned = write_report(tmp_path, y, score, t, thresholds=thresholds, model_version="gbm-test", data="random")
    metrics = assert_report_files(tmp_path)
    assert metrics == orjson.loads(orjson.dumps(returned))
    assert metrics["model_version"] == "gbm-test" and metrics["transactions"] == n
    assert metrics["fraud"] == int(y.sum())
    assert metrics["roc_auc"] == roc_auc(y, score)
    assert metrics["average_precision"] == average_precision(y, score)
    assert metrics["recall_at_fpr_0.1%"] == recall_at_fpr(y, score, 0.001)
    assert metrics["recall_at_fpr_1%"] == recall_at_fpr(y, score, 0.01)
    assert metrics["operating_points"]["review"] == operating_point(y, score, 0.5)
    assert metrics["operating_points"]["decline"] == operating_point(y, score, 0.8)
    assert set(metrics["top_k_precision_per_day"]) == {"10", "50", "100"}
    assert metrics["top_k_precision_per_day"]["50"] == top_k_precision_by_day(y, score, t, 50)
    assert len(metrics["top_k_precision_per_day"]["10"]) == 4
    assert metrics["feature_importance_gain"] is None
    assert "Feature importance" not in (tmp_path / REPORT_FILE).read_text()


def test_one_class_only_gives_nulls_not_a_crash(tmp_path: Path) -> None:
    t = np.arange(50, dtype=np.int64) + JAN_1_2026_MS
    write_report(tmp_path, np.zeros(50), np.linspace(0, 1, 50), t, thresholds=Thresholds(0.5, 0.9),
                 model_version="gbm-test", data="no fraud")
    metrics = assert_report_files(tmp_path)
    assert metrics["roc_auc"] is None and metrics["average_precision"] is None
    assert "| ROC AUC | n/a |" in (tmp_path / REPORT_FILE).read_text()


def test_training_writes_the_report_of_its_validation_period(model_dir: Path) -> None:
    metrics = assert_report_files(model_dir)
    manifest = read_json(model_dir / MANIFEST_FILE)
    assert metrics["model_version"] == manifest["model_version"]
    assert metrics["transactions"] == manifest["training"]["validation_rows"]
    for name in ("roc_auc", "average_precision", "recall_at_fpr_0.1%", "recall_at_fpr_1%"):
        assert metrics[name] == manifest["metrics"][name]
    assert metrics["operating_points"]["review"]["threshold"] == manifest["thresholds"]["review"]
    # The review threshold holds its 1 % false-positive rate on the period it was calibrated on.
    assert metrics["operating_points"]["review"]["false_positive_rate"] <= 0.01
    importance = metrics["feature_importance_gain"]
    assert 0 < len(importance) <= 20 and set(importance) <= set(FEATURE_NAMES)
    shares = list(importance.values())
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1.0 + 1e-9
    # The saved model (cut at the best iteration) gives the same importance, as evaluate reads it.
    assert model_file_importance(model_dir / MODEL_FILE) == pytest.approx(importance)
    report = (model_dir / REPORT_FILE).read_text()
    assert "the validation period" in report and f"`{next(iter(importance))}`" in report
