"""`ForestLayout` -> one read-only uint8 blob, the single layout argument of the bit-vector kernels.

The blob is an int64 header (byte offset and length of each region, element offset and count of
each array), then one region per element type (int64, float64, uint16, bytes), each array in it
64-byte aligned. Section numbers live in `core.forest.bitvector`, whose disk cache must change
when they do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from core.forest import bitvector as bv
from core.forest.layout import VIEW_NAN_LOW, VIEW_ZERO_HIGH, VIEW_ZERO_LOW, ForestLayout

_ALIGN = 64
_DTYPES = (np.int64, np.float64, np.uint16, np.uint8)  # by region


def pack(layout: ForestLayout, *, divisor: float, sigmoid: float) -> npt.NDArray[np.uint8]:
    """The layout as one read-only uint8 blob; `predict` divides sums by `divisor`, then applies
    the sigmoid when `sigmoid` > 0 (as `kernels.scores`)."""
    lanes = layout.lanes
    numeric = layout.numeric_view.shape[0]
    table = np.full((max(numeric, 1), bv.TABLE_WIDTH), math.inf, dtype=np.float64)
    table[:numeric, : layout.numeric_thresholds.shape[1]] = layout.numeric_thresholds[:numeric]
    # The last group's missing trees read the end of the leaf table (their lanes are all padding).
    trees = layout.num_trees
    padded_starts = np.full(-(-trees // lanes) * lanes + 1, layout.tree_leaf_start[-1], dtype=np.int64)
    padded_starts[: trees + 1] = layout.tree_leaf_start
    info = [numeric, trees, layout.position_column.shape[0] // bv.WORD_POSITIONS, lanes]
    # A view replaces a missing value (NaN; for the zero views also 0.0) by -inf or +inf.
    view = layout.numeric_view
    missing_value = np.where((view == VIEW_NAN_LOW) | (view == VIEW_ZERO_LOW), -math.inf, math.inf)
    zero_is_missing = (view == VIEW_ZERO_LOW) | (view == VIEW_ZERO_HIGH)
    arrays: dict[int, tuple[int, npt.ArrayLike]] = {
        bv.INFO: (bv.REGION_INT64, info),
        bv.COLUMN_FEATURE: (bv.REGION_INT64, layout.column_feature),
        bv.SET_TABLE: (bv.REGION_INT64, layout.set_table),
        bv.CATEGORY_FEATURE: (bv.REGION_INT64, layout.category_feature),
        bv.SET_WORD_START: (bv.REGION_INT64, layout.set_word_start),
        bv.CATEGORY_START: (bv.REGION_INT64, layout.category_start),
        bv.CATEGORY_VALUES: (bv.REGION_INT64, layout.category_values),
        bv.GROUP_SLOT_START: (bv.REGION_INT64, layout.group_slot_start),
        bv.TREE_LEAF_START: (bv.REGION_INT64, padded_starts),
        bv.SET_WORDS: (bv.REGION_INT64, layout.set_words.view(np.int64)),
        bv.OUTPUT: (bv.REGION_FLOAT64, [divisor, sigmoid]),
        bv.MISSING_VALUE: (bv.REGION_FLOAT64, missing_value),
        bv.FENCES: (bv.REGION_FLOAT64, table[:, bv.FENCE_WIDTH - 1 :: bv.FENCE_WIDTH]),
        bv.THRESHOLDS: (bv.REGION_FLOAT64, table),
        bv.LEAF_VALUE: (bv.REGION_FLOAT64, np.append(layout.leaf_value, 0.0)),  # the padding lanes' leaf
        bv.POSITION_COLUMN: (bv.REGION_UINT16, layout.position_column),
        bv.ZERO_IS_MISSING: (bv.REGION_BYTES, zero_is_missing),
        bv.PREDICATE_RULE: (bv.REGION_BYTES, layout.predicate_rule),
        bv.POSITION_COLUMN8: (bv.REGION_BYTES, layout.position_column & 0xFF),
        bv.POSITION_RANK: (bv.REGION_BYTES, layout.position_rank),
        bv.POSITION_MASK: (bv.REGION_BYTES, layout.position_mask.view(np.uint8)),
    }
    if sorted(arrays) != list(range(bv.ARRAYS)):
        raise AssertionError("pack() and the kernels' section numbers disagree")
    header = np.zeros(bv.HEADER_WORDS, dtype=np.int64)
    contents: list[list[npt.NDArray[Any]]] = [[] for _ in range(bv.REGIONS)]
    size = [0] * bv.REGIONS
    for i, (region, values) in sorted(arrays.items()):
        part = np.asarray(values).astype(_DTYPES[region], casting="unsafe").reshape(-1)
        pad = -size[region] % (_ALIGN // part.itemsize)  # every array starts on a 64-byte boundary
        contents[region].append(np.zeros(pad, dtype=_DTYPES[region]))
        header[2 * (bv.REGIONS + i)], header[2 * (bv.REGIONS + i) + 1] = size[region] + pad, part.size
        contents[region].append(part)
        size[region] += pad + part.size
    offset = _round_up(header.nbytes)
    regions = [np.concatenate(parts) for parts in contents]
    for region, data in enumerate(regions):
        header[2 * region], header[2 * region + 1] = offset, data.size
        offset = _round_up(offset + data.nbytes)
    blob = np.zeros(offset, dtype=np.uint8)
    blob[: header.nbytes] = header.view(np.uint8)
    for region, data in enumerate(regions):
        start = int(header[2 * region])
        blob[start : start + data.nbytes] = data.view(np.uint8)
    blob.flags.writeable = False
    return blob


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
