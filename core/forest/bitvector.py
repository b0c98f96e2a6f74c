"""Numba kernels that score rows on a `ForestLayout`, exactly as `Booster.predict` does.

Per block of up to eight rows:

1. bin each row, one byte per column (`_bin_rows`);
2. turn bins into go-right bits, 64 split positions at a time: with AVX-512 VBMI the row's bins
   sit in four registers and two `vpermi2b` look up 64 positions (`_go_right_words_permute`);
   elsewhere a plain loop does it (`_go_right_words_loop`);
3. per group of trees, AND the masks of the splits each row goes right at, one tree per vector
   lane, and take each lane's lowest set bit: the exit leaf (`_add_exit_leaves_*`);
4. add the leaves tree by tree in LightGBM's order, so every sum is bit-identical.

The layout travels as one uint8 blob (`core.forest.packing`) and results go into the caller's
array: each array argument costs ~70 ns to unbox and returning a new array ~350 ns, against ~1 µs
to score a row.

One file on purpose, over the usual size: Numba's on-disk cache of a kernel is invalidated only
by changes to that kernel's own file, never by a helper it calls in another file, which would
then run stale compiled code after an edit; the kernels here call each other's helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import llvmlite.binding as llvm
import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

# Constants live here, not imported: numba's disk cache is keyed on this file alone.
ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM's kZeroThreshold = 1e-35f
RIGHT_IF_NAN, RIGHT_IF_ZERO, RIGHT_IF_OTHER = 1, 2, 4
BLOCK_ROWS = 8  # rows that share each mask load in step 3
WORD_POSITIONS = 64
PERMUTE_COLUMNS = 256  # columns reachable through four 64-byte tables
TABLE_WIDTH = 256  # a column's thresholds, ascending, +inf padded
FENCE_WIDTH = 16  # thresholds 15, 31, ..., 255 of a column: the last of each block of 16

# The blob: an int64 header, then one region per element type holding several arrays.
REGION_INT64, REGION_FLOAT64, REGION_UINT16, REGION_BYTES = range(4)
REGIONS = 4
(
    INFO, COLUMN_FEATURE, SET_TABLE, CATEGORY_FEATURE, SET_WORD_START, CATEGORY_START, CATEGORY_VALUES,
    GROUP_SLOT_START, TREE_LEAF_START, SET_WORDS,  # int64 (set words bit-cast)
    OUTPUT, MISSING_VALUE, FENCES, THRESHOLDS, LEAF_VALUE,  # float64
    POSITION_COLUMN,  # uint16
    ZERO_IS_MISSING, PREDICATE_RULE, POSITION_COLUMN8, POSITION_RANK, POSITION_MASK,  # bytes
) = range(21)  # fmt: skip
ARRAYS = 21
HEADER_WORDS = 2 * (REGIONS + ARRAYS)  # (byte offset, length) per region, (offset, count) per array
NUM_NUMERIC, NUM_TREES, NUM_WORDS, LANES = range(4)  # INFO fields
DIVISOR, SIGMOID = range(2)  # OUTPUT fields


def byte_permute_supported(num_columns: int) -> bool:
    """Whether step 2 may use `vpermi2b`: numba compiles for a CPU with AVX-512 VBMI and every
    column id fits a byte. Elsewhere the portable loop gives the same bits, slower.
    """
    if num_columns > PERMUTE_COLUMNS:
        return False
    if getattr(numba.config, "CPU_NAME", None):  # numba compiles for a named CPU, not this one
        features = getattr(numba.config, "CPU_FEATURES", None) or ""
    else:
        features = llvm.get_host_cpu_features().flatten()
    return {"+avx512f", "+avx512bw", "+avx512vbmi"} <= set(features.split(","))


# --- LLVM IR helpers -------------------------------------------------------------------------

_I1, _I8, _I32, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
# numba.core.cgutils is untyped; these names let strict mypy check the code around them.
_unpack_tuple: Callable[..., Any] = cgutils.unpack_tuple
_get_or_insert_function: Callable[..., Any] = cgutils.get_or_insert_function
_populate_array: Callable[..., Any] = populate_array
_impl_ret_borrowed: Callable[..., Any] = impl_ret_borrowed


def _data(context: Any, builder: ir.IRBuilder, array_type: types.Array, value: ir.Value) -> ir.Value:
    return context.make_array(array_type)(context, builder, value).data


def _load(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value, value_type: ir.Type) -> ir.Value:
    """Load a `value_type` at element `index` of `pointer` (alignment 1: x86 does not mind)."""
    return builder.load(builder.bitcast(builder.gep(pointer, [index]), value_type.as_pointer()), align=1)


def _splat(builder: ir.IRBuilder, value: ir.Value, count: int) -> ir.Value:
    vector = ir.VectorType(value.type, count)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(_I32, count), [0] * count))


def _counted_loop(
    builder: ir.IRBuilder, start: ir.Value, stop: ir.Value, step: int, carried: list[ir.Value], body: Any
) -> list[ir.Value]:
    """`for i in range(start, stop, step): carried = body(i, carried)` ((stop - start) % step == 0)."""
    entry = builder.block
    head = builder.append_basic_block("loop.head")
    loop_body = builder.append_basic_block("loop.body")
    done = builder.append_basic_block("loop.done")
    builder.branch(head)
    builder.position_at_end(head)
    index = builder.phi(_I64)
    index.add_incoming(start, entry)
    phis = []
    for value in carried:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        phis.append(phi)
    builder.cbranch(builder.icmp_signed("<", index, stop), loop_body, done)
    builder.position_at_end(loop_body)
    results = body(index, phis)
    index.add_incoming(builder.add(index, ir.Constant(_I64, step)), builder.block)
    for phi, value in zip(phis, results, strict=True):
        phi.add_incoming(value, builder.block)
    builder.branch(head)
    builder.position_at_end(done)
    return phis


def _count_below_typer(typingctx: Any, values: types.Array, start: types.Integer, value: types.Float) -> tuple[Any, Any]:
    """How many of values[start : start + 16] are < value (none when value is NaN), as int64."""
    sig = types.int64(values, types.int64, types.float64)
    vector = ir.VectorType(ir.DoubleType(), FENCE_WIDTH)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: list[ir.Value]) -> ir.Value:
        block = _load(builder, _data(context, builder, signature.args[0], args[0]), args[1], vector)
        below = builder.fcmp_ordered("<", block, _splat(builder, args[2], FENCE_WIDTH))
        return builder.zext(builder.ctpop(builder.bitcast(below, ir.IntType(FENCE_WIDTH))), _I64)

    return sig, codegen


_count_below: Any = intrinsic(_count_below_typer)


def _reinterpret_codegen(element: types.Type, result_type: types.Array) -> Any:
    """Codegen of `_reinterpret` and `_reinterpret_rows`: only the array struct is built."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: list[ir.Value]) -> ir.Value:
        source = context.make_array(signature.args[0])(context, builder, args[0])
        result = context.make_array(result_type)(context, builder)
        nbytes = builder.mul(_unpack_tuple(builder, source.shape)[0], source.itemsize)
        itemsize = ir.Constant(nbytes.type, context.get_abi_sizeof(context.get_data_type(element)))
        count = builder.udiv(nbytes, itemsize)
        shape, strides = [count], [itemsize]
        if result_type.ndim == 2:
            width = context.cast(builder, args[2], signature.args[2], types.intp)
            shape, strides = [builder.udiv(count, width), width], [builder.mul(width, itemsize), itemsize]
        data = builder.bitcast(source.data, result.data.type)
        _populate_array(result, data=data, shape=shape, strides=strides, itemsize=itemsize,
                       meminfo=source.meminfo, parent=source.parent)  # fmt: skip
        return _impl_ret_borrowed(context, builder, result_type, result._getvalue())

    return codegen


