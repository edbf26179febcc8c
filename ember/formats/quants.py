"""Dequantize ggml block types (the weight encodings inside GGUF files) to float32.

This is ember's own decoder, one small numba kernel per block type. It does not call
``gguf.quants``, but tests check that its float32 output is bit-identical to
``gguf.quants.dequantize(raw, qtype)`` for every supported type. Max difference: 0 for all
types. Each kernel does the same float32 operations in the same order as gguf's numpy code
(e.g. ``(d * sc) * q - dmin * m`` for Q4_K). Numba's default strict float mode never
contracts a multiply and an add into an FMA. One caveat applies only to corrupt data: when an
f16 *scale* is NaN, the output is NaN in the same places, but the NaN payload bits may
differ. F16 tensors themselves decode exactly, NaN payloads included.

Supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K, TQ1_0, TQ2_0. ``block_info``/``row_nbytes`` know the sizes of every ggml type, so a
loader can lay out tensors it cannot decode. ``dequantize`` raises ``UnsupportedError``
for the others.

Kernel contract: ``kernel(src, out)``. ``src`` is a flat uint8 array of whole blocks and
``out`` is a contiguous float32 array of ``n_blocks * block_weights``. The kernels do no bounds
checks; the public functions validate sizes first. They are ``@njit(cache=True, nogil=True)``,
so threads may decode disjoint block ranges at once (prefill tiles, via ``dequantize_into``).
``dequantize_rows`` decodes single rows (embedding lookups) without touching the rest.

Speed, one thread, measured on the dev box (Intel Xeon Sapphire Rapids class, AVX-512,
2 cores shared with other jobs), in ns per weight, min of many runs. The kernel is called
directly with a reused ``out``. 64K = 2**16 weights (cache-resident, like a tile or a row
batch), 4M = 2**22 weights (memory-bound):

    type   64K   4M        type   64K   4M        type   64K   4M
    Q4_0   0.23  0.35      Q2_K   0.48  0.52      F32    0.13  0.54  (numpy copy)
    Q4_1   0.31  0.35      Q3_K   0.55  0.56      F16    0.60  0.60  (numpy's cast: ~3)
    Q5_0   0.32  0.44      Q4_K   0.28  0.32      BF16   0.12  0.51
    Q5_1   0.40  0.49      Q5_K   0.39  0.44      TQ1_0  0.41  0.55
    Q8_0   0.18  0.33      Q6_K   0.40  0.44      TQ2_0  0.19  0.25

gguf's numpy code is 10-30 ns per weight on the same box. Fixed costs per call: about 0.7 us
to dispatch a kernel, about 2.5 us for ``dequantize`` of a small buffer, and 3-5 us for
``dequantize_rows`` of one 896-weight Q5_0 row. A fresh output array also costs page faults
on large sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ember.errors import FormatError, UnsupportedError
from ember.formats.gguf import type_name

__all__ = [
    "SUPPORTED",
    "type_name",
    "block_info",
    "row_nbytes",
    "dequantize",
    "dequantize_into",
    "dequantize_rows",
]

_T = GGMLQuantizationType
_F32 = np.float32
_TWO_M24 = np.float32(2.0**-24)

# --------------------------------------------------------------------------------------------
# shared pieces


@intrinsic
def _opaque(typingctx, n):
    """``n`` unchanged, but hidden from LLVM's constant folding.

    A block's inner loops have tiny constant trip counts (16, 32). LLVM fully unrolls such loops
    into scalar code before its loop vectorizer runs. It cannot prove that ``src`` and ``out``
    do not overlap, so the SLP vectorizer leaves the unrolled code scalar too, which is 2-4x
    slower. When the trip count is a value LLVM cannot see, the loop vectorizer takes the loop
    and adds a cheap runtime overlap check.
    """

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(args[0].type, [args[0].type])
        return builder.call(ir.InlineAsm(fnty, "", "=r,0"), [args[0]])

    return types.intp(types.intp), codegen


@njit(cache=True, nogil=True, inline="always")
def _f16(src, off):
    """Little-endian IEEE half at src[off:off+2] -> float32, computed exactly.

    A finite half is ``mant * 2**(exp - 25)`` with ``mant < 2**11``. So we multiply by two
    exact powers of two. Zero, subnormals and the sign come out right. inf keeps its sign.
    NaN comes back as a NaN, but not with the half's payload bits.
    """
    h = np.int32(src[off]) | (np.int32(src[off + 1]) << 8)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        v = _F32(np.inf) if m == 0 else _F32(np.nan)
    elif e == 0:
        v = _F32(m) * _TWO_M24
    else:
        v = (_F32(m | 0x400) * _F32(np.int32(1) << (e - 1))) * _TWO_M24
    return -v if h & 0x8000 else v


@njit(cache=True, nogil=True, inline="always")
def _i8(x):
    """uint8 byte -> its int8 value (as an int32)."""
    return (np.int32(x) ^ 0x80) - 0x80


@njit(cache=True, nogil=True, inline="always")
def _u32(src, off):
    """Little-endian uint32 at src[off:off+4], as an int64."""
    return (
        np.int64(src[off])
        | (np.int64(src[off + 1]) << 8)
        | (np.int64(src[off + 2]) << 16)
        | (np.int64(src[off + 3]) << 24)
    )


@njit(cache=True, nogil=True, inline="always")
def _kquant_scale_min(src, off, j):
    """(scale, min) of sub-block j (0..7) from the 12-byte 6-bit packing used by Q4_K/Q5_K."""
    if j < 4:
        sc = src[off + j] & 0x3F
        mn = src[off + 4 + j] & 0x3F
    else:
        sc = (src[off + 4 + j] & 0x0F) | ((src[off + j - 4] >> 2) & 0x30)
        mn = (src[off + 4 + j] >> 4) | ((src[off + j] >> 2) & 0x30)
    return _F32(sc), _F32(mn)


# --------------------------------------------------------------------------------------------
# 32-weight blocks: Q4_0, Q4_1, Q5_0, Q5_1 share one layout, Q8_0 is plain int8


@njit(cache=True, nogil=True, inline="always")
def _nibble_block(src, out, qs_off, w, qh, d, m, zero, with_min, n16):
    """Decode one 32-weight Q4_0/Q4_1/Q5_0/Q5_1 block into out[w:w+32].

    Weight j (0..15) is the low nibble of qs[j] and weight j + 16 is the high nibble. For Q5
    types, bit j of ``qh`` is bit 4 of weight j (pass qh=0 for Q4). The value is ``d*q + m``
    with a min (Q4_1/Q5_1), else ``d*(q - zero)``. No "+ 0.0" is added, so -0.0 survives
    exactly as in gguf.
    """
    for j in range(n16):
        x = np.int32(src[qs_off + j])
        lo = (x & 0x0F) | np.int32(((qh >> j) & 1) << 4)
        hi = (x >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
        if with_min:
            out[w + j] = d * _F32(lo) + m
            out[w + j + 16] = d * _F32(hi) + m
        else:
            out[w + j] = d * _F32(lo - zero)
            out[w + j + 16] = d * _F32(hi - zero)


@njit(cache=True, nogil=True)
def _deq_q4_0(src, out):  # d:f16, qs[16]
    n16 = _opaque(16)
    for b in range(out.size // 32):
        o = b * 18
        _nibble_block(src, out, o + 2, b * 32, 0, _f16(src, o), _F32(0), 8, False, n16)


@njit(cache=True, nogil=True)
def _deq_q4_1(src, out):  # d:f16, m:f16, qs[16]
    n16 = _opaque(16)
    for b in range(out.size // 32):
        o = b * 20
        _nibble_block(src, out, o + 4, b * 32, 0, _f16(src, o), _f16(src, o + 2), 0, True, n16)


@njit(cache=True, nogil=True)
def _deq_q5_0(src, out):  # d:f16, qh:u32, qs[16]
    n16 = _opaque(16)
    for b in range(out.size // 32):
        o = b * 22
        _nibble_block(src, out, o + 6, b * 32, _u32(src, o + 2), _f16(src, o), _F32(0), 16, False, n16)


@njit(cache=True, nogil=True)
def _deq_q5_1(src, out):  # d:f16, m:f16, qh:u32, qs[16]
    n16 = _opaque(16)
    for b in range(out.size // 32):
        o = b * 24
        _nibble_block(src, out, o + 8, b * 32, _u32(src, o + 4), _f16(src, o), _f16(src, o + 2), 0, True, n16)


@njit(cache=True, nogil=True)
def _deq_q8_0(src, out):  # d:f16, qs:i8[32]
    n32 = _opaque(32)
    for b in range(out.size // 32):
        o, w = b * 34, b * 32
        d = _f16(src, o)
        for j in range(n32):
            out[w + j] = _F32(_i8(src[o + 2 + j])) * d


# --------------------------------------------------------------------------------------------
# 256-weight K-quant blocks. Q2_K, Q3_K and Q6_K have 16 scales, one per run of 16 weights.
# They are decoded as 8 groups of 32 weights: group g = h*4 + s (h: which 128-weight half,
# s: which 2-bit field or nibble) is out[w + 32*g : w + 32*g + 32], and it uses scales 2g and
# 2g + 1. Picking the scale per weight (``a if l < 16 else b``) keeps one 32-long loop, which
# LLVM vectorizes. Separate 16-long loops measured about 3x slower for Q6_K.


@njit(cache=True, nogil=True)
def _deq_q2_k(src, out):  # scales[16], qs[64], d:f16, dmin:f16
    n32 = _opaque(32)
    for b in range(out.size // 256):
        o, w = b * 84, b * 256
        d = _f16(src, o + 80)
        dmin = _f16(src, o + 82)
        for g in range(8):
            sc0, sc1 = np.int32(src[o + 2 * g]), np.int32(src[o + 2 * g + 1])
            dl0, dl1 = d * _F32(sc0 & 0x0F), d * _F32(sc1 & 0x0F)
            ml0, ml1 = dmin * _F32(sc0 >> 4), dmin * _F32(sc1 >> 4)
            qo = o + 16 + (g >> 2) * 32  # weight l = 2-bit field s of qs[h*32 + l]
            shift = 2 * (g & 3)
            for l in range(n32):
                q = _F32((np.int32(src[qo + l]) >> shift) & 3)
                out[w + g * 32 + l] = (dl0 if l < 16 else dl1) * q - (ml0 if l < 16 else ml1)


@njit(cache=True, nogil=True, inline="always")
def _q3_k_scale(src, off, i):
    """Signed 6-bit scale i (0..15) of a Q3_K block. src[off:off+12] holds the packed scales."""
    lo = (np.int32(src[off + (i & 7)]) >> (4 * (i >> 3))) & 0x0F
    hi = (np.int32(src[off + 8 + (i & 3)]) >> (2 * (i >> 2))) & 0x03
    return (lo | (hi << 4)) - 32


@njit(cache=True, nogil=True)
def _deq_q3_k(src, out):  # hmask[32], qs[64], scales[12], d:f16
    n32 = _opaque(32)
    for b in range(out.size // 256):
        o, w = b * 110, b * 256
        d = _f16(src, o + 108)
        for g in range(8):
            dl0 = d * _F32(_q3_k_scale(src, o + 96, 2 * g))
            dl1 = d * _F32(_q3_k_scale(src, o + 96, 2 * g + 1))
            qo = o + 32 + (g >> 2) * 32  # low 2 bits: field s of qs[h*32 + l]
            shift = 2 * (g & 3)
            for l in range(n32):
                q = (np.int32(src[qo + l]) >> shift) & 3
                hb = (np.int32(src[o + l]) >> g) & 1  # bit g of hmask[l]; clear means "minus 4"
                out[w + g * 32 + l] = (dl0 if l < 16 else dl1) * _F32(q - ((hb ^ 1) << 2))


@njit(cache=True, nogil=True)
def _deq_q6_k(src, out):  # ql[128], qh[64], scales:i8[16], d:f16
    n32 = _opaque(32)
    for b in range(out.size // 256):
        o, w = b * 210, b * 256
        d = _f16(src, o + 208)
        for g in range(8):
            dl0 = d * _F32(_i8(src[o + 192 + 2 * g]))
            dl1 = d * _F32(_i8(src[o + 192 + 2 * g + 1]))
            h, s = g >> 2, g & 3
            lo_off = o + h * 64 + (s & 1) * 32  # low 4 bits: nibble s//2 of ql[h*64 + (s%2)*32 + l]
            hi_off = o + 128 + h * 32  # high 2 bits: field s of qh[h*32 + l]
            lshift, hshift = 4 * (s >> 1), 2 * s
            for l in range(n32):
                ql = (np.int32(src[lo_off + l]) >> lshift) & 0x0F
                qh = (np.int32(src[hi_off + l]) >> hshift) & 0x03
                out[w + g * 32 + l] = (dl0 if l < 16 else dl1) * _F32((ql | (qh << 4)) - 32)


@njit(cache=True, nogil=True, inline="always")
def _kquant_block(src, out, o, w, qs_off, qh_off, n32):
    """One Q4_K (qh_off < 0) or Q5_K block: 8 runs of 32 weights, (d*sc)*q - dmin*m.

    Weight l of run j is nibble j%2 of qs[(j//2)*32 + l]. For Q5_K, bit j of qh[l] is its bit 4.
    """
    d = _f16(src, o)
    dmin = _f16(src, o + 2)
    for j in range(8):
        sc, mn = _kquant_scale_min(src, o + 4, j)
        dl = d * sc
        ml = dmin * mn
        qo = qs_off + (j >> 1) * 32
        shift = 4 * (j & 1)
        for l in range(n32):
            q = (np.int32(src[qo + l]) >> shift) & 0x0F
            if qh_off >= 0:
                q |= ((np.int32(src[qh_off + l]) >> j) & 1) << 4
            out[w + j * 32 + l] = dl * _F32(q) - ml


@njit(cache=True, nogil=True)
def _deq_q4_k(src, out):  # d:f16, dmin:f16, scales[12], qs[128]
    n32 = _opaque(32)
    for b in range(out.size // 256):
        o = b * 144
        _kquant_block(src, out, o, b * 256, o + 16, -1, n32)


@njit(cache=True, nogil=True)
def _deq_q5_k(src, out):  # d:f16, dmin:f16, scales[12], qh[32], qs[128]
    n32 = _opaque(32)
    for b in range(out.size // 256):
        o = b * 176
        _kquant_block(src, out, o, b * 256, o + 48, o + 16, n32)


# --------------------------------------------------------------------------------------------
# ternary types


@njit(cache=True, nogil=True, inline="always")
def _trit(x, p3):
    """Base-3 digit of a TQ1_0 byte picked by multiplier p3 (1, 3, 9, 27, 81), as -1/0/1."""
    v = (np.int32(x) * p3) & 0xFF
    return ((v * 3) >> 8) - 1


@njit(cache=True, nogil=True)
def _deq_tq1_0(src, out):  # qs[48], qh[4], d:f16
    n32, n16 = _opaque(32), _opaque(16)
    for b in range(out.size // 256):
        o, w = b * 54, b * 256
        d = _f16(src, o + 52)
        p3 = 1
        for p in range(5):
            for l in range(n32):  # weights 0..159: digit p of qs[0:32]
                out[w + p * 32 + l] = d * _F32(_trit(src[o + l], p3))
            for l in range(n16):  # weights 160..239: digit p of qs[32:48]
                out[w + 160 + p * 16 + l] = d * _F32(_trit(src[o + 32 + l], p3))
            if p < 4:
                for l in range(4):  # weights 240..255: digit p of qh[0:4]
                    out[w + 240 + p * 4 + l] = d * _F32(_trit(src[o + 48 + l], p3))
            p3 *= 3


@njit(cache=True, nogil=True)
def _deq_tq2_0(src, out):  # qs[64], d:f16
    n32 = _opaque(32)
    for b in range(out.size // 256):
        o, w = b * 66, b * 256
        d = _f16(src, o + 64)
        for g in range(8):  # g = h*4 + s: 2-bit field s of qs[h*32 + l]
            qo = o + (g >> 2) * 32
            shift = 2 * (g & 3)
            for l in range(n32):
                out[w + g * 32 + l] = d * _F32(((np.int32(src[qo + l]) >> shift) & 3) - 1)


# --------------------------------------------------------------------------------------------
# float types


def _deq_f32(src, out):
    out[:] = src.view("<f4")


@njit(cache=True, nogil=True)
def _deq_f16(src, out):
    """Exact (NaN payloads too), and about 4x faster than numpy's float16 cast."""
    bits = out.view(np.uint32)
    for i in range(out.size):
        h = np.int32(src[2 * i]) | (np.int32(src[2 * i + 1]) << 8)
        em = h & 0x7FFF
        if em < 0x400:  # zero or subnormal: em * 2**-24
            v = _F32(em) * _TWO_M24
            out[i] = -v if h & 0x8000 else v
        else:  # rebias the exponent (15 -> 127). inf/NaN go to exponent 255, payload kept
            bits[i] = np.uint32(((h & 0x8000) << 16) | ((em << 13) + (0x70000000 if em >= 0x7C00 else 0x38000000)))


@njit(cache=True, nogil=True)
def _deq_bf16(src, out):
    bits = out.view(np.uint32)
    for i in range(out.size):
        bits[i] = (np.uint32(src[2 * i]) << 16) | (np.uint32(src[2 * i + 1]) << 24)


# --------------------------------------------------------------------------------------------
# public API

# type id -> kernel(src, out), in the order error messages list them
_KERNELS: dict[int, Callable[[np.ndarray, np.ndarray], None]] = {
    int(t): k
    for t, k in {
        _T.F32: _deq_f32,
        _T.F16: _deq_f16,
        _T.BF16: _deq_bf16,
        _T.Q4_0: _deq_q4_0,
        _T.Q4_1: _deq_q4_1,
        _T.Q5_0: _deq_q5_0,
        _T.Q5_1: _deq_q5_1,
        _T.Q8_0: _deq_q8_0,
        _T.Q2_K: _deq_q2_k,
        _T.Q3_K: _deq_q3_k,
        _T.Q4_K: _deq_q4_k,
        _T.Q5_K: _deq_q5_k,
        _T.Q6_K: _deq_q6_k,
        _T.TQ1_0: _deq_tq1_0,
        _T.TQ2_0: _deq_tq2_0,
    }.items()
}

SUPPORTED: frozenset[int] = frozenset(_KERNELS)
"""ggml type ids that ``dequantize`` can decode."""

_SIZES: dict[int, tuple[int, int]] = {int(t): tuple(s) for t, s in GGML_QUANT_SIZES.items()}


def _describe(qtype: int) -> str:
    """ "IQ2_XXS (16)" for a known type, "id 99 (not a known ggml type)" otherwise."""
    qtype = int(qtype)
    if qtype in _SIZES:
        return f"{type_name(qtype)} ({qtype})"
    return f"id {qtype} (not a known ggml type)"


def block_info(qtype: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of any known ggml type, decodable or not."""
    try:
        return _SIZES[int(qtype)]
    except KeyError:
        raise UnsupportedError(
            f"ggml type {_describe(qtype)} has no known block layout; the file is corrupt or needs a newer ember"
        ) from None


def row_nbytes(qtype: int, n: int) -> int:
    """Bytes that ``n`` weights of type ``qtype`` take. FormatError if n is not whole blocks."""
    bw, bb = block_info(qtype)
    n = int(n)
    if n < 0 or n % bw:
        raise FormatError(
            f"{n} weights of type {type_name(qtype)} is not a whole number of "
            f"{bw}-weight blocks; the tensor shape is corrupt"
        )
    return n // bw * bb


def _kernel(qtype: int, name: str) -> Callable[[np.ndarray, np.ndarray], None]:
    kernel = _KERNELS.get(int(qtype))
    if kernel is None:
        supported = ", ".join(type_name(t) for t in _KERNELS)
        raise UnsupportedError(
            f"tensor {name!r} has ggml type {_describe(qtype)}, which ember cannot decode yet; supported: {supported}"
        )
    return kernel


def _named_row_nbytes(qtype: int, n: int, name: str) -> int:
    try:
        return row_nbytes(qtype, n)
    except FormatError as e:
        raise FormatError(f"tensor {name!r}: {e}") from None


def _as_bytes(raw) -> np.ndarray:
    """Any buffer or array -> flat uint8 view (copied only if the array is not contiguous)."""
    if isinstance(raw, np.ndarray):
        arr = np.asarray(raw)  # drops subclasses such as np.memmap
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        return arr.reshape(-1).view(np.uint8)
    return np.frombuffer(raw, dtype=np.uint8)


def _checked_bytes(raw, qtype: int, n_elements: int | None, name: str) -> tuple[np.ndarray, int]:
    """raw as flat uint8 plus its weight count, after checking that the sizes agree."""
    src = _as_bytes(raw)
    bw, bb = block_info(qtype)
    if n_elements is None:
        if src.size % bb:
            raise FormatError(
                f"tensor {name!r} ({type_name(qtype)}) has {src.size} bytes, not a whole "
                f"number of {bb}-byte blocks; the file is truncated or corrupt"
            )
        return src, src.size // bb * bw
    expected = _named_row_nbytes(qtype, n_elements, name)
    if src.size != expected:
        raise FormatError(
            f"tensor {name!r} ({type_name(qtype)}, {n_elements} weights) should be "
            f"{expected} bytes but is {src.size} bytes; the file is truncated or corrupt"
        )
    return src, int(n_elements)


def dequantize(raw, qtype: int, n_elements: int | None = None, name: str = "tensor") -> np.ndarray:
    """Decode ``raw`` (bytes, memoryview, np.ndarray or memmap slice of any dtype) of ggml type
    ``qtype``.

    Returns a new, writable 1-D float32 array of ``n_elements`` weights (default: every whole
    block in raw). Raises UnsupportedError for a type ember cannot decode and FormatError when
    the byte count does not fit.
    """
    kernel = _kernel(qtype, name)
    src, n = _checked_bytes(raw, qtype, n_elements, name)
    out = np.empty(n, dtype=np.float32)
    kernel(src, out)
    return out


def dequantize_into(raw, qtype: int, out: np.ndarray, name: str = "tensor") -> np.ndarray:
    """Like ``dequantize``, but writes into ``out``, a writable C-contiguous float32 array with
    one slot per weight (for prefill tiles and reused buffers). Returns ``out``."""
    kernel = _kernel(qtype, name)
    if out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writable C-contiguous float32 array")
    src, _ = _checked_bytes(raw, qtype, out.size, name)
    kernel(src, out.reshape(-1))
    return out


def dequantize_rows(
    raw2d: np.ndarray, qtype: int, rows: int | Sequence[int] | np.ndarray, n_cols: int, name: str = "tensor"
) -> np.ndarray:
    """Decode only the given rows of a matrix, e.g. token embeddings on demand.

    ``raw2d`` is the matrix as stored: uint8 [n_rows, row_nbytes(qtype, n_cols)]. A typed array
    such as GGUFReader's float16 [n_rows, n_cols] also works, as long as each row holds that
    many bytes. ``rows`` is one index or a 1-D sequence of them (negative indices count from
    the end). Returns float32 [len(rows), n_cols], or [1, n_cols] for a single int.
    """
    kernel = _kernel(qtype, name)
    raw2d = np.asarray(raw2d)
    expected = _named_row_nbytes(qtype, n_cols, name)
    if raw2d.ndim == 2 and raw2d.dtype != np.uint8 and raw2d.strides[1] == raw2d.itemsize:
        raw2d = raw2d.view(np.uint8)
    if raw2d.ndim != 2 or raw2d.dtype != np.uint8 or raw2d.shape[1] != expected:
        raise FormatError(
            f"tensor {name!r} ({type_name(qtype)}, {n_cols} columns) should be a matrix with "
            f"rows of {expected} bytes, got shape {raw2d.shape} of {raw2d.dtype}"
        )
    if isinstance(rows, (int, np.integer)):  # the per-token path: no copy of the row bytes
        src = raw2d[int(rows)]  # IndexError when out of range
        out = np.empty((1, n_cols), dtype=np.float32)
        kernel(src if src.flags.c_contiguous else np.ascontiguousarray(src), out[0])
        return out
    idx = np.asarray(rows)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise TypeError(f"rows must be an int or a 1-D sequence of ints, got {rows!r}")
    src = np.take(raw2d, idx.astype(np.intp, copy=False), axis=0)  # IndexError when out of range
    out = np.empty((idx.size, n_cols), dtype=np.float32)
    kernel(src.reshape(-1), out.reshape(-1))
    return out
