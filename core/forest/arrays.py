"""The flat, read-only arrays every kernel walks: all trees of a model concatenated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class ForestArrays:
    """One model as flat arrays; node and leaf indices are global across all trees.

    Children keep LightGBM's encoding: a child >= 0 is an internal node, a child < 0 is leaf ~child.
    `tree_root[t]` is tree t's root node, or ~leaf for a tree with a single leaf.
    For categorical nodes `threshold` holds the global index into `cat_boundaries` (LightGBM holds
    the tree-local one there); words cat_boundaries[i]:cat_boundaries[i+1] of `cat_threshold` are
    that split's bitset of categories that go left.
    `leaf_count` and `internal_count` are the training rows that reached each leaf and node
    (LightGBM's `data_count`), the cover TreeSHAP weighs branches by.
    """

    tree_root: npt.NDArray[np.int32]
    split_feature: npt.NDArray[np.int32]
    threshold: npt.NDArray[np.float64]
    decision_type: npt.NDArray[np.uint8]
    left_child: npt.NDArray[np.int32]
    right_child: npt.NDArray[np.int32]
    internal_value: npt.NDArray[np.float64]
    leaf_value: npt.NDArray[np.float64]
    cat_boundaries: npt.NDArray[np.int32]
    cat_threshold: npt.NDArray[np.uint32]
    leaf_count: npt.NDArray[np.int32]
    internal_count: npt.NDArray[np.int32]

    def __post_init__(self) -> None:
        # Kernels run without the GIL and share one model across threads: nobody may write.
        for name in self.__slots__:
            getattr(self, name).flags.writeable = False

    @property
    def num_trees(self) -> int:
        """Number of trees (one per boosting iteration for the single-output models served)."""
        return int(self.tree_root.shape[0])
