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


@njit(nogil=True, cache=True)
def _number_goes_left(fval: float, decision_type: int, threshold: float) -> bool:
    """LightGBM's `Tree::NumericalDecision`, fed the row value as the C API would feed it."""
    missing_type = (decision_type >> 2) & 3
    if math.isnan(fval):
        if missing_type == MISSING_NAN:
            return (decision_type & DEFAULT_LEFT_MASK) != 0
        fval = 0.0
    elif -ZERO_THRESHOLD <= fval <= ZERO_THRESHOLD:
        # The C API drops |x| <= kZeroThreshold from a dense row before prediction, so such a
        # value reaches the tree as 0.0; this also makes IsZero(fval) the same as fval == 0.0.
        fval = 0.0
    if missing_type == MISSING_ZERO and fval == 0.0:
        return (decision_type & DEFAULT_LEFT_MASK) != 0
    return fval <= threshold


@njit(nogil=True, cache=True)
def _category_goes_left(
    fval: float,
    cat_set: int,
    cat_boundaries: npt.NDArray[np.int32],
    cat_threshold: npt.NDArray[np.uint32],
) -> bool:
    """LightGBM's `Tree::CategoricalDecision`: is int(fval) in bitset `cat_set`?

    NaN and int(fval) < 0 go right. static_cast<int> truncates toward zero, so (-1, 0) is
    category 0; values past the bitset (inf and anything >= 2**31 included) go right.
    """
    if math.isnan(fval) or fval <= -1.0:
        return False
    first = cat_boundaries[cat_set]
    if fval >= 32.0 * (cat_boundaries[cat_set + 1] - first):
        return False
    category = int(fval)
    word = int(cat_threshold[first + (category >> 5)])
    return ((word >> (category & 31)) & 1) != 0


@njit(nogil=True, cache=True)
def _goes_left(
    fval: float,
    decision_type: int,
    threshold: float,
    cat_boundaries: npt.NDArray[np.int32],
    cat_threshold: npt.NDArray[np.uint32],
) -> bool:
    """LightGBM's `Tree::Decision` for one node.

    Takes the node's scalars rather than the node arrays and index: the latter form compiled to
    a kernel five times slower (numba 0.68).
    """
    if decision_type & CATEGORICAL_MASK:
        in_set: bool = _category_goes_left(fval, int(threshold), cat_boundaries, cat_threshold)
        return in_set
    below: bool = _number_goes_left(fval, decision_type, threshold)
    return below


@njit(nogil=True, cache=True)
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

    divisor=1 and sigmoid=0 give LightGBM's raw score (x / 1.0 is exact). For `predict`,
    average_output models pass the number of trees and binary models their sigmoid, as
    `GBDT::Predict` then `ConvertOutput` do.
    """
    n_rows = X.shape[0]
    out = np.zeros(n_rows, dtype=np.float64)
    # Trees outside, rows inside: one tree's nodes stay in L1 across the batch, and each row
    # still sums its trees in LightGBM's order (tree 0 first), so results are bit-identical.
    for tree in range(tree_root.shape[0]):
        root = tree_root[tree]
        for row in range(n_rows):
            node = root
            while node >= 0:
                if _goes_left(
                    X[row, split_feature[node]], decision_type[node], threshold[node], cat_boundaries, cat_threshold
                ):
                    node = left_child[node]
                else:
                    node = right_child[node]
            out[row] += leaf_value[~node]
    for row in range(n_rows):
        total = out[row] / divisor
        if sigmoid > 0.0:
            total = 1.0 / (1.0 + math.exp(-sigmoid * total))
        out[row] = total
    return out


@njit(nogil=True, cache=True)
def splits_visited(
    X: npt.NDArray[np.float64],
    tree_root: npt.NDArray[np.int32],
    split_feature: npt.NDArray[np.int32],
    threshold: npt.NDArray[np.float64],
    decision_type: npt.NDArray[np.uint8],
    left_child: npt.NDArray[np.int32],
    right_child: npt.NDArray[np.int32],
    cat_boundaries: npt.NDArray[np.int32],
    cat_threshold: npt.NDArray[np.uint32],
) -> npt.NDArray[np.int64]:
    """Per row: how many splits its paths pass through, over all trees (a tree walk's work)."""
    n_rows = X.shape[0]
    out = np.zeros(n_rows, dtype=np.int64)
    for tree in range(tree_root.shape[0]):
        for row in range(n_rows):
            node = tree_root[tree]
            while node >= 0:
                out[row] += 1
                if _goes_left(
                    X[row, split_feature[node]], decision_type[node], threshold[node], cat_boundaries, cat_threshold
                ):
                    node = left_child[node]
                else:
                    node = right_child[node]
    return out


@njit(nogil=True, cache=True)
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
    for tree in range(tree_root.shape[0]):
        root = tree_root[tree]
        root_value = internal_value[root] if root >= 0 else leaf_value[~root]
        for row in range(n_rows):
            out[row, n_features] += root_value
            node = root
            value = root_value
            while node >= 0:
                feature = split_feature[node]
                if _goes_left(X[row, feature], decision_type[node], threshold[node], cat_boundaries, cat_threshold):
                    child = left_child[node]
                else:
                    child = right_child[node]
                child_value = internal_value[child] if child >= 0 else leaf_value[~child]
                out[row, feature] += child_value - value
                value = child_value
                node = child
    return out
