"""The Numba stack machine that evaluates every rule of a ruleset over a whole batch in one call.

A ruleset is data, never code: core.rules.lang.compile turns each rule's tree into postfix
instructions, all rules into one program, and this kernel (compiled once, cached on disk) runs it
row by row, rule by rule:

    program[k] = (opcode, a, b, c)      one instruction; a, b, c as each opcode below says
    rule_start[r] .. rule_start[r + 1]  the instructions of rule r; it hits if they leave true on the stack
    constants                           literals, and the members of each set: sorted, unique, no NaN
    key_members                         uint64 members of each named identifier list: sorted, unique, no 0
    depth                               the deepest the stack gets (computed by the compiler)

Values on the stack are float64; a condition is 1.0 (true) or 0.0 (false). `and` / `or` jump
past their right operand when the left decides (most rules fail their first comparison, so most
rows run one or two instructions a rule). A comparison with a column and a literal, by far the
commonest shape, is one fused instruction.

Semantics (docs/rules.md): a comparison or membership test with a NaN operand is false (even
`!=` and `not in`); arithmetic is IEEE (NaN propagates, x/0 is ±inf, 0/0 is NaN); min and max are
NaN when any argument is. An absent column (no features, or no fraud_probability in fallback)
reads as NaN. An identifier (keys[k, i], a keyed hash or a country code + 1) is 0 when unknown, and
an unknown identifier is in no list and "not in" none either: like NaN, false both ways. Without
keys (has_keys false) every identifier is unknown.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Constants live here, not in the compiler: numba's on-disk cache is keyed on this file only, so
# a constant imported from elsewhere could change without invalidating the compiled kernel.

# Opcodes (a, b, c unused unless named).
LOAD = 0             # push column a
CONST = 1            # push constants[a]
NEG, ABS, NOT = 2, 3, 4
ADD, SUB, MUL, DIV, MIN, MAX = 5, 6, 7, 8, 9, 10
LT, LE, GT, GE, EQ, NE = 11, 12, 13, 14, 15, 16
IN, NOT_IN = 17, 18  # is the top one of constants[a:b]
AND_JUMP = 19        # top false: jump to a, keeping it; else pop it
OR_JUMP = 20         # top true: jump to a, keeping it; else pop it
KEY_IN, KEY_NOT_IN = 21, 22  # push (keys row a) [not] in key_members[b:c]; false for an unknown (0) key
# Opcodes from COMPARE_COLUMN up read a column; keep them last.
COMPARE_COLUMN = 23  # push (column a) <op c> constants[b], c one of LT..NE
IN_COLUMN, NOT_IN_COLUMN = 24, 25  # push (column a) [not] in constants[b:c]

# Columns that are not a feature (a feature is its index in FEATURE_NAMES, >= 0).
AMOUNT_COLUMN = -1
PROBABILITY_COLUMN = -2

PROGRAM_WIDTH = 4

# Sets up to this size are scanned; larger ones are halved down to it first. Measured on 256
# random lookups (ns a lookup, scan / binary search to the end): 2 members 1.4 / 11, 16: 4.0 / 12,
# 64: 15 / 12, 512: 115 / 13; this hybrid: 1.6, 3.9, 7.2, 9.0.
SCAN_MEMBERS = 16


@njit(nogil=True, cache=True, inline="always")
def _in_set(x, constants, lo, hi):  # type: ignore[no-untyped-def]
    """Is x (not NaN) one of the sorted, unique constants[lo:hi]?"""
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
def _in_keys(x, members, lo, hi):  # type: ignore[no-untyped-def]
    """Is the key x one of the sorted, unique members[lo:hi]? (binary search: lists run long)"""
    end = hi
    while lo < hi:
        mid = (lo + hi) >> 1
        if members[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo < end and members[lo] == x


@njit(nogil=True, cache=True, inline="always")
def _compare(op, x, y):  # type: ignore[no-untyped-def]
    """x <op> y, false when either is NaN (x != x only for NaN)."""
    if x != x or y != y:
        return False
    if op == LT:
        return x < y
    if op == LE:
        return x <= y
    if op == GT:
        return x > y
    if op == GE:
        return x >= y
    if op == EQ:
        return x == y
    return x != y


@njit(nogil=True, cache=True, error_model="numpy")
def evaluate(features, has_features, amount, probability, has_probability,  # type: ignore[no-untyped-def]
             keys, has_keys, program, rule_start, constants, key_members, depth):
    """hits[i, r]: rule r's program leaves true for transaction i.

    features: (n, F) float64, read only if has_features (else every feature is NaN); amount: (n,)
    float64; probability: (n,) float64, read only if has_probability; keys: (IDENTIFIERS, n)
    uint64, read only if has_keys. error_model="numpy" makes x/0 give ±inf or NaN, as IEEE says,
    instead of raising.
    """
    n = amount.shape[0]
    rules = rule_start.shape[0] - 1
    hits = np.empty((n, rules), dtype=np.bool_)
    stack = np.empty(max(depth, 1), dtype=np.float64)
    for i in range(n):
        for r in range(rules):
            pc = rule_start[r]
            end = rule_start[r + 1]
            sp = 0
            while pc < end:
                op = program[pc, 0]
                a = program[pc, 1]
                if op >= COMPARE_COLUMN or op == LOAD:
                    # Read the column here, not in a helper: an inlined helper taking the arrays
                    # measured 30 ns a row slower (8.8 µs against 1.6 µs for 256 rows, one rule).
                    if a >= 0:
                        x = features[i, a] if has_features else np.nan
                    elif a == AMOUNT_COLUMN:
                        x = amount[i]
                    else:
                        x = probability[i] if has_probability else np.nan
                    if op == COMPARE_COLUMN:
                        stack[sp] = 1.0 if _compare(program[pc, 3], x, constants[program[pc, 2]]) else 0.0
                    elif op == LOAD:
                        stack[sp] = x
                    else:
                        found = x == x and _in_set(x, constants, program[pc, 2], program[pc, 3])
                        stack[sp] = 1.0 if x == x and found == (op == IN_COLUMN) else 0.0
                    sp += 1
                elif op == AND_JUMP or op == OR_JUMP:  # noqa: SIM109 (two compares: no tuple in the hot loop)
                    if (stack[sp - 1] != 0.0) == (op == OR_JUMP):
                        pc = a
                        continue
                    sp -= 1
                elif op == CONST:
                    stack[sp] = constants[a]
                    sp += 1
                elif op >= LT and op <= NE:
                    sp -= 1
                    stack[sp - 1] = 1.0 if _compare(op, stack[sp - 1], stack[sp]) else 0.0
                elif op == IN or op == NOT_IN:  # noqa: SIM109 (two compares: no tuple in the hot loop)
                    x = stack[sp - 1]
                    found = x == x and _in_set(x, constants, a, program[pc, 2])
                    stack[sp - 1] = 1.0 if x == x and found == (op == IN) else 0.0
                elif op == KEY_IN or op == KEY_NOT_IN:  # noqa: SIM109 (two compares: no tuple in the hot loop)
                    key = keys[a, i] if has_keys else np.uint64(0)
                    found = key != 0 and _in_keys(key, key_members, program[pc, 2], program[pc, 3])
                    stack[sp] = 1.0 if key != 0 and found == (op == KEY_IN) else 0.0
                    sp += 1
                elif op == NOT:
                    stack[sp - 1] = 1.0 if stack[sp - 1] == 0.0 else 0.0
                elif op == NEG:
                    stack[sp - 1] = -stack[sp - 1]
                elif op == ABS:
                    stack[sp - 1] = abs(stack[sp - 1])
                else:
                    sp -= 1
                    x = stack[sp - 1]
                    y = stack[sp]
                    if op == ADD:
                        stack[sp - 1] = x + y
                    elif op == SUB:
                        stack[sp - 1] = x - y
                    elif op == MUL:
                        stack[sp - 1] = x * y
                    elif op == DIV:
                        stack[sp - 1] = x / y
                    elif op == MIN:
                        stack[sp - 1] = np.nan if x != x or y != y else (y if y < x else x)
                    else:  # MAX
                        stack[sp - 1] = np.nan if x != x or y != y else (y if y > x else x)
                pc += 1
            hits[i, r] = stack[0] != 0.0
    return hits
