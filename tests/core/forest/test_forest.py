"""core.forest against LightGBM itself: random models, edge inputs, and unusable files."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InvalidInputError, ModelLoadError
from core.forest import Forest, load_forest
from tests.core.forest.lightgbm_models import (
    ZERO_THRESHOLD,
    FloatArray,
    categorical_model,
    feature_matrix,
    labels,
    numerical_thresholds,
    train,
)

PREDICT_TOLERANCE = 1e-12
ATTRIBUTION_TOLERANCE = 1e-9
REPO_ROOT = Path(__file__).resolve().parents[3]

# database=None: no .hypothesis/ directory in the repository; deadline=None: training time varies.
MODELS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, database=None)




def assert_matches_lightgbm(text: str, X: FloatArray) -> Forest:
    """Score X with Forest and with a Booster loaded from the same text; they must agree."""
    forest = Forest.from_string(text)
    reference = lgb.Booster(model_str=text)
    expected = reference.predict(X, num_threads=1)
    expected_raw = reference.predict(X, raw_score=True, num_threads=1)
    np.testing.assert_allclose(forest.predict(X), expected, rtol=0, atol=PREDICT_TOLERANCE)
    raw = forest.raw_score(X)
    np.testing.assert_allclose(raw, expected_raw, rtol=0, atol=PREDICT_TOLERANCE)
    attributions = forest.path_attributions(X)
    assert attributions.shape == (X.shape[0], forest.num_features + 1)
    np.testing.assert_allclose(attributions.sum(axis=1), raw, rtol=0, atol=ATTRIBUTION_TOLERANCE)
    return forest



def edge_values(thresholds: list[float]) -> FloatArray:
    """Values where a wrong comparison, missing-value rule or zero rule would show."""
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e300, -1e300, 1e-36, -1e-36, 1e-35, -1e-35]
    special += [ZERO_THRESHOLD, -ZERO_THRESHOLD, np.nextafter(ZERO_THRESHOLD, 1), -np.nextafter(ZERO_THRESHOLD, 1)]
    for threshold in thresholds:
        with np.errstate(over="ignore"):  # thresholds of +-DBL_MAX appear when training saw inf
            special += [threshold, np.nextafter(threshold, np.inf), np.nextafter(threshold, -np.inf)]
    return np.array(special, dtype=np.float64)


def probe_rows(X_train: FloatArray, values: FloatArray, rng: np.random.Generator, n_random: int = 200) -> FloatArray:
    """Training rows, then rows mixing edge values and out-of-range values into random columns."""
    n_features = X_train.shape[1]
    finite = X_train[np.isfinite(X_train)]
    span = float(np.abs(finite).max()) if finite.size else 1.0
    pool = np.concatenate([values, rng.uniform(-3 * span - 1, 3 * span + 1, size=50)])
    random_rows = X_train[rng.integers(0, X_train.shape[0], size=n_random)].copy()
    mask = rng.random(random_rows.shape) < 0.5
    random_rows[mask] = rng.choice(pool, size=int(mask.sum()))
    # Each edge value alone in each column, the other columns at 0: isolates one decision.
    single = np.zeros((values.shape[0] * n_features, n_features))
    for column in range(n_features):
        single[column * values.shape[0] : (column + 1) * values.shape[0], column] = values
    return np.ascontiguousarray(np.vstack([X_train, random_rows, single]))




@MODELS
@given(
    seed=st.integers(0, 2**32 - 1),
    objective=st.sampled_from(["binary", "regression", "regression_l1", "huber"]),
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
    assert_matches_lightgbm(text, probe_rows(X, edge_values(numerical_thresholds(text)), rng))


CATEGORY_PROBES = np.array(
    [
        *(np.nan, np.inf, -np.inf, -1.0, -0.5, -1e-300, -0.0, 0.0, 0.5, 0.999, 1.5, 31.0, 32.0, 33.0, 63.9, 64.0),
        *(1e9, 2.0**31 - 1, 2.0**31, 2.0**32, 2.0**32 + 5, 1e300, -(2.0**31), -(2.0**31) - 1, -1e300),
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
    probes = np.concatenate([CATEGORY_PROBES, np.arange(n_categories + 40, dtype=np.float64)])
    values = np.concatenate([probes, edge_values(numerical_thresholds(text))])
    assert_matches_lightgbm(text, probe_rows(X, values, rng))


@pytest.mark.parametrize("objective", ["binary", "regression"])
def test_random_forest_averages_predict_but_not_raw_score(objective: str) -> None:
    rng = np.random.default_rng(3)
    X = feature_matrix(rng, 300, 4, 0.05)
    params = {"objective": objective, "boosting": "rf", "bagging_fraction": 0.6, "bagging_freq": 1, "num_leaves": 8}
    text = train(X, labels(rng, X, objective), params, 12)
    assert "\naverage_output\n" in text
    assert_matches_lightgbm(text, probe_rows(X, edge_values(numerical_thresholds(text)), rng))


def test_single_leaf_trees_between_split_trees() -> None:
    rng = np.random.default_rng(5)
    X = feature_matrix(rng, 60, 3, 0.1)
    text = train(X, labels(rng, X, "regression"), {"objective": "regression", "num_leaves": 4}, 5)
    single = train(X, labels(rng, X, "regression"), {"objective": "regression", "min_data_in_leaf": 100}, 3)
    assert "num_leaves=1\n" in single
    forest = assert_matches_lightgbm(single, probe_rows(X, edge_values([]), rng))
    assert forest.num_trees == single.count("\nTree=")
    # Splice the single-leaf tree into the middle of a model with splits.
    one_leaf = single[single.index("Tree=0") : single.index("end of trees")].replace("Tree=0", "Tree=2")
    head, tail = text.split("Tree=2\n", 1)
    tail = re.sub(r"^Tree=(\d+)$", lambda m: f"Tree={int(m.group(1)) + 1}", "Tree=2\n" + tail, flags=re.M)
    spliced = re.sub(r"^tree_sizes=.*\n", "", head + one_leaf + tail, flags=re.M)
    assert_matches_lightgbm(spliced, probe_rows(X, edge_values(numerical_thresholds(spliced)), rng))


def handmade_model(decision_types: list[int], thresholds: list[float], cat_words: str = "") -> str:
    """A two-feature, one-tree regression model: node 0 splits feature 0, node 1 feature 1."""
    num_cat = cat_words.count("|") + 1 if cat_words else 0
    cat_lines = ""
    if num_cat:
        words = [w.split() for w in cat_words.split("|")]
        bounds = np.cumsum([0] + [len(w) for w in words])
        cat_lines = f"cat_boundaries={' '.join(map(str, bounds))}\ncat_threshold={' '.join(w for ws in words for w in ws)}\n"
    return (
        "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nlabel_index=0\nmax_feature_idx=1\n"
        "objective=regression\nfeature_names=a b\nfeature_infos=none none\n\n"
        f"Tree=0\nnum_leaves=3\nnum_cat={num_cat}\nsplit_feature=0 1\nsplit_gain=1 1\n"
        f"threshold={' '.join(repr(t) for t in thresholds)}\n"
        f"decision_type={' '.join(map(str, decision_types))}\n"
        "left_child=-1 -2\nright_child=1 -3\nleaf_value=1 2 4\nleaf_weight=1 1 1\nleaf_count=1 1 1\n"
        f"internal_value=0.5 3\ninternal_weight=3 2\ninternal_count=3 2\n{cat_lines}is_linear=0\nshrinkage=1\n\n\n"
        "end of trees\n"
    )


TINY = [5e-36, -5e-36, 0.0, -0.0, ZERO_THRESHOLD, -ZERO_THRESHOLD, 1e-35, 2e-35, -2e-35, 1e-300, 1.0]


@pytest.mark.parametrize("decision_type", [0, 2, 4, 6, 8, 10])
@pytest.mark.parametrize("threshold", [5e-36, -5e-36, 0.0, ZERO_THRESHOLD, -ZERO_THRESHOLD, 1e-35, -2e-35])
def test_tiny_values_and_missing_types_on_handmade_splits(decision_type: int, threshold: float) -> None:
    text = handmade_model([decision_type, decision_type], [threshold, threshold])
    values = np.array([*TINY, *(-v for v in TINY), np.nan, np.inf, -np.inf, np.nextafter(threshold, 1)])
    grid = np.array(np.meshgrid(values, values)).reshape(2, -1).T.copy()
    assert_matches_lightgbm(text, grid)


@pytest.mark.parametrize("decision_type", [1, 3, 5, 7, 9, 11])
def test_categorical_bitsets_on_handmade_splits(decision_type: int) -> None:
    # Set 0 holds categories 0, 5, 31, 32 and 63; set 1 holds category 1 only.
    text = handmade_model([decision_type, decision_type], [0.0, 1.0], cat_words=f"{1 | 1 << 5 | 1 << 31} {1 | 1 << 31}|2")
    values = np.concatenate([CATEGORY_PROBES, np.arange(-3, 70, dtype=np.float64), [5.5, 4.999, 1e-40, -1e-40]])
    grid = np.array(np.meshgrid(values, values)).reshape(2, -1).T.copy()
    assert_matches_lightgbm(text, grid)


def test_binary_sigmoid_is_read_as_lightgbm_reads_it() -> None:
    rng = np.random.default_rng(11)
    X = feature_matrix(rng, 200, 3, 0.0)
    text = train(X, labels(rng, X, "binary"), {"objective": "binary", "sigmoid": 2.69594}, 20)
    # LightGBM's Atof reads "2.69594" one ulp away from float("2.69594"); only bit-equality shows it.
    assert "sigmoid:2.69594" in text
    forest = assert_matches_lightgbm(text, X)
    np.testing.assert_array_equal(forest.predict(X), lgb.Booster(model_str=text).predict(X, num_threads=1))
    assert forest.objective == "binary"


@pytest.fixture(scope="module")
def small_model() -> tuple[str, FloatArray]:
    rng = np.random.default_rng(1)
    X = feature_matrix(rng, 200, 4, 0.05)
    return train(X, labels(rng, X, "binary"), {"objective": "binary", "num_leaves": 7}, 8), X


def test_load_forest_reads_a_file_and_reports_metadata(small_model: tuple[str, FloatArray], tmp_path: Path) -> None:
    text, X = small_model
    path = tmp_path / "model.txt"
    path.write_text(text)
    forest = load_forest(path)
    assert forest.version == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert forest.num_features == 4
    assert forest.feature_names == ("Column_0", "Column_1", "Column_2", "Column_3")
    assert forest.num_trees == 8
    assert forest.objective == "binary"
    np.testing.assert_array_equal(forest.predict(X), Forest.from_string(text).predict(X))
    reference = lgb.Booster(model_file=str(path))
    np.testing.assert_allclose(forest.predict(X), reference.predict(X), rtol=0, atol=PREDICT_TOLERANCE)


def test_input_is_checked_at_the_boundary(small_model: tuple[str, FloatArray]) -> None:
    text, X = small_model
    forest = Forest.from_string(text)
    for bad, rule in [
        (X.astype(np.float32), "dtype float64"),
        (X[0], "2-D"),
        (X[:, :3], "4 columns"),
        (X.tolist(), "numpy.ndarray"),
    ]:
        with pytest.raises(InvalidInputError, match=rule) as caught:
            forest.predict(bad)
        assert caught.value.field == "X"
    expected = forest.predict(X)
    np.testing.assert_array_equal(forest.predict(np.asfortranarray(X)), expected)
    strided = np.zeros((X.shape[0] * 2, X.shape[1] * 3))
    strided[::2, ::3] = X
    np.testing.assert_array_equal(forest.raw_score(strided[::2, ::3]), forest.raw_score(X))
    read_only = X.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(forest.predict(read_only), expected)
    empty = np.empty((0, 4))
    assert forest.predict(empty).shape == (0,)
    assert forest.path_attributions(empty).shape == (0, 5)
    np.testing.assert_array_equal(forest.predict(X[3:4]), expected[3:4])


UNSUPPORTED = [
    ({"objective": "multiclass", "num_class": 3}, "multiclass"),
    ({"objective": "regression", "linear_tree": True}, "linear_tree"),
    ({"objective": "poisson"}, "'poisson' is not supported"),
    ({"objective": "cross_entropy"}, "'cross_entropy' is not supported"),
    ({"objective": "regression", "reg_sqrt": True}, "reg_sqrt"),
]


@pytest.mark.parametrize(("params", "message"), UNSUPPORTED)
def test_unsupported_models_are_refused_by_name(params: dict[str, Any], message: str) -> None:
    rng = np.random.default_rng(2)
    X = feature_matrix(rng, 120, 3, 0.0)
    y = rng.integers(0, 3, size=120).astype(np.float64) if params["objective"] == "multiclass" else rng.random(120)
    text = train(X, y + (params["objective"] == "poisson"), {**params, "num_leaves": 4}, 2)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        Forest.from_string(text)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: re.sub(r"decision_type=\d+", "decision_type=64", t, count=1), "decision_type=64"),
        (lambda t: re.sub(r"decision_type=\d+", "decision_type=12", t, count=1), "decision_type=12"),
        (lambda t: t.replace("version=v4", "version=v9"), "version=v9"),
        (lambda t: t.replace("objective=binary sigmoid:1", ""), "no objective"),
        (lambda t: re.sub(r"left_child=\S+", "left_child=0", t, count=1), "left_child"),
        (lambda t: re.sub(r"split_feature=\S+", "split_feature=9", t, count=1), "split_feature"),
        (lambda t: re.sub(r"leaf_value=\S+", "leaf_value=x", t, count=1), "leaf_value"),
        (lambda t: t.replace("tree\n", "forest\n", 1), "not a LightGBM text model"),
    ],
)
def test_corrupt_models_are_refused(small_model: tuple[str, FloatArray], edit: Any, message: str) -> None:
    text, _ = small_model
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        Forest.from_string(edit(text))


@FEW
@given(data=st.data())
def test_truncated_text_is_refused(small_model: tuple[str, FloatArray], data: st.DataObject) -> None:
    text, _ = small_model
    cut = data.draw(st.integers(0, text.index("end of trees")))
    with pytest.raises(ModelLoadError):
        Forest.from_string(text[:cut])


@FEW
@given(data=st.data())
def test_a_mutated_number_is_refused_or_scored_safely(small_model: tuple[str, FloatArray], data: st.DataObject) -> None:
    text, X = small_model
    body = text.index("Tree=0")
    spans = [m.span() for m in re.finditer(r"-?\d+(\.\d+)?(e-?\d+)?", text[body : text.index("end of trees")])]
    start, end = data.draw(st.sampled_from(spans))
    replacement = data.draw(st.sampled_from(["-9", "-1", "0", "1", "2", "3", "7", "15", "40", "nan", "1e400"]))
    mutated = text[: body + start] + replacement + text[body + end :]
    try:
        forest = Forest.from_string(mutated)
    except ModelLoadError:
        return
    assert forest.raw_score(X).shape == (X.shape[0],)


@FEW
@given(garbage=st.binary(max_size=300))
def test_garbage_files_are_refused(garbage: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("garbage") / "model.txt"
    path.write_bytes(garbage)
    with pytest.raises(ModelLoadError):
        load_forest(path)


def test_missing_file_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_forest(tmp_path / "absent.txt")


def test_importing_core_forest_does_not_import_lightgbm() -> None:
    code = "import core.forest, sys; assert 'lightgbm' not in sys.modules, 'lightgbm was imported'"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, env=env)
