"""`ForestArrays` -> `ForestLayout`: the model rearranged for the bit-vector kernels.

Every split becomes "is this row's bin in column c greater than rank r", so a row is scored by
integer compares alone (see docs/forest.md for why and what it buys):

- A *column* is one way of reading a feature. Numerical splits read a *view* of the feature
  (LightGBM's missing-value rule folded into the value: NaN, or NaN and zero, replaced by -inf
  or +inf), and a row's *bin* in a column is the number of the column's split thresholds below
  the value, so `value > threshold` is exactly `bin > rank of threshold`. Categorical splits and
  the few numerical splits no view can express read an indicator column whose bin is 1 when the
  row goes right.
- Trees are taken 16 at a time (8 when a tree has more than 32 leaves), a *group*; slot s of a
  group holds the s-th split of each of its trees, one per lane. Each split carries
  QuickScorer's mask: all ones except the leaves of its left subtree (leaves numbered left to
  right). ANDing the masks of the splits a row goes right at leaves the row's exit leaf as the
  lowest set bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from core.forest.arrays import ForestArrays
from core.forest.kernels import CATEGORICAL_MASK, DEFAULT_LEFT_MASK, MISSING_NAN, MISSING_NONE, MISSING_ZERO

MAX_LEAVES = 64  # one uint64 mask per split
NARROW_LEAVES = 32  # up to here masks are uint32 and a group holds 16 trees, else uint64 and 8
MAX_BIN = 255  # bins are uint8: a column holds at most 255 thresholds
POSITIONS_PER_WORD = 64  # the kernels write go-right bits 64 at a time

# Views of a feature (after LightGBM's |x| <= kZeroThreshold -> 0.0): which value a missing one takes.
VIEW_NAN_LOW, VIEW_NAN_HIGH, VIEW_ZERO_LOW, VIEW_ZERO_HIGH = 0, 1, 2, 3
# Predicate columns: bit set -> a value of that class goes right.
RIGHT_IF_NAN, RIGHT_IF_ZERO, RIGHT_IF_OTHER = 1, 2, 4

_ALL_ONES = (1 << 64) - 1
_Scalar = TypeVar("_Scalar", bound=np.generic)


class LayoutUnsupported(ValueError):
    """The model cannot be laid out for the bit-vector kernels; the message says why."""


@dataclass(frozen=True, slots=True)
class ForestLayout:
    """A model as the bit-vector kernels read it. Columns are numbered numeric, then set, then
    predicate; positions are slot-major (position lanes * s + g is lane g of slot s).
    """

    num_features: int
    column_feature: npt.NDArray[np.int32]  # (C,) feature each column reads
    numeric_view: npt.NDArray[np.int8]  # (numeric columns,) VIEW_*
    numeric_thresholds: npt.NDArray[np.float64]  # (numeric columns, MAX_BIN) sorted, +inf padded
    set_table: npt.NDArray[np.int32]  # (set columns,) category table the set is over
    set_word_start: npt.NDArray[np.int64]  # (set columns + 1,) into set_words
    set_words: npt.NDArray[np.uint64]  # bit k of a set: category code k goes left
    category_feature: npt.NDArray[np.int32]  # (tables,) feature of each category table
    category_start: npt.NDArray[np.int64]  # (tables + 1,) into category_values
    category_values: npt.NDArray[np.int64]  # each table's categories, sorted; code = index
    predicate_rule: npt.NDArray[np.uint8]  # (predicate columns,) RIGHT_IF_* bits
    position_column: npt.NDArray[np.uint16]  # (P,) P a multiple of POSITIONS_PER_WORD
    position_rank: npt.NDArray[np.uint8]  # (P,) goes right when bin > rank
    position_mask: npt.NDArray[np.uint32] | npt.NDArray[np.uint64]  # (P,) QuickScorer mask; all ones for padding
    group_slot_start: npt.NDArray[np.int64]  # (groups + 1,) slots of each group
    leaf_value: npt.NDArray[np.float64]  # each tree's leaves, left to right
    tree_leaf_start: npt.NDArray[np.int64]  # (trees + 1,) into leaf_value

    @property
    def lanes(self) -> int:
        """Trees per group: 16 with uint32 masks, 8 with uint64 masks."""
        return 16 if self.position_mask.dtype == np.uint32 else 8

    @property
    def num_columns(self) -> int:
        """Number of columns (numeric + set + predicate)."""
        return int(self.column_feature.shape[0])

    @property
    def num_trees(self) -> int:
        """Number of trees."""
        return int(self.tree_leaf_start.shape[0] - 1)

    @property
    def num_splits(self) -> int:
        """Number of split nodes over all trees (padding excluded)."""
        return int(self.tree_leaf_start[-1] - self.num_trees)


def build_layout(arrays: ForestArrays, num_features: int) -> ForestLayout:
    """Lay out a parsed model; raises LayoutUnsupported (e.g. a tree with more than 64 leaves)."""
    trees = [_walk_tree(arrays, t) for t in range(arrays.num_trees)]
    columns = _Columns(arrays, [split for splits, _ in trees for split in splits])
    if columns.count >= 1 << 16:
        raise LayoutUnsupported(f"{columns.count} split columns; at most 65535 fit the layout")

    # Slots per group: its largest tree's split count, rounded up to even (a single row ANDs two
    # slots per step).
    narrow = all(len(leaves) <= NARROW_LEAVES for _, leaves in trees)
    lanes = 16 if narrow else 8
    slots_per_group = [
        _round_up_even(max(len(trees[t][0]) for t in range(g, min(g + lanes, len(trees)))))
        for g in range(0, len(trees), lanes)
    ]
    group_slot_start = np.cumsum([0, *slots_per_group], dtype=np.int64)
    words = -(-int(group_slot_start[-1]) * lanes // POSITIONS_PER_WORD)
    total = max(words, 1) * POSITIONS_PER_WORD
    position_column = np.zeros(total, dtype=np.uint16)
    position_rank = np.full(total, MAX_BIN, dtype=np.uint8)  # bin > 255 never holds: padding goes left
    position_mask = np.full(total, _ALL_ONES, dtype=np.uint64)  # and changes nothing
    for t, (splits, _) in enumerate(trees):
        group, lane = divmod(t, lanes)
        for s, (split, mask) in enumerate(splits.items()):
            p = (int(group_slot_start[group]) + s) * lanes + lane
            position_column[p], position_rank[p] = columns.of_split[split]
            position_mask[p] = mask
    return ForestLayout(
        num_features=num_features,
        column_feature=_frozen(np.array(columns.feature, dtype=np.int32)),
        numeric_view=_frozen(np.array(columns.numeric_view, dtype=np.int8)),
        numeric_thresholds=_frozen(columns.threshold_table()),
        set_table=_frozen(np.array(columns.set_table, dtype=np.int32)),
        set_word_start=_frozen(np.cumsum([0] + [len(w) for w in columns.set_words], dtype=np.int64)),
        set_words=_frozen(np.array([w for ws in columns.set_words for w in ws], dtype=np.uint64)),
        category_feature=_frozen(np.array(columns.category_feature, dtype=np.int32)),
        category_start=_frozen(np.cumsum([0] + [len(v) for v in columns.categories], dtype=np.int64)),
        category_values=_frozen(np.array([c for cs in columns.categories for c in cs], dtype=np.int64)),
        predicate_rule=_frozen(np.array(columns.predicate_rule, dtype=np.uint8)),
        position_column=_frozen(position_column),
        position_rank=_frozen(position_rank),
        position_mask=_frozen(position_mask.astype(np.uint32)) if narrow else _frozen(position_mask),
        group_slot_start=_frozen(group_slot_start),
        leaf_value=_frozen(np.array([v for _, leaves in trees for v in leaves], dtype=np.float64)),
        tree_leaf_start=_frozen(np.cumsum([0] + [len(leaves) for _, leaves in trees], dtype=np.int64)),
    )


def _walk_tree(arrays: ForestArrays, tree: int) -> tuple[dict[int, int], list[float]]:
    """A tree's splits (global node index -> QuickScorer mask) and its leaf values, left to right."""
    root = int(arrays.tree_root[tree])
    if root < 0:
        return {}, [float(arrays.leaf_value[~root])]
    masks: dict[int, int] = {}
    leaves: list[float] = []
    # Iterative in-order walk; a split's left subtree holds the leaves numbered while it is open.
    stack: list[tuple[int, int]] = [(root, 0)]
    first_leaf: dict[int, int] = {}
    while stack:
        node, state = stack.pop()
        if node < 0:
            leaves.append(float(arrays.leaf_value[~node]))
        elif state == 0:
            first_leaf[node] = len(leaves)
            stack += [(node, 1), (int(arrays.left_child[node]), 0)]
        else:
            low, high = first_leaf[node], len(leaves)  # left subtree's leaves: [low, high)
            masks[node] = _ALL_ONES ^ (((1 << (high - low)) - 1) << low)
            stack.append((int(arrays.right_child[node]), 0))
    if len(leaves) > MAX_LEAVES:
        raise LayoutUnsupported(f"tree {tree} has {len(leaves)} leaves; the bit-vector layout holds {MAX_LEAVES}")
    return masks, leaves


