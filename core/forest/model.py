"""`Forest`: a LightGBM model scored by the Numba kernels, and `load_forest` to read one."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError, ModelLoadError
from core.forest import bitvector, kernels, packing, treeshap
from core.forest.layout import LayoutUnsupported, build_layout
from core.forest.parser import ParsedModel, parse_model

_FLOAT64 = np.dtype(np.float64)


def load_forest(path: str | os.PathLike[str]) -> Forest:
    """Load a LightGBM text model file (as written by `Booster.save_model`).

    Raises ModelLoadError(path, reason) when the file cannot be read or the model cannot be
    served exactly (multiclass, linear trees, unknown objectives or decision types, truncation).
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ModelLoadError(source, f"cannot read the file: {exc.strerror or exc}") from None
    return Forest._from_bytes(data, source=source)


class Forest:
    """A loaded model; scores rows exactly as LightGBM's `Booster.predict` does.

    Immutable and safe to share between threads: the kernels release the GIL and only read.
    """

    __slots__ = ("_blob", "_divisor", "_model", "_score", "_shap", "_sigmoid", "_version")

    def __init__(self, model: ParsedModel, *, version: str) -> None:
        """Wrap a parsed model; use `load_forest` or `Forest.from_string` instead."""
        self._model = model
        self._version = version
        # GBDT::Predict divides an average_output (random forest) sum by the iteration count.
        self._divisor = float(model.arrays.num_trees) if model.average_output else 1.0
        self._sigmoid = model.objective.sigmoid
        self._shap = treeshap.prepare(model.arrays)
        # The bit-vector kernels (docs/forest.md) when the model fits their layout; the tree walk
        # of `kernels.scores` otherwise (e.g. trees of more than 64 leaves), equally exact.
        self._blob: npt.NDArray[np.uint8] | None = None
        self._score = bitvector.scores_loop
        try:
            layout = build_layout(model.arrays, model.num_features)
        except LayoutUnsupported:
            pass
        else:
            self._blob = packing.pack(layout, divisor=self._divisor, sigmoid=self._sigmoid)
            if bitvector.byte_permute_supported(layout.num_columns):
                self._score = bitvector.scores_permute
        # Compile (or load from numba's disk cache) now, so the first request does not pay for it.
        warm_up = np.zeros((1, model.num_features), dtype=np.float64)
        self.predict(warm_up)
        self.raw_score(warm_up)
        self.path_attributions(warm_up)
        self.contributions(warm_up)

    @classmethod
    def from_string(cls, text: str, *, source: str = "<string>") -> Forest:
        """Build a Forest from the text of a model; `source` names it in error messages."""
        return cls._from_bytes(text.encode("utf-8"), source=source)

    @classmethod
    def _from_bytes(cls, data: bytes, *, source: str) -> Forest:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelLoadError(
                source, f"not a LightGBM text model: byte {exc.start} is not UTF-8 (a binary or compressed file?)"
            ) from None
        version = hashlib.sha256(data).hexdigest()[:16]
        return cls(parse_model(text, source=source), version=version)

    @property
    def num_features(self) -> int:
        """Number of columns `X` must have (LightGBM's max_feature_idx + 1)."""
        return self._model.num_features

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names in column order, as stored in the model file."""
        return self._model.feature_names

    @property
    def num_trees(self) -> int:
        """Number of trees in the model."""
        return self._model.arrays.num_trees

    @property
    def objective(self) -> str:
        """The objective's name as LightGBM writes it, e.g. "binary" or "regression"."""
        return self._model.objective.name

    @property
    def version(self) -> str:
        """First 16 hex digits of the SHA-256 of the model file's bytes."""
        return self._version

    def predict(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """What `Booster.predict(X)` returns: a probability for binary models, the raw value for
        regression models (divided by the number of trees for average_output models).
        """
        rows = self._rows(X)
        if self._blob is None:
            return self._walk(rows, self._divisor, self._sigmoid)
        out = np.empty(rows.shape[0])  # float64
        self._score(rows, self._blob, out, True)
        return out

    def raw_score(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """What `Booster.predict(X, raw_score=True)` returns: the sum of tree outputs, tree 0 first.

        LightGBM does not average the raw score of average_output models, and neither does this.
        """
        rows = self._rows(X)
        if self._blob is None:
            return self._walk(rows, 1.0, 0.0)
        out = np.empty(rows.shape[0])  # float64
        self._score(rows, self._blob, out, False)
        return out

    def splits_visited(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """How many splits each row passes through over all trees: the work of a tree walk (as
        LightGBM's), against which `predict`'s cost per row is measured (see `fraudscore bench`).
        """
        a = self._model.arrays
        result: npt.NDArray[np.int64] = kernels.splits_visited(
            self._rows(X), a.tree_root, a.split_feature, a.threshold, a.decision_type, a.left_child,
            a.right_child, a.cat_boundaries, a.cat_threshold,
        )  # fmt: skip
        return result

    @property
    def num_splits(self) -> int:
        """Number of split nodes over all trees: what `predict` evaluates for every row."""
        return int(self._model.arrays.split_feature.shape[0])

    @property
    def kernel(self) -> str:
        """Which predict kernel serves this model: "bit-vector, vpermi2b", "bit-vector" (the
        portable step 2) or "tree walk" (a layout the bit-vector kernels cannot hold)."""
        if self._blob is None:
            return "tree walk"
        return "bit-vector, vpermi2b" if self._score is bitvector.scores_permute else "bit-vector"

    def _walk(self, rows: npt.NDArray[np.float64], divisor: float, sigmoid: float) -> npt.NDArray[np.float64]:
        """Score by walking each tree (`kernels.scores`), for layouts the bit-vector kernels cannot hold."""
        a = self._model.arrays
        result: npt.NDArray[np.float64] = kernels.scores(
            rows, a.tree_root, a.split_feature, a.threshold, a.decision_type, a.left_child,
            a.right_child, a.leaf_value, a.cat_boundaries, a.cat_threshold, divisor, sigmoid,
        )  # fmt: skip
        return result

    def path_attributions(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Saabas attributions of the raw score, shape (n_rows, num_features + 1).

        For each internal node on a row's path, value(child taken) - value(node) goes to the
        node's split feature; the last column is the sum of the trees' root values. Each row sums
        to `raw_score` up to rounding. Node values are LightGBM's `internal_value`, which the text
        format stores to 6 significant digits only.
        """
        a = self._model.arrays
        rows = self._rows(X)
        result: npt.NDArray[np.float64] = kernels.path_attributions(
            rows, a.tree_root, a.split_feature, a.threshold, a.decision_type, a.left_child,
            a.right_child, a.internal_value, a.leaf_value, a.cat_boundaries, a.cat_threshold,
        )  # fmt: skip
        return result

    def contributions(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """What `Booster.predict(X, pred_contrib=True)` returns: exact TreeSHAP values of the raw
        score (log-odds for binary models), shape (n_rows, num_features + 1).

        The last column is the model's expected value (the trees' `ExpectedValue()` summed); each
        row sums to `raw_score` up to rounding. Branches are weighed by the training row counts
        stored in the model (`leaf_count`, `internal_count`), as LightGBM does.
        """
        return treeshap.contributions(self._rows(X), self._model.arrays, self._shap)

    def _rows(self, X: object) -> npt.NDArray[np.float64]:
        """Check X at the boundary; copy only when it is not C-contiguous."""
        # The common case first, in as few attribute lookups as possible: at one row per call
        # this check costs as much as a tenth of the scoring.
        if type(X) is np.ndarray and X.dtype is _FLOAT64 and X.ndim == 2 and X.shape[1] == self._model.num_features:
            return X if X.flags.c_contiguous else np.ascontiguousarray(X)
        shape = f"(n_rows, {self.num_features})"
        if not isinstance(X, np.ndarray):
            raise InvalidInputError(
                "X", f"must be a numpy.ndarray of float64 with shape {shape}", got=type(X).__name__
            )
        if X.dtype != np.float64:
            raise InvalidInputError(
                "X", "must have dtype float64; convert it with X.astype(np.float64)", got=f"dtype {X.dtype}"
            )
        if X.ndim != 2:
            raise InvalidInputError(
                "X", f"must be 2-D with shape {shape}; make one row 2-D with x.reshape(1, -1)",
                got=f"shape {X.shape}",
            )  # fmt: skip
        if X.shape[1] != self.num_features:
            raise InvalidInputError(
                "X", f"must have {self.num_features} columns, one per model feature, in model order",
                got=f"{X.shape[1]} columns",
            )  # fmt: skip
        return np.ascontiguousarray(X)

    def __repr__(self) -> str:
        return (
            f"Forest(objective={self.objective!r}, num_trees={self.num_trees}, "
            f"num_features={self.num_features}, version={self.version!r})"
        )
