"""core.forest.layout, .packing and .bitvector against LightGBM: both step-2 variants, every
block boundary, both mask widths, and the models the layout refuses."""

from __future__ import annotations

from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.forest import Forest
from core.forest import bitvector as bv
from core.forest.layout import MAX_BIN, ForestLayout, LayoutUnsupported, build_layout
from core.forest.packing import pack
from core.forest.parser import parse_model
from tests.core.forest.test_forest import (
    CATEGORY_PROBES,
    FEW,
    MODELS,
    TINY,
    FloatArray,
    edge_values,
    feature_matrix,
    handmade_model,
    labels,
    numerical_thresholds,
    probe_rows,
    train,
)

KERNELS = [bv.scores_loop] + ([bv.scores_permute] if bv.byte_permute_supported(1) else [])
# Row counts around the 8-row block: the one-row path, a full block, and blocks plus tails.
BATCHES = (1, 2, 7, 8, 9, 16, 17)


def layout_of(text: str) -> ForestLayout:
    parsed = parse_model(text, source="<test>")
    return build_layout(parsed.arrays, parsed.num_features)


def assert_kernels_match_lightgbm(text: str, X: FloatArray) -> ForestLayout:
    """Every kernel variant, whole batch and sliced into every block shape, equals LightGBM."""
    parsed = parse_model(text, source="<test>")
    layout = build_layout(parsed.arrays, parsed.num_features)
    divisor = float(parsed.arrays.num_trees) if parsed.average_output else 1.0
    blob = pack(layout, divisor=divisor, sigmoid=parsed.objective.sigmoid)
    booster = lgb.Booster(model_str=text)
    expected_raw = booster.predict(X, raw_score=True, num_threads=1)
    expected = booster.predict(X, num_threads=1)
    for kernel in KERNELS:
        if kernel is bv.scores_permute and not bv.byte_permute_supported(layout.num_columns):
            continue
        raw = np.empty(X.shape[0])
        kernel(X, blob, raw, False)
        np.testing.assert_array_equal(raw, expected_raw, err_msg=kernel.__name__)  # bit-identical sums
        out = np.empty(X.shape[0])
        kernel(X, blob, out, True)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12, err_msg=kernel.__name__)
        for n in BATCHES:
            part = np.ascontiguousarray(X[:n])
            got = np.empty(part.shape[0])
            kernel(part, blob, got, False)
            np.testing.assert_array_equal(got, expected_raw[:n], err_msg=f"{kernel.__name__}, {n} rows")
    return layout


