"""Forest.contributions against LightGBM's own `predict(X, pred_contrib=True)`: random models,
edge inputs, every missing type, categorical splits, single-leaf trees, and row sums."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InvalidInputError, ModelLoadError
from core.forest import Forest
from tests.core.forest.lightgbm_models import (
    ZERO_THRESHOLD,
    FloatArray,
    categorical_model,
    feature_matrix,
    labels,
    numerical_thresholds,
    train,
)

TOLERANCE = 1e-9
# database=None: no .hypothesis/ directory in the repository; deadline=None: training time varies.
MODELS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])




def assert_contributions_match(text: str, X: FloatArray) -> Forest:
    """Forest.contributions(X) is LightGBM's pred_contrib to TOLERANCE; rows sum to the raw score."""
    forest = Forest.from_string(text)
    booster = lgb.Booster(model_str=text)
    expected = np.asarray(booster.predict(X, pred_contrib=True, num_threads=1))
    got = forest.contributions(X)
    assert got.dtype == np.float64
    assert got.shape == expected.shape == (X.shape[0], forest.num_features + 1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    # The expected value is summed in LightGBM's order, so it is the same to the bit.
    np.testing.assert_array_equal(got[:, -1], expected[:, -1])
    # In raw-score space (log-odds for binary), as LightGBM's are.
    raw = booster.predict(X, raw_score=True, num_threads=1)
    np.testing.assert_allclose(got.sum(axis=1), raw, rtol=0, atol=TOLERANCE)
    return forest



def edge_values(thresholds: list[float], rng: np.random.Generator, most: int = 20) -> FloatArray:
    """NaN, infinities, signed zeros, values around kZeroThreshold, and values at and next to
    (a sample of) the split thresholds."""
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e300, -1e300, 1e-36, -1e-36, ZERO_THRESHOLD, -ZERO_THRESHOLD]
    sample = rng.permutation(np.array(thresholds, dtype=np.float64))[:most]
    with np.errstate(over="ignore"):  # thresholds of +-DBL_MAX appear when training saw inf
        special += [*sample, *np.nextafter(sample, np.inf), *np.nextafter(sample, -np.inf)]
    return np.array(special, dtype=np.float64)


def probe_rows(X_train: FloatArray, values: FloatArray, rng: np.random.Generator) -> FloatArray:
    """Some training rows, rows with edge and out-of-range values mixed into random columns, and
    each edge value alone in each column (the others 0)."""
    n_features = X_train.shape[1]
    finite = X_train[np.isfinite(X_train)]
    span = float(np.abs(finite).max()) if finite.size else 1.0
    pool = np.concatenate([values, rng.uniform(-3 * span - 1, 3 * span + 1, size=30)])
    mixed = X_train[rng.integers(0, X_train.shape[0], size=100)].copy()
    mask = rng.random(mixed.shape) < 0.5
    mixed[mask] = rng.choice(pool, size=int(mask.sum()))
    single = np.zeros((values.shape[0] * n_features, n_features))
    for column in range(n_features):
        single[column * values.shape[0] : (column + 1) * values.shape[0], column] = values
    return np.ascontiguousarray(np.vstack([X_train[:60], mixed, single]))




