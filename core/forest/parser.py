"""LightGBM text model (as written by `Booster.save_model`) -> `ParsedModel` of flat arrays.

No lightgbm import here or anywhere in `core.forest`: the serving path must not need it.
Every structural fact the kernels rely on (index ranges, one parent per node, no cycles) is
checked here, because the kernels index without bounds checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from core.errors import ModelLoadError
from core.forest.arrays import ForestArrays
from core.forest.kernels import CATEGORICAL_MASK, MISSING_NAN
from core.forest.objective import Objective, UnsupportedObjective, parse_objective

SUPPORTED_VERSIONS = ("v3", "v4")
_END_OF_TREES = "end of trees"
_Scalar = TypeVar("_Scalar", bound=np.generic)
_RESAVE = "re-save it with Booster.save_model"


@dataclass(frozen=True, slots=True)
class ParsedModel:
    """Everything `Forest` needs from a model file."""

    arrays: ForestArrays
    num_features: int
    feature_names: tuple[str, ...]
    objective: Objective
    average_output: bool


class _BadTree(ValueError):
    """A tree block is unusable; parse_model adds the file and tree index."""


@dataclass(frozen=True, slots=True)
class _Tree:
    """One tree with tree-local indices, already validated."""

    split_feature: npt.NDArray[np.int64]
    threshold: npt.NDArray[np.float64]
    decision_type: npt.NDArray[np.int64]
    left_child: npt.NDArray[np.int64]
    right_child: npt.NDArray[np.int64]
    internal_value: npt.NDArray[np.float64]
    leaf_value: npt.NDArray[np.float64]
    cat_boundaries: npt.NDArray[np.int64]
    cat_threshold: npt.NDArray[np.int64]
    leaf_count: npt.NDArray[np.int64]
    internal_count: npt.NDArray[np.int64]


def parse_model(text: str, *, source: str) -> ParsedModel:
    """Parse a LightGBM text model; raise ModelLoadError(source, reason) for anything unusable."""
    if text.lstrip().partition("\n")[0].strip() != "tree":
        raise ModelLoadError(source, f"not a LightGBM text model (the first line should be 'tree'); {_RESAVE}")
    header, blocks = _split_blocks(text, source)
    version = header.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(
            source,
            f"model format version={version} is not supported (expected one of {', '.join(SUPPORTED_VERSIONS)}); "
            "load it with LightGBM >= 3 and re-save it",
        )
    num_class = _header_int(header, "num_class", source)
    per_iteration = _header_int(header, "num_tree_per_iteration", source, default=num_class)
    if num_class != 1 or per_iteration != 1:
        raise ModelLoadError(
            source,
            f"multiclass models are not supported (num_class={num_class}, "
            f"num_tree_per_iteration={per_iteration}); train a binary or regression model",
        )
    try:
        objective = parse_objective(header.get("objective"))
    except UnsupportedObjective as exc:
        raise ModelLoadError(source, str(exc)) from None
    num_features = _header_int(header, "max_feature_idx", source) + 1
    if num_features < 1:
        raise ModelLoadError(source, f"max_feature_idx={num_features - 1}: a model needs at least one feature")
    feature_names = tuple(header.get("feature_names", "").split(" "))
    if len(feature_names) != num_features:
        raise ModelLoadError(
            source, f"feature_names lists {len(feature_names)} names but max_feature_idx says {num_features}"
        )
    sizes = header.get("tree_sizes")
    if sizes is not None and len(sizes.split()) != len(blocks):
        raise ModelLoadError(
            source, f"tree_sizes announces {len(sizes.split())} trees but the file holds {len(blocks)}"
        )
    if not blocks:
        raise ModelLoadError(source, "the model has no trees")
    trees = []
    for index, block in enumerate(blocks):
        try:
            trees.append(_parse_tree(block, num_features))
        except _BadTree as exc:
            raise ModelLoadError(source, f"tree {index}: {exc}") from None
    return ParsedModel(
        arrays=_flatten(trees, source),
        num_features=num_features,
        feature_names=feature_names,
        objective=objective,
        average_output="average_output" in header,
    )


def _split_blocks(text: str, source: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Header key=value pairs (a bare key maps to ''), then one key=value dict per `Tree=i` block."""
    header: dict[str, str] = {}
    blocks: list[dict[str, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line == _END_OF_TREES:
            return header, blocks
        key, has_value, value = line.partition("=")
        if key == "Tree":
            if value != str(len(blocks)):
                raise ModelLoadError(source, f"line {number}: expected Tree={len(blocks)}, found {line[:40]!r}")
            blocks.append({})
        elif blocks:
            if not has_value:
                raise ModelLoadError(source, f"line {number}: expected key=value in tree {len(blocks) - 1}")
            blocks[-1][key] = value
        else:
            header[key] = value
    raise ModelLoadError(
        source, f"the file ends without an '{_END_OF_TREES}' line after {len(blocks)} trees (truncated?); {_RESAVE}"
    )


def _header_int(header: dict[str, str], key: str, source: str, *, default: int | None = None) -> int:
    if key not in header:
        if default is not None:
            return default
        raise ModelLoadError(source, f"the header has no {key}= line; {_RESAVE}")
    try:
        return int(header[key])
    except ValueError:
        raise ModelLoadError(source, f"{key}={header[key][:40]!r} is not an integer") from None


def _fields(block: dict[str, str], key: str, count: int) -> list[str]:
    """The `count` space-separated values of `key` (an absent key is fine when none are due)."""
    if key not in block:
        if count == 0:
            return []
        raise _BadTree(f"missing {key}= line; {_RESAVE}")
    parts = block[key].split()
    if len(parts) != count:
        raise _BadTree(f"{key} has {len(parts)} values, expected {count}")
    return parts


def _floats(block: dict[str, str], key: str, count: int) -> npt.NDArray[np.float64]:
    try:
        # float() rounds correctly, like the fast_double_parser LightGBM reads trees with.
        return np.array([float(part) for part in _fields(block, key, count)], dtype=np.float64)
    except ValueError:
        raise _BadTree(f"{key} holds a value that is not a number; {_RESAVE}") from None


def _ints(block: dict[str, str], key: str, count: int) -> npt.NDArray[np.int64]:
    try:
        values = [int(part) for part in _fields(block, key, count)]
    except ValueError:
        raise _BadTree(f"{key} holds a value that is not an integer; {_RESAVE}") from None
    if values and (min(values) < -(2**62) or max(values) > 2**62):
        raise _BadTree(f"{key} holds an integer out of range")
    return np.array(values, dtype=np.int64)


def _parse_tree(block: dict[str, str], num_features: int) -> _Tree:
    """Parse and validate one tree block with tree-local indices."""
    if block.get("is_linear", "0") != "0":
        raise _BadTree("linear trees (linear_tree=True) are not supported; retrain without linear_tree")
    num_leaves = int(_ints(block, "num_leaves", 1)[0])
    num_cat = int(_ints(block, "num_cat", 1)[0])
    if num_leaves < 1 or num_cat < 0:
        raise _BadTree(f"num_leaves={num_leaves}, num_cat={num_cat}: expected >= 1 and >= 0")
    nodes = num_leaves - 1
    tree = _Tree(
        split_feature=_ints(block, "split_feature", nodes),
        threshold=_floats(block, "threshold", nodes),
        decision_type=_ints(block, "decision_type", nodes),
        left_child=_ints(block, "left_child", nodes),
        right_child=_ints(block, "right_child", nodes),
        internal_value=_floats(block, "internal_value", nodes),
        leaf_value=_floats(block, "leaf_value", num_leaves),
        cat_boundaries=_ints(block, "cat_boundaries", num_cat + 1 if num_cat else 0),
        cat_threshold=(
            _ints(block, "cat_threshold", len(block.get("cat_threshold", "").split()))
            if num_cat
            else np.empty(0, dtype=np.int64)
        ),
        leaf_count=_ints(block, "leaf_count", num_leaves),
        internal_count=_ints(block, "internal_count", nodes),
    )
    _check_structure(tree, num_features, num_cat)
    _check_counts(tree)
    return tree


def _check_structure(tree: _Tree, num_features: int, num_cat: int) -> None:
    """Reject anything the kernels could index out of bounds or loop on."""
    nodes = tree.split_feature.shape[0]
    if nodes and (tree.split_feature.min() < 0 or tree.split_feature.max() >= num_features):
        raise _BadTree(f"split_feature outside 0..{num_features - 1}")
    dt = tree.decision_type
    if nodes and (dt.min() < 0 or dt.max() > 15 or np.any(((dt >> 2) & 3) > MISSING_NAN)):
        bad = int(dt[(dt < 0) | (dt > 15) | (((dt >> 2) & 3) > MISSING_NAN)][0])
        raise _BadTree(f"decision_type={bad} is not a LightGBM decision type (bits 0-3, missing type 0-2)")
    children = np.concatenate([tree.left_child, tree.right_child])
    parents = np.concatenate([np.arange(nodes), np.arange(nodes)])
    inner = children >= 0
    # LightGBM numbers a node after its parent, so children > parent rules out cycles; together
    # with "every node and leaf has exactly one parent" the nodes form one tree under node 0.
    if np.any(children[inner] <= parents[inner]) or np.any(children[inner] >= nodes):
        raise _BadTree("left_child/right_child: an internal child is not a later node of the tree")
    leaves = ~children[~inner]
    num_leaves = tree.leaf_value.shape[0]
    if nodes and (
        np.any(leaves >= num_leaves)
        or np.any(np.bincount(children[inner], minlength=nodes)[1:] != 1)
        or np.any(np.bincount(leaves, minlength=num_leaves) != 1)
    ):
        raise _BadTree("left_child/right_child do not form a binary tree over all nodes and leaves")
    if num_cat:
        bounds = tree.cat_boundaries
        if bounds[0] != 0 or np.any(np.diff(bounds) < 0) or bounds[-1] != tree.cat_threshold.shape[0]:
            raise _BadTree("cat_boundaries must rise from 0 to the number of cat_threshold words")
        if np.any(tree.cat_threshold < 0) or np.any(tree.cat_threshold > 0xFFFFFFFF):
            raise _BadTree("cat_threshold words must be unsigned 32-bit integers")
    categorical = (dt & CATEGORICAL_MASK) != 0
    cat_index = tree.threshold[categorical]
    if np.any((cat_index != np.floor(cat_index)) | (cat_index < 0) | (cat_index >= num_cat)):
        raise _BadTree(f"a categorical split's threshold is not a category-set index 0..{num_cat - 1}")


def _check_counts(tree: _Tree) -> None:
    """Row counts are LightGBM `data_size_t` (int32); TreeSHAP divides by the internal ones."""
    for name, counts in (("leaf_count", tree.leaf_count), ("internal_count", tree.internal_count)):
        if counts.shape[0] and (counts.min() < 0 or counts.max() > 2**31 - 1):
            raise _BadTree(f"{name} holds a count outside 0..2**31-1; {_RESAVE}")


def _flatten(trees: list[_Tree], source: str) -> ForestArrays:
    """Concatenate trees, turning tree-local node, leaf and category-set indices into global ones."""
    node_offsets = np.cumsum([0] + [t.split_feature.shape[0] for t in trees])
    leaf_offsets = np.cumsum([0] + [t.leaf_value.shape[0] for t in trees])
    if max(node_offsets[-1], leaf_offsets[-1]) >= 2**31 - 1:
        raise ModelLoadError(source, "the model has more than 2**31 nodes; split it into smaller models")
    roots = np.where(node_offsets[1:] > node_offsets[:-1], node_offsets[:-1], ~leaf_offsets[:-1])

    def globalize(child: npt.NDArray[np.int64], tree: int) -> npt.NDArray[np.int64]:
        shifted: npt.NDArray[np.int64] = np.where(
            child >= 0, child + node_offsets[tree], ~(~child + leaf_offsets[tree])
        )
        return shifted

    thresholds = []
    bounds = [np.zeros(1, dtype=np.int64)]
    num_sets = words = 0
    for tree in trees:
        threshold = tree.threshold.copy()
        categorical = (tree.decision_type & CATEGORICAL_MASK) != 0
        threshold[categorical] += num_sets
        thresholds.append(threshold)
        if tree.cat_boundaries.shape[0]:
            bounds.append(tree.cat_boundaries[1:] + words)
            num_sets += tree.cat_boundaries.shape[0] - 1
            words += tree.cat_threshold.shape[0]

    return ForestArrays(
        tree_root=_join([roots], np.int32),
        split_feature=_join([t.split_feature for t in trees], np.int32),
        threshold=_join(thresholds, np.float64),
        decision_type=_join([t.decision_type for t in trees], np.uint8),
        left_child=_join([globalize(t.left_child, i) for i, t in enumerate(trees)], np.int32),
        right_child=_join([globalize(t.right_child, i) for i, t in enumerate(trees)], np.int32),
        internal_value=_join([t.internal_value for t in trees], np.float64),
        leaf_value=_join([t.leaf_value for t in trees], np.float64),
        cat_boundaries=_join(bounds, np.int32),
        cat_threshold=_join([t.cat_threshold for t in trees], np.uint32),
        leaf_count=_join([t.leaf_count for t in trees], np.int32),
        internal_count=_join([t.internal_count for t in trees], np.int32),
    )


def _join(parts: Sequence[npt.NDArray[Any]], dtype: type[_Scalar]) -> npt.NDArray[_Scalar]:
    """Concatenate into one C-contiguous array of `dtype` (values were range-checked before)."""
    return np.ascontiguousarray(np.concatenate(parts), dtype=dtype)
