"""The Numba kernel that applies a ruleset's hits to decisions by precedence.

Evaluating the rules is core.rules.lang.vm's job; this kernel takes its hit matrix:

    hits[i, r]   rule r matched transaction i
    effect[r]    what rule r does when it hits: NO_EFFECT (shadow) or a Decision
    base[i]      the decision before rules (the model's, or APPROVE in fallback)

Outside `core/features/` on purpose: the source there is hashed into the feature-set version.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from core.rules.lang.vm import SCAN_MEMBERS

__all__ = ["APPROVE", "DECLINE", "NO_EFFECT", "REVIEW", "SCAN_MEMBERS", "decide"]

# Constants live here, not in core.rules.ruleset: numba's on-disk cache is keyed on this file only, so a
# constant imported from elsewhere could change without invalidating the compiled kernels.
# (SCAN_MEMBERS is re-exported for callers, never used by the kernel below.)

# effect[r]: the Decision values (APPROVE 1, REVIEW 2, DECLINE 3), or none for a shadow rule.
NO_EFFECT, APPROVE, REVIEW, DECLINE = 0, 1, 2, 3


@njit(nogil=True, cache=True)
def decide(hits, effect, base):  # type: ignore[no-untyped-def]
    """Each row's decision by precedence: an APPROVE hit wins, then any DECLINE, then a REVIEW
    hit raises an APPROVE to REVIEW; otherwise base. Rules with NO_EFFECT never change anything."""
    n, rules = hits.shape
    out = np.empty(n, dtype=np.int8)
    for i in range(n):
        approve = decline = review = False
        for r in range(rules):
            if hits[i, r]:
                e = effect[r]
                approve |= e == APPROVE
                decline |= e == DECLINE
                review |= e == REVIEW
        if approve:
            out[i] = APPROVE
        elif decline:
            out[i] = DECLINE
        elif review and base[i] == APPROVE:
            out[i] = REVIEW
        else:
            out[i] = base[i]
    return out
