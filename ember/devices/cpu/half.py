"""IEEE half precision in numba loops: the KV cache's storage type (or float32, `kv_cache="f32"`).

numba has no float16 type on the CPU, so the cache holds the halves' bits as uint16 and these
two intrinsics convert one value with LLVM's own ``fpext`` / ``fptrunc`` (round to nearest
even, as NumPy's ``astype(np.float16)``: `runtime.kv_cache.to_half`). In a loop over a row LLVM turns them into vector
conversions (``vcvtph2ps`` / ``vcvtps2ph`` with F16C, which every x86-64 CPU ember's kernels
target has; ``fcvt`` on AArch64).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


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
    """dst[i] = src[i] (float32) in the cache's type: rounded to halves for a uint16 dst."""


@overload(store_row, inline="always")
def _store_row(src, dst):
    if dst.dtype == types.uint16:

        def to_halves(src, dst):
            for i in range(src.size):
                dst[i] = f2h(src[i])

        return to_halves
    if dst.dtype == types.float32:

        def copy(src, dst):
            for i in range(src.size):
                dst[i] = src[i]

        return copy
    return None