def _reinterpret_typer(typingctx: Any, array: types.Array, dtype: Any) -> tuple[Any, Any]:
    """A contiguous 1-D array's bytes as a 1-D array of `dtype`, like `array.view(dtype)`: that
    costs ~35 ns in numba, a tenth of a microsecond per call over a few arrays; this costs nothing."""
    result_type = types.Array(dtype.instance_type, 1, "C")
    return result_type(array, dtype), _reinterpret_codegen(dtype.instance_type, result_type)


def _reinterpret_rows_typer(
    typingctx: Any, array: types.Array, dtype: Any, columns: types.Integer
) -> tuple[Any, Any]:
    """`_reinterpret`, shaped (n, columns) (where numba's reshape would cost as much again)."""
    result_type = types.Array(dtype.instance_type, 2, "C")
    return result_type(array, dtype, columns), _reinterpret_codegen(dtype.instance_type, result_type)


_reinterpret: Any = intrinsic(_reinterpret_typer)
_reinterpret_rows: Any = intrinsic(_reinterpret_rows_typer)


def _go_right_words_permute_typer(
    typingctx: Any, bins: types.Array, columns: types.Array, ranks: types.Array, out: types.Array
) -> tuple[Any, Any]:
    """out[w] bit i = bins[columns[64w + i]] > ranks[64w + i], 64 positions per `vpermi2b` pair.

    bins holds PERMUTE_COLUMNS bytes, columns are byte ids. Compiles only for AVX-512 VBMI CPUs:
    call it from `scores_permute` alone.
    """
    sig = types.void(bins, columns, ranks, out)
    bytes64 = ir.VectorType(_I8, WORD_POSITIONS)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: list[ir.Value]) -> ir.Value:
        bins_at, columns_at, ranks_at, out_at = (
            _data(context, builder, ty, value) for ty, value in zip(signature.args, args, strict=True)
        )
        words = _unpack_tuple(builder, context.make_array(signature.args[3])(context, builder, args[3]).shape)[0]
        tables = [_load(builder, bins_at, ir.Constant(_I64, 64 * i), bytes64) for i in range(4)]
        permute = _get_or_insert_function(
            builder.module, ir.FunctionType(bytes64, [bytes64] * 3), "llvm.x86.avx512.vpermi2var.qi.512"
        )

        def body(w: ir.Value, carried: list[ir.Value]) -> list[ir.Value]:
            first = builder.mul(w, ir.Constant(_I64, WORD_POSITIONS))
            index = _load(builder, columns_at, first, bytes64)
            low = builder.call(permute, [tables[0], index, tables[1]])  # columns 0-127: bit 6 picks the table
            high = builder.call(permute, [tables[2], index, tables[3]])  # columns 128-255
            row_bins = builder.select(builder.icmp_signed("<", index, ir.Constant(bytes64, None)), high, low)
            right = builder.icmp_unsigned(">", row_bins, _load(builder, ranks_at, first, bytes64))
            builder.store(builder.bitcast(right, _I64), builder.gep(out_at, [w]))
            return []

        _counted_loop(builder, ir.Constant(_I64, 0), words, 1, [], body)
        return context.get_dummy_value()

    return sig, codegen