@MODELS
@given(
    seed=st.integers(0, 2**32 - 1),
    objective=st.sampled_from(["binary", "regression"]),
    n_rows=st.integers(10, 300),
    n_features=st.integers(1, 6),
    num_leaves=st.integers(2, 31),
    rounds=st.integers(1, 30),
    min_data_in_leaf=st.sampled_from([1, 3, 10, 1000]),
    use_missing=st.booleans(),
    zero_as_missing=st.booleans(),
    max_bin=st.sampled_from([3, 15, 255]),
    special_fraction=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_numerical_models_match_lightgbm(
    seed: int,
    objective: str,
    n_rows: int,
    n_features: int,
    num_leaves: int,
    rounds: int,
    min_data_in_leaf: int,
    use_missing: bool,
    zero_as_missing: bool,
    max_bin: int,
    special_fraction: float,
) -> None:
    rng = np.random.default_rng(seed)
    X = feature_matrix(rng, n_rows, n_features, special_fraction)
    params = {
        "objective": objective,
        "num_leaves": num_leaves,
        "min_data_in_leaf": min_data_in_leaf,
        "min_data_in_bin": 1,
        "min_sum_hessian_in_leaf": 0.0,
        "use_missing": use_missing,
        "zero_as_missing": zero_as_missing,
        "max_bin": max_bin,
    }
    text = train(X, labels(rng, X, objective), params, rounds)
    assert_contributions_match(text, probe_rows(X, edge_values(numerical_thresholds(text), rng), rng))


CATEGORY_PROBES = np.array(
    [
        *(np.nan, np.inf, -np.inf, -1.0, -0.5, -1e-300, -0.0, 0.0, 0.5, 0.999, 1.5, 31.0, 32.0, 33.0, 63.9, 64.0),
        *(1e9, 2.0**31 - 1, 2.0**31, 2.0**32, 1e300, -(2.0**31), -1e300),
    ]
)


@MODELS
@given(
    seed=st.integers(0, 2**32 - 1),
    objective=st.sampled_from(["binary", "regression"]),
    n_rows=st.integers(20, 300),
    n_categories=st.integers(2, 90),
    rounds=st.integers(1, 20),
    max_cat_to_onehot=st.sampled_from([1, 4, 64]),
    use_missing=st.booleans(),
    nan_fraction=st.sampled_from([0.0, 0.1]),
)
def test_categorical_models_match_lightgbm(
    seed: int,
    objective: str,
    n_rows: int,
    n_categories: int,
    rounds: int,
    max_cat_to_onehot: int,
    use_missing: bool,
    nan_fraction: float,
) -> None:
    rng = np.random.default_rng(seed)
    text, X = categorical_model(rng, objective, n_rows, n_categories, rounds, max_cat_to_onehot, use_missing,
                                nan_fraction)
    probes = np.concatenate([CATEGORY_PROBES, np.arange(n_categories + 5, dtype=np.float64)])
    values = np.concatenate([probes, edge_values(numerical_thresholds(text), rng)])
    assert_contributions_match(text, probe_rows(X, values, rng))


@pytest.mark.parametrize(
    ("n_features", "num_leaves", "rounds"),
    [
        (40, 255, 4),  # paths with up to ~20 distinct features: several blocks of quadrature points
        (3, 120, 3),  # few features, deep trees: the same feature split on again and again
        (8, 63, 200),  # many trees
    ],
)
def test_deep_and_long_models_match_lightgbm(n_features: int, num_leaves: int, rounds: int) -> None:
    rng = np.random.default_rng(num_leaves)
    X = feature_matrix(rng, 3000, n_features, 0.05)
    params = {"objective": "regression", "num_leaves": num_leaves, "min_data_in_leaf": 1, "min_sum_hessian_in_leaf": 0.0}
    text = train(X, labels(rng, X, "regression") ** 3, params, rounds)
    assert_contributions_match(text, np.ascontiguousarray(X[:40]))


@pytest.mark.parametrize("objective", ["binary", "regression"])
def test_random_forest_matches_lightgbm(objective: str) -> None:
    rng = np.random.default_rng(3)
    X = feature_matrix(rng, 300, 4, 0.05)
    params = {"objective": objective, "boosting": "rf", "bagging_fraction": 0.6, "bagging_freq": 1, "num_leaves": 8}
    text = train(X, labels(rng, X, objective), params, 12)
    assert "\naverage_output\n" in text
    assert_contributions_match(text, probe_rows(X, edge_values(numerical_thresholds(text), rng), rng))


def test_single_leaf_trees_between_split_trees() -> None:
    rng = np.random.default_rng(5)
    X = feature_matrix(rng, 60, 3, 0.1)
    text = train(X, labels(rng, X, "regression"), {"objective": "regression", "num_leaves": 4}, 5)
    single = train(X, labels(rng, X, "regression"), {"objective": "regression", "min_data_in_leaf": 100}, 3)
    assert "num_leaves=1\n" in single
    forest = assert_contributions_match(single, probe_rows(X, edge_values([], rng), rng))
    np.testing.assert_array_equal(forest.contributions(X)[:, :-1], 0.0)
    one_leaf = single[single.index("Tree=0") : single.index("end of trees")].replace("Tree=0", "Tree=2")
    head, tail = text.split("Tree=2\n", 1)
    tail = re.sub(r"^Tree=(\d+)$", lambda m: f"Tree={int(m.group(1)) + 1}", "Tree=2\n" + tail, flags=re.M)
    spliced = re.sub(r"^tree_sizes=.*\n", "", head + one_leaf + tail, flags=re.M)
    assert_contributions_match(spliced, probe_rows(X, edge_values(numerical_thresholds(spliced), rng), rng))


def handmade_model(decision_types: list[int], thresholds: list[float], cat_words: str = "") -> str:
    """Two features, one tree: node 0 splits feature 0, node 1 splits feature 1, node 2 feature 0
    again (so a feature repeats on a path), with uneven counts."""
    num_cat = cat_words.count("|") + 1 if cat_words else 0
    cat_lines = ""
    if num_cat:
        words = [w.split() for w in cat_words.split("|")]
        bounds = np.cumsum([0] + [len(w) for w in words])
        cat_lines = f"cat_boundaries={' '.join(map(str, bounds))}\ncat_threshold={' '.join(w for ws in words for w in ws)}\n"
    return (
        "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nlabel_index=0\nmax_feature_idx=1\n"
        "objective=regression\nfeature_names=a b\nfeature_infos=none none\n\n"
        f"Tree=0\nnum_leaves=4\nnum_cat={num_cat}\nsplit_feature=0 1 0\nsplit_gain=1 1 1\n"
        f"threshold={' '.join(repr(t) for t in thresholds)}\n"
        f"decision_type={' '.join(map(str, decision_types))}\n"
        "left_child=-1 2 -2\nright_child=1 -4 -3\nleaf_value=1 2 4 -3\nleaf_weight=1 1 1 1\nleaf_count=7 3 2 5\n"
        f"internal_value=0 0 0\ninternal_weight=17 10 5\ninternal_count=17 10 5\n{cat_lines}is_linear=0\nshrinkage=1\n\n\n"
        "end of trees\n"
    )


TINY = [5e-36, -5e-36, 0.0, -0.0, ZERO_THRESHOLD, -ZERO_THRESHOLD, 1e-35, 2e-35, 1e-300, 1.0, -1.0, 7.0]


@pytest.mark.parametrize("decision_type", [0, 2, 4, 6, 8, 10])
@pytest.mark.parametrize("threshold", [5e-36, 0.0, -ZERO_THRESHOLD, 1e-35, 0.5])
def test_missing_types_on_handmade_splits(decision_type: int, threshold: float) -> None:
    text = handmade_model([decision_type, decision_type, decision_type], [threshold, threshold, threshold + 1.0])
    values = np.array([*TINY, *(-v for v in TINY), np.nan, np.inf, -np.inf, np.nextafter(threshold, 1), threshold + 1.0])
    grid = np.array(np.meshgrid(values, values)).reshape(2, -1).T.copy()
    assert_contributions_match(text, grid)


@pytest.mark.parametrize("decision_type", [1, 3, 5, 9])
def test_categorical_bitsets_on_handmade_splits(decision_type: int) -> None:
    # Set 0 holds categories 0, 5, 31, 32 and 63; set 1 category 1; set 2 categories 2 and 5.
    words = f"{1 | 1 << 5 | 1 << 31} {1 | 1 << 31}|2|{1 << 2 | 1 << 5}"
    text = handmade_model([decision_type, decision_type, decision_type], [0.0, 1.0, 2.0], cat_words=words)
    values = np.concatenate([CATEGORY_PROBES, np.arange(-3, 70, dtype=np.float64), [5.5, 4.999, 1e-40, -1e-40]])
    grid = np.array(np.meshgrid(values, values)).reshape(2, -1).T.copy()
    assert_contributions_match(text, grid)


def test_service_model_matches_lightgbm(model_dir: Path) -> None:
    # The service's kind of model (trained by the suite's fixture, since a fresh clone has no models/).
    text = (model_dir / "model.txt").read_text()
    forest = Forest.from_string(text)
    rng = np.random.default_rng(8)
    X = rng.normal(size=(30, forest.num_features)) * rng.choice([0.0, 1.0, 10.0, 1000.0], size=(30, forest.num_features))
    X[rng.random(X.shape) < 0.1] = np.nan
    assert_contributions_match(text, X)


def test_batches_and_input_checks() -> None:
    rng = np.random.default_rng(1)
    X = feature_matrix(rng, 200, 4, 0.05)
    forest = Forest.from_string(train(X, labels(rng, X, "binary"), {"objective": "binary", "num_leaves": 7}, 8))
    expected = forest.contributions(X)
    # A row alone, a batch, Fortran order and a read-only array give the same bits.
    np.testing.assert_array_equal(forest.contributions(X[3:4]), expected[3:4])
    np.testing.assert_array_equal(forest.contributions(np.asfortranarray(X)), expected)
    read_only = X.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(forest.contributions(read_only), expected)
    assert forest.contributions(np.empty((0, 4))).shape == (0, 5)
    for bad, rule in [(X.astype(np.float32), "dtype float64"), (X[0], "2-D"), (X[:, :3], "4 columns")]:
        with pytest.raises(InvalidInputError, match=rule):
            forest.contributions(bad)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: re.sub(r"^leaf_count=.*\n", "", t, count=1, flags=re.M), "leaf_count"),
        (lambda t: re.sub(r"^internal_count=\S+", "internal_count=-4", t, count=1, flags=re.M), "internal_count"),
        (lambda t: re.sub(r"^leaf_count=\S+", "leaf_count=4294967296", t, count=1, flags=re.M), "leaf_count"),
    ],
)
def test_unusable_row_counts_are_refused(edit: Any, message: str) -> None:
    text = handmade_model([0, 0, 0], [0.0, 0.0, 1.0])
    Forest.from_string(text)
    with pytest.raises(ModelLoadError, match=message):
        Forest.from_string(edit(text))
