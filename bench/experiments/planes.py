"""Bit-plane table-lookup (T-MAC) matvec for the low-bit GGUF types: Q4_0, Q4_1, Q5_0, Q5_1,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, TQ1_0, TQ2_0 (b = 2..6 bit planes, one kernel form for all).

API
---
``pack_planes(raw2d, qtype) -> PackedPlanes`` (``.codes .sc .d .n_out .n_in .qtype .bits
.nbytes .gguf_nbytes``, ``arrays()`` / ``PackedPlanes.from_arrays(a)``, ``dequantize()``
bit for bit ``ember.formats.quants.dequantize``).
``planes_matvec(x, p, out=None, threads=1, kernel=None, table_bits=None) -> float32 [n_out]``
``planes_matvec_reference(x, p, table_bits=None, return_scale=False)``: the NumPy oracle.
``fn_address(qtype, kernel=None, table_bits=16)`` (0: portable), ``half_sums(x, hs)`` and the
numba entry ``matvec_nb(ftab, fk, x, codes, sc, d, out, bits)`` for numba callers.
The tables are tmac.py's (``tmac_tables``: per 32-block of x, 8 groups of 4 activations, 16
mirrored subset sums each, int16 or int8 with one scale), so one table build serves a Q4_1
matrix (tmac.py) and any matrix here.

Layout (``PackedPlanes``; tiles of 16 rows, padding rows all zero; 64-byte aligned codes)
----------------------------------------------------------------------------------------
``codes`` uint8 [n_tiles, nb, bits, 16, 4] (nb = n_in / 32): byte (t, b, p, r, k) holds bit
    p of 8 codes of row 16 t + r, block b: low nibble bit j = weight 4 k + j (group k), high
    nibble bit j = weight 16 + 4 k + j (group 4 + k). A 4-byte lane is one row, one plane, the
    whole block; one 64-byte vector is 16 rows of one plane.
``d`` uint16 [n_tiles, nsup, ND, 16]: IEEE half bits per row and scale unit (nsup = nb for the
    32-weight types, nb / 8 for the 256-weight ones): Q4_0, Q5_0, Q3_K, Q6_K, TQ1_0, TQ2_0: d;
    Q4_1, Q5_1: d, m; Q2_K, Q4_K, Q5_K: d, dmin.
``sc`` uint8 [n_tiles, nsup, NS, 16]: the integer sub-block scales, natural order: Q2_K the
    file's 16 bytes (scale | min << 4, per 16 weights); Q3_K (6-bit, minus 32) and Q6_K 16
    int8 per 16 weights; Q4_K, Q5_K 8 scales then 8 mins per 32 weights (6-bit); NS = 0 else.
Bytes per 256 weights against the file's: Q4_0 144 (144), Q4_1 160 (160), Q5_0 176 (176),
Q5_1 192 (192), Q2_K 84 (84), Q3_K 114 (110), Q4_K 148 (144), Q5_K 180 (176), Q6_K 210
(210), TQ2_0 66 (66), TQ1_0 66 (54: its base-3 codes become 2 planes).

Math
----
The weight is ``D k_s (q - z)`` (zero-point forms) or ``D k_s q - M m_s`` (min forms), q the
unsigned b-bit code, s the sub-block (16 or 32 weights; k_s = 1 for types without sub-block
scales, Q4_1/Q5_1: ``d q + m``). With the mirrored tables, per sub-block and row the exact
integer ``I_s = sum_p 2^p sum_groups T[nibble]`` is ``sum_j (q_j - h) x_j / scale`` with
``h = (2^b - 1) / 2``, so ``sum_j q_j x_j = scale I_s + h xs_s`` and, per row,
``y = sum_units D sum_s k_s F_s (- M sum_s m_s xs_s | + m xs)``, ``F_s = scale I_s + c xs_s``,
``c = h - z`` (-0.5 for Q4_0, Q5_0, Q3_K, Q6_K; 0.5 TQ; h for the min forms), ``xs_s`` the sub-
block's sum of x (the tables' block sum for 32 weights, ``half_sums`` for 16). Accuracy: the
kernels equal the oracle to float32 rounding (tests: <= 1e-6 of the row's sum of |terms|,
measured <= 1e-7), and the oracle is within ``sum_s |D k_s| scale_s groups (2^b - 1) / 2`` of
the float truth (measured: 0.03-0.13 of that bound, 16-bit tables).

Kernels (``kernel_ir``; per 16 rows and 32-block, ``b`` planes, 16-bit tables)
--------------------------------------------------------------------------------
``permb`` + ``vnni`` (AVX-512 VBMI + VNNI): ``4 b`` ``vpermb`` (index = nibble | group << 4,
one ``vpternlog``/``vgf2p8affineqb`` each) and ``4 b`` ``vpdpbusd`` with the weights ``2^p``:
Q4_0 75 instructions per (16 rows, block) in the loop, no spills (tmac.py's Q4 kernel: ~52, its
dword being 4 planes of one group pair, which only a 4-bit code fills). ``shuf4`` (AVX2, AVX-512
without VBMI): 4 ``vpshufb`` per lookup, one per table, each dot product's weight vector zero
but in the byte lanes of its table. Both forms are measured below; the tests also compile the
AVX-512 forms for icelake-server / skylake-avx512 (their instruction mix, no spills).

Speed: ``python -m bench.experiments.planes`` (``benchmark()``: 2048 x 2048, 1 thread, this
kernel against the one the runtime runs for the type, hot and cold). The results on AVX2 (AMD
EPYC Zen 3) and AVX-512 VBMI + VNNI (Intel Emerald Rapids, AMD EPYC Zen 4) are in
docs/kernels.md ("Bit-plane kernels"): only the ternary types gain, and only on AVX-512, so the
runtime does not use this module: its fused decode and its k-token and prefill kernels read
their own layouts, and a second layout per matrix would double the weights held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from ember.lut_kernels import codegen
from ember.lut_kernels.codegen import (
    check_types,
    emit_call,
    emit_tile_end,
    finish_module,
    flt,
    init_llvm,
    optimize,
    splat,
    vec,
)
from ember.lut_kernels.kquant import QTYPES as KQ_TYPES
from ember.lut_kernels.kquant import pack_kquant, random_kquant
from ember.lut_kernels.kquant_layout import GROUP_LANE
from ember.lut_kernels.pack import aligned, aligned_empty, gguf_blocks, half_to_f32, stored_arrays, stored_meta
from ember.lut_kernels.q8 import EXACT_INT8, pack_exact_int8
from ember.lut_kernels.tmac import DEFAULT_TABLE_BITS, build_tables_nb, build_tables_reference, table_values
from ember.lut_kernels.tmac import fn_addresses as tmac_addresses

__all__ = [
    "PackedPlanes",
    "QTYPES",
    "pack_planes",
    "planes_matvec",
    "planes_matvec_reference",
    "half_sums",
    "half_sums_reference",
    "spec",
    "params",
    "fn_address",
    "matvec_nb",
    "kernel_ir",
    "kernel_asm",
    "random_rows",
    "benchmark",
    "reset_kernel_choice",
]

Q4_0, Q4_1, Q5_0, Q5_1 = 2, 3, 6, 7
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
TQ1_0, TQ2_0 = 34, 35
ROWS = 16  # rows per tile: one 16-lane int32 / float32 vector


class Spec(NamedTuple):
    name: str
    bits: int  # planes
    sub: int  # weights per sub-block (16 or 32)
    unit: int  # weights per scale unit (32 or 256)
    nd: int  # f16 values per unit and row
    ns: int  # sub-scale bytes per unit and row
    form: str  # zero (D (q - z)), fmin (d q + m), kzero (D k (q - z)), kmin (D k q - M m),
    # kmin4 (kmin, k | m << 4 in one byte)
    c: float  # h - z: F_s = scale I_s + c xs_s
    block_bytes: int


_SPECS = {
    Q4_0: Spec("q4_0", 4, 32, 32, 1, 0, "zero", -0.5, 18),
    Q4_1: Spec("q4_1", 4, 32, 32, 2, 0, "fmin", 7.5, 20),
    Q5_0: Spec("q5_0", 5, 32, 32, 1, 0, "zero", -0.5, 22),
    Q5_1: Spec("q5_1", 5, 32, 32, 2, 0, "fmin", 15.5, 24),
    Q2_K: Spec("q2_k", 2, 16, 256, 2, 16, "kmin4", 1.5, 84),
    Q3_K: Spec("q3_k", 3, 16, 256, 1, 16, "kzero", -0.5, 110),
    Q4_K: Spec("q4_k", 4, 32, 256, 2, 16, "kmin", 7.5, 144),
    Q5_K: Spec("q5_k", 5, 32, 256, 2, 16, "kmin", 15.5, 176),
    Q6_K: Spec("q6_k", 6, 16, 256, 1, 16, "kzero", -0.5, 210),
    TQ1_0: Spec("tq1_0", 2, 32, 256, 1, 0, "zero", 0.5, 54),
    TQ2_0: Spec("tq2_0", 2, 32, 256, 1, 0, "zero", 0.5, 66),
}
QTYPES = tuple(_SPECS)
_ZERO = {Q4_0: 8, Q5_0: 16, Q3_K: 4, Q6_K: 32, TQ1_0: 1, TQ2_0: 1}


def spec(qtype: int) -> Spec:
    try:
        return _SPECS[int(qtype)]
    except KeyError:
        raise ValueError(f"no bit-plane layout for ggml type {qtype}") from None


@dataclass
class PackedPlanes:
    """A matrix [n_out, n_in] of a type in ``QTYPES`` in the bit-plane layout (module docstring)."""

    codes: np.ndarray
    sc: np.ndarray
    d: np.ndarray
    n_out: int
    n_in: int
    qtype: int

    @property
    def bits(self) -> int:
        return _SPECS[self.qtype].bits

    @property
    def n_tiles(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes a matvec streams."""
        return self.codes.nbytes + self.sc.nbytes + self.d.nbytes

    @property
    def gguf_nbytes(self) -> int:
        s = _SPECS[self.qtype]
        return self.n_out * self.n_in // s.unit * s.block_bytes

    def arrays(self) -> dict:
        return {
            "codes": self.codes,
            "sc": self.sc,
            "d": self.d,
            "meta": np.array([self.n_out, self.n_in, self.qtype], np.int64),
        }

    @classmethod
    def from_arrays(cls, a) -> PackedPlanes:
        n_out, n_in, qtype = stored_meta(a, "PackedPlanes", 3)
        s = _SPECS.get(qtype)
        if s is None or n_out <= 0 or n_in <= 0 or n_in % s.unit:
            raise ValueError(f"PackedPlanes.from_arrays: bad meta {(n_out, n_in, qtype)}")
        nt, nb, nsup = -(-n_out // ROWS), n_in // 32, n_in // s.unit
        codes, sc, d = stored_arrays(
            a,
            "PackedPlanes",
            ("codes", "sc", "d"),
            {
                "codes": ((nt, nb, s.bits, ROWS, 4), np.uint8),
                "sc": ((nt, nsup, s.ns, ROWS), np.uint8),
                "d": ((nt, nsup, s.nd, ROWS), np.uint16),
            },
        )
        return cls(aligned(codes), np.ascontiguousarray(sc), np.ascontiguousarray(d), n_out, n_in, qtype)

    def natural(self):
        """(codes uint8 [n_out, n_in], d uint16 [n_out, nsup, ND], sc uint8 [n_out, nsup, NS])."""
        n, s = self.n_out, _SPECS[self.qtype]
        c = self.codes.transpose(0, 3, 1, 2, 4)  # [t, r, b, p, k]
        shifts = np.array([0, 4], np.uint8).reshape(1, 1, 1, 1, 1, 2, 1)
        j = np.arange(4, dtype=np.uint8).reshape(1, 1, 1, 1, 1, 1, 4)
        bit = (c[..., None, None] >> (shifts + j)) & 1  # [t, r, b, p, k, half, j]
        q = (bit << np.arange(s.bits, dtype=np.uint8).reshape(1, 1, 1, -1, 1, 1, 1)).sum(
            axis=3, dtype=np.uint8
        )  # [t, r, b, k, half, j]
        q = q.transpose(0, 1, 2, 4, 3, 5).reshape(-1, self.n_in)[:n]

        def rows(a):
            return a.transpose(0, 3, 1, 2).reshape(a.shape[0] * ROWS, *a.shape[1:3])[:n]

        return q, rows(self.d), rows(self.sc)

    def dequantize(self) -> np.ndarray:
        """float32 [n_out, n_in], bit for bit ``ember.formats.quants.dequantize`` (every
        product is exact in float32, so only the final add or subtract rounds)."""
        s = _SPECS[self.qtype]
        q, d, sc = self.natural()
        n, nsup = q.shape[0], self.n_in // s.unit
        f = d.view(np.float16).astype(np.float32)  # [n, nsup, ND]
        qf = q.reshape(n, nsup, -1, s.sub).astype(np.float32)  # [n, nsup, subs, sub]
        D = f[:, :, 0, None, None]
        if s.form == "zero":
            w = (qf - np.float32(_ZERO[self.qtype])) * D
        elif s.form == "fmin":
            w = qf * D + f[:, :, 1, None, None]
        elif s.form == "kzero":
            k = sc.view(np.int8).astype(np.float32)[:, :, :, None]
            w = (D * k) * (qf - np.float32(_ZERO[self.qtype]))
        else:
            nsub = qf.shape[2]
            if s.form == "kmin4":
                k, m = sc & 15, sc >> 4
            else:
                k, m = sc[:, :, :nsub], sc[:, :, nsub:]
            w = (D * k.astype(np.float32)[..., None]) * qf - f[:, :, 1, None, None] * m.astype(np.float32)[..., None]
        return w.reshape(n, self.n_in).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# packing: the file's codes and scales in natural order, then planes and tiles


def _decode_q45(r3: np.ndarray, qt: int):
    """Q4_0/Q4_1/Q5_0/Q5_1 blocks [n, nb, bb] -> codes [n, nb * 32], d [n, nb, ND]."""
    nd = _SPECS[qt].nd
    n, nb = r3.shape[:2]
    d = np.ascontiguousarray(r3[:, :, : 2 * nd]).view(np.uint16).reshape(n, nb, nd)
    o = 2 * nd
    if qt in (Q5_0, Q5_1):
        qh = np.ascontiguousarray(r3[:, :, o : o + 4]).view(np.uint32).reshape(n, nb, 1)
        o += 4
    qs = r3[:, :, o : o + 16]
    q = np.concatenate([qs & 15, qs >> 4], axis=2)
    if qt in (Q5_0, Q5_1):
        q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
    return q.reshape(n, nb * 32), d


def _decode(raw2d, qt: int):
    """The file's rows -> (codes uint8 [n, n_in], d uint16 [n, nsup, ND], sc uint8 [n, nsup, NS])."""
    s = _SPECS[qt]
    r3 = gguf_blocks(raw2d, s.block_bytes, f"pack_planes ({s.name})")
    n, nsup = r3.shape[:2]
    if qt in (Q4_0, Q4_1, Q5_0, Q5_1):
        q, d = _decode_q45(r3, qt)
        return q, d, np.zeros((n, nsup, 0), np.uint8)
    if qt in (TQ1_0, TQ2_0):
        q = (pack_exact_int8(r3.reshape(n, -1), qt).qs + 1).view(np.uint8)
        o = EXACT_INT8[qt][2]
        d = np.ascontiguousarray(r3[:, :, o : o + 2]).view(np.uint16).reshape(n, nsup, 1)
        return q, d, np.zeros((n, nsup, 0), np.uint8)
    pk = pack_kquant(r3.reshape(n, -1), qt)
    q = pk.codes()
    if qt in (Q4_K, Q5_K):  # row pairs: [pair, sb, kind, row, 8] -> [row, sb, kind * 8]
        m = pk.q.shape[0] // 2
        sc = pk.sc.reshape(m, nsup, 2, 2, 8).transpose(0, 3, 1, 2, 4).reshape(2 * m, nsup, 16)
        d = pk.d.reshape(m, nsup, 2, 2).transpose(0, 3, 1, 2).reshape(2 * m, nsup, 2)
        return q, np.ascontiguousarray(d[:n]), np.ascontiguousarray(sc[:n])
    sc = pk.sc.reshape(n, nsup, 16)[:, :, GROUP_LANE]
    return q, pk.d.reshape(n, nsup, s.nd), np.ascontiguousarray(sc)


def _to_tiles(a: np.ndarray, nt: int) -> np.ndarray:
    """[n, u, v] -> [nt, u, v, 16] (rows padded with zeros)."""
    out = np.zeros((nt * ROWS, *a.shape[1:]), a.dtype)
    out[: a.shape[0]] = a
    return np.ascontiguousarray(out.reshape(nt, ROWS, *a.shape[1:]).transpose(0, 2, 3, 1))


_PLANE_W = (
    np.uint8(1) << (4 * np.arange(2, dtype=np.uint8)[:, None, None] + np.arange(4, dtype=np.uint8)[None, None, :])
).astype(np.uint8)


def _plane_codes(q: np.ndarray, bits: int, nt: int, chunk: int = 1024) -> np.ndarray:
    """codes uint8 [n, n_in] -> [nt, nb, bits, 16, 4] (module docstring)."""
    n, n_in = q.shape
    nb = n_in // 32
    out = aligned_empty((nt, nb, bits, ROWS, 4), np.uint8)
    out[-1] = 0
    step = max(ROWS, chunk // ROWS * ROWS)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        qq = q[r0:r1].reshape(r1 - r0, nb, 2, 4, 4)  # [r, b, half, k, j]
        planes = np.empty((r1 - r0, nb, bits, 4), np.uint8)
        for p in range(bits):
            planes[:, :, p] = (((qq >> p) & 1) * _PLANE_W).sum(axis=(2, 4), dtype=np.uint8)
        t0, nr = r0 // ROWS, r1 - r0
        full = np.zeros((-(-nr // ROWS) * ROWS, nb, bits, 4), np.uint8)
        full[:nr] = planes
        out[t0 : t0 + full.shape[0] // ROWS] = full.reshape(-1, ROWS, nb, bits, 4).transpose(0, 2, 3, 1, 4)
    return out


def pack_planes(raw2d, qtype: int) -> PackedPlanes:
    """GGUF rows (uint8 [n_out, row_bytes]) of a type in ``QTYPES`` -> ``PackedPlanes``."""
    qtype = int(qtype)
    s = spec(qtype)
    q, d, sc = _decode(raw2d, qtype)
    n, n_in = q.shape
    nt = -(-n // ROWS)
    return PackedPlanes(_plane_codes(q, s.bits, nt), _to_tiles(sc, nt), _to_tiles(d, nt), n, n_in, qtype)


# ---------------------------------------------------------------------------------------------
# sums of x per 16 weights, and the oracle


@njit(cache=True, nogil=True)
def half_sums(x, hs):
    """hs[2 b + h] = the sum of x[32 b + 16 h: + 16] as a tree (8 lanes x[i] + x[i + 8], then
    halves 4, 2, 1): the 16-weight sub-block sums of the Q2_K, Q3_K, Q6_K kernels."""
    v = np.empty(8, np.float32)
    for u in range(x.size // 16):
        o = 16 * u
        for i in range(8):
            v[i] = x[o + i] + x[o + 8 + i]
        for i in range(4):
            v[i] = v[i] + v[i + 4]
        for i in range(2):
            v[i] = v[i] + v[i + 2]
        hs[u] = v[0] + v[1]


def half_sums_reference(x) -> np.ndarray:
    v = np.asarray(x, np.float32).reshape(-1, 2, 8)
    v = v[:, 0] + v[:, 1]
    v = v[:, :4] + v[:, 4:]
    v = v[:, :2] + v[:, 2:]
    return (v[:, 0] + v[:, 1]).astype(np.float32)


def planes_matvec_reference(x, p: PackedPlanes, table_bits: int | None = None, return_scale: bool = False):
    """What the kernels compute, in NumPy: the same tables (``tmac.build_tables_reference``),
    the same exact integers I_s, and the same float32 per-sub-block values (``c xs_s`` in float32),
    summed in float64 (the kernels add in float32: they agree to ~1e-6 of the row's sum of
    |terms|). ``return_scale`` also returns that sum of |terms| per row and the guaranteed table
    rounding bound against the float truth: ``sum_s |D k_s| scale_s * groups (2^b - 1) / 2``."""
    s = _SPECS[p.qtype]
    tq, tsc, xs = build_tables_reference(x, table_bits)  # [nb, 8, 16], [nb], [nb]
    nb = tq.shape[0]
    c = p.codes.astype(np.intp)  # [t, b, p, r, k]
    bi = np.arange(nb).reshape(1, nb, 1, 1, 1)
    ki = np.arange(4).reshape(1, 1, 1, 1, 4)
    pw = (1 << np.arange(s.bits)).reshape(1, 1, -1, 1, 1)
    I_lo = (tq[bi, ki, c & 15].astype(np.int64) * pw).sum(axis=(2, 4))  # [t, b, r]
    I_hi = (tq[bi, ki + 4, c >> 4].astype(np.int64) * pw).sum(axis=(2, 4))
    I_lo = I_lo.transpose(0, 2, 1).reshape(-1, nb)[: p.n_out]  # [n, b]
    I_hi = I_hi.transpose(0, 2, 1).reshape(-1, nb)[: p.n_out]
    cf = np.float32(s.c)
    scl = tsc.astype(np.float64)
    if s.sub == 32:
        Is = (I_lo + I_hi)[:, :, None]  # [n, b, 1]
        xsub = xs.reshape(nb, 1)
    else:
        Is = np.stack([I_lo, I_hi], axis=2)  # [n, b, 2]
        xsub = half_sums_reference(x).reshape(nb, 2)
    si = Is * scl[None, :, None]
    cx = (cf * xsub).astype(np.float64)
    F = si + cx[None]
    _, d, sc = p.natural()
    n, nsup = p.n_out, p.n_in // s.unit
    f = d.view(np.float16).astype(np.float64)
    nsub = s.unit // s.sub
    F = F.reshape(n, nsup, nsub)
    aF = (np.abs(si) + np.abs(cx)[None]).reshape(n, nsup, nsub)
    xsub = xsub.astype(np.float64).reshape(nsup, nsub)
    m_term = np.zeros((n, nsup))
    if s.form in ("zero", "fmin"):
        k = np.ones((n, nsup, nsub))
    elif s.form == "kzero":
        k = sc.view(np.int8).astype(np.float64)
    elif s.form == "kmin4":
        k = (sc & 15).astype(np.float64)
        m_term = -f[:, :, 1] * ((sc >> 4).astype(np.float64) * xsub[None]).sum(axis=2)
    else:
        k = sc[:, :, :nsub].astype(np.float64)
        m_term = -f[:, :, 1] * (sc[:, :, nsub:].astype(np.float64) * xsub[None]).sum(axis=2)
    if s.form == "fmin":
        m_term = f[:, :, 1] * xsub[None, :, 0]
    acc = (k * F).sum(axis=2)
    y = (f[:, :, 0] * acc + m_term).sum(axis=1)
    if not return_scale:
        return y.astype(np.float32)
    absum = (np.abs(f[:, :, 0]) * (np.abs(k) * aF).sum(axis=2) + np.abs(m_term)).sum(axis=1)
    groups = s.sub // 4
    step = np.repeat(tsc.astype(np.float64), 32 // s.sub).reshape(nsup, nsub)
    bound = (
        (np.abs(f[:, :, 0])[:, :, None] * np.abs(k) * step[None]).sum(axis=(1, 2)) * groups * ((1 << s.bits) - 1) / 2
    )
    return y.astype(np.float32), absum, bound


# ---------------------------------------------------------------------------------------------
# the portable kernel (plain numba; the same integers, float32 sums)

_FORMS = ("zero", "fmin", "kzero", "kmin", "kmin4")


@njit(cache=True, nogil=True)
def _kernel_portable(codes, sc, d, tab, bc, hs, y, t0, t1, form, sub, bpu, c):
    """y[(t - t0) * 16 + r] for tiles t0 <= t < t1; ``form`` indexes ``_FORMS``."""
    nb, bits = codes.shape[1], codes.shape[2]
    nsup = nb // bpu
    nsub = bpu * 32 // sub
    tv = table_values(tab)
    cf = np.float32(c)
    acc = np.empty(ROWS, np.float32)
    macc = np.empty(ROWS, np.float32)
    yacc = np.empty(ROWS, np.float32)
    F = np.empty((2, ROWS), np.float32)
    for t in range(t0, t1):
        yacc[:] = 0
        for s in range(nsup):
            acc[:] = 0
            macc[:] = 0
            for jb in range(bpu):
                b = s * bpu + jb
                scb = bc[b, 0]
                for r in range(ROWS):
                    ilo = 0
                    ihi = 0
                    for p in range(bits):
                        slo = 0
                        shi = 0
                        for k in range(4):
                            v = codes[t, b, p, r, k]
                            slo += tv[b, k, v & 15]
                            shi += tv[b, 4 + k, v >> 4]
                        ilo += slo << p
                        ihi += shi << p
                    if sub == 32:
                        F[0, r] = np.float32(ilo + ihi) * scb + cf * bc[b, 3]
                    else:
                        F[0, r] = np.float32(ilo) * scb + cf * hs[2 * b]
                        F[1, r] = np.float32(ihi) * scb + cf * hs[2 * b + 1]
                for h in range(32 // sub):
                    j = jb * (32 // sub) + h
                    xsj = bc[b, 3] if sub == 32 else hs[2 * b + h]
                    for r in range(ROWS):
                        if form <= 1:
                            acc[r] += F[h, r]
                        elif form == 2:
                            acc[r] += np.float32(np.int8(sc[t, s, j, r])) * F[h, r]
                        else:
                            v = sc[t, s, j, r]
                            k = v & 15 if form == 4 else v
                            m = v >> 4 if form == 4 else sc[t, s, nsub + j, r]
                            acc[r] += np.float32(k) * F[h, r]
                            macc[r] += np.float32(m) * xsj
            for r in range(ROWS):
                yr = yacc[r] + half_to_f32(d[t, s, 0, r]) * acc[r]
                if form == 1:
                    yr += half_to_f32(d[t, s, 1, r]) * bc[s, 3]
                elif form >= 3:
                    yr -= half_to_f32(d[t, s, 1, r]) * macc[r]
                yacc[r] = yr
        y[(t - t0) * ROWS : (t - t0 + 1) * ROWS] = yacc


# ---------------------------------------------------------------------------------------------
# IR: ``void planes_<type>(codes, sc, d, tab, bc, hs, y, i64 nb, i64 t0, i64 t1)``

DEFAULT_PREFETCH = 2048  # bytes of codes ahead (0: none)

_DECLS = (
    "declare <64 x i8> @llvm.x86.avx512.permvar.qi.512(<64 x i8>, <64 x i8>)",
    "declare <64 x i8> @llvm.x86.avx512.pshuf.b.512(<64 x i8>, <64 x i8>)",
    "declare <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8>, <32 x i8>)",
    "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)",
    "declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8>, <64 x i8>)",
    "declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)",
    "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)",
    "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)",
    "declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)",
    "declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)",
)


def _isa_form(isa: str) -> tuple[int, str, str]:
    """(vector bytes, lookup, combine) of an ISA on this host: ``permb`` = one ``vpermb`` per
    64 bytes over 4 tables (AVX-512 VBMI); ``shuf4`` = 4 ``vpshufb``, one per table, whose
    wrong bytes the dot product's weights zero. ``vnni`` = ``vpdpbusd``; ``maddubs`` =
    ``vpmaddubsw`` summed in int16 over a block, one ``vpmaddwd`` per block."""
    f = codegen.host_features()
    if isa == "avx512":
        return 64, ("permb" if f.get("avx512vbmi") else "shuf4"), ("vnni" if f.get("avx512vnni") else "maddubs")
    if isa == "avx512-novnni":
        return 64, "shuf4", "maddubs"
    if isa == "avx2":
        return 32, "shuf4", "maddubs"
    raise ValueError(f"no planes kernel for isa {isa!r}")


def _kernel_ir(qt: int, vw: int, lookup: str, combine: str, table_bits: int, prefetch: int) -> list[str]:
    s = _SPECS[qt]
    nh, nl = 64 // vw, vw // 4
    V8, V16, V32, VF = f"<{vw} x i8>", f"<{vw // 2} x i16>", f"<{nl} x i32>", f"<{nl} x float>"
    fma = f"@llvm.fma.v{nl}f32"
    if vw == 64:
        perm, shuf = "@llvm.x86.avx512.permvar.qi.512", "@llvm.x86.avx512.pshuf.b.512"
        mad, madd = "@llvm.x86.avx512.pmaddubs.w.512", "@llvm.x86.avx512.pmaddw.d.512"
    else:
        shuf, mad, madd = "@llvm.x86.avx2.pshuf.b", "@llvm.x86.avx2.pmadd.ub.sw", "@llvm.x86.avx2.pmadd.wd"
    assert lookup == "shuf4" or vw == 64
    bpu, nsub_b = s.unit // 32, 32 // s.sub  # blocks per unit, sub-blocks per block
    nsub = bpu * nsub_b
    nL = 2 if table_bits == 16 else 1
    tstride = 128 * nL
    signed = [False, True] if nL == 2 else [True]  # low bytes of 16-bit tables are unsigned
    bcast16 = "<" + ", ".join(f"i32 {i % 16}" for i in range(vw)) + ">"
    K = vec("i8", [(i % 4) << 4 for i in range(vw)])
    zf = "zeroinitializer"
    L = []
    a = L.append
    ro = "ptr noalias nocapture readonly"
    a(
        f"define void @planes_{s.name}({ro} %codes, {ro} %sc, {ro} %d, {ro} %tab, {ro} %bc, "
        f"{ro} %hs, ptr noalias nocapture %y, i64 %nb, i64 %t0, i64 %t1) #0 {{"
    )
    a("entry:")
    a("  %e1 = icmp sge i64 %t0, %t1")
    a("  %e2 = icmp sle i64 %nb, 0")
    a("  %skip = or i1 %e1, %e2")
    a(f"  %nsup = udiv i64 %nb, {bpu}")
    a("  br i1 %skip, label %exit, label %tile")
    a("tile:")
    a("  %t = phi i64 [%t0, %entry], [%t.next, %tile.end]")
    a(f"  %cbo = mul i64 %t, {64 * s.bits}")
    a("  %cbo2 = mul i64 %cbo, %nb")
    a("  %cbase = getelementptr i8, ptr %codes, i64 %cbo2")
    a(f"  %dbo = mul i64 %t, {s.nd * ROWS}")
    a("  %dbo2 = mul i64 %dbo, %nsup")
    a("  %dbase = getelementptr i16, ptr %d, i64 %dbo2")
    a(f"  %sbo = mul i64 %t, {max(s.ns, 1) * ROWS}")
    a("  %sbo2 = mul i64 %sbo, %nsup")
    a("  %sbase = getelementptr i8, ptr %sc, i64 %sbo2")
    a("  br label %unit")
    a("unit:")
    a("  %s = phi i64 [0, %tile], [%s.next, %unit]")
    for h in range(nh):
        a(f"  %yacc{h} = phi {VF} [{zf}, %tile], [%ynew{h}, %unit]")
    a(f"  %b0 = mul i64 %s, {bpu}")
    a(f"  %ub = mul i64 %s, {s.nd * ROWS}")
    a("  %dp = getelementptr i16, ptr %dbase, i64 %ub")
    a(f"  %usc = mul i64 %s, {s.ns * ROWS}")
    a("  %sp = getelementptr i8, ptr %sbase, i64 %usc")

    def splat_f(val: str, tag: str) -> str:
        a(f"  %{tag}.i = insertelement {VF} poison, float {val}, i32 0")
        a(f"  %{tag} = shufflevector {VF} %{tag}.i, {VF} poison, <{nl} x i32> {zf}")
        return f"%{tag}"

    def half_vec(ptr: str, off: int, tag: str) -> str:  # 16 halves -> floats of half h
        a(f"  %{tag}.p = getelementptr i16, ptr {ptr}, i64 {off}")
        a(f"  %{tag}.h = load <{nl} x half>, ptr %{tag}.p, align 2")
        a(f"  %{tag} = fpext <{nl} x half> %{tag}.h to {VF}")
        return f"%{tag}"

    def byte_vec(off: int, tag: str, op: str, mask: str | None = None) -> str:
        a(f"  %{tag}.p = getelementptr i8, ptr %sp, i64 {off}")
        a(f"  %{tag}.b = load <{nl} x i8>, ptr %{tag}.p, align 1")
        src = f"%{tag}.b"
        if mask is not None:
            a(f"  %{tag}.m = {mask.format(src=src, ty=f'<{nl} x i8>')}")
            src = f"%{tag}.m"
        ext, cvt = ("sext", "sitofp") if op == "s" else ("zext", "uitofp")
        a(f"  %{tag}.w = {ext} <{nl} x i8> {src} to {V32}")
        a(f"  %{tag} = {cvt} {V32} %{tag}.w to {VF}")
        return f"%{tag}"

    accs = {h: None for h in range(nh)}  # per-unit float sums (k_s F_s) and mins
    maccs = {h: None for h in range(nh)}
    for jb in range(bpu):
        B = f"j{jb}"
        a(f"  %{B}.b = add i64 %b0, {jb}")
        a(f"  %{B}.to = mul i64 %{B}.b, {tstride}")
        a(f"  %{B}.tb = getelementptr i8, ptr %tab, i64 %{B}.to")
        a(f"  %{B}.co = mul i64 %{B}.b, {64 * s.bits}")
        a(f"  %{B}.cb = getelementptr i8, ptr %cbase, i64 %{B}.co")
        # tables: T[nib][Lb] (permb: 64 bytes = groups 4 nib .. 4 nib + 3) or T[nib][Lb][k]
        T = {}
        for nib in range(2):
            for Lb in range(nL):
                base = Lb * 128 + nib * 64
                if lookup == "permb":
                    nm = f"%{B}.T{nib}{Lb}"
                    a(f"  {nm}.p = getelementptr i8, ptr %{B}.tb, i64 {base}")
                    a(f"  {nm} = load <64 x i8>, ptr {nm}.p, align 1")
                    T[nib, Lb] = nm
                else:
                    for k in range(4):
                        nm = f"%{B}.T{nib}{Lb}{k}"
                        a(f"  {nm}.p = getelementptr i8, ptr %{B}.tb, i64 {base + 16 * k}")
                        a(f"  {nm}.x = load <16 x i8>, ptr {nm}.p, align 1")
                        a(f"  {nm} = shufflevector <16 x i8> {nm}.x, <16 x i8> poison, <{vw} x i32> {bcast16}")
                        T[nib, Lb, k] = nm
        if prefetch:
            for p in range(s.bits):
                a(f"  %{B}.pf{p} = getelementptr i8, ptr %{B}.cb, i64 {p * 64 + prefetch}")
                codegen.emit_prefetch(a, f"%{B}.pf{p}")
        for h in range(nh):
            H = f"{B}h{h}"
            acc = {}  # (nib, Lb) -> accumulator name (i32 vnni, i16 maddubs)
            for p in range(s.bits):
                P = f"{H}p{p}"
                a(f"  %{P}.cp = getelementptr i8, ptr %{B}.cb, i64 {p * 64 + h * vw}")
                a(f"  %{P}.c = load {V8}, ptr %{P}.cp, align 1")
                a(f"  %{P}.lo = and {V8} %{P}.c, {splat('i8', vw, 15)}")
                a(f"  %{P}.hi = lshr {V8} %{P}.c, {splat('i8', vw, 4)}")
                for nib in range(2):
                    raw = f"%{P}.{'lo' if nib == 0 else 'hi'}"
                    if lookup == "permb":
                        a(f"  %{P}.i{nib} = or {V8} {raw}, {K}")
                    for Lb in range(nL):
                        parts = []  # (lookup vector, weight vector)
                        if lookup == "permb":
                            nm = f"%{P}.l{nib}{Lb}"
                            a(f"  {nm} = call <64 x i8> {perm}(<64 x i8> {T[nib, Lb]}, <64 x i8> %{P}.i{nib})")
                            parts.append((nm, splat("i8", vw, 1 << p)))
                        else:
                            for k in range(4):
                                nm = f"%{P}.l{nib}{Lb}{k}"
                                a(f"  {nm} = call {V8} {shuf}({V8} {T[nib, Lb, k]}, {V8} {raw})")
                                parts.append((nm, vec("i8", [(1 << p) if i % 4 == k else 0 for i in range(vw)])))
                        for q, (lk, w) in enumerate(parts):
                            ops = f"{V8} {w}, {V8} {lk}" if signed[Lb] else f"{V8} {lk}, {V8} {w}"
                            prev = acc.get((nib, Lb))
                            nm = f"%{P}.a{nib}{Lb}{q}"
                            if combine == "vnni":
                                a(f"  {nm} = call {V32} @llvm.x86.avx512.vpdpbusd.512({V32} {prev or zf}, {ops})")
                            else:
                                a(f"  {nm}.m = call {V16} {mad}({ops})")
                                if prev is None:
                                    nm = f"{nm}.m"
                                else:
                                    a(f"  {nm} = add {V16} {prev}, {nm}.m")
                            acc[nib, Lb] = nm
            Inib = []
            for nib in range(2):
                parts = []
                for Lb in range(nL):
                    v = acc[nib, Lb]
                    if combine != "vnni":
                        a(f"  %{H}.w{nib}{Lb} = call {V32} {madd}({V16} {v}, {V16} {splat('i16', vw // 2, 1)})")
                        v = f"%{H}.w{nib}{Lb}"
                    parts.append(v)
                if nL == 2:
                    a(f"  %{H}.sh{nib} = shl {V32} {parts[1]}, {splat('i32', nl, 8)}")
                    a(f"  %{H}.I{nib} = add {V32} {parts[0]}, %{H}.sh{nib}")
                    Inib.append(f"%{H}.I{nib}")
                else:
                    Inib.append(parts[0])
            # float part: F_s = fma(float(I_s), scale, c xs_s)
            if h == 0:
                a(f"  %{B}.bo = mul i64 %{B}.b, 4")
                a(f"  %{B}.scp = getelementptr float, ptr %bc, i64 %{B}.bo")
                a(f"  %{B}.scl = load float, ptr %{B}.scp, align 4")
                a(f"  %{B}.xsp = getelementptr float, ptr %{B}.scp, i64 3")
                a(f"  %{B}.xs = load float, ptr %{B}.xsp, align 4")
                a(f"  %{B}.ho = mul i64 %{B}.b, 2")
                for u in range(2 if s.sub == 16 else 0):
                    a(f"  %{B}.hp{u} = getelementptr float, ptr %hs, i64 %{B}.ho")
                    a(f"  %{B}.hsp{u} = getelementptr float, ptr %{B}.hp{u}, i64 {u}")
                    a(f"  %{B}.hs{u} = load float, ptr %{B}.hsp{u}, align 4")
            SCL = splat_f(f"%{B}.scl", f"{H}.SC")
            if s.sub == 32:
                a(f"  %{H}.I = add {V32} {Inib[0]}, {Inib[1]}")
                Is, xss = [f"%{H}.I"], [f"%{B}.xs"]
            else:
                Is, xss = Inib, [f"%{B}.hs0", f"%{B}.hs1"]
            for u, (Iv, xv) in enumerate(zip(Is, xss)):
                j = jb * nsub_b + u  # sub-block within the unit
                U = f"{H}u{u}"
                a(f"  %{U}.cx = fmul float {xv}, {flt(s.c)}")
                CX = splat_f(f"%{U}.cx", f"{U}.CX")
                a(f"  %{U}.If = sitofp {V32} {Iv} to {VF}")
                a(f"  %{U}.F = call {VF} {fma}({VF} %{U}.If, {VF} {SCL}, {VF} {CX})")
                F = f"%{U}.F"
                prev = accs[h]
                if s.form in ("zero", "fmin"):
                    if prev is None:
                        accs[h] = F
                    else:
                        a(f"  %{U}.acc = fadd {VF} {prev}, {F}")
                        accs[h] = f"%{U}.acc"
                    continue
                if s.form == "kzero":
                    k = byte_vec(j * ROWS + h * nl, f"{U}.k", "s")
                elif s.form == "kmin":
                    k = byte_vec(j * ROWS + h * nl, f"{U}.k", "u")
                    m = byte_vec((nsub + j) * ROWS + h * nl, f"{U}.m", "u")
                else:
                    k = byte_vec(j * ROWS + h * nl, f"{U}.k", "u", "and {ty} {src}, " + splat("i8", nl, 15))
                    m = byte_vec(j * ROWS + h * nl, f"{U}.m", "u", "lshr {ty} {src}, " + splat("i8", nl, 4))
                a(f"  %{U}.acc = call {VF} {fma}({VF} {k}, {VF} {F}, {VF} {prev or zf})")
                accs[h] = f"%{U}.acc"
                if s.form != "kzero":
                    XS = splat_f(xv, f"{U}.XS")
                    a(f"  %{U}.macc = call {VF} {fma}({VF} {m}, {VF} {XS}, {VF} {maccs[h] or zf})")
                    maccs[h] = f"%{U}.macc"
    for h in range(nh):
        D = half_vec("%dp", h * nl, f"D{h}")
        y1 = f"%y1_{h}" if s.form in ("fmin", "kmin", "kmin4") else f"%ynew{h}"
        a(f"  {y1} = call {VF} {fma}({VF} {D}, {VF} {accs[h]}, {VF} %yacc{h})")
        if s.form == "fmin":
            M = half_vec("%dp", ROWS + h * nl, f"M{h}")
            XS = splat_f("%j0.xs", f"XSu{h}")
            a(f"  %ynew{h} = call {VF} {fma}({VF} {M}, {VF} {XS}, {VF} %y1_{h})")
        elif s.form in ("kmin", "kmin4"):
            M = half_vec("%dp", ROWS + h * nl, f"M{h}")
            a(f"  %Mn{h} = fneg {VF} {M}")
            a(f"  %ynew{h} = call {VF} {fma}({VF} %Mn{h}, {VF} {maccs[h]}, {VF} %y1_{h})")
    emit_tile_end(a, "s", "%nsup", "unit", ROWS, nh, nl)
    return L


def kernel_ir(
    isa: str,
    qtype: int,
    table_bits: int = 16,
    prefetch: int = DEFAULT_PREFETCH,
    cpu: str = "",
    features: str = "",
    form: tuple | None = None,
) -> str:
    """The IR module of ``planes_<type>`` for an ISA on this host, or for ``form`` = (vector
    bytes, lookup, combine) whatever the host has (``kernel_asm``)."""
    vw, lookup, combine = form or _isa_form(isa)
    return finish_module(
        list(_DECLS) + _kernel_ir(int(qtype), vw, lookup, combine, table_bits, prefetch), cpu, features
    )


def kernel_asm(qtype: int, form=(64, "permb", "vnni"), cpu: str = "icelake-server", table_bits: int = 16) -> str:
    """x86-64 assembly of a kernel form for ``cpu`` (compiled, never run): how the AVX-512
    forms are checked on hosts without AVX-512."""
    import llvmlite.binding as llvm

    init_llvm()
    mod = llvm.parse_assembly(kernel_ir("", qtype, table_bits, cpu=cpu, form=form))
    mod.verify()
    tm = llvm.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(cpu=cpu, opt=3)
    mod.triple = "x86_64-unknown-linux-gnu"
    mod.data_layout = str(tm.target_data)
    optimize(mod, tm)
    return tm.emit_assembly(mod)


# ---------------------------------------------------------------------------------------------
# compiling, calling, orchestration

_choice: dict = {}


def reset_kernel_choice() -> None:
    _choice.clear()


def fn_address(qtype: int, kernel: str | None = None, table_bits: int = 16, prefetch: int = DEFAULT_PREFETCH) -> int:
    """Address of ``planes_<type>`` for a kernel path (0: portable)."""
    key = (int(qtype), kernel, table_bits, prefetch)
    r = _choice.get(key)
    if r is None:
        s = spec(qtype)
        name = codegen.select_kernel(kernel)
        if name in ("portable", "neon"):
            r = 0
        else:

            def build():
                ee, owners, _ = codegen.jit(
                    lambda cpu, feat: kernel_ir(name, qtype, table_bits, prefetch, cpu, feat), name
                )
                return ee.get_function_address(f"planes_{s.name}"), owners

            r = codegen.once(("planes", name, int(qtype), table_bits, prefetch), build)[0]
        _choice[key] = r
    return r


@intrinsic
def _call_planes(typingctx, fn, codes, sc, d, tab, bc, hs, y, nb, t0, t1):
    """planes_<type>(codes, sc, d, tab, bc, hs, y, nb, t0, t1) through a runtime address."""
    check_types(
        (fn, codes, sc, d, tab, bc, hs, y, nb, t0, t1),
        (
            None,
            types.uint8,
            types.uint8,
            types.uint16,
            types.int8,
            types.float32,
            types.float32,
            types.float32,
            None,
            None,
            None,
        ),
    )
    return types.void(fn, codes, sc, d, tab, bc, hs, y, nb, t0, t1), emit_call


@njit(cache=True, nogil=True, inline="always")
def _run(fk, codes, sc, d, tab, bc, hs, y, t0, t1, prm):
    if fk != 0:
        _call_planes(fk, codes, sc, d, tab, bc, hs, y, codes.shape[1], t0, t1)
    else:
        _kernel_portable(
            codes, sc, d, tab, bc, hs, y, t0, t1, prm[0], prm[1], prm[2], np.float32(prm[3]) / np.float32(2)
        )


@njit(cache=True, nogil=True, inline="always")
def _tiles(fk, codes, sc, d, tab, bc, hs, out, t0, t1, prm):
    """Tiles [t0, t1) into out[16 t0:]; a last, partial tile goes through a scratch row."""
    nfull = min(t1, out.size // ROWS)
    if nfull > t0:
        _run(fk, codes, sc, d, tab, bc, hs, out[t0 * ROWS :], t0, nfull, prm)
    s = max(nfull, t0)
    if t1 > s:
        tmp = np.empty((t1 - s) * ROWS, np.float32)
        _run(fk, codes, sc, d, tab, bc, hs, tmp, s, t1, prm)
        out[s * ROWS :] = tmp[: out.size - s * ROWS]


@njit(cache=True, nogil=True, inline="always")
def _check(codes, sc, d, out, n_in, prm):
    nb = n_in // 32
    nsup = nb // prm[2]
    nt = codes.shape[0]
    if (
        n_in % (32 * prm[2])
        or codes.shape[1] != nb
        or codes.shape[3] != ROWS
        or codes.shape[4] != 4
        or sc.shape[0] != nt
        or d.shape[0] != nt
        or sc.shape[1] != nsup
        or d.shape[1] != nsup
        or sc.shape[3] != ROWS
        or d.shape[3] != ROWS
        or out.size > nt * ROWS
        or out.size <= (nt - 1) * ROWS
    ):
        raise ValueError("planes_matvec: the shapes of x, the packed matrix and out differ")


@njit(cache=True, nogil=True, inline="always")
def _acts(ftab, x, bits):
    """The activation formats of x: tables and block constants (tmac.py's), 16-weight sums."""
    nb = x.size // 32
    tab = np.empty((nb, 1 if bits == 8 else 2, 8, 16), np.int8)
    bc = np.empty((nb, 4), np.float32)
    hs = np.empty(2 * nb, np.float32)
    build_tables_nb(ftab, x, tab, bc, bits)
    half_sums(x, hs)
    return tab, bc, hs


@njit(cache=True, nogil=True)
def matvec_nb(ftab, fk, x, codes, sc, d, out, bits, prm):
    """numba-callable single-threaded matvec: ``ftab`` (tmac tables, 0: numba), ``fk``
    (``fn_address``, 0: portable), x float32 [n_in], a PackedPlanes' arrays, out float32
    [n_out]; ``prm`` = ``params(qtype)``."""
    _check(codes, sc, d, out, x.size, prm)
    tab, bc, hs = _acts(ftab, x, bits)
    _tiles(fk, codes, sc, d, tab, bc, hs, out, 0, codes.shape[0], prm)


@njit(cache=True, nogil=True, parallel=True)
def _mv_parallel(ftab, fk, x, codes, sc, d, out, bits, prm, nthreads):
    _check(codes, sc, d, out, x.size, prm)
    tab, bc, hs = _acts(ftab, x, bits)
    nt = codes.shape[0]
    nch = min(nthreads, nt)
    for c in prange(nch):
        _tiles(fk, codes, sc, d, tab, bc, hs, out, c * nt // nch, (c + 1) * nt // nch, prm)


def params(qtype: int) -> np.ndarray:
    """int64 [form, sub, blocks per unit, 2 c]: what the portable kernel needs of a type."""
    s = spec(qtype)
    return np.array([_FORMS.index(s.form), s.sub, s.unit // 32, int(2 * s.c)], np.int64)


_F32 = np.dtype(np.float32)


def planes_matvec(
    x,
    p: PackedPlanes,
    out: np.ndarray | None = None,
    threads: int = 1,
    kernel: str | None = None,
    table_bits: int | None = None,
) -> np.ndarray:
    """y = W @ x for a PackedPlanes W (float32 [n_out]); ``out`` may be given."""
    key = ("mv", p.qtype, kernel, table_bits)
    r = _choice.get(key)
    if r is None:
        bits = table_bits or DEFAULT_TABLE_BITS
        ftab = tmac_addresses(Q4_1, table_bits=bits, kernel=kernel)[0]
        r = _choice[key] = (ftab, fn_address(p.qtype, kernel, bits), bits, params(p.qtype))
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 1 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if out is None:
        out = np.empty(p.n_out, np.float32)
    elif out.shape != (p.n_out,) or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError("planes_matvec: out must be a C-contiguous float32 [n_out] array")
    if x.size != p.n_in:
        raise ValueError(f"planes_matvec: x has {x.size} values, the matrix {p.n_in} columns")
    if threads > 1:
        _mv_parallel(r[0], r[1], x, p.codes, p.sc, p.d, out, r[2], r[3], threads)
    else:
        matvec_nb(r[0], r[1], x, p.codes, p.sc, p.d, out, r[2], r[3])
    return out


# ---------------------------------------------------------------------------------------------
# test data and the benchmark: python -m bench.experiments.planes

_F16_AT = {Q4_0: (0,), Q4_1: (0, 2), Q5_0: (0,), Q5_1: (0, 2), TQ1_0: (52,), TQ2_0: (64,)}


def random_rows(rng, qtype: int, n_out: int, n_in: int) -> np.ndarray:
    """Random GGUF rows of a type in ``QTYPES``: random code and scale bytes, f16 scales ~1e-2
    of random sign (K-quants: ``kquant.random_kquant``)."""
    if qtype in KQ_TYPES:
        return random_kquant(rng, qtype, n_out, n_in)
    s = spec(qtype)
    nu = n_in // s.unit
    raw = rng.integers(0, 256, (n_out, nu, s.block_bytes), dtype=np.uint8)
    for off in _F16_AT[qtype]:
        v = rng.uniform(0.5, 1.5, (n_out, nu)) * rng.choice([-1.0, 1.0], (n_out, nu)) * 1e-2
        raw[:, :, off : off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_out, nu, 2)
    return raw.reshape(n_out, nu * s.block_bytes)


def benchmark(
    qtypes=QTYPES, shape=(2048, 2048), rounds: int = 7, cold_bytes: int = 96 << 20, kernel: str | None = None, out=print
) -> list[dict]:
    """One thread, y = W x for one matrix of each type: this module's kernel against the kernel
    the runtime runs for the type (``ops.quant_matrix``: tmac.py's for Q4_0/Q4_1, the int8
    kernels of q8.py / kquant.py for the others). hot = the same matrix again (cache
    resident), cold = a rotation over copies totalling ``cold_bytes`` (DRAM); median of
    ``rounds`` rounds, each alternating the two kernels."""
    import copy
    import time

    from ember.lut_kernels.ops import quant_matrix

    rng = np.random.default_rng(0)
    n_out, n_in = shape
    x = rng.standard_normal(n_in).astype(np.float32)
    y = np.empty(n_out, np.float32)
    rows = []
    for qt in qtypes:
        raw = random_rows(rng, qt, n_out, n_in)
        pl = pack_planes(raw, qt)
        m = quant_matrix("w", raw, qt, n_out, n_in)
        ncold = max(2, cold_bytes // pl.nbytes)
        pls = [pl] + [copy.deepcopy(pl) for _ in range(ncold - 1)]
        pks = [m.packed] + [copy.deepcopy(m.packed) for _ in range(ncold - 1)]
        fs = {
            "planes": lambda i: planes_matvec(x, pls[i], out=y, kernel=kernel),
            "runtime": lambda i: m.matvec(x, pks[i], out=y, kernel=kernel),
        }
        res = {k: ([], []) for k in fs}
        for f in fs.values():
            f(0)
            f(1)
        for _ in range(rounds):
            for k, f in fs.items():
                t0 = time.perf_counter()
                for _ in range(20):
                    f(0)
                res[k][0].append((time.perf_counter() - t0) / 20)
                t0 = time.perf_counter()
                for i in range(ncold):
                    f(i)
                res[k][1].append((time.perf_counter() - t0) / ncold)
        med = {k: (np.median(v[0]) * 1e6, np.median(v[1]) * 1e6) for k, v in res.items()}
        row = dict(
            qtype=spec(qt).name,
            planes_bytes=pl.nbytes,
            runtime_bytes=m.packed.nbytes,
            runtime=type(m.packed).__name__,
            planes_us=med["planes"],
            runtime_us=med["runtime"],
        )
        rows.append(row)
        out(
            f"{row['qtype']:6s} planes {pl.nbytes / 1e6:5.2f} MB hot {med['planes'][0]:6.0f} us "
            f"cold {med['planes'][1]:6.0f} | {row['runtime']} {m.packed.nbytes / 1e6:5.2f} MB "
            f"hot {med['runtime'][0]:6.0f} cold {med['runtime'][1]:6.0f} | cold: runtime / "
            f"planes {med['runtime'][1] / med['planes'][1]:.2f}"
        )
    return rows


if __name__ == "__main__":
    import subprocess

    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("host:", codegen.host_isas(), "cpu:", codegen.llvm.get_host_cpu_name())
    benchmark()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
