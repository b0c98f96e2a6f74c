"""LightGBM models for the forest tests: training, random feature matrices, labels, thresholds.

Shared by test_forest.py (predict) and test_contributions.py (TreeSHAP), which compare
core.forest with LightGBM on the same kinds of models.
"""

from __future__ import annotations

import re
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
from hypothesis import reject

FloatArray = npt.NDArray[np.float64]
ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM's kZeroThreshold = 1e-35f


def train(X: FloatArray, y: FloatArray, params: dict[str, Any], rounds: int, categorical: list[int] | None = None) -> str:
    """Train quietly and deterministically; return the model text.

    LightGBM's own trainer sometimes aborts on tiny data full of special values
    ("Check failed: (best_split_info.left_count) > (0)"): there is no model to compare
    then, so a property test drops that example instead of failing on LightGBM's bug.
    """
    base = {"verbose": -1, "deterministic": True, "num_threads": 1, "force_col_wise": True, "seed": 7}
    dataset = lgb.Dataset(X, y, categorical_feature=categorical or "auto", params={"verbose": -1})
    try:
        booster = lgb.train({**base, **params}, dataset, num_boost_round=rounds)
    except lgb.basic.LightGBMError as exc:
        if "best_split_info.left_count" in str(exc):
            reject()
        raise
    return str(booster.model_to_string())


def numerical_thresholds(text: str) -> list[float]:
    """Every numerical split threshold in a model text (categorical splits hold set indices)."""
    found: list[float] = []
    for thresholds, types in re.findall(r"^threshold=(.*)\ndecision_type=(.*)$", text, flags=re.M):
        for value, decision_type in zip(thresholds.split(), types.split(), strict=True):
            if not int(decision_type) & 1:
                found.append(float(value))
    return found


def feature_matrix(rng: np.random.Generator, n_rows: int, n_features: int, special_fraction: float) -> FloatArray:
    """Columns of mixed kinds (continuous, small integers with many zeros, sparse), with specials."""
    columns = []
    for column in range(n_features):
        kind = column % 3
        if kind == 0:
            values = rng.normal(size=n_rows)
        elif kind == 1:
            values = rng.integers(-3, 4, size=n_rows).astype(np.float64)
        else:
            values = np.where(rng.random(n_rows) < 0.7, 0.0, rng.exponential(size=n_rows))
        columns.append(values)
    X = np.column_stack(columns)
    mask = rng.random(X.shape) < special_fraction
    X[mask] = rng.choice(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0]), size=int(mask.sum()))
    return X


def labels(rng: np.random.Generator, X: FloatArray, objective: str) -> FloatArray:
    signal = np.nan_to_num(X, nan=0.5, posinf=3.0, neginf=-3.0) @ rng.normal(size=X.shape[1])
    signal += 0.3 * rng.normal(size=X.shape[0])
    if objective == "binary":
        return (signal > np.median(signal)).astype(np.float64)
    return signal


def categorical_model(
    rng: np.random.Generator, objective: str, n_rows: int, n_categories: int, rounds: int,
    max_cat_to_onehot: int, use_missing: bool, nan_fraction: float,
) -> tuple[str, FloatArray]:
    """A model on two categorical columns (NaN mixed in) and one numerical; returns (text, X)."""
    categories = rng.integers(0, n_categories, size=(n_rows, 2)).astype(np.float64)
    categories[rng.random(categories.shape) < nan_fraction] = np.nan
    X = np.column_stack([categories, rng.normal(size=n_rows)])
    effect = rng.normal(size=n_categories + 1)
    signal = effect[np.nan_to_num(categories[:, 0], nan=n_categories).astype(int)] + 0.5 * X[:, 2]
    y = (signal > np.median(signal)).astype(np.float64) if objective == "binary" else signal
    params = {
        "objective": objective,
        "num_leaves": 15,
        "min_data_in_leaf": 2,
        "min_data_per_group": 1,
        "cat_smooth": 0.0,
        "cat_l2": 0.0,
        "min_data_in_bin": 1,
        "max_cat_to_onehot": max_cat_to_onehot,
        "use_missing": use_missing,
    }
    return train(X, y, params, rounds, categorical=[0, 1]), X