class _Columns:
    """Gives every split a column and a rank, and collects what the kernels need to bin a row.

    Columns are numbered numeric first (one per feature and view, split further when a view has
    more than MAX_BIN thresholds), then one per distinct categorical set, then one per predicate.
    """

    def __init__(self, arrays: ForestArrays, splits: list[int]) -> None:
        numeric: dict[tuple[int, int], set[float]] = {}
        sets: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        predicates: dict[tuple[int, int], list[int]] = {}
        for split in splits:
            feature, decision = int(arrays.split_feature[split]), int(arrays.decision_type[split])
            threshold = float(arrays.threshold[split])
            if decision & CATEGORICAL_MASK:
                sets.setdefault((feature, _category_set(arrays, int(threshold))), []).append(split)
            elif (view := _numeric_view(decision, threshold)) is not None:
                numeric.setdefault((feature, view), set()).add(threshold)
            else:
                predicates.setdefault((feature, _predicate_rule(decision, threshold)), []).append(split)

        self.feature: list[int] = []
        self.numeric_view: list[int] = []
        self.of_split: dict[int, tuple[int, int]] = {}  # split -> (column, rank)
        self._tables: list[list[float]] = []
        place: dict[tuple[int, int], dict[float, tuple[int, int]]] = {}
        for (feature, view), thresholds in sorted(numeric.items()):
            ordered = sorted(thresholds)
            for start in range(0, len(ordered), MAX_BIN):
                chunk = ordered[start : start + MAX_BIN]
                lookup = place.setdefault((feature, view), {})
                lookup.update({t: (len(self.feature), rank) for rank, t in enumerate(chunk)})
                self.feature.append(feature)
                self.numeric_view.append(view)
                self._tables.append(chunk)
        for split in splits:
            decision = int(arrays.decision_type[split])
            threshold = float(arrays.threshold[split])
            if not decision & CATEGORICAL_MASK and (view := _numeric_view(decision, threshold)) is not None:
                self.of_split[split] = place[(int(arrays.split_feature[split]), view)][threshold]

        # Categorical splits: a row's category becomes a code (its index among all categories
        # the model's sets name for that feature), and each distinct set an indicator column.
        self.categories: list[list[int]] = []
        self.category_feature: list[int] = []
        table_of_feature: dict[int, int] = {}
        for feature, _ in sets:
            if feature not in table_of_feature:
                table_of_feature[feature] = len(self.categories)
                self.category_feature.append(feature)
                self.categories.append(sorted({c for (f, cats) in sets for c in cats if f == feature}))
        self.set_table: list[int] = []
        self.set_words: list[list[int]] = []
        for (feature, cats), members in sets.items():
            table = table_of_feature[feature]
            code = {c: k for k, c in enumerate(self.categories[table])}
            words = [0] * (len(code) // 64 + 1)  # one spare bit: the code of "none of these"
            for c in cats:
                words[code[c] >> 6] |= 1 << (code[c] & 63)
            self.of_split.update({split: (len(self.feature), 0) for split in members})  # bin 1 > 0: right
            self.feature.append(feature)
            self.set_table.append(table)
            self.set_words.append(words)

        self.predicate_rule: list[int] = []
        for (feature, rule), members in predicates.items():
            self.of_split.update({split: (len(self.feature), 0) for split in members})
            self.feature.append(feature)
            self.predicate_rule.append(rule)

    @property
    def count(self) -> int:
        return len(self.feature)

    def threshold_table(self) -> npt.NDArray[np.float64]:
        """(numeric columns, MAX_BIN): each column's thresholds ascending, then +inf (never below a value)."""
        table = np.full((max(len(self._tables), 1), MAX_BIN), math.inf, dtype=np.float64)
        for column, chunk in enumerate(self._tables):
            table[column, : len(chunk)] = chunk
        return table


def _category_set(arrays: ForestArrays, cat_set: int) -> tuple[int, ...]:
    """The categories of bitset `cat_set` (those that go left), ascending."""
    words = arrays.cat_threshold[arrays.cat_boundaries[cat_set] : arrays.cat_boundaries[cat_set + 1]]
    return tuple(32 * i + bit for i, word in enumerate(words.tolist()) for bit in range(32) if word >> bit & 1)


def _numeric_view(decision_type: int, threshold: float) -> int | None:
    """The view in which LightGBM's `NumericalDecision` is exactly `view(x) > threshold` (goes
    right), or None when no view is exact for this threshold.

    LightGBM: missing type None reads NaN as 0.0; Zero sends 0.0 (and so NaN) to the default
    side; NaN sends NaN there; every other value goes left when `x <= threshold`. A missing value
    replaced by -inf never exceeds a non-NaN threshold (goes left), one replaced by +inf exceeds
    every threshold below +inf (goes right).
    """
    if math.isnan(threshold):
        return None
    missing = (decision_type >> 2) & 3
    left = bool(decision_type & DEFAULT_LEFT_MASK)
    if missing == MISSING_NONE:
        return VIEW_NAN_LOW if threshold >= 0.0 else VIEW_NAN_HIGH  # NaN goes where 0.0 goes
    if missing == MISSING_NAN:
        return VIEW_NAN_LOW if left else (VIEW_NAN_HIGH if threshold < math.inf else None)
    return VIEW_ZERO_LOW if left else (VIEW_ZERO_HIGH if threshold < math.inf else None)


def _predicate_rule(decision_type: int, threshold: float) -> int:
    """RIGHT_IF_* bits of a numerical split no view expresses (a NaN threshold, or +inf with the
    default to the right): each class of value (NaN, zero, other) then goes one fixed way.
    """
    missing = (decision_type >> 2) & 3
    default_right = not decision_type & DEFAULT_LEFT_MASK
    # Non-missing values compare against the threshold: NaN never holds, +inf always does.
    other_right = math.isnan(threshold)
    nan_right = default_right if missing in (MISSING_NAN, MISSING_ZERO) else other_right
    zero_right = default_right if missing == MISSING_ZERO else other_right
    return (RIGHT_IF_NAN * nan_right) | (RIGHT_IF_ZERO * zero_right) | (RIGHT_IF_OTHER * other_right)


def _round_up_even(n: int) -> int:
    return n + (n & 1)


def _frozen(array: npt.NDArray[_Scalar]) -> npt.NDArray[_Scalar]:
    """Kernels share one layout across threads without the GIL: nobody may write."""
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array
