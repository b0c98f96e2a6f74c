"""Numba kernels that walk a `ForestArrays` exactly as LightGBM's `Tree::GetLeaf` does.

The kernels are generic over models (the model is data, never code), compiled once and cached on
disk, single-threaded, and release the GIL. Each public kernel handles a whole batch in one call.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from numba import njit

# Constants live here, not in another module: numba's on-disk cache is keyed on this file only,
# so a constant imported from elsewhere could change without invalidating compiled kernels.

# LightGBM declares `const double kZeroThreshold = 1e-35f;`: a float literal widened to double,
# which is 1.0000000180025095e-35, not the double 1e-35.
ZERO_THRESHOLD = float(np.float32(1e-35))

# decision_type bits, as in LightGBM's tree.h: bit 0 categorical, bit 1 default left,
# bits 2-3 the missing type.
CATEGORICAL_MASK = 1
DEFAULT_LEFT_MASK = 2
MISSING_NONE, MISSING_ZERO, MISSING_NAN = 0, 1, 2


@njit(nogil=True, cache=True, inline="always")  # type: ignore[misc]
def _next_node(
    fval: float,
    node: int,
    threshold: npt.NDArray[np.float64],
    decision_type: npt.NDArray[np.uint8],
    left_child: npt.NDArray[np.int32],
    right_child: npt.NDArray[np.int32],
    cat_boundaries: npt.NDArray[np.int32],
    cat_threshold: npt.NDArray[np.uint32],
) -> int:
    """LightGBM's `Tree::Decision` for one node, fed the row value as the C API would feed it."""
    dt = decision_type[node]
    if dt & CATEGORICAL_MASK:
        # CategoricalDecision: NaN and int(fval) < 0 go right. static_cast<int> truncates toward
        # zero, so (-1, 0) is category 0; values past the bitset (inf, >= 2**31 included) go right.
        if math.isnan(fval) or fval <= -1.0:
            return right_child[node]
        first = cat_boundaries[np.int64(threshold[node])]
        words = cat_boundaries[np.int64(threshold[node]) + 1] - first
        if fval >= 32.0 * words:
            return right_child[node]
        category = np.int64(fval)
        if (cat_threshold[first + (category >> 5)] >> np.uint32(category & 31)) & np.uint32(1):
            return left_child[node]
        return right_child[node]
    missing_type = (dt >> 2) & 3
    if math.isnan(fval):
        if missing_type == MISSING_NAN:
            return left_child[node] if dt & DEFAULT_LEFT_MASK else right_child[node]
        fval = 0.0
    elif -ZERO_THRESHOLD <= fval <= ZERO_THRESHOLD:
        # The C API drops |x| <= kZeroThreshold from a dense row before prediction, so such a
        # value reaches the tree as 0.0; this also makes IsZero(fval) the same as fval == 0.0.
        fval = 0.0
    if missing_type == MISSING_ZERO and fval == 0.0:
        return left_child[node] if dt & DEFAULT_LEFT_MASK else right_child[node]
    if fval <= threshold[node]:
        return left_child[node]
    return right_child[node]


@njit(nogil=True, cache=True)  # type: ignore[misc]
def scores(
    X: npt.NDArray[np.float64],
    tree_root: npt.NDArray[np.int32],
    split_feature: npt.NDArray[np.int32],
    threshold: npt.NDArray[np.float64],
    decision_type: npt.NDArray[np.uint8],
    left_child: npt.NDArray[np.int32],
    right_child: npt.NDArray[np.int32],
    leaf_value: npt.NDArray[np.float64],
    cat_boundaries: npt.NDArray[np.int32],
    cat_threshold: npt.NDArray[np.uint32],
    divisor: float,
    sigmoid: float,
) -> npt.NDArray[np.float64]:
    """Per row: sum of tree outputs (tree 0 first), divided by `divisor`, then the sigmoid if > 0.

    divisor=1, sigmoid=0 gives LightGBM's raw score (x / 1.0 is exact); `average_output` models pass the number
    of trees, binary models their sigmoid, as `GBDT::Predict` then `ConvertOutput` do.
    """
    n_rows = X.shape[0]
    out = np.empty(n_rows, dtype=np.float64)
    for row in range(n_rows):
        total = 0.0
        for tree in range(tree_root.shape[0]):
            node = tree_root[tree]
            while node >= 0:
                node = _next_node(
                    X[row, split_feature[node]], node, threshold, decision_type,
                    left_child, right_child, cat_boundaries, cat_threshold,
                )  # fmt: skip
            total += leaf_value[~node]
        total /= divisor
        if sigmoid > 0.0:
            total = 1.0 / (1.0 + math.exp(-sigmoid * total))
        out[row] = total
    return out


@njit(nogil=True, cache=True)  # type: ignore[misc]
def path_attributions(
    X: npt.NDArray[np.float64],
    tree_root: npt.NDArray[np.int32],
    split_feature: npt.NDArray[np.int32],
    threshold: npt.NDArray[np.float64],
    decision_type: npt.NDArray[np.uint8],
    left_child: npt.NDArray[np.int32],
    right_child: npt.NDArray[np.int32],
    internal_value: npt.NDArray[np.float64],
    leaf_value: npt.NDArray[np.float64],
    cat_boundaries: npt.NDArray[np.int32],
    cat_threshold: npt.NDArray[np.uint32],
) -> npt.NDArray[np.float64]:
    """Saabas attributions: each step down a row's path credits value(child) - value(node) to the
    node's split feature; the last column sums the trees' root values. Rows sum to the raw score.
    """
    n_rows, n_features = X.shape
    out = np.zeros((n_rows, n_features + 1), dtype=np.float64)
    for row in range(n_rows):
        for tree in range(tree_root.shape[0]):
            node = tree_root[tree]
            if node < 0:
                out[row, n_features] += leaf_value[~node]
                continue
            value = internal_value[node]
            out[row, n_features] += value
            while node >= 0:
                feature = split_feature[node]
                child = _next_node(
                    X[row, feature], node, threshold, decision_type,
                    left_child, right_child, cat_boundaries, cat_threshold,
                )  # fmt: skip
                child_value = internal_value[child] if child >= 0 else leaf_value[~child]
                out[row, feature] += child_value - value
                value = child_value
                node = child
    return out
