"""Exact Numba scoring of LightGBM text models, without importing LightGBM.
On the request path: may import numpy, numba and core.errors; never lightgbm or anything offline.

    forest = load_forest("model.txt")
    forest.predict(X)            # == Booster.predict(X)
    forest.raw_score(X)          # == Booster.predict(X, raw_score=True)
    forest.path_attributions(X)  # per-feature contributions along each row's path
    forest.contributions(X)      # == Booster.predict(X, pred_contrib=True), exact TreeSHAP
"""

from core.forest.model import Forest, load_forest

__all__ = ["Forest", "load_forest"]
