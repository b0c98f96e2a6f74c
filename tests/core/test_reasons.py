from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.features import FEATURE_NAMES, NUM_FEATURES
from core.reasons import FEATURE_TO_REASON, REASON_CODES, REASON_OF_FEATURE, top_reasons


def test_every_feature_has_exactly_one_stable_reason_code() -> None:
    assert set(REASON_OF_FEATURE) == set(FEATURE_NAMES)
    assert (FEATURE_TO_REASON.sum(axis=1) == 1).all()
    codes = [r.code for r in REASON_CODES]
    assert len(codes) == len(set(codes))
    assert all(c.isupper() and not c.startswith("R_") for c in codes)  # R_ is the rules' prefix
    assert "CARD_VELOCITY_1H" in codes and "AMOUNT_UNUSUAL_FOR_CARD" in codes


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, (5, NUM_FEATURES), elements=st.floats(-3, 3)), st.integers(0, 6))
def test_top_reasons_sum_features_by_code_and_keep_the_largest_positive(c: np.ndarray, k: int) -> None:
    for row, chosen in zip(c, top_reasons(c, k), strict=True):
        totals = {r.code: 0.0 for r in REASON_CODES}
        for j, name in enumerate(FEATURE_NAMES):
            totals[REASON_OF_FEATURE[name].code] += row[j]
        positive = sorted((w for w in totals.values() if w > 0), reverse=True)[:k]
        assert len(chosen) == len(positive)
        np.testing.assert_allclose([w for _, w in chosen], positive, rtol=1e-12)
        for code, w in chosen:
            assert abs(totals[code.code] - w) <= 1e-12 * max(1.0, abs(w))


def test_docs_list_every_reason_code() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "reasons.md").read_text()
    for r in REASON_CODES:
        assert f"| `{r.code}` | {r.description} |" in doc