_go_right_words_permute: Any = intrinsic(_go_right_words_permute_typer)


def _add_exit_leaves_intrinsic(rows: int, lanes: int) -> Any:
    """An intrinsic for steps 3 and 4 of one group, for `rows` rows at once: AND the masks of
    slots [start, stop) at which each row goes right, take each lane's lowest set bit (the exit
    leaf, numbered left to right from first_leaf[lane]) and add the leaves' values to totals[r]
    lane by lane, in tree order.

    Masks are `lanes` x (512 / lanes)-bit words per slot (raw bytes); bytes [s * lanes / 8, ...)
    of row r's go-right words are slot s, one bit per lane. A single row keeps two accumulators
    on alternate slots (groups have an even slot count) so no AND waits for the one before.
    Everything stays in registers: a vector stored and read back lane by lane stalls.
    """
    chains = 2 if rows == 1 else 1
    mask_bits = 512 // lanes
    masks_type = ir.VectorType(ir.IntType(mask_bits), lanes)
    lane_bits_type = ir.VectorType(_I1, lanes)
    leaves_type = ir.VectorType(_I64, lanes)

    def add_exit_leaves(
        typingctx: Any, words: types.Array, masks: types.Array, start: types.Integer, stop: types.Integer,
        first_leaf: types.Array, leaf_value: types.Array, totals: types.Array,
    ) -> tuple[Any, Any]:  # fmt: skip
        sig = types.void(words, masks, types.int64, types.int64, first_leaf, leaf_value, totals)

        def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: list[ir.Value]) -> ir.Value:
            words_array = context.make_array(signature.args[0])(context, builder, args[0])
            row_bytes = _unpack_tuple(builder, words_array.strides)[0]
            word_bytes = builder.bitcast(words_array.data, _I8.as_pointer())
            masks_at = builder.bitcast(_data(context, builder, signature.args[1], args[1]), masks_type.as_pointer())
            first_leaf_at = _data(context, builder, signature.args[4], args[4])
            leaf_value_at = _data(context, builder, signature.args[5], args[5])
            totals_at = _data(context, builder, signature.args[6], args[6])
            cttz = _get_or_insert_function(
                builder.module, ir.FunctionType(masks_type, [masks_type, _I1]), f"llvm.cttz.v{lanes}i{mask_bits}"
            )

            def body(first: ir.Value, accumulators: list[ir.Value]) -> list[ir.Value]:
                result = list(accumulators)
                for chain in range(chains):
                    slot = builder.add(first, ir.Constant(_I64, chain))
                    mask = builder.load(builder.gep(masks_at, [slot]), align=1)
                    for r in range(rows):
                        at = builder.add(builder.mul(ir.Constant(_I64, r), row_bytes), builder.mul(slot, ir.Constant(_I64, lanes // 8)))
                        taken = builder.bitcast(_load(builder, word_bytes, at, ir.IntType(lanes)), lane_bits_type)
                        i = r * chains + chain
                        result[i] = builder.select(taken, builder.and_(result[i], mask), result[i])
                return result

            ones = ir.Constant(masks_type, [(1 << mask_bits) - 1] * lanes)
            accumulators = _counted_loop(builder, args[2], args[3], chains, [ones] * (rows * chains), body)
            first_leaf = _load(builder, first_leaf_at, ir.Constant(_I64, 0), leaves_type)
            for r in range(rows):
                lane_masks = accumulators[r * chains]
                for chain in range(1, chains):
                    lane_masks = builder.and_(lane_masks, accumulators[r * chains + chain])
                exit_bits = builder.call(cttz, [lane_masks, ir.Constant(_I1, 0)])
                leaves = builder.add(builder.zext(exit_bits, leaves_type), first_leaf)
                total_at = builder.gep(totals_at, [ir.Constant(_I64, r)])
                total = builder.load(total_at)
                for lane in range(lanes):  # LightGBM's order: tree by tree, one rounding each
                    leaf = builder.extract_element(leaves, ir.Constant(_I32, lane))
                    total = builder.fadd(total, builder.load(builder.gep(leaf_value_at, [leaf])))
                builder.store(total, total_at)
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(add_exit_leaves)


_add_exit_leaves_8_block = _add_exit_leaves_intrinsic(BLOCK_ROWS, 8)
_add_exit_leaves_8_row = _add_exit_leaves_intrinsic(1, 8)
_add_exit_leaves_16_block = _add_exit_leaves_intrinsic(BLOCK_ROWS, 16)
_add_exit_leaves_16_row = _add_exit_leaves_intrinsic(1, 16)


# --- kernels ---------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _region(blob: npt.NDArray[np.uint8], header: npt.NDArray[np.int64], region: int, itemsize: int) -> Any:
    start = header[2 * region]
    return blob[start : start + header[2 * region + 1] * itemsize]


@njit(nogil=True, cache=True)
def _part(region: Any, header: npt.NDArray[np.int64], array: int) -> Any:
    start = header[2 * (REGIONS + array)]
    return region[start : start + header[2 * (REGIONS + array) + 1]]


@njit(nogil=True, cache=True)
def _category_code(value: float, categories: npt.NDArray[np.int64]) -> int:
    """Index of int(value) among `categories` (ascending), or len(categories) when absent.

    As `CategoricalDecision`: NaN and values <= -1 are no category, int() truncates toward zero,
    and nothing at or beyond 2**31 is in any set.
    """
    absent: int = categories.shape[0]
    if math.isnan(value) or value <= -1.0 or value >= 2147483648.0:
        return absent
    category = int(value)
    low, high = 0, absent
    while low < high:
        middle = (low + high) >> 1
        if categories[middle] < category:
            low = middle + 1
        else:
            high = middle
    found: bool = low < absent and categories[low] == category
    code: int = low if found else absent
    return code


@njit(nogil=True, cache=True)
def _bin_rows(
    X: npt.NDArray[np.float64],
    first: int,
    bins: npt.NDArray[np.uint8],
    ints: npt.NDArray[np.int64],
    floats: npt.NDArray[np.float64],
    bytes_: npt.NDArray[np.uint8],
    header: npt.NDArray[np.int64],
    codes: npt.NDArray[np.int64],
) -> None:
    """bins[r, c] = row first + r's bin in column c: how many of the column's thresholds lie below
    the row's value in its view, or 1 for an indicator column the row goes right at.

    Column by column, so that a column's thresholds (2 KB) are read from L2 once per block of
    rows, not once per row; the rows' searches are independent and overlap.
    """
    rows = bins.shape[0]
    column_feature = _part(ints, header, COLUMN_FEATURE)
    missing_value = _part(floats, header, MISSING_VALUE)
    zero_is_missing = _part(bytes_, header, ZERO_IS_MISSING)
    fences = _part(floats, header, FENCES)
    thresholds = _part(floats, header, THRESHOLDS)
    num_numeric = _part(ints, header, INFO)[NUM_NUMERIC]
    for c in range(num_numeric):
        feature = column_feature[c]
        replacement = missing_value[c]  # loaded up front so that the choice below stays a select
        zero_missing = zero_is_missing[c] != 0
        for r in range(rows):
            value = X[first + r, feature]
            # The C API drops |x| <= kZeroThreshold from a dense row, so trees see 0.0. Selects,
            # not branches: whether a value is missing is data, and a mispredicted branch costs
            # ~15 cycles.
            value = 0.0 if -ZERO_THRESHOLD <= value <= ZERO_THRESHOLD else value
            missing = (value != value) | (zero_missing & (value == 0.0))
            value = replacement if missing else value
            # `block` fences lie below the value, so do the block * 16 thresholds they close.
            block = _count_below(fences, c * FENCE_WIDTH, value)
            bins[r, c] = block * FENCE_WIDTH + _count_below(thresholds, c * TABLE_WIDTH + block * FENCE_WIDTH, value)

    category_feature = _part(ints, header, CATEGORY_FEATURE)
    category_start = _part(ints, header, CATEGORY_START)
    category_values = _part(ints, header, CATEGORY_VALUES)
    tables = category_feature.shape[0]
    for table in range(tables):
        categories = category_values[category_start[table] : category_start[table + 1]]
        for r in range(rows):
            codes[r * tables + table] = _category_code(X[first + r, category_feature[table]], categories)
    set_table = _part(ints, header, SET_TABLE)
    set_word_start = _part(ints, header, SET_WORD_START)
    set_words = _part(ints, header, SET_WORDS)
    for s in range(set_table.shape[0]):
        for r in range(rows):
            code = codes[r * tables + set_table[s]]
            goes_left = (set_words[set_word_start[s] + (code >> 6)] >> (code & 63)) & 1
            bins[r, num_numeric + s] = 0 if goes_left else 1

    predicate_rule = _part(bytes_, header, PREDICATE_RULE)
    base = num_numeric + set_table.shape[0]
    for p in range(predicate_rule.shape[0]):
        for r in range(rows):
            value = X[first + r, column_feature[base + p]]
            if math.isnan(value):
                kind = RIGHT_IF_NAN
            elif -ZERO_THRESHOLD <= value <= ZERO_THRESHOLD:
                kind = RIGHT_IF_ZERO
            else:
                kind = RIGHT_IF_OTHER
            bins[r, base + p] = 1 if predicate_rule[p] & kind else 0


@njit(nogil=True, cache=True)
def _go_right_words_loop(
    bins: npt.NDArray[np.uint8],
    columns: npt.NDArray[np.uint16],
    ranks: npt.NDArray[np.uint8],
    out: npt.NDArray[np.uint64],
) -> None:
    """The portable step 2: out[w] bit i = bins[columns[64w + i]] > ranks[64w + i]."""
    for w in range(out.shape[0]):
        word = np.uint64(0)
        first = w * WORD_POSITIONS
        for i in range(WORD_POSITIONS):
            if bins[columns[first + i]] > ranks[first + i]:
                word |= np.uint64(1) << np.uint64(i)
        out[w] = word


@njit(nogil=True, cache=True)
def _add_leaves(
    out: npt.NDArray[np.float64],
    first: int,
    rows: int,
    words: npt.NDArray[np.uint64],
    ints: npt.NDArray[np.int64],
    floats: npt.NDArray[np.float64],
    bytes_: npt.NDArray[np.uint8],
    header: npt.NDArray[np.int64],
    transform: bool,
) -> None:
    """Steps 3 and 4 for rows [first, first + rows), whose go-right words are words[:rows]."""
    lanes = _part(ints, header, INFO)[LANES]
    group_slot_start = _part(ints, header, GROUP_SLOT_START)
    tree_leaf_start = _part(ints, header, TREE_LEAF_START)
    leaf_value = _part(floats, header, LEAF_VALUE)
    masks = _part(bytes_, header, POSITION_MASK)
    totals = out[first : first + rows]
    totals[:] = 0.0
    # Lanes past the last tree are padding: they add leaf_value[-1], which is 0.0, and s + 0.0
    # is s for every sum here (no sum starts at -0.0), so the order of roundings is untouched.
    for group in range(group_slot_start.shape[0] - 1):
        start, stop = group_slot_start[group], group_slot_start[group + 1]
        first_leaf = tree_leaf_start[group * lanes : (group + 1) * lanes]
        if lanes == 16:
            if rows == BLOCK_ROWS:
                _add_exit_leaves_16_block(words, masks, start, stop, first_leaf, leaf_value, totals)
            else:
                for r in range(rows):
                    _add_exit_leaves_16_row(words[r : r + 1], masks, start, stop, first_leaf, leaf_value, totals[r:])
        elif rows == BLOCK_ROWS:
            _add_exit_leaves_8_block(words, masks, start, stop, first_leaf, leaf_value, totals)
        else:
            for r in range(rows):
                _add_exit_leaves_8_row(words[r : r + 1], masks, start, stop, first_leaf, leaf_value, totals[r:])
    if transform:
        output = _part(floats, header, OUTPUT)
        for r in range(rows):
            total = totals[r] / output[DIVISOR]
            if output[SIGMOID] > 0.0:
                total = 1.0 / (1.0 + math.exp(-output[SIGMOID] * total))
            totals[r] = total


@njit(nogil=True, cache=True)
def _regions(blob: npt.NDArray[np.uint8]) -> Any:
    header = _reinterpret(blob[: HEADER_WORDS * 8], np.int64)
    ints = _reinterpret(_region(blob, header, REGION_INT64, 8), np.int64)
    floats = _reinterpret(_region(blob, header, REGION_FLOAT64, 8), np.float64)
    bytes_ = _region(blob, header, REGION_BYTES, 1)
    return header, ints, floats, bytes_


@njit(nogil=True, cache=True)
def _scratch(n_rows: int, bins_per_row: int, ints: npt.NDArray[np.int64], header: npt.NDArray[np.int64]) -> Any:
    """Working arrays for a block of rows, carved from one allocation (each costs ~40 ns):
    bins (rows, bins_per_row) uint8, go-right words (rows, words) uint64, category codes."""
    rows = min(BLOCK_ROWS, n_rows)
    words, tables = _part(ints, header, INFO)[NUM_WORDS], _part(ints, header, CATEGORY_FEATURE).shape[0]
    bin_words = rows * bins_per_row // 8  # bins_per_row is a multiple of 8
    scratch = np.empty(rows * words + bin_words + rows * tables, dtype=np.uint64)
    at = rows * words
    go_right = _reinterpret_rows(scratch[:at], np.uint64, words)
    bins = _reinterpret_rows(scratch[at : at + bin_words], np.uint8, bins_per_row)
    codes = _reinterpret(scratch[at + bin_words :], np.int64)
    return bins, go_right, codes


@njit(nogil=True, cache=True)
def scores_permute(
    X: npt.NDArray[np.float64], blob: npt.NDArray[np.uint8], out: npt.NDArray[np.float64], transform: bool
) -> None:
    """out[i] = row i's raw score (tree 0 first), or with `transform` its `predict` output (sum
    / divisor, then the sigmoid), bit-identical to LightGBM. Needs AVX-512 VBMI: call it only
    where `byte_permute_supported` is true, else `scores_loop`.
    """
    header, ints, floats, bytes_ = _regions(blob)
    columns = _part(bytes_, header, POSITION_COLUMN8)
    ranks = _part(bytes_, header, POSITION_RANK)
    # Bins past the last column are never read (no position points there): no need to clear them.
    bins, words, codes = _scratch(X.shape[0], PERMUTE_COLUMNS, ints, header)
    for first in range(0, X.shape[0], BLOCK_ROWS):
        rows = min(BLOCK_ROWS, X.shape[0] - first)
        _bin_rows(X, first, bins[:rows], ints, floats, bytes_, header, codes)
        for r in range(rows):
            _go_right_words_permute(bins[r], columns, ranks, words[r])
        _add_leaves(out, first, rows, words, ints, floats, bytes_, header, transform)


@njit(nogil=True, cache=True)
def scores_loop(
    X: npt.NDArray[np.float64], blob: npt.NDArray[np.uint8], out: npt.NDArray[np.float64], transform: bool
) -> None:
    """`scores_permute` for any CPU: step 2 by a plain loop."""
    header, ints, floats, bytes_ = _regions(blob)
    columns = _part(_reinterpret(_region(blob, header, REGION_UINT16, 2), np.uint16), header, POSITION_COLUMN)
    ranks = _part(bytes_, header, POSITION_RANK)
    columns_count = _part(ints, header, COLUMN_FEATURE).shape[0]
    bins, words, codes = _scratch(X.shape[0], max(-(-columns_count // 8) * 8, 8), ints, header)
    for first in range(0, X.shape[0], BLOCK_ROWS):
        rows = min(BLOCK_ROWS, X.shape[0] - first)
        _bin_rows(X, first, bins[:rows], ints, floats, bytes_, header, codes)
        for r in range(rows):
            _go_right_words_loop(bins[r], columns, ranks, words[r])
        _add_leaves(out, first, rows, words, ints, floats, bytes_, header, transform)
