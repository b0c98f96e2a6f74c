"""core.offline.train and core.model: what training writes, exact serving of it, and refusing unusable models."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ModelLoadError, TrainingError
from core.features import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURE_SET_VERSION
from core.history.simulate import simulate
from core.history.table import History
from core.history.times import iso_ms
from core.model import MANIFEST_FILE, MODEL_FILE, load_model_dir
from core.offline.evaluation import roc_auc
from core.offline.replay import replay_features
from core.offline.train import operating_thresholds, time_split, train

MANIFEST_KEYS = {
    "model_version", "feature_set_version", "feature_names", "categorical_features", "objective", "thresholds",
    "threshold_policy", "training", "metrics", "versions", "created_at", "id_key",
}


@pytest.fixture(scope="module")
def replayed(small_history: History) -> np.ndarray:
    return replay_features(small_history)


def manifest_of(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((path / MANIFEST_FILE).read_bytes())
    return data


def validation_rows(history: History, valid_fraction: float = 0.2) -> np.ndarray:
    """The validation period exactly as `train` cuts it: the last `valid_fraction` of the time span."""
    t = history.event_time_ms
    return t >= int(t[0] + (1.0 - valid_fraction) * (t[-1] - t[0]))


def test_the_model_directory_holds_the_model_and_its_manifest(model_dir: Path, small_history: History) -> None:
    assert (model_dir / MODEL_FILE).is_file()
    manifest = manifest_of(model_dir)
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["feature_set_version"] == FEATURE_SET_VERSION
    assert manifest["feature_names"] == list(FEATURE_NAMES)
    assert manifest["categorical_features"] == list(CATEGORICAL_FEATURES)
    assert manifest["objective"] == "binary"
    assert set(manifest["thresholds"]) == {"review", "decline"}
    assert manifest["threshold_policy"] == {"review_rate": 0.005, "decline_fpr": 0.001}
    assert set(manifest["metrics"]) >= {"roc_auc", "average_precision", "recall_at_fpr_1%", "recall_at_fpr_0.1%"}
    training = manifest["training"]
    valid = validation_rows(small_history)
    assert training["rows"] + training["validation_rows"] == len(small_history)
    assert training["validation_rows"] == int(valid.sum())
    assert training["gap_rows"] == 0
    assert training["train_until"] == training["valid_from"]
    assert training["best_iteration"] >= 1
    assert training["class_imbalance"] == {"fraud_weight": 1.0, "early_stopping_metric": "average_precision"}
    assert training["params"]["metric"] == ["average_precision"]
    assert training["data"] == {"source": "an in-memory history"}
    assert len(training["data_fingerprint"]) == 16
    assert set(manifest["versions"]) == {"python", "fraudscore", "lightgbm", "numpy", "numba", "pyarrow"}
    assert manifest["versions"]["lightgbm"] == lgb.__version__
    model = load_model_dir(model_dir)
    assert model.version == manifest["model_version"]
    assert model.manifest == manifest
    assert model.forest.feature_names == FEATURE_NAMES
    assert model.forest.num_trees == training["best_iteration"]


def test_the_numba_forest_matches_lightgbm_on_replayed_features(model_dir: Path, replayed: np.ndarray) -> None:
    forest = load_model_dir(model_dir).forest
    booster = lgb.Booster(model_file=str(model_dir / MODEL_FILE))
    assert np.isnan(replayed).any()  # missing values take LightGBM's default directions too
    expected = booster.predict(replayed, num_threads=1)
    np.testing.assert_allclose(forest.predict(replayed), expected, rtol=0, atol=1e-9)


def test_thresholds_hold_their_operating_points_on_the_validation_period(
    model_dir: Path, small_history: History, replayed: np.ndarray
) -> None:
    manifest = manifest_of(model_dir)
    review, decline = manifest["thresholds"]["review"], manifest["thresholds"]["decline"]
    assert 0.0 <= review <= decline <= 1.0
    valid = validation_rows(small_history)
    booster = lgb.Booster(model_file=str(model_dir / MODEL_FILE))
    p = booster.predict(replayed[valid], num_threads=1)
    y = small_history.is_fraud[valid]
    legit = p[y == 0]
    assert np.sum(legit >= decline) <= np.floor(0.001 * legit.size)
    in_review = (p >= review) & (p < decline)
    assert in_review.sum() <= 0.005 * p.size
    # Lowest such review threshold: one float lower, more than 0.5 % would land in REVIEW
    # (unless it was clamped at zero).
    if review > 0.0:
        lower = np.nextafter(review, -np.inf)
        assert np.sum((p >= lower) & (p < decline)) > 0.005 * p.size
    # The metrics in the manifest are the validation period's.
    metrics = manifest["metrics"]
    assert metrics["roc_auc"] == pytest.approx(roc_auc(y, p), abs=1e-9)
    assert metrics["valid_fraud_rate"] == pytest.approx(float(y.mean()))
    assert metrics["valid_review_rate"] == pytest.approx(float(in_review.mean()))
    assert metrics["valid_decline_fpr"] == pytest.approx(float(np.mean(legit >= decline)))
    assert metrics["valid_recall_decline"] == pytest.approx(float(np.mean(p[y == 1] >= decline)))


@settings(max_examples=200, deadline=None)
# Scores below 1: a threshold lives in [0, 1], so a legitimate row at exactly 1.0 could never be
# left undeclined (a sigmoid reaches 1.0 only past a raw score of ~37).
@given(scores=st.lists(st.sampled_from([0.0, 0.01, 0.2, 0.5, 0.9]) | st.floats(0, 1, exclude_max=True), min_size=1,
                       max_size=300),
       fraud_every=st.integers(1, 20),
       review_rate=st.floats(0, 0.5), decline_fpr=st.floats(0, 0.5))
def test_operating_thresholds_never_exceed_their_rates_and_are_the_lowest_that_do_not(
        scores: list[float], fraud_every: int, review_rate: float, decline_fpr: float) -> None:
    p = np.array(scores)
    y = (np.arange(p.size) % fraud_every == 0).astype(np.float64)
    t = operating_thresholds(y, p, review_rate=review_rate, decline_fpr=decline_fpr)
    assert 0.0 <= t.review <= t.decline <= 1.0
    legit = p[y == 0]
    declined = p >= t.decline
    if legit.size:
        assert np.sum(legit >= t.decline) <= decline_fpr * legit.size + 1e-9
    reviewed = (p >= t.review) & ~declined
    assert reviewed.sum() <= (review_rate + 1e-12) * p.size + 1e-9
    if 0.0 < t.review < t.decline:  # not clamped: one float lower admits too many
        lower = np.nextafter(t.review, -np.inf)
        assert np.sum((p >= lower) & ~declined) > review_rate * p.size


def test_time_split_defaults_to_the_last_fifth_and_honours_a_gap() -> None:
    t = np.arange(0, 1000, dtype=np.int64)
    default = time_split(t)
    assert default.valid_from_ms == default.train_until_ms == 799
    assert default.train.sum() == 799 and default.valid.sum() == 201 and not default.gap.any()
    gapped = time_split(t, valid_from_ms=600, train_until_ms=500)
    assert (gapped.train.sum(), gapped.gap.sum(), gapped.valid.sum()) == (500, 100, 400)
    assert not (gapped.train & gapped.valid).any()
    assert time_split(t, valid_from_ms=900).train_until_ms == 900
    only_until = time_split(t, train_until_ms=850)  # validation starts where training ends
    assert (only_until.valid_from_ms, only_until.train.sum(), only_until.valid.sum()) == (850, 850, 150)


@pytest.mark.parametrize(("valid_from", "train_until", "problem"), [
    (500, 600, "would train on the period that judges it"),
    (2000, None, "no validation rows"),
    (None, 0, "no training rows"),
    (950, None, "validation period holds 50 rows, fewer than 100"),
    (None, 50, "training period holds 50 rows, fewer than 100"),
])
def test_time_split_refuses_overlap_and_empty_sides(valid_from: int | None, train_until: int | None,
                                                    problem: str) -> None:
    with pytest.raises(TrainingError, match=problem) as caught:
        time_split(np.arange(0, 1000, dtype=np.int64), valid_from_ms=valid_from, train_until_ms=train_until)
    assert "1970-01-01T00:00:00" in str(caught.value) or "--train-until" in str(caught.value)


def test_training_windows_and_a_gap_are_written_to_the_manifest(tmp_path: Path) -> None:
    tiny = simulate(num_days=6, num_cards=150, num_merchants=68, seed=5, fraud_scale=5.0)
    day = 86_400_000
    start = int(tiny.event_time_ms[0])
    train(tiny, tmp_path / "m", valid_from_ms=start + 4 * day, train_until_ms=start + 3 * day,
          num_boost_round=5, early_stopping_rounds=5, progress=False)
    training = manifest_of(tmp_path / "m")["training"]
    t = tiny.event_time_ms
    assert training["rows"] == int(np.sum(t < start + 3 * day))
    assert training["gap_rows"] == int(np.sum((t >= start + 3 * day) & (t < start + 4 * day)))
    assert training["validation_rows"] == int(np.sum(t >= start + 4 * day))
    assert training["gap_rows"] > 0
    assert training["valid_from"] == iso_ms(start + 4 * day)
    assert training["train_until"] == iso_ms(start + 3 * day)


def test_a_fraud_weight_is_recorded_and_changes_the_model(tmp_path: Path) -> None:
    tiny = simulate(num_days=3, num_cards=150, num_merchants=68, seed=5, fraud_scale=5.0)
    plain = train(tiny, tmp_path / "a", num_boost_round=10, early_stopping_rounds=10, progress=False)
    weighted = train(tiny, tmp_path / "b", num_boost_round=10, early_stopping_rounds=10, fraud_weight=20.0,
                     progress=False)
    assert plain.model_version != weighted.model_version
    training = manifest_of(tmp_path / "b")["training"]
    assert training["class_imbalance"]["fraud_weight"] == 20.0
    assert training["params"]["scale_pos_weight"] == 20.0


def test_features_are_hashed_with_the_key_given_and_its_fingerprint_recorded(tmp_path: Path) -> None:
    from core.encode import KEY_SCHEME, KeyHasher

    tiny = simulate(num_days=3, num_cards=150, num_merchants=68, seed=5, fraud_scale=5.0)
    hasher = KeyHasher(b"a-serving-key-0123456789abcdef")
    train(tiny, tmp_path / "m", num_boost_round=10, early_stopping_rounds=5, hasher=hasher, progress=False)
    manifest = manifest_of(tmp_path / "m")
    assert manifest["id_key"] == {"scheme": KEY_SCHEME, "fingerprint": hasher.fingerprint}
    assert "a-serving-key" not in (tmp_path / "m" / MANIFEST_FILE).read_text()  # the fingerprint, never the key
    assert manifest_of(tmp_path / "m")["id_key"]["fingerprint"] != KeyHasher().fingerprint


def test_training_twice_with_the_same_seed_gives_the_same_model(tmp_path: Path) -> None:
    tiny = simulate(num_days=3, num_cards=150, num_merchants=68, seed=5, fraud_scale=5.0)  # ~700 rows
    first = train(tiny, tmp_path / "a", num_boost_round=10, early_stopping_rounds=5, progress=False)
    second = train(tiny, tmp_path / "b", num_boost_round=10, early_stopping_rounds=5, progress=False)
    assert first.metrics["roc_auc"] == first.metrics["roc_auc"]  # not NaN: both periods hold fraud
    assert (tmp_path / "a" / MODEL_FILE).read_bytes() == (tmp_path / "b" / MODEL_FILE).read_bytes()
    assert first.model_version == second.model_version
    assert first.thresholds == second.thresholds
    a, b = manifest_of(tmp_path / "a"), manifest_of(tmp_path / "b")
    assert {k: v for k, v in a.items() if k != "created_at"} == {k: v for k, v in b.items() if k != "created_at"}


def test_training_refuses_a_history_too_small_to_learn_from() -> None:
    tiny = simulate(num_days=1, num_cards=10, num_merchants=68, seed=1)
    with pytest.raises(TrainingError, match="at least 100 transactions"):
        train(tiny.slice(0, 50), Path("unused"), progress=False)


def test_training_refuses_a_period_without_fraud_saying_what_to_do(tmp_path: Path) -> None:
    tiny = simulate(num_days=3, num_cards=150, num_merchants=68, seed=5, fraud_scale=5.0)
    legit_only = History(**{**tiny.columns(), "is_fraud": np.where(
        tiny.event_time_ms >= int(tiny.event_time_ms[-1]) - 86_400_000, 0, tiny.is_fraud).astype(np.int8)})
    with pytest.raises(TrainingError, match=r"validation period .* holds no fraud.*--valid-from"):
        train(legit_only, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


# --- load_model_dir refusals ----------------------------------------------------------------------

def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest[key] = value
    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        del manifest[key]
    return edit


def _reversed_names(manifest: dict[str, Any]) -> None:
    manifest["feature_names"] = manifest["feature_names"][::-1]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        pytest.param(_set("feature_set_version", "fs-000000000000"), "retrain", id="wrong feature set version"),
        pytest.param(_drop("feature_set_version"), "retrain", id="no feature set version"),
        pytest.param(_reversed_names, "feature_names differ", id="feature names in another order"),
        pytest.param(_set("feature_names", list(FEATURE_NAMES[:-1])), "feature_names differ",
                     id="a feature missing"),
        pytest.param(_set("thresholds", {"review": 0.8, "decline": 0.3}), "review ≤ decline",
                     id="review above decline"),
        pytest.param(_set("thresholds", {"review": -0.1, "decline": 0.3}), "0 ≤ review", id="negative review"),
        pytest.param(_set("thresholds", {"review": 0.1, "decline": 1.5}), "decline ≤ 1", id="decline above 1"),
        pytest.param(_set("thresholds", {"review": 0.1}), "expected thresholds", id="no decline"),
        pytest.param(_set("thresholds", {"review": "low", "decline": 0.5}), "expected thresholds",
                     id="review not a number"),
        pytest.param(_set("thresholds", None), "expected thresholds", id="thresholds null"),
        pytest.param(_drop("thresholds"), "expected thresholds", id="no thresholds"),
    ],
)
def test_load_model_dir_refuses_a_bad_manifest(
    model_dir: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], problem: str
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    manifest = manifest_of(copy)
    edit(manifest)
    (copy / MANIFEST_FILE).write_bytes(orjson.dumps(manifest))
    with pytest.raises(ModelLoadError) as info:
        load_model_dir(copy)
    assert problem in info.value.reason
    assert str(copy) in info.value.path


def test_the_feature_set_refusal_says_what_was_found_and_what_to_do(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    manifest = manifest_of(copy)
    manifest["feature_set_version"] = "fs-old"
    (copy / MANIFEST_FILE).write_bytes(orjson.dumps(manifest))
    with pytest.raises(ModelLoadError) as info:
        load_model_dir(copy)
    assert "'fs-old'" in info.value.reason and FEATURE_SET_VERSION in info.value.reason
    assert "fraudscore train" in info.value.reason


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        pytest.param(lambda d: (d / MANIFEST_FILE).unlink(), "fraudscore train --out", id="no manifest"),
        pytest.param(lambda d: (d / MANIFEST_FILE).write_text("{not json"), "not valid JSON", id="manifest not JSON"),
        pytest.param(lambda d: (d / MANIFEST_FILE).write_text("[1, 2]"), "expected a JSON object",
                     id="manifest not an object"),
        pytest.param(lambda d: (d / MODEL_FILE).unlink(), "cannot read", id="no model file"),
    ],
)
def test_load_model_dir_refuses_a_damaged_directory(
    model_dir: Path, tmp_path: Path, damage: Callable[[Path], None], problem: str
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    damage(copy)
    with pytest.raises(ModelLoadError) as info:
        load_model_dir(copy)
    assert problem in info.value.reason


def test_the_untouched_copy_loads(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    assert load_model_dir(copy).version == load_model_dir(model_dir).version
