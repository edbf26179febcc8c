"""A KV cache row in numba loops: IEEE halves (the default), 8-bit rows (`kv_cache="q8_0"`) or
float32 (`kv_cache="f32"`); `runtime.kv_cache` says what each stores.

numba has no float16 type on the CPU, so the cache holds the halves' bits as uint16 and two
intrinsics convert one value with LLVM's own ``fpext`` / ``fptrunc`` (round to nearest even, as
NumPy's ``astype(np.float16)``: `runtime.kv_cache.to_half`). In a loop over a row LLVM turns
them into vector conversions (``vcvtph2ps`` / ``vcvtps2ph`` with F16C, which every x86-64 CPU
ember's kernels target has; ``fcvt`` on AArch64). An 8-bit row (int8) keeps its blocks' float32
scales in its last bytes, read and written by `f32_at` / `set_f32_at`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ...runtime.kv_cache import Q8_BLOCK


@intrinsic
def h2f(typingctx, h):
    """The half with bits h (uint16) as a float32, exactly."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f2h(typingctx, x):
    """The float32 x rounded to the nearest half (ties to even), as its bits (uint16)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def _f32_ptr(context, builder, aryty, ary, off):
    data = context.make_array(aryty)(context, builder, ary).data
    byte = builder.bitcast(data, ir.IntType(8).as_pointer())
    p = builder.gep(byte, [context.cast(builder, off, types.intp, types.int64)])
    return builder.bitcast(p, ir.FloatType().as_pointer())


@intrinsic
def f32_at(typingctx, row, off):
    """The float32 in the bytes off..off+3 of a contiguous int8 array (an 8-bit row's scale)."""
    if not (isinstance(row, types.Array) and row.dtype == types.int8 and row.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(_f32_ptr(context, builder, sig.args[0], args[0], off), align=1)

    return types.float32(row, types.intp), codegen


@intrinsic
def set_f32_at(typingctx, row, off, x):
    """Write the float32 x into the bytes off..off+3 of a contiguous int8 array."""
    if not (isinstance(row, types.Array) and row.dtype == types.int8 and row.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        x = context.cast(builder, args[2], sig.args[2], types.float32)
        builder.store(x, _f32_ptr(context, builder, sig.args[0], args[0], off), align=1)
        return context.get_dummy_value()

    return types.void(row, types.intp, types.float32), codegen


@njit(cache=True, nogil=True)
def _to_q8(src, dst):
    """src (float32) as an 8-bit row into dst: `runtime.kv_cache.to_q8`, bit for bit."""
    nb = src.size // Q8_BLOCK
    for b in range(nb):
        blk = src[b * Q8_BLOCK : (b + 1) * Q8_BLOCK]
        amax = np.float32(0.0)
        for i in range(Q8_BLOCK):
            amax = max(amax, abs(blk[i]))
        s = amax * np.float32(1 / 127)
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        for i in range(Q8_BLOCK):
            dst[b * Q8_BLOCK + i] = np.int8(np.rint(blk[i] * inv))
        set_f32_at(dst, nb * Q8_BLOCK + 4 * b, s)


@njit(cache=True, nogil=True, fastmath=True)
def hadamard_row(x):
    """x (float32, a power of two long) times the orthonormal Hadamard matrix, in place:
    `runtime.kv_cache.hadamard`, bit for bit."""
    n, h = x.size, 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                a, b = x[j], x[j + h]
                x[j], x[j + h] = a + b, a - b
        h *= 2
    c = np.float32(1 / np.sqrt(n))
    for j in range(n):
        x[j] *= c


def store_key(src, dst):
    """`store_row` for a key: rotated first (`hadamard_row`, src overwritten) where the cache
    stores keys rotated (`runtime.kv_cache.rotates`: 8 bits, a power-of-two size)."""


@overload(store_key, inline="always")
def _store_key(src, dst):
    if dst.dtype == types.int8:

        def rotated(src, dst):
            if src.size & (src.size - 1) == 0:
                hadamard_row(src)
            _to_q8(src, dst)

        return rotated
    return lambda src, dst: store_row(src, dst)


def rotate_queries(cache, q, hd):
    """q's heads of hd values, rotated in place as the cache's keys are stored (`store_key`): an
    8-bit cache's by `hadamard_row` where hd is a power of two; nothing for the others. Once a
    query, before its attention (not once a part)."""


@overload(rotate_queries, inline="always")
def _rotate_queries(cache, q, hd):
    if cache.dtype == types.int8:

        def rotate(cache, q, hd):
            if hd & (hd - 1) == 0:
                for h0 in range(0, q.size, hd):
                    hadamard_row(q[h0 : h0 + hd])

        return rotate
    return lambda cache, q, hd: None


def widen(x):
    """A cache element as a float32: h2f of half bits (uint16), a float32 as it is."""


@overload(widen, inline="always")
def _widen(x):
    if x == types.uint16:
        return lambda x: h2f(x)
    if x == types.float32:
        return lambda x: x
    return None


def store_row(src, dst):
    """dst[i] = src[i] (float32) in the cache's type: rounded to halves for a uint16 dst, an
    8-bit row (codes and scales) for an int8 one."""


@overload(store_row, inline="always")
def _store_row(src, dst):
    if dst.dtype == types.uint16:

        def to_halves(src, dst):
            for i in range(src.size):
                dst[i] = f2h(src[i])

        return to_halves
    if dst.dtype == types.int8:
        return lambda src, dst: _to_q8(src, dst)
    if dst.dtype == types.float32:

        def copy(src, dst):
            for i in range(src.size):
                dst[i] = src[i]

        return copy
    return None


def dequant_rows(src, t0, n, dst):
    """dst[j] = row t0 + j of an 8-bit cache (src [T, d + d / 8], int8) as float32, j < n."""


@overload(dequant_rows, inline="always")
def _dequant_rows(src, t0, n, dst):
    def run(src, t0, n, dst):
        d = dst.shape[1]
        for j in range(n):
            r, o = src[t0 + j], dst[j]
            for b in range(d // Q8_BLOCK):
                s = f32_at(r, d + 4 * b)
                for i in range(b * Q8_BLOCK, (b + 1) * Q8_BLOCK):
                    o[i] = s * np.float32(r[i])

    return run
