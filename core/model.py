"""A model directory: the LightGBM model file, its manifest, and loading them for serving.

    models/default/
      model.txt       LightGBM text model (evaluated by core.forest, never by lightgbm when serving)
      manifest.json   feature names and feature-set version, thresholds, training window, metrics
      report.md, metrics.json, pr_curve.png, score_histogram.png
                      the validation period's report, for people (core/offline/report.py; never read here)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from core.errors import ModelLoadError
from core.features import FEATURE_NAMES, FEATURE_SET_VERSION
from core.forest import Forest, load_forest
from core.rules.ruleset import Decision

MODEL_FILE = "model.txt"
MANIFEST_FILE = "manifest.json"


# Plain ints: an IntEnum member lookup costs ~1 µs, and this runs per batch.
_APPROVE, _REVIEW, _DECLINE = int(Decision.APPROVE), int(Decision.REVIEW), int(Decision.DECLINE)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """fraud_probability ≥ review → REVIEW; ≥ decline → DECLINE; else APPROVE."""

    review: float
    decline: float

    def decide(self, p: np.ndarray) -> np.ndarray:
        """The model's own decision for each probability (int8 Decision values), before any rule."""
        base = np.full(p.shape[0], _APPROVE, dtype=np.int8)
        base[p >= self.review] = _REVIEW
        base[p >= self.decline] = _DECLINE
        return base


@dataclass(frozen=True, slots=True)
class LoadedModel:
    forest: Forest
    version: str
    thresholds: Thresholds
    manifest: dict[str, Any]


def load_model_dir(path: Path) -> LoadedModel:
    """Load and check a model directory; raises ModelLoadError saying what is wrong and what to do."""
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = orjson.loads(manifest_path.read_bytes())
    except FileNotFoundError:
        raise ModelLoadError(str(path), f"no {MANIFEST_FILE}; train one with `fraudscore train --out {path}`") from None
    except orjson.JSONDecodeError as exc:
        raise ModelLoadError(str(manifest_path), f"not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(str(manifest_path), "expected a JSON object")
    found = manifest.get("feature_set_version")
    if found != FEATURE_SET_VERSION:
        raise ModelLoadError(
            str(path),
            f"model was trained on feature set {found!r} but this build computes {FEATURE_SET_VERSION!r}; "
            "retrain the model with this version (`fraudscore train`)",
        )
    if tuple(manifest.get("feature_names", ())) != FEATURE_NAMES:
        raise ModelLoadError(str(path), "manifest feature_names differ from this build's feature registry; retrain")
    forest = load_forest(path / MODEL_FILE)
    if forest.num_features != len(FEATURE_NAMES):
        raise ModelLoadError(str(path), f"model has {forest.num_features} features, registry has {len(FEATURE_NAMES)}")
    try:
        t = manifest["thresholds"]
        thresholds = Thresholds(review=float(t["review"]), decline=float(t["decline"]))
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(str(manifest_path), "expected thresholds {review, decline} as numbers") from None
    if not 0.0 <= thresholds.review <= thresholds.decline <= 1.0:
        raise ModelLoadError(str(manifest_path), f"thresholds must satisfy 0 ≤ review ≤ decline ≤ 1, got {t}")
    version = str(manifest.get("model_version") or forest.version)
    return LoadedModel(forest=forest, version=version, thresholds=thresholds, manifest=manifest)
