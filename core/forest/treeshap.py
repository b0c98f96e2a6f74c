"""Exact TreeSHAP of a `ForestArrays`: what LightGBM's `Booster.predict(X, pred_contrib=True)` returns.

LightGBM (`Tree::TreeSHAP`, tree.cpp) recurses over every node carrying a path of (feature,
zero_fraction, one_fraction) with permutation weights, and unwinds that path once per feature at
every leaf: O(leaves * depth**2) dependent divisions per tree. This kernel computes the same
Shapley values in two flat passes over each tree's nodes (no recursion, no stack), with a dozen
multiply-adds per node at each of a few quadrature points, in the manner of Linear TreeSHAP
(Yu et al., 2022): O(nodes * depth / 2) per tree.

The values. Along the path to leaf l, feature j has a zero fraction z (the product of
count(child) / count(node) over the path's splits on j) and a one fraction o, which is 1 when the
row takes the path's branch at every one of those splits and 0 otherwise. TreeSHAP is the Shapley
value of the game S -> v_l * prod(o_i if i in S else z_i), and through the multilinear extension

    phi_j = sum over leaves l of  v_l * (o_j - z_j) * integral_0^1 prod_{i != j} F_i(q) dq,
    F_i(q) = o_i * q + z_i * (1 - q).

The integrand is a polynomial of degree (distinct features on the path) - 1, so Gauss-Legendre
quadrature with half that many points integrates it exactly; only rounding differs from LightGBM.

The passes, per row and tree, at each quadrature point q:
- down (node order; the parser guarantees a child comes after its parent): P(node) is the product
  of the path's factors F into the node; Q(node) is P(node) without the factor of the node's own
  feature (divided out when an ancestor split on that feature, else P itself).
- up (reverse order): T(leaf) = v; T(node) = sum over children of F_child / F_node * T(child),
  the leaves below weighed by the factors added below the node. Node m on feature j then adds

      integral Q(m) * ((o_L - z_L) T(L) + (o_R - z_R) T(R) - (o_m - z_m) T(m))

  to phi_j: every leaf's term for j, less what the nearest ancestor on the same feature counted for
  the leaves below m with the fractions it knew (the terms telescope to the deepest split on j).

One file on purpose, over the usual size: Numba's on-disk cache of a kernel is invalidated only by
changes to its own file, so the kernel and the helpers it calls stay together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numba import njit

from core.forest.arrays import ForestArrays

# Numba's on-disk cache is keyed on this file only, so everything the kernels use lives here: a
# function or constant imported from kernels.py could change without recompiling these. The row
# decision below therefore repeats kernels.py's; tests/core/forest/test_contributions.py holds both to
# LightGBM.
ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM's kZeroThreshold = 1e-35f, widened
CATEGORICAL_MASK = 1
DEFAULT_LEFT_MASK = 2
MISSING_ZERO, MISSING_NAN = 1, 2

# Quadrature points go in blocks of this many: each tree's rule is padded with weight-0 points to a
# multiple of it, so the innermost loops have a constant trip count and compile to straight code.
LANES = 4

# Columns of ShapTables.node_int, one row per node.
FEATURE, KIND, ANCESTOR, UNDER_LEFT, TO_LEFT, TO_RIGHT, FROM_LEFT, FROM_RIGHT = range(8)
# Columns of ShapTables.node_float.
THRESHOLD, ZERO_IN, ZERO_LEFT, ZERO_RIGHT, VALUE_LEFT, VALUE_RIGHT = range(6)


@dataclass(frozen=True, slots=True)
class ShapTables:
    """Row-independent facts about a model that TreeSHAP needs; built once by `prepare`.

    In the kernel's work arrays, internal node tree_root + i of a tree has row i; row `max_nodes`
    stands in for "no ancestor on this feature" (one fraction 1) and, in T, for a leaf child (T = 0,
    plus the leaf's value); row `max_nodes + 1` receives a leaf child's P, which nobody reads.
    """

    tree: npt.NDArray[np.int64]
    """[t] = (first node, one past the last node, quadrature points); 0, 0, 0 for a single leaf."""
    node_int: npt.NDArray[np.int32]
    """[node] = split feature, decision type, row of the nearest ancestor on the same feature,
    whether the node lies under that ancestor's left child, rows the down pass writes for the left
    and right child, rows the up pass reads for them."""
    node_float: npt.NDArray[np.float64]
    """[node] = threshold, zero fraction of the node's feature on the path into it (1 if new),
    the same past the left and past the right branch, the left and right child's output if a leaf
    (else 0), and two unused columns that make a row one 64-byte line."""
    rule: npt.NDArray[np.float64]
    """[0, n] the points and [1, n] the weights of the n-point Gauss-Legendre rule on [0, 1],
    padded to a multiple of LANES with weight-0 points at 1/2."""
    expected_value: float
    """The last output column: the trees' `ExpectedValue()` summed tree 0 first, as LightGBM does."""
    max_nodes: int
    """Internal nodes in the largest tree."""

    def __post_init__(self) -> None:
        for array in (self.tree, self.node_int, self.node_float, self.rule):
            array.flags.writeable = False


def prepare(arrays: ForestArrays) -> ShapTables:
    """Compute the row-independent tables of a model (linear in its size)."""
    a = arrays
    tree, node_int, node_float, expected_value, max_nodes = _tables(
        a.tree_root, a.split_feature, a.threshold, a.decision_type, a.left_child, a.right_child,
        a.leaf_value, a.leaf_count, a.internal_count,
    )  # fmt: skip
    max_points = max(1, int(tree[:, 2].max(initial=1)))
    width = -(-max_points // LANES) * LANES
    rule = np.zeros((2, max_points + 1, width), dtype=np.float64)
    rule[0] = 0.5
    for count in range(1, max_points + 1):
        x, w = np.polynomial.legendre.leggauss(count)
        rule[0, count, :count] = (x + 1.0) / 2.0
        rule[1, count, :count] = w / 2.0
    return ShapTables(tree, node_int, node_float, rule, float(expected_value), int(max_nodes))


def contributions(X: npt.NDArray[np.float64], arrays: ForestArrays, tables: ShapTables) -> npt.NDArray[np.float64]:
    """SHAP values of the raw score, shape (n_rows, num_features + 1); X is C-contiguous float64."""
    t = tables
    result: npt.NDArray[np.float64] = _contributions(
        X, t.tree, t.node_int, t.node_float, arrays.cat_boundaries, arrays.cat_threshold, t.rule,
        t.expected_value, t.max_nodes,
    )  # fmt: skip
    return result


# error_model="numpy": a zero row count (a corrupt file) gives inf/NaN fractions, as in LightGBM,
# rather than an exception.
@njit(nogil=True, cache=True, error_model="numpy")
def _tables(  # type: ignore[no-untyped-def]
    tree_root, split_feature, threshold, decision_type, left_child, right_child, leaf_value, leaf_count,
    internal_count,
):  # fmt: skip
    n_nodes = split_feature.shape[0]
    n_trees = tree_root.shape[0]
    tree = np.zeros((n_trees, 3), dtype=np.int64)
    max_nodes = 0
    for t in range(n_trees):
        root = tree_root[t]
        if root < 0:
            continue
        end = n_nodes
        for later in range(t + 1, n_trees):
            if tree_root[later] >= 0:
                end = tree_root[later]
                break
        tree[t, 0] = root
        tree[t, 1] = end
        max_nodes = max(max_nodes, end - root)
    spare = max_nodes
    sink = max_nodes + 1
    node_int = np.zeros((n_nodes, 8), dtype=np.int32)
    node_float = np.zeros((n_nodes, 8), dtype=np.float64)
    parent = np.full(n_nodes, -1, dtype=np.int64)
    is_left = np.zeros(n_nodes, dtype=np.bool_)
    distinct = np.zeros(n_nodes, dtype=np.int64)  # distinct features on the path above the node
    expected_value = 0.0
    leaf = 0
    for t in range(n_trees):
        root = tree_root[t]
        if root < 0:
            expected_value += leaf_value[~root]  # Tree::ExpectedValue of a single leaf
            leaf += 1
            continue
        end = tree[t, 1]
        most_distinct = 0
        # Parents come before their children, so one pass in node order sees every ancestor first.
        for node in range(root, end):
            feature = split_feature[node]
            ancestor = parent[node]
            child = node
            while ancestor >= 0 and split_feature[ancestor] != feature:
                child = ancestor
                ancestor = parent[ancestor]
            zero_in = 1.0
            node_int[node, ANCESTOR] = spare
            if ancestor >= 0:
                node_int[node, ANCESTOR] = ancestor - root
                node_int[node, UNDER_LEFT] = is_left[child]
                zero_in = node_float[ancestor, ZERO_LEFT] if is_left[child] else node_float[ancestor, ZERO_RIGHT]
                here = distinct[node]
            else:
                here = distinct[node] + 1
            node_int[node, FEATURE] = feature
            node_int[node, KIND] = decision_type[node]
            node_float[node, THRESHOLD] = threshold[node]
            node_float[node, ZERO_IN] = zero_in
            # `data_count(child) / w` with int counts and a double w, times the incoming fraction,
            # in Tree::TreeSHAP's order.
            w = float(internal_count[node])
            for child_node, to, source, zero, value, on_left in (
                (left_child[node], TO_LEFT, FROM_LEFT, ZERO_LEFT, VALUE_LEFT, True),
                (right_child[node], TO_RIGHT, FROM_RIGHT, ZERO_RIGHT, VALUE_RIGHT, False),
            ):
                if child_node >= 0:
                    node_float[node, zero] = (internal_count[child_node] / w) * zero_in
                    node_int[node, to] = child_node - root
                    node_int[node, source] = child_node - root
                    parent[child_node] = node
                    is_left[child_node] = on_left
                    distinct[child_node] = here
                else:
                    node_float[node, zero] = (leaf_count[~child_node] / w) * zero_in
                    node_int[node, to] = sink
                    node_int[node, source] = spare
                    node_float[node, value] = leaf_value[~child_node]
                    most_distinct = max(most_distinct, here)
        tree[t, 2] = (most_distinct + 1) // 2
        # Tree::ExpectedValue: leaves in index order, count / internal_count[0] times the output.
        total = float(internal_count[root])
        tree_value = 0.0
        for i in range(leaf, leaf + end - root + 1):
            tree_value += (leaf_count[i] / total) * leaf_value[i]
        expected_value += tree_value
        leaf += end - root + 1
    return tree, node_int, node_float, expected_value, max_nodes


@njit(nogil=True, cache=True)
def _goes_left(fval, kind, threshold, cat_boundaries, cat_threshold):  # type: ignore[no-untyped-def]
    """LightGBM's `Tree::Decision` for one node, fed the row value as the C API feeds it."""
    if kind & CATEGORICAL_MASK:
        # CategoricalDecision: NaN and int(fval) < 0 go right (int() truncates toward zero), as do
        # categories past the bitset, inf and anything >= 2**31 included.
        if math.isnan(fval) or fval <= -1.0:
            return False
        cat_set = int(threshold)
        first = cat_boundaries[cat_set]
        if fval >= 32.0 * (cat_boundaries[cat_set + 1] - first):
            return False
        category = int(fval)
        return ((int(cat_threshold[first + (category >> 5)]) >> (category & 31)) & 1) != 0
    missing_type = (kind >> 2) & 3
    if math.isnan(fval):
        if missing_type == MISSING_NAN:
            return (kind & DEFAULT_LEFT_MASK) != 0
        fval = 0.0
    elif -ZERO_THRESHOLD <= fval <= ZERO_THRESHOLD:
        # The C API drops |x| <= kZeroThreshold from a dense row, so such a value arrives as 0.0.
        fval = 0.0
    if missing_type == MISSING_ZERO and fval == 0.0:
        return (kind & DEFAULT_LEFT_MASK) != 0
    return fval <= threshold


# The passes are written out in one function: numba kept reference-counting calls on arrays handed
# to inlined helpers in these branchy loops, which made a factored version ten times slower.
@njit(nogil=True, cache=True, error_model="numpy")
def _contributions(X, tree, node_int, node_float, cat_boundaries, cat_threshold, rule, expected_value, max_nodes):  # type: ignore[no-untyped-def]
    n_rows, n_features = X.shape
    out = np.zeros((n_rows, n_features + 1), dtype=np.float64)
    width = rule.shape[2]
    spare = max_nodes
    # Work arrays, one row per internal node of the current tree (plus the spare and sink rows),
    # one column per quadrature point.
    p_in = np.zeros((max_nodes + 2, width), dtype=np.float64)  # P, then Q in place
    below = np.zeros((max_nodes + 1, width), dtype=np.float64)  # T
    one_in = np.ones(max_nodes + 1, dtype=np.float64)
    goes_left = np.zeros(max_nodes + 1, dtype=np.int32)

    for row in range(n_rows):
        for t in range(tree.shape[0]):
            root = tree[t, 0]
            end = tree[t, 1]
            n = tree[t, 2]
            points = -(-n // LANES) * LANES
            for block in range(0, points, LANES):
                for g in range(block, block + LANES):
                    p_in[0, g] = 1.0

            # Down: decisions, one fractions, then P and Q at every node. A factor
            # z * (1 - q) + o * q is computed as z + (o - z) * q.
            for node in range(root, end):
                i = node - root
                left = _goes_left(
                    X[row, node_int[node, FEATURE]], node_int[node, KIND], node_float[node, THRESHOLD],
                    cat_boundaries, cat_threshold,
                )  # fmt: skip
                goes_left[i] = left
                a = node_int[node, ANCESTOR]
                one = one_in[a] * (goes_left[a] == node_int[node, UNDER_LEFT])
                one_in[i] = one
                z_left = node_float[node, ZERO_LEFT]
                z_right = node_float[node, ZERO_RIGHT]
                d_left = one * left - z_left
                d_right = one * (not left) - z_right
                to_left = node_int[node, TO_LEFT]
                to_right = node_int[node, TO_RIGHT]
                if a != spare:
                    z = node_float[node, ZERO_IN]
                    d = one - z
                    for block in range(0, points, LANES):
                        for g in range(block, block + LANES):
                            q = rule[0, n, g]
                            without = p_in[i, g] / (z + d * q)
                            p_in[i, g] = without
                            p_in[to_left, g] = without * (z_left + d_left * q)
                            p_in[to_right, g] = without * (z_right + d_right * q)
                else:
                    for block in range(0, points, LANES):
                        for g in range(block, block + LANES):
                            q = rule[0, n, g]
                            without = p_in[i, g]
                            p_in[to_left, g] = without * (z_left + d_left * q)
                            p_in[to_right, g] = without * (z_right + d_right * q)

            # Up: T at every node, and each node's share of its feature's value. With
            # S = d_L T_L + d_R T_R, T(node) = (z_L T_L + z_R T_R + q S) / F_node and the share is
            # S - (o - z) T(node), the last term only for a feature seen above.
            for node in range(end - 1, root - 1, -1):
                i = node - root
                one = one_in[i]
                left = goes_left[i]
                z_left = node_float[node, ZERO_LEFT]
                z_right = node_float[node, ZERO_RIGHT]
                d_left = one * left - z_left
                d_right = one * (1 - left) - z_right
                v_left = node_float[node, VALUE_LEFT]
                v_right = node_float[node, VALUE_RIGHT]
                from_left = node_int[node, FROM_LEFT]
                from_right = node_int[node, FROM_RIGHT]
                feature = node_int[node, FEATURE]
                total = 0.0
                if node_int[node, ANCESTOR] != spare:
                    z = node_float[node, ZERO_IN]
                    d = one - z
                    for block in range(0, points, LANES):
                        for g in range(block, block + LANES):
                            q = rule[0, n, g]
                            t_left = below[from_left, g] + v_left
                            t_right = below[from_right, g] + v_right
                            s = d_left * t_left + d_right * t_right
                            t_node = (z_left * t_left + z_right * t_right + q * s) / (z + d * q)
                            below[i, g] = t_node
                            total += rule[1, n, g] * p_in[i, g] * (s - d * t_node)
                else:
                    for block in range(0, points, LANES):
                        for g in range(block, block + LANES):
                            q = rule[0, n, g]
                            t_left = below[from_left, g] + v_left
                            t_right = below[from_right, g] + v_right
                            s = d_left * t_left + d_right * t_right
                            below[i, g] = z_left * t_left + z_right * t_right + q * s
                            total += rule[1, n, g] * p_in[i, g] * s
                out[row, feature] += total
        out[row, n_features] = expected_value
    return out