@MODELS
@given(
    seed=st.integers(0, 2**32 - 1),
    objective=st.sampled_from(["binary", "regression"]),
    n_features=st.integers(1, 8),
    num_leaves=st.sampled_from([2, 3, 16, 31, 32, 33, 63, 64]),
    rounds=st.integers(1, 40),
    use_missing=st.booleans(),
    zero_as_missing=st.booleans(),
    special_fraction=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_numerical_models(
    seed: int, objective: str, n_features: int, num_leaves: int, rounds: int, use_missing: bool,
    zero_as_missing: bool, special_fraction: float,
) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    X = feature_matrix(rng, 400, n_features, special_fraction)
    params = {
        "objective": objective, "num_leaves": num_leaves, "min_data_in_leaf": 2, "min_data_in_bin": 1,
        "use_missing": use_missing, "zero_as_missing": zero_as_missing,
    }  # fmt: skip
    text = train(X, labels(rng, X, objective), params, rounds)
    layout = assert_kernels_match_lightgbm(text, probe_rows(X, edge_values(numerical_thresholds(text)), rng, 100))
    leaves = np.diff(layout.tree_leaf_start)
    assert layout.lanes == (16 if leaves.max() <= 32 else 8)


@MODELS
@given(
    seed=st.integers(0, 2**32 - 1),
    n_categories=st.integers(2, 150),
    rounds=st.integers(1, 20),
    max_cat_to_onehot=st.sampled_from([1, 4, 64]),
    use_missing=st.booleans(),
)
def test_categorical_models(seed: int, n_categories: int, rounds: int, max_cat_to_onehot: int, use_missing: bool) -> None:
    rng = np.random.default_rng(seed)
    categories = rng.integers(0, n_categories, size=(300, 2)).astype(np.float64)
    categories[rng.random(categories.shape) < 0.1] = np.nan
    X = np.column_stack([categories, rng.normal(size=300)])
    effect = rng.normal(size=n_categories + 1)
    y = effect[np.nan_to_num(categories[:, 0], nan=n_categories).astype(int)] + 0.5 * X[:, 2]
    params = {
        "objective": "regression", "num_leaves": 15, "min_data_in_leaf": 2, "min_data_per_group": 1,
        "cat_smooth": 0.0, "cat_l2": 0.0, "min_data_in_bin": 1, "max_cat_to_onehot": max_cat_to_onehot,
        "use_missing": use_missing,
    }  # fmt: skip
    text = train(X, y, params, rounds, categorical=[0, 1])
    probes = np.concatenate([CATEGORY_PROBES, np.arange(n_categories + 70, dtype=np.float64), [-0.5, 0.5, 1e-40]])
    assert_kernels_match_lightgbm(text, probe_rows(X, probes, rng, 100))


@pytest.mark.parametrize("decision_type", [0, 2, 4, 6, 8, 10])
@pytest.mark.parametrize("threshold", [np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-36, -2e-35, 1.5])
def test_every_missing_rule_and_odd_threshold(decision_type: int, threshold: float) -> None:
    # NaN thresholds and +inf with the default to the right become predicate columns.
    text = handmade_model([decision_type, decision_type], [threshold, threshold])
    values = np.array([*TINY, *(-v for v in TINY), np.nan, np.inf, -np.inf, 1.5, np.nextafter(1.5, 2), -7.0])
    grid = np.array(np.meshgrid(values, values)).reshape(2, -1).T.copy()
    assert_kernels_match_lightgbm(text, grid)


@pytest.mark.parametrize("decision_type", [1, 3, 5, 7, 9, 11])
def test_category_codes_cover_absent_negative_and_huge_values(decision_type: int) -> None:
    # Set 0 holds categories 0, 5, 31, 32 and 63; set 1 holds category 1 only.
    text = handmade_model([decision_type, decision_type], [0.0, 1.0], cat_words=f"{1 | 1 << 5 | 1 << 31} {1 | 1 << 31}|2")
    values = np.concatenate([CATEGORY_PROBES, np.arange(-3, 70, dtype=np.float64), [5.5, 4.999, 1e-40, -1e-40]])
    grid = np.array(np.meshgrid(values, values)).reshape(2, -1).T.copy()
    layout = assert_kernels_match_lightgbm(text, grid)
    # One code table per feature: feature 0 knows its set's categories, feature 1 its own.
    assert layout.category_values.tolist() == [0, 5, 31, 32, 63, 1]


def test_single_leaf_trees_and_average_output() -> None:
    rng = np.random.default_rng(5)
    X = feature_matrix(rng, 80, 3, 0.1)
    single = train(X, labels(rng, X, "regression"), {"objective": "regression", "min_data_in_leaf": 100}, 3)
    assert "num_leaves=1\n" in single
    assert_kernels_match_lightgbm(single, probe_rows(X, edge_values([]), rng))
    params = {"objective": "binary", "boosting": "rf", "bagging_fraction": 0.6, "bagging_freq": 1, "num_leaves": 8}
    forest = train(X, labels(rng, X, "binary"), params, 21)  # 21 trees: the last group is partly padding
    assert "\naverage_output\n" in forest
    assert_kernels_match_lightgbm(forest, probe_rows(X, edge_values(numerical_thresholds(forest)), rng))


def test_a_view_with_more_than_255_thresholds_spans_several_columns() -> None:
    rng = np.random.default_rng(9)
    X = rng.normal(size=(3000, 1))
    text = train(X, X[:, 0] + 0.1 * rng.normal(size=3000), {"objective": "regression", "max_bin": 1023}, 60)
    thresholds = set(numerical_thresholds(text))
    assert len(thresholds) > MAX_BIN
    layout = assert_kernels_match_lightgbm(text, probe_rows(X, edge_values(sorted(thresholds)), rng))
    assert layout.numeric_view.shape[0] >= 2


def test_trees_of_more_than_64_leaves_fall_back_to_the_tree_walk() -> None:
    rng = np.random.default_rng(4)
    X = feature_matrix(rng, 600, 4, 0.05)
    text = train(X, labels(rng, X, "regression"), {"objective": "regression", "num_leaves": 100, "min_data_in_leaf": 1}, 3)
    with pytest.raises(LayoutUnsupported, match="leaves"):
        layout_of(text)
    forest = Forest.from_string(text)
    reference = lgb.Booster(model_str=text)
    np.testing.assert_array_equal(forest.raw_score(X), reference.predict(X, raw_score=True, num_threads=1))


def test_byte_permute_needs_column_ids_that_fit_a_byte() -> None:
    assert not bv.byte_permute_supported(bv.PERMUTE_COLUMNS + 1)


@FEW
@given(data=st.data())
def test_empty_and_strided_batches(data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    X = feature_matrix(rng, 200, 3, 0.1)
    text = train(X, labels(rng, X, "binary"), {"objective": "binary", "num_leaves": 7}, 12)
    forest = Forest.from_string(text)
    assert forest.predict(np.empty((0, 3))).shape == (0,)
    rows = data.draw(st.integers(1, 40))
    strided = np.asfortranarray(X[:rows])
    expected: Any = lgb.Booster(model_str=text).predict(X[:rows], num_threads=1)
    np.testing.assert_allclose(forest.predict(strided), expected, rtol=0, atol=1e-12)
