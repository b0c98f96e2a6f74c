"""Numba kernels that run a compiled ruleset over a whole batch, and apply its decisions.

A ruleset is data, never code: at load, `core.rules` turns each condition into one row of a
small program, and these two kernels (compiled once, cached on disk) interpret it:

    program[k] = (column, op, lo, hi)   one row per condition, grouped by rule
    rule_start[r] .. rule_start[r + 1]  the conditions of rule r (all must hold)
    constants[lo]                       the value of a comparison
    constants[lo:hi]                    the members of an `in` / `not in` set: sorted, unique, no NaN
                                        (scanned when small, else halved first)
    effect[r]                           what rule r does when it hits: NO_EFFECT (shadow) or a Decision

Outside `core/features/` on purpose: the source there is hashed into the feature-set version.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Constants live here, not in core.rules: numba's on-disk cache is keyed on this file only, so a
# constant imported from elsewhere could change without invalidating the compiled kernels.

# Op codes, in the order of OP_NAMES.
LT, LE, GT, GE, EQ, NE, IN, NOT_IN = range(8)
OP_NAMES = ("<", "<=", ">", ">=", "==", "!=", "in", "not in")

# Columns that are not a feature (a feature is its index in FEATURE_NAMES, >= 0).
AMOUNT_COLUMN = -1
PROBABILITY_COLUMN = -2

# effect[r]: the Decision values (APPROVE 1, REVIEW 2, DECLINE 3), or none for a shadow rule.
NO_EFFECT, APPROVE, REVIEW, DECLINE = 0, 1, 2, 3

# The program's row: column, op, lo, hi.
PROGRAM_WIDTH = 4


# Sets up to this size are scanned; larger ones are halved down to it first. Measured on 256
# random lookups (ns a lookup, scan / binary search to the end): 2 members 1.4 / 11, 16: 4.0 / 12,
# 64: 15 / 12, 512: 115 / 13; this hybrid: 1.6, 3.9, 7.2, 9.0.
SCAN_MEMBERS = 16


@njit(nogil=True, cache=True, inline="always")
def _in_set(x, constants, lo, hi):  # type: ignore[no-untyped-def]
    """Is x one of the sorted, unique constants[lo:hi]?"""
    while hi - lo > SCAN_MEMBERS:
        mid = (lo + hi) >> 1
        if constants[mid] < x:
            lo = mid + 1
        else:
            hi = mid + 1  # x, if there, is at mid or before
    for j in range(lo, hi):  # noqa: SIM110 (a plain loop for Numba, not a generator)
        if constants[j] == x:
            return True
    return False


@njit(nogil=True, cache=True, inline="always")
def _holds(x, op, constants, lo, hi):  # type: ignore[no-untyped-def]
    """One condition on one value; NaN satisfies none (x != x only for NaN)."""
    if x != x:
        return False
    if op == IN:
        return _in_set(x, constants, lo, hi)
    if op == NOT_IN:
        return not _in_set(x, constants, lo, hi)
    v = constants[lo]
    if op == LT:
        return x < v
    if op == LE:
        return x <= v
    if op == GT:
        return x > v
    if op == GE:
        return x >= v
    if op == EQ:
        return x == v
    return x != v


@njit(nogil=True, cache=True)
def evaluate(features, has_features, amount, probability, has_probability,  # type: ignore[no-untyped-def]
             program, rule_start, constants):
    """hits[i, r]: every condition of rule r holds for transaction i.

    features: (n, F) float64, ignored unless has_features (then every feature condition fails);
    amount: (n,) float64; probability: (n,) float64, ignored unless has_probability.
    """
    n = amount.shape[0]
    rules = rule_start.shape[0] - 1
    hits = np.empty((n, rules), dtype=np.bool_)
    for i in range(n):
        for r in range(rules):
            hit = True
            for k in range(rule_start[r], rule_start[r + 1]):
                column = program[k, 0]
                if column >= 0:
                    if not has_features:
                        hit = False
                        break
                    x = features[i, column]
                elif column == AMOUNT_COLUMN:
                    x = amount[i]
                else:
                    if not has_probability:
                        hit = False
                        break
                    x = probability[i]
                if not _holds(x, program[k, 1], constants, program[k, 2], program[k, 3]):
                    hit = False
                    break
            hits[i, r] = hit
    return hits


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
