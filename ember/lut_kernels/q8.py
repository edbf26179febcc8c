"""Decode matvec for Q8_0 weights: ``y = W @ x`` with int8 activations (llama.cpp's method).

Q8_0 block: 34 bytes = f16 ``d`` then 32 int8 ``qs``; weight = ``q * d``.

API
---
``pack_q8_0(raw2d) -> PackedQ8``; ``pack_exact_int8(raw2d, qtype) -> PackedQ8`` for Q5_0,
    TQ1_0 and TQ2_0, whose weights are int8 codes times one f16 scale per block (exact)
    raw GGUF rows (uint8 [n_out, n_in / 32 * 34]) -> int8 ``qs`` [n_out, n_in] (row-major, the
    GGUF quants without their scales) and ``d`` [n_out, n_in / 32], the f16 scales' bits
    (uint16; ``d_f32`` widens them; the kernels widen them with ``vcvtph2ps``), so a matvec reads
    exactly GGUF's 34 bytes per 32 weights. Vectorized NumPy.
``q8_matvec(x, p, out=None, threads=1, kernel=None) -> float32 [n_out]``
``q8_matvec_reference(x, p, return_scale=False)``
    NumPy oracle of exactly what the kernels compute (same int8 activations, exact integer block
    dots, float32 ``d_w * d_x``; the sum in float64).
``quantize_x_reference(x)``, ``matvec_nb(fn, x, qs, d, out)`` (numba entry), ``fn_address``.

Math. Per 32-block ``b`` of x: ``amax = max |x|``, ``d_x = amax / 127``, ``xq = rint(x * (127 /
amax))`` (round half to even, |xq| <= 127; amax == 0 gives d_x = 0, xq = 0). Per row and block the
exact integer ``I_b = sum_j qs_j xq_j``; ``y = sum_b (d_w[b] * d_x[b]) * I_b`` (the scale product
in float32, the sum in float32 FMAs, lane-wise, then a tree over the lanes).

Kernel paths (``kernel=`` or ``$EMBER_KERNEL`` via ``codegen.select_kernel``):
``avx512``: zmm, 2 blocks per 64-byte load; ``vpdpbusd`` is u8 x s8, so ``xu = xq ^ 0x80 =
xq + 128`` and ``I = vpdpbusd(xu, w) - vpdpbusd(128, w)`` (both exact in int32 lanes);
``avx512-novnni`` and ``avx2`` (x86-64-v3 code): ``vpmaddubsw(|w|, sign(w) * xq)`` (|w| <= 128 as
u8, |xq| <= 127: pair sums <= 32512, never saturate) + ``vpmaddwd`` by 1; ``portable``: plain
numba, 32 float32 lanes ``acc[j] += qs[j] * (xq[j] * s_b)`` per row (vectorizes), a tree sum.
The native paths: per 4-byte lane ``float(partial) * s_b`` (``s_b = d_w[b] * d_x[b]``)
accumulated by FMA into a float vector, one horizontal tree reduction per row. Modules are compiled with codegen's MCJIT helpers and cached.

Accuracy. Kernel vs oracle: float32 accumulation order only (measured <= 8e-8 of the row's
sum of |terms|; tests assert 1e-5). Against the float truth ``dequantize(W) @ x`` (float64):
guaranteed per row ``|err| <= sum_b |d_w[b]| * d_x[b] / 2 * sum_j |qs_j|`` (half an activation
step per weight) + float32 rounding (measured <= 0.47 of it). Typical (Gaussian x, uniform qs):
max |err| / sum_j |w_j x_j| per row, 20 seeds: 7e-3 at n_in = 32 (1.1e-2 once in 300 seeds x 1000
rows: one block, a wide tail), 4.4e-3 at 96, 1.4e-3 at 576. Tests (tests/test_q8_kernel.py)
assert the guaranteed bound and 1e-2 (2e-2 for n_in = 32) of sum |w x| per row.

Timing: ``python -m ember.lut_kernels.q8`` (``benchmark()``). Dev box: 2 vCPUs "Intel Xeon"
(LLVM cpu rocketlake, AVX-512 VNNI; 2 MB L2/core, 105 MB shared L3), load average 0.5-0.6,
1 thread unless said, whole Python call, median of 9 interleaved rounds; hot = the same matrix
again (it may sit in L3), cold = rotating over 512 MB of copies (DRAM). GB/s = packed bytes
(qs + d) / time. 49152 x 576 (SmolLM2-135M's tied output matrix), 31.9 MB packed (measured when
``d`` was still float32; it is f16 now, 30.1 MB)::

                       hot us (GB/s)    cold us (GB/s)
    avx512 (vnni)       2704 (11.8)      2969 (10.7)     two runs: 2704-2786 / 2969-3101
    avx512-novnni       2854 (11.2)      3024 (10.5)
    avx2                2756 (11.6)      3036 (10.5)
    portable            5451 ( 5.8)      5581 ( 5.7)
    avx512, threads=2   1097 (29.0)      1701 (18.7)
    f32 numpy W @ x    11733 ( 9.7)     12125 ( 9.3)     (W dequantized beforehand: 113 MB)

So one thread is at the DRAM roofline (10.1 GB/s measured for a plain f32 sum), ~4x faster than
float32 BLAS on the pre-dequantized matrix (ember's tile-wise dequantize + BLAS: ~25 ms per the
task brief, not re-measured here). Software prefetch ``DEFAULT_PREFETCH`` = 4096 bytes ahead on qs: cold 4443 us without,
3924 (1 KiB), 3339 (2 KiB), 3083 (4 KiB), 3069 (8 KiB). Compute bound (2048 x 576, 1.2 MB, L2
resident, min of 11): avx512 44 us (30 GB/s, 21 ns/row), avx2 62 us, portable 144 us (the
int8 -> float lanes vectorize; an int32-per-block numba loop was 5x slower: not vectorized). Per call: 1.9 us
from Python on a 1 x 32 matrix (1.5 us for ``matvec_nb``'s numba dispatch). MCJIT compile of a
module 30-60 ms, once per process. ``pack_q8_0`` 49152 x 576: 18-26 ms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import codegen
from .codegen import _mask, _splat
from .pack import gguf_blocks, half_to_f32
from .tmac import _check_types, _emit_call

__all__ = [
    "PackedQ8",
    "pack_q8_0",
    "q8_matvec",
    "q8_matvec_reference",
    "quantize_x_reference",
    "matvec_nb",
    "fn_address",
    "kernel_ir",
    "reset_kernel_choice",
]

DEFAULT_PREFETCH = 4096  # software prefetch distance in bytes of qs (0: none); measured below


# ---------------------------------------------------------------------------------------------
# packing


@dataclass
class PackedQ8:
    qs: np.ndarray      # int8 [n_out, n_in]
    d: np.ndarray       # uint16 [n_out, nb] (nb = n_in / 32): the block scales' IEEE half bits;
    #                     [n_out, 2 nb] with mins (Q5_1): the nb scales, then the nb mins
    n_out: int
    n_in: int

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes

    def arrays(self) -> dict:
        return {"qs": self.qs, "d": self.d}

    @property
    def has_min(self) -> bool:
        """Whether each block also has an additive f16 min (weight ``q d + m``)."""
        return self.d.shape[1] == 2 * (self.n_in // 32) and self.n_in > 0

    @property
    def d_f32(self) -> np.ndarray:
        """The block scales as float32 [n_out, n_in // 32]."""
        return self.d[:, :self.n_in // 32].view(np.float16).astype(np.float32)

    @property
    def m_f32(self):
        """The block mins as float32 [n_out, n_in // 32], or None."""
        nb = self.n_in // 32
        return self.d[:, nb:].view(np.float16).astype(np.float32) if self.has_min else None

    @classmethod
    def from_arrays(cls, a) -> "PackedQ8":
        qs = np.ascontiguousarray(a["qs"], dtype=np.int8)
        d = np.asarray(a["d"])
        if d.dtype != np.uint16:
            raise ValueError("PackedQ8: d must hold f16 bits (uint16)")
        d = np.ascontiguousarray(d)
        nb = qs.shape[1] // 32 if qs.ndim == 2 else -1
        if qs.ndim != 2 or qs.shape[1] % 32 or d.ndim != 2 or d.shape[0] != qs.shape[0] \
                or d.shape[1] not in (nb, 2 * nb):
            raise ValueError("PackedQ8: inconsistent qs / d shapes")
        return cls(qs, d, qs.shape[0], qs.shape[1])

    def dequantize(self) -> np.ndarray:
        """float32 [n_out, n_in] (for tests and baselines; Q5_1: bit for bit the file's)."""
        nb = self.n_in // 32
        w = self.qs.reshape(self.n_out, nb, 32).astype(np.float32) * self.d_f32[:, :, None]
        if self.has_min:
            w = w + self.m_f32[:, :, None]
        return w.reshape(self.n_out, self.n_in)


def pack_q8_0(raw2d: np.ndarray) -> PackedQ8:
    """GGUF Q8_0 rows (uint8 [n_out, nb * 34]) -> PackedQ8."""
    r3 = gguf_blocks(raw2d, 34, "pack_q8_0")
    n_out, nb = r3.shape[:2]
    d = np.ascontiguousarray(r3[:, :, :2]).view(np.uint16).reshape(n_out, nb)
    qs = np.ascontiguousarray(r3[:, :, 2:]).view(np.int8).reshape(n_out, nb * 32)
    return PackedQ8(qs, d, n_out, nb * 32)


# Types whose every weight is an int8 code times one f16 scale per block of 32 (or per super-block
# of 256): (weights, bytes, offset of the f16 scale) per block.
EXACT_INT8 = {6: (32, 22, 0),       # Q5_0: d * (q - 16)
              34: (256, 54, 52),    # TQ1_0: d * (t - 1)
              35: (256, 66, 64)}    # TQ2_0: d * (t - 1)
INT8_TYPES = (8, 7, *EXACT_INT8)          # the types the Q8_0 kernels run (8: Q8_0 itself;
#                                           7: Q5_1, with its mins)


def pack_exact_int8(raw2d: np.ndarray, qtype: int, chunk: int = 2048) -> PackedQ8:
    """GGUF rows of a type in ``EXACT_INT8`` -> PackedQ8, exactly (``dequantize()`` gives the
    file's float32 weights bit for bit): the int8 codes are the dequantized weights divided by
    the block's f16 scale (a float32 division of an exact multiple is exact), checked.
    The int8 kernels then run these types; they read 1.0625 bytes a weight instead of the
    file's (Q5_0 0.69, TQ 0.21-0.26) until each has a kernel of its own."""
    from ..formats.quants import dequantize_into

    bw, bb, off = EXACT_INT8[qtype]
    r3 = gguf_blocks(raw2d, bb, "pack_exact_int8")
    n_out, n_in = r3.shape[0], r3.shape[1] * bw
    raw = r3.reshape(n_out, -1)
    d = np.ascontiguousarray(r3[:, :, off:off + 2]).view(np.uint16).reshape(n_out, -1)
    d = np.repeat(d, bw // 32, axis=1)                                  # one per 32 weights
    qs = np.empty((n_out, n_in), np.int8)
    w = np.empty(min(chunk, n_out) * n_in, np.float32)
    for r0 in range(0, n_out, chunk):  # bounded temporaries for large matrices
        r1 = min(n_out, r0 + chunk)
        wr = w[:(r1 - r0) * n_in].reshape(r1 - r0, -1, 32)
        dequantize_into(raw[r0:r1], qtype, wr.reshape(-1))
        df = d[r0:r1].view(np.float16).astype(np.float32)[:, :, None]
        ok = np.isfinite(df) & (df != 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            q = np.where(ok, wr / np.where(ok, df, 1), 0)
        q = np.rint(q)
        if not (np.all((q >= -128) & (q <= 127))
                and np.array_equal((q.astype(np.float32) * df)[ok[..., 0]], wr[ok[..., 0]])):
            raise ValueError("pack_exact_int8: a block is not an int8 code times its scale")
        qs[r0:r1] = q.astype(np.int8).reshape(r1 - r0, n_in)
    return PackedQ8(qs, d, n_out, n_in)


Q5_1 = 7


def pack_q5_1(raw2d: np.ndarray) -> PackedQ8:
    """GGUF Q5_1 rows (uint8 [n_out, nb * 24]: f16 d, f16 m, 32 high bits, 16 bytes of nibbles;
    weight j = d * (low nibble of qs[j % 16] (j < 16) / high (j >= 16) | bit j of qh << 4) + m)
    -> PackedQ8 with mins: the 5-bit codes as int8 (0..31), then d and m. 1.125 bytes a weight
    read instead of the file's 0.75 (a bit-plane table-lookup layout would read the file's)."""
    r3 = gguf_blocks(raw2d, 24, "pack_q5_1")
    n_out, nb = r3.shape[:2]
    d = np.empty((n_out, 2 * nb), np.uint16)
    dm = np.ascontiguousarray(r3[:, :, :4]).view(np.uint16).reshape(n_out, nb, 2)
    d[:, :nb], d[:, nb:] = dm[:, :, 0], dm[:, :, 1]
    qh = np.ascontiguousarray(r3[:, :, 4:8]).view(np.uint32).reshape(n_out, nb, 1)
    hb = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)        # [n, nb, 32]
    qs = r3[:, :, 8:24]
    lo = np.concatenate([qs & 15, qs >> 4], axis=2)                              # [n, nb, 32]
    codes = (lo | (hb << 4)).view(np.int8).reshape(n_out, nb * 32)
    return PackedQ8(np.ascontiguousarray(codes), d, n_out, nb * 32)


# ---------------------------------------------------------------------------------------------
# IR

_VNNI = "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)"


def _row_ir(vw: int, combine: str, prefetch: int, has_min: bool = False) -> list[str]:
    """``q8_rows(qs, d, xq, dxv, y, nb, r0, r1)``: y[r] for r0 <= r < r1 (absolute indices).

    qs int8 [*, 32 nb], d f16 bits [*, nb], xq int8 [32 nb], dxv float32 [16 nbp] (nbp = nb +
    nb % 2): ``dx[b]`` repeated 8 times (a zero block appended when nb is odd), then per block
    ``float32(dx[b] * xsum[b])`` and 7 zeros. ``has_min`` (``q8m_rows``, Q5_1): d [*, 2 nb],
    the scales then the mins m; y also gets ``m[b] * float32(dx[b] xsum[b])`` per block (in the
    block's first lane: the 7 zeros keep the other lanes exact).
    """
    nl = vw // 4
    bpv = vw // 32                    # blocks per vector
    V8, V16, V32, VF = f"<{vw} x i8>", f"<{vw // 2} x i16>", f"<{nl} x i32>", f"<{nl} x float>"
    L = []
    a = L.append
    ro = "ptr noalias nocapture readonly"
    a(f"define void @q8{'m' if has_min else ''}_rows({ro} %qs, {ro} %dw, {ro} %xq, {ro} %dxv, "
      "ptr noalias nocapture %y, i64 %nb, i64 %r0, i64 %r1) #0 {")
    a("entry:")
    a("  %e1 = icmp sge i64 %r0, %r1")
    a("  %e2 = icmp sle i64 %nb, 0")
    a("  %skip = or i1 %e1, %e2")
    a("  br i1 %skip, label %exit, label %pre")
    a("pre:")
    a(f"  %np = udiv i64 %nb, {bpv}")
    a("  %hasp = icmp sgt i64 %np, 0")
    a("  %rowb = mul i64 %nb, 32")
    a(f"  %drs = mul i64 %nb, {2 if has_min else 1}")    # f16 values per row of d
    a("  %nbo = and i64 %nb, 1")
    a("  %nbp = add i64 %nb, %nbo")
    a("  %xso = mul i64 %nbp, 8")                          # dxv: dx * xsum after the dx part
    a("  %dxs = getelementptr float, ptr %dxv, i64 %xso")
    if bpv == 2:
        a("  %odd0 = and i64 %nb, 1")
        a("  %odd = icmp ne i64 %odd0, 0")
        a("  %lastb = sub i64 %nb, 1")
        a("  %tqo = mul i64 %lastb, 32")
        a("  %txp = getelementptr i8, ptr %xq, i64 %tqo")
        a("  %tx32 = load <32 x i8>, ptr %txp, align 1")
        a(f"  %tx = shufflevector <32 x i8> %tx32, <32 x i8> zeroinitializer, {_mask(range(64))}")
        a("  %tdxo = mul i64 %np, 16")
        a("  %tdxp = getelementptr float, ptr %dxv, i64 %tdxo")
    a("  br label %row")

    def block(tag, w, x, dvec, acc, out):
        """acc + float(lane partials of w . x) * dvec -> out."""
        if combine == "vnni":
            a(f"  %xu{tag} = xor {V8} {x}, {_splat('i8', vw, -128)}")
            a(f"  %p1{tag} = call {V32} @llvm.x86.avx512.vpdpbusd.512({V32} zeroinitializer, "
              f"{V8} %xu{tag}, {V8} {w})")
            a(f"  %p2{tag} = call {V32} @llvm.x86.avx512.vpdpbusd.512({V32} zeroinitializer, "
              f"{V8} {_splat('i8', vw, -128)}, {V8} {w})")
            a(f"  %I{tag} = sub {V32} %p1{tag}, %p2{tag}")
        else:
            mad = "@llvm.x86.avx512.pmaddubs.w.512" if vw == 64 else "@llvm.x86.avx2.pmadd.ub.sw"
            madd = "@llvm.x86.avx512.pmaddw.d.512" if vw == 64 else "@llvm.x86.avx2.pmadd.wd"
            a(f"  %aw{tag} = call {V8} @llvm.abs.v{vw}i8({V8} {w}, i1 false)")
            a(f"  %ng{tag} = icmp slt {V8} {w}, zeroinitializer")
            a(f"  %nx{tag} = sub {V8} zeroinitializer, {x}")
            a(f"  %sx{tag} = select <{vw} x i1> %ng{tag}, {V8} %nx{tag}, {V8} {x}")
            a(f"  %m{tag} = call {V16} {mad}({V8} %aw{tag}, {V8} %sx{tag})")
            a(f"  %I{tag} = call {V32} {madd}({V16} %m{tag}, {V16} {_splat('i16', vw // 2, 1)})")
        a(f"  %f{tag} = sitofp {V32} %I{tag} to {VF}")
        a(f"  {out} = call {VF} @llvm.fma.v{nl}f32({VF} %f{tag}, {VF} {dvec}, {VF} {acc})")

    def mins(tag, drow, moff, xoff, acc, out, tail=False):
        """acc + m[b] * float32(dx xsum)[b] for the vector's block(s) -> out."""
        a(f"  %mp{tag} = getelementptr i16, ptr %mrow, i64 {moff}")
        if bpv == 2 and not tail:
            a(f"  %mh{tag} = load <2 x half>, ptr %mp{tag}, align 2")
            a(f"  %m2{tag} = fpext <2 x half> %mh{tag} to <2 x float>")
            a(f"  %M{tag} = shufflevector <2 x float> %m2{tag}, <2 x float> poison, "
              f"{_mask([0] * 8 + [1] * 8)}")
        else:
            a(f"  %mh{tag} = load half, ptr %mp{tag}, align 2")
            a(f"  %m1{tag} = fpext half %mh{tag} to float")
            a(f"  %mi{tag} = insertelement {VF} poison, float %m1{tag}, i32 0")
            a(f"  %M{tag} = shufflevector {VF} %mi{tag}, {VF} poison, <{nl} x i32> zeroinitializer")
        a(f"  %xsp{tag} = getelementptr float, ptr %dxs, i64 {xoff}")
        a(f"  %XS{tag} = load {VF}, ptr %xsp{tag}, align 4, !invariant.load !0")
        a(f"  {out} = call {VF} @llvm.fma.v{nl}f32({VF} %M{tag}, {VF} %XS{tag}, {VF} {acc})")

    a("row:")
    a("  %r = phi i64 [%r0, %pre], [%r.next, %fin]")
    a("  %qo = mul i64 %r, %rowb")
    a("  %qrow = getelementptr i8, ptr %qs, i64 %qo")
    a("  %do = mul i64 %r, %drs")
    a("  %drow = getelementptr i16, ptr %dw, i64 %do")
    a("  %mrow = getelementptr i16, ptr %drow, i64 %nb")
    a("  br i1 %hasp, label %inner, label %after")
    a("inner:")
    a("  %k = phi i64 [0, %row], [%k.next, %inner]")
    a(f"  %acc = phi {VF} [zeroinitializer, %row], [%accn, %inner]")
    a(f"  %wo = mul i64 %k, {vw}")
    a("  %wp = getelementptr i8, ptr %qrow, i64 %wo")
    if prefetch:
        a(f"  %pfp = getelementptr i8, ptr %wp, i64 {prefetch}")
        a("  call void @llvm.prefetch.p0(ptr %pfp, i32 0, i32 3, i32 1)")
    a(f"  %w = load {V8}, ptr %wp, align 1")
    a("  %xp = getelementptr i8, ptr %xq, i64 %wo")
    a(f"  %x = load {V8}, ptr %xp, align 1, !invariant.load !0")
    a(f"  %dwo = mul i64 %k, {bpv}")
    a("  %dwp = getelementptr i16, ptr %drow, i64 %dwo")
    if bpv == 2:
        a("  %d2h = load <2 x half>, ptr %dwp, align 2")
        a("  %d2 = fpext <2 x half> %d2h to <2 x float>")
        a(f"  %D = shufflevector <2 x float> %d2, <2 x float> poison, {_mask([0] * 8 + [1] * 8)}")
    else:
        a("  %d1h = load half, ptr %dwp, align 2")
        a("  %d1 = fpext half %d1h to float")
        a(f"  %di = insertelement {VF} poison, float %d1, i32 0")
        a(f"  %D = shufflevector {VF} %di, {VF} poison, <{nl} x i32> zeroinitializer")
    a(f"  %dxo = mul i64 %k, {nl}")
    a("  %dxp = getelementptr float, ptr %dxv, i64 %dxo")
    a(f"  %DX = load {VF}, ptr %dxp, align 4, !invariant.load !0")
    a(f"  %S = fmul {VF} %D, %DX")
    if has_min:
        block("", "%w", "%x", "%S", "%acc", "%acc1")
        mins("", "%drow", "%dwo", "%dxo", "%acc1", "%accn")
    else:
        block("", "%w", "%x", "%S", "%acc", "%accn")
    a("  %k.next = add i64 %k, 1")
    a("  %kdone = icmp eq i64 %k.next, %np")
    a("  br i1 %kdone, label %after, label %inner")
    a("after:")
    a(f"  %accA = phi {VF} [zeroinitializer, %row], [%accn, %inner]")
    if bpv == 2:
        a("  br i1 %odd, label %tail, label %fin")
        a("tail:")
        a("  %twp = getelementptr i8, ptr %qrow, i64 %tqo")
        a("  %tw32 = load <32 x i8>, ptr %twp, align 1")
        a(f"  %tw = shufflevector <32 x i8> %tw32, <32 x i8> zeroinitializer, {_mask(range(64))}")
        a("  %tdp = getelementptr i16, ptr %drow, i64 %lastb")
        a("  %td1h = load half, ptr %tdp, align 2")
        a("  %td1 = fpext half %td1h to float")
        a(f"  %tdi = insertelement {VF} poison, float %td1, i32 0")
        a(f"  %TD = shufflevector {VF} %tdi, {VF} poison, <{nl} x i32> zeroinitializer")
        a(f"  %TDX = load {VF}, ptr %tdxp, align 4")
        a(f"  %TS = fmul {VF} %TD, %TDX")
        if has_min:
            block("t", "%tw", "%tx", "%TS", "%accA", "%accT1")
            a("  %tmo = mul i64 %np, 2")
            a(f"  %tdxso = mul i64 %np, {nl}")
            mins("t", "%drow", "%tmo", "%tdxso", "%accT1", "%accT", tail=True)
        else:
            block("t", "%tw", "%tx", "%TS", "%accA", "%accT")
        a("  br label %fin")
        a("fin:")
        a(f"  %accF = phi {VF} [%accA, %after], [%accT, %tail]")
    else:
        a("  br label %fin")
        a("fin:")
        a(f"  %accF = fadd {VF} %accA, {_splat('float', nl, '-0.0')}")
    codegen.emit_hsum(a, "%accF", nl, "%ys")
    a("  %yp = getelementptr float, ptr %y, i64 %r")
    a("  store float %ys, ptr %yp, align 4")
    a("  %r.next = add i64 %r, 1")
    a("  %rdone = icmp eq i64 %r.next, %r1")
    a("  br i1 %rdone, label %exit, label %row")
    a("exit:")
    a("  ret void")
    a("}")
    return L


_SPECS = {"avx512": (64, "vnni"), "avx512-novnni": (64, "maddubs"), "avx2": (32, "maddubs")}


def kernel_ir(isa: str, prefetch: int = DEFAULT_PREFETCH, cpu: str = "", features: str = "") -> str:
    """The IR module text of ``q8_rows`` and ``q8m_rows`` (with mins) for an x86 path."""
    vw, combine = _SPECS[isa]
    nl = vw // 4
    L = [_VNNI,
         "declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8>, <64 x i8>)",
         "declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)",
         "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)",
         "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)",
         f"declare <{vw} x i8> @llvm.abs.v{vw}i8(<{vw} x i8>, i1)",
         f"declare <{nl} x float> @llvm.fma.v{nl}f32(<{nl} x float>, <{nl} x float>, "
         f"<{nl} x float>)",
         "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"]
    if combine != "vnni":
        L = L[1:]
    L += _row_ir(vw, combine, prefetch) + _row_ir(vw, combine, prefetch, has_min=True)
    return codegen.finish_module(L, cpu, features)


def _compile(isa: str, prefetch: int):
    """((address of q8_rows, of q8m_rows), owners to keep alive, compile seconds); once per
    process."""
    if isa not in codegen.host_isas() or isa not in _SPECS:
        raise ValueError(f"isa {isa!r} cannot be compiled for execution on this host")

    def build():
        spec = codegen.resolve_isa(isa)
        ee, owners, secs = codegen.jit(lambda cpu, feat: kernel_ir(spec, prefetch, cpu, feat), isa)
        return ((ee.get_function_address("q8_rows"), ee.get_function_address("q8m_rows")),
                owners, secs)

    return codegen.once(("q8", isa, prefetch), build)


def kernel_asm(isa: str = "avx512", prefetch: int = DEFAULT_PREFETCH) -> str:
    """The host assembly of the Q8_0 kernel (for inspection; runs nothing)."""
    spec = codegen.resolve_isa(isa)
    return codegen.host_asm(lambda cpu, feat: kernel_ir(spec, prefetch, cpu, feat), isa)


_choice: dict = {}


def reset_kernel_choice() -> None:
    _choice.clear()


def fn_address(kernel: str | None = None, prefetch: int | None = None,
               has_min: bool = False) -> int:
    """Address of ``q8_rows`` (``q8m_rows`` with ``has_min``) for a kernel path (0: portable)."""
    key = (kernel, prefetch, has_min)
    r = _choice.get(key)
    if r is None:
        name = codegen.select_kernel(kernel)
        if name not in _SPECS:   # portable (neon is never executed here)
            r = 0
        else:
            r = _compile(name, DEFAULT_PREFETCH if prefetch is None else prefetch)[0][has_min]
        _choice[key] = r
    return r


# ---------------------------------------------------------------------------------------------
# numba


@intrinsic
def _call_rows(typingctx, fn, qs, d, xq, dxv, y, nb, r0, r1):
    """q8_rows(qs, d, xq, dxv, y, nb, r0, r1) through a runtime address."""
    _check_types((fn, qs, d, xq, dxv, y, nb, r0, r1),
                 (None, types.int8, types.uint16, types.int8, types.float32, types.float32,
                  None, None, None))
    return types.void(fn, qs, d, xq, dxv, y, nb, r0, r1), _emit_call


@njit(cache=True, nogil=True)
def _quantize_x(x, xq, dxv):
    """int8 xq [n_in] and dxv [16 * (nb + nb % 2)]: d_x per block repeated 8x (zero padded),
    then per block float32(d_x * xsum) and 7 zeros (xsum: the block's sum of xq; the mins)."""
    nb = x.size // 32
    q127 = np.float32(127.0)
    half = 8 * (nb + nb % 2)                   # dxv may be longer (a scratch buffer)
    dxv[half:2 * half] = 0
    for b in range(nb):
        o = 32 * b
        amax = np.float32(0.0)
        for j in range(32):
            v = abs(x[o + j])
            amax = v if v > amax else amax
        if amax > 0:
            inv = q127 / amax
            dx = amax / q127
        else:
            inv = np.float32(0.0)
            dx = np.float32(0.0)
        xs = 0
        for j in range(32):
            q = np.int32(np.rint(x[o + j] * inv))
            xs += q
            xq[o + j] = np.int8(q)
        for j in range(8):
            dxv[8 * b + j] = dx
        dxv[half + 8 * b] = dx * np.float32(xs)
    for j in range(8 * nb, half):
        dxv[j] = 0


@njit(cache=True, nogil=True, fastmath={"contract", "nsz", "arcp"})
def _rows_portable(qs, d, xq, dxv, y, r0, r1):
    """Plain numba: 32 float32 lanes ``acc[j] += qs[j] * (xq[j] * s_b)`` per row, then a sum.

    The lanes are the vector, so LLVM vectorizes without fastmath (which would make the
    rounding depend on the inlining context: serial and threaded calls would differ); the lanes
    are summed as a tree. Differs from the oracle by float32 rounding only.
    """
    nb = qs.shape[1] // 32
    has_min = d.shape[1] == 2 * nb
    half = 8 * (nb + nb % 2)
    xqf = np.empty(xq.size, np.float32)
    for j in range(xq.size):
        xqf[j] = np.float32(xq[j])
    acc = np.empty(32, np.float32)
    for r in range(r0, r1):
        acc[:] = 0
        for b in range(nb):
            o = 32 * b
            sc = half_to_f32(d[r, b]) * dxv[8 * b]
            for j in range(32):
                acc[j] += np.float32(qs[r, o + j]) * (xqf[o + j] * sc)
            if has_min:
                acc[0] += half_to_f32(d[r, nb + b]) * dxv[half + 8 * b]
        n = 32
        while n > 1:
            n //= 2
            for j in range(n):
                acc[j] = acc[j] + acc[j + n]
        y[r] = acc[0]


@njit(cache=True, nogil=True, inline="always")
def _rows(fn, qs, d, xq, dxv, y, r0, r1):
    if fn != 0:
        _call_rows(fn, qs, d, xq, dxv, y, qs.shape[1] // 32, r0, r1)
    else:
        _rows_portable(qs, d, xq, dxv, y, r0, r1)


@njit(cache=True, nogil=True, inline="always")
def _prep(x, qs, d, out):
    nb = x.size // 32
    if x.size % 32 or qs.shape[1] != x.size or (d.shape[1] != nb and d.shape[1] != 2 * nb) \
            or d.shape[0] != qs.shape[0] or out.size != qs.shape[0]:
        raise ValueError("q8_matvec: the shapes of x, the packed matrix and out differ")
    xq = np.empty(x.size, np.int8)
    dxv = np.empty(16 * (nb + nb % 2), np.float32)
    _quantize_x(x, xq, dxv)
    return xq, dxv


@njit(cache=True, nogil=True)
def _mv_serial(fn, x, qs, d, out):
    xq, dxv = _prep(x, qs, d, out)
    _rows(fn, qs, d, xq, dxv, out, 0, qs.shape[0])


@njit(cache=True, nogil=True, parallel=True)
def _mv_parallel(fn, x, qs, d, out, nthreads):
    xq, dxv = _prep(x, qs, d, out)
    n = qs.shape[0]
    nch = min(nthreads, n)
    for c in prange(nch):
        _rows(fn, qs, d, xq, dxv, out, c * n // nch, (c + 1) * n // nch)


@njit(cache=True, nogil=True)
def matvec_nb(fn, x, qs, d, out):
    """numba-callable single-threaded matvec; ``fn`` from ``fn_address`` (0: portable)."""
    _mv_serial(fn, x, qs, d, out)


_F32 = np.dtype(np.float32)


def q8_matvec(x, p: PackedQ8, out: np.ndarray | None = None, threads: int = 1,
              kernel: str | None = None) -> np.ndarray:
    """y = W @ x for a PackedQ8 matrix (float32 [n_out]); ``out`` may be given."""
    has_min = p.has_min
    fn = _choice.get((kernel, None, has_min))
    if fn is None:
        fn = fn_address(kernel, has_min=has_min)
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 1 \
            or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if out is None:
        out = np.empty(p.n_out, np.float32)
    if threads > 1:
        _mv_parallel(fn, x, p.qs, p.d, out, threads)
    else:
        _mv_serial(fn, x, p.qs, p.d, out)
    return out


# ---------------------------------------------------------------------------------------------
# NumPy oracle


def quantize_x_reference(x):
    """(int8 xq [n_in], float32 d_x [nb]) exactly as the kernels quantize x."""
    x = np.asarray(x, np.float32).reshape(-1)
    nb = x.size // 32
    xb = x.reshape(nb, 32)
    amax = np.abs(xb).max(axis=1)
    pos = amax > 0
    safe = np.where(pos, amax, np.float32(1))
    inv = np.where(pos, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    dx = np.where(pos, safe / np.float32(127), np.float32(0)).astype(np.float32)
    xq = np.rint(xb * inv[:, None]).astype(np.int8).reshape(-1)
    return xq, dx


def q8_matvec_reference(x, p: PackedQ8, return_scale: bool = False):
    """What the kernels compute: ``sum_b float32(d_w[b] * d_x[b]) * I_b`` (+ ``m[b] *
    float32(d_x[b] * xsum[b])`` with mins), the sum in float64.

    With ``return_scale`` also (per row) the sum of the |terms| (the size of float32 rounding
    differences) and the guaranteed activation-quantization error bound against the float
    truth, ``sum_b d_x[b] / 2 sum_j |w_j|`` (half an activation step per weight).
    """
    xq, dx = quantize_x_reference(x)
    nb = p.n_in // 32
    q = p.qs.reshape(p.n_out, nb, 32).astype(np.int32)
    xb = xq.reshape(nb, 32).astype(np.int32)
    I = np.einsum("rbj,bj->rb", q, xb)
    s = (p.d_f32 * dx[None, :]).astype(np.float32).astype(np.float64)
    t = I.astype(np.float64) * s
    absum = np.abs(s) * np.einsum("rbj,bj->rb", np.abs(q), np.abs(xb))
    if p.has_min:
        dxs = (dx * xb.sum(axis=1).astype(np.float32)).astype(np.float64)   # float32 products
        tm = p.m_f32.astype(np.float64) * dxs[None, :]
        t, absum = t + tm, absum + np.abs(tm)
    y = t.sum(axis=1).astype(np.float32)
    if not return_scale:
        return y
    w = np.abs(p.dequantize().astype(np.float64)).reshape(p.n_out, nb, 32).sum(axis=2)
    bound = (w * dx.astype(np.float64)[None, :] / 2).sum(axis=1)
    return y, absum.sum(axis=1), bound


# ---------------------------------------------------------------------------------------------
# benchmark: python -m ember.lut_kernels.q8


def random_q8_0(rng, n_out: int, n_in: int) -> np.ndarray:
    """Random GGUF Q8_0 rows: uint8 [n_out, n_in / 32 * 34], f16 scales ~ 0.01, qs uniform."""
    nb = n_in // 32
    raw = rng.integers(0, 256, (n_out, nb, 34), dtype=np.uint8)
    dd = (np.abs(rng.standard_normal((n_out, nb))) * 0.01 + 1e-4).astype(np.float16)
    raw[:, :, 0:2] = dd.view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * 34)


def benchmark(n_out: int = 49152, n_in: int = 576, rounds: int = 9, kernels=None,
              cold_bytes: int = 512 << 20, out=print) -> dict:
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    kernels = kernels or [k for k in codegen.host_isas() if k != "neon"]
    p = pack_q8_0(random_q8_0(rng, n_out, n_in))
    ncold = max(2, cold_bytes // p.nbytes)
    cps = [p] + [PackedQ8(p.qs.copy(), p.d.copy(), n_out, n_in) for _ in range(ncold - 1)]
    x = rng.standard_normal(n_in).astype(np.float32)
    y = np.empty(n_out, np.float32)
    w = p.dequantize()
    nw = max(2, cold_bytes // w.nbytes)
    ws = [w] + [w.copy() for _ in range(nw - 1)]
    variants = {}
    for k in kernels:
        variants[k] = ((lambda i, k=k: q8_matvec(x, cps[i % ncold], out=y, kernel=k)), p.nbytes)
    variants[f"{kernels[0]} 2thr"] = ((lambda i: q8_matvec(x, cps[i % ncold], out=y,
                                                           kernel=kernels[0], threads=2)),
                                      p.nbytes)
    variants["f32 numpy"] = ((lambda i: ws[i % nw] @ x), w.nbytes)
    res = {nm: ([], []) for nm in variants}
    with threadpool_limits(1):
        for f, _ in variants.values():
            f(0)
            f(1)
        for _ in range(rounds):
            for nm, (f, nbytes) in variants.items():
                reps = 3 if nm != "portable" else 1
                f(0)
                f(0)
                t0 = time.perf_counter()
                for _ in range(reps):
                    f(0)
                res[nm][0].append((time.perf_counter() - t0) / reps)
                t0 = time.perf_counter()
                for i in range(1, 1 + ncold):
                    f(i)
                res[nm][1].append((time.perf_counter() - t0) / ncold)
    out(f"{n_out}x{n_in} Q8_0 packed {p.nbytes / 1e6:.1f} MB (f32 {w.nbytes / 1e6:.1f} MB): "
        "median hot us (GB/s) | cold us (GB/s)")
    rows = {}
    for nm, (f, nbytes) in variants.items():
        h, c = np.median(res[nm][0]), np.median(res[nm][1])
        rows[nm] = (h, c)
        out(f"  {nm:16s} {h * 1e6:9.0f} ({nbytes / h / 1e9:5.1f}) | {c * 1e6:9.0f} "
            f"({nbytes / c / 1e9:5.1f})")
    return rows


if __name__ == "__main__":
    import subprocess
    import sys
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("host:", codegen.host_isas())
    rng = np.random.default_rng(1)
    raw = random_q8_0(rng, 49152, 576)
    pack_q8_0(raw)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        pack_q8_0(raw)
        ts.append(time.perf_counter() - t0)
    print(f"pack_q8_0 49152x576: {np.median(ts) * 1e3:.1f} ms")
    benchmark(rounds=3 if "--quick" in sys.argv else 9)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
