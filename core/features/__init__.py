"""Real-time features: registry, bounded entity state, the state store interface and the Numba kernels.
On the request path: may import numpy, numba and core's encode, errors and files; nothing offline.

kernels.py stays one file, over the usual size: its bytes (with state.py's) are part of
FEATURE_SET_VERSION, which a model records, and Numba's disk cache of a kernel is invalidated only
by changes to its own file, so every helper the kernels inline lives beside them.
"""

from core.features.engine import FeatureEngine
from core.features.registry import (
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    FEATURE_SET_VERSION,
    FEATURES,
    NUM_FEATURES,
    Feature,
)
from core.features.state import EntityState
from core.features.store import LocalStore, StateStore, StoredRows

__all__ = [
    "CATEGORICAL_FEATURES", "FEATURES", "FEATURE_NAMES", "FEATURE_SET_VERSION", "NUM_FEATURES",
    "EntityState", "Feature", "FeatureEngine", "LocalStore", "StateStore", "StoredRows",
]
