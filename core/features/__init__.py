"""Real-time features: registry, bounded entity state and the Numba kernels that fill them."""

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

__all__ = [
    "CATEGORICAL_FEATURES", "FEATURES", "FEATURE_NAMES", "FEATURE_SET_VERSION", "NUM_FEATURES",
    "EntityState", "Feature", "FeatureEngine",
]
