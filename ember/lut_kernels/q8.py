"""Decode matvec for Q8_0, Q5_0 and Q5_1 weights: ``y = W @ x`` with int8 activations (llama.cpp's
method), and TQ1_0 / TQ2_0 repacked exactly into the Q8_0 layout.

Q8_0 block: 34 bytes = f16 ``d`` then 32 int8 ``qs``; weight = ``q * d``. Q5_0 (22 bytes: d,
32 high bits, 16 bytes of nibbles): ``(q - 16) d``; Q5_1 (24: d, m, the same): ``q d + m``.

API
---
``pack_q8_0(raw2d) -> PackedQ8``; ``pack_exact_int8(raw2d, qtype) -> PackedQ8`` for TQ1_0 and
    TQ2_0, whose weights are int8 codes times one f16 scale per block (exact)
    raw GGUF rows (uint8 [n_out, n_in / 32 * 34]) -> int8 ``qs`` [n_out, n_in] (row-major, the
    GGUF quants without their scales) and ``d`` [n_out, n_in / 32], the f16 scales' bits
    (uint16; ``d_f32`` widens them; the kernels widen them with ``vcvtph2ps``), so a matvec reads
    exactly GGUF's 34 bytes per 32 weights. Vectorized NumPy.
``pack_q5(raw2d, qtype) -> PackedQ5`` (Q5_0, Q5_1): the 5-bit codes in pairs of blocks, low
    nibbles of two blocks in one 32-byte run (one ``and``, one shift make 64 weights) and their
    high bits as the file's 32-bit words (a mask register adds them), so a matvec reads the
    file's bytes (layout: ``PackedQ5``).
``q8_matvec(x, p, out=None, threads=1, kernel=None) -> float32 [n_out]`` (PackedQ8 or PackedQ5)
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
Q5_0 / Q5_1 (``q5_0_rows``, ``q5_1_rows``): the unsigned codes (0..31) are ``vpdpbusd``'s u8
operand and the activations its s8 one (one instruction per 64 weights; ``vpmaddubsw`` pairs
<= 2 * 31 * 127 on the other paths), and per block ``m * float32(d_x * xsum)`` (m = -16 d for
Q5_0) is added from the activations' block sums (the second half of ``dxv``).
The native paths: per 4-byte lane ``float(partial) * s_b`` (``s_b = d_w[b] * d_x[b]``)
accumulated by FMA into a float vector, one horizontal tree reduction per row. Modules are
compiled with codegen's MCJIT helpers and cached.

Accuracy. Kernel vs oracle: float32 accumulation order only (tests assert 1e-5 of the row's
sum of |terms|). Against the float truth ``dequantize(W) @ x`` (float64): guaranteed per row
``|err| <= sum_b |d_w[b]| * d_x[b] / 2 * sum_j |qs_j|`` (half an activation step per weight) +
float32 rounding. Tests (tests/test_q8_kernel.py) assert the guaranteed bound and 1e-2 (2e-2 for
n_in = 32) of sum |w x| per row.

Timing: ``python -m bench.experiments.bench_q8``; measured figures (per path, hot and
cold, the prefetch distance, Q5_0 against the Q8_0 layout): docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import codegen
from .codegen import check_types, emit_call, flt, mask, splat
from .pack import absmax_scale, gguf_blocks, half_to_f32, tree_sum

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
    qs: np.ndarray  # int8 [n_out, n_in]
    d: np.ndarray  # uint16 [n_out, n_in // 32]: the block scales' IEEE half bits
    n_out: int
    n_in: int

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.d.nbytes

    def arrays(self) -> dict:
        return {"qs": self.qs, "d": self.d}

    @property
    def d_f32(self) -> np.ndarray:
        """The block scales as float32 [n_out, n_in // 32]."""
        return self.d.view(np.float16).astype(np.float32)

    @classmethod
    def from_arrays(cls, a) -> PackedQ8:
        qs = np.ascontiguousarray(a["qs"], dtype=np.int8)
        d = np.asarray(a["d"])
        if d.dtype != np.uint16:
            raise ValueError("PackedQ8: d must hold f16 bits (uint16)")
        d = np.ascontiguousarray(d)
        if qs.ndim != 2 or d.shape != (qs.shape[0], qs.shape[1] // 32) or qs.shape[1] % 32:
            raise ValueError("PackedQ8: inconsistent qs / d shapes")
        return cls(qs, d, qs.shape[0], qs.shape[1])

    def dequantize(self) -> np.ndarray:
        """float32 [n_out, n_in] (for tests and baselines)."""
        nb = self.n_in // 32
        return (self.qs.reshape(self.n_out, nb, 32).astype(np.float32) * self.d_f32[:, :, None]).reshape(
            self.n_out, self.n_in
        )


@dataclass
class PackedQ5:
    """A Q5_0 / Q5_1 matrix in the 5-bit layout of the ``q5_*_rows`` kernels: the file's bytes.

    ``q`` uint8 [n_out, 20 nbp] (nbp = nb rounded up to even), per pair of 32-blocks (2p, 2p+1):
    32 bytes, byte j = low 4 bits of weight j of block 2p | those of block 2p + 1 << 4, then
    the two blocks' 32-bit high-bit words (bit j = bit 4 of weight j, as in the file); an odd
    last block is paired with a zero block. ``d`` uint16 [n_out, nb] (Q5_0) or [n_out, 2 nb]
    (Q5_1: the scales, then the mins), IEEE half bits. Weight: ``d (q - 16)`` (Q5_0) or ``d q
    + m`` (Q5_1) with the 5-bit code q."""

    q: np.ndarray
    d: np.ndarray
    n_out: int
    n_in: int
    qtype: int

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes

    def arrays(self) -> dict:
        return {"q": self.q, "d": self.d, "meta": np.array([self.n_out, self.n_in, self.qtype], np.int64)}

    @classmethod
    def from_arrays(cls, a) -> PackedQ5:
        try:
            n_out, n_in, qtype = (int(v) for v in np.asarray(a["meta"]).reshape(-1))
            q, d = np.asarray(a["q"]), np.asarray(a["d"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"PackedQ5.from_arrays: missing or malformed arrays ({e})") from None
        nb = n_in // 32
        if (
            qtype not in (Q5_0, Q5_1)
            or n_in <= 0
            or n_in % 32
            or q.dtype != np.uint8
            or d.dtype != np.uint16
            or q.shape != (n_out, 20 * (nb + nb % 2))
            or d.shape != (n_out, nb * (2 if qtype == Q5_1 else 1))
        ):
            raise ValueError("PackedQ5: inconsistent q / d arrays")
        return cls(np.ascontiguousarray(q), np.ascontiguousarray(d), n_out, n_in, qtype)

    def codes(self) -> np.ndarray:
        """The 5-bit codes, uint8 [n_out, n_in] (natural order)."""
        n, nb = self.n_out, self.n_in // 32
        pr = self.q.reshape(n, -1, 40)
        nib = pr[:, :, :32]
        lo = np.stack([nib & 15, nib >> 4], axis=2).reshape(n, -1, 32)  # [n, nbp, 32]
        qh = np.ascontiguousarray(pr[:, :, 32:]).view(np.uint32).reshape(n, -1, 1)
        hb = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        return (lo | (hb << 4))[:, :nb].reshape(n, self.n_in)

    def scales(self):
        """(d, m) float32 [n_out, nb]: weight = d q + m (Q5_0: m = -16 d, exact)."""
        nb = self.n_in // 32
        d = self.d[:, :nb].view(np.float16).astype(np.float32)
        m = self.d[:, nb:].view(np.float16).astype(np.float32) if self.qtype == Q5_1 else np.float32(-16) * d
        return d, m

    def dequantize(self) -> np.ndarray:
        """float32 [n_out, n_in], bit for bit ``ember.formats.quants.dequantize``."""
        nb = self.n_in // 32
        q = self.codes().reshape(self.n_out, nb, 32).astype(np.float32)
        d = self.d[:, :nb].view(np.float16).astype(np.float32)[:, :, None]
        if self.qtype == Q5_0:
            w = (q - np.float32(16)) * d
        else:
            w = q * d + self.d[:, nb:].view(np.float16).astype(np.float32)[:, :, None]
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
EXACT_INT8 = {
    34: (256, 54, 52),  # TQ1_0: d * (t - 1)
    35: (256, 66, 64),
}  # TQ2_0: d * (t - 1)
Q5_0, Q5_1 = 6, 7
INT8_TYPES = (8, Q5_0, Q5_1)  # the types the runtime runs on this module's kernels (8: Q8_0;
#                               Q5_0/Q5_1 in their own 5-bit layout; TQ1_0/TQ2_0 run as Q2_K)


def pack_exact_int8(raw2d: np.ndarray, qtype: int, chunk: int = 2048) -> PackedQ8:
    """GGUF rows of a type in ``EXACT_INT8`` -> PackedQ8, exactly (``dequantize()`` gives the
    file's float32 weights bit for bit): the int8 codes are the dequantized weights divided by
    the block's f16 scale (a float32 division of an exact multiple is exact), checked.
    The int8 kernels can run these types, reading 1.0625 bytes a weight instead of the file's
    0.21-0.26: the runtime runs them as Q2_K instead (``kquant.ternary_as_q2_k``, 0.33), and
    uses this for their exact codes."""
    from ..formats.quants import dequantize_into

    bw, bb, off = EXACT_INT8[qtype]
    r3 = gguf_blocks(raw2d, bb, "pack_exact_int8")
    n_out, n_in = r3.shape[0], r3.shape[1] * bw
    raw = r3.reshape(n_out, -1)
    d = np.ascontiguousarray(r3[:, :, off : off + 2]).view(np.uint16).reshape(n_out, -1)
    d = np.repeat(d, bw // 32, axis=1)  # one per 32 weights
    qs = np.empty((n_out, n_in), np.int8)
    w = np.empty(min(chunk, n_out) * n_in, np.float32)
    for r0 in range(0, n_out, chunk):  # bounded temporaries for large matrices
        r1 = min(n_out, r0 + chunk)
        wr = w[: (r1 - r0) * n_in].reshape(r1 - r0, -1, 32)
        dequantize_into(raw[r0:r1], qtype, wr.reshape(-1))
        df = d[r0:r1].view(np.float16).astype(np.float32)[:, :, None]
        ok = np.isfinite(df) & (df != 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            q = np.where(ok, wr / np.where(ok, df, 1), 0)
        q = np.rint(q)
        if not (
            np.all((q >= -128) & (q <= 127)) and np.array_equal((q.astype(np.float32) * df)[ok[..., 0]], wr[ok[..., 0]])
        ):
            raise ValueError("pack_exact_int8: a block is not an int8 code times its scale")
        qs[r0:r1] = q.astype(np.int8).reshape(r1 - r0, n_in)
    return PackedQ8(qs, d, n_out, n_in)


def pack_q5(raw2d: np.ndarray, qtype: int) -> PackedQ5:
    """GGUF Q5_0 rows (uint8 [n_out, nb * 22]: f16 d, 32 high bits, 16 bytes of nibbles) or
    Q5_1 rows ([n_out, nb * 24]: f16 d, f16 m, then the same) -> PackedQ5. Weight j's low 4
    bits are the low nibble of qs[j] (j < 16) or the high nibble of qs[j - 16]."""
    qtype = int(qtype)
    if qtype not in (Q5_0, Q5_1):
        raise ValueError(f"pack_q5 handles Q5_0 (6) and Q5_1 (7), not type {qtype}")
    bb, o = (22, 2) if qtype == Q5_0 else (24, 4)
    r3 = gguf_blocks(raw2d, bb, "pack_q5")
    n_out, nb = r3.shape[:2]
    nbp = nb + nb % 2
    d = np.ascontiguousarray(r3[:, :, :o]).view(np.uint16).reshape(n_out, nb, o // 2)
    d = np.ascontiguousarray(d.transpose(0, 2, 1)).reshape(n_out, -1)  # scales[, mins]
    qs = r3[:, :, o + 4 : o + 20]
    lo = np.zeros((n_out, nbp, 32), np.uint8)
    lo[:, :nb] = np.concatenate([qs & 15, qs >> 4], axis=2)
    pr = np.zeros((n_out, nbp // 2, 40), np.uint8)
    pr[:, :, :32] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    qh = np.zeros((n_out, nbp, 4), np.uint8)
    qh[:, :nb] = r3[:, :, o : o + 4]
    pr[:, :, 32:] = qh.reshape(n_out, nbp // 2, 8)
    return PackedQ5(pr.reshape(n_out, 20 * nbp), d, n_out, nb * 32, qtype)


# ---------------------------------------------------------------------------------------------
# IR

_VNNI = "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)"


def _row_ir(vw: int, combine: str, prefetch: int, kind: str = "q8") -> list[str]:
    """``<kind>_rows(q, d, xq, dxv, y, nb, r0, r1)``: y[r] for r0 <= r < r1 (absolute indices).

    xq int8 [32 nb], dxv float32 [16 nbp] (nbp = nb + nb % 2): ``dx[b]`` repeated 8 times (a
    zero block appended when nb is odd), then per block ``float32(dx[b] * xsum[b])`` and 7
    zeros. ``q8``: q = qs int8 [*, 32 nb], d f16 bits [*, nb]; the signed weights against the
    activations + 128 (``vpdpbusd`` is u8 x s8), less 128 * their sum. ``q5_0`` / ``q5_1``: q
    = a PackedQ5's bytes (20 nbp per row), d [*, nb] / [*, 2 nb] (scales, then mins); the
    unsigned 5-bit codes are the u8 operand, the activations the s8 one, and y also gets ``m[b]
    * float32(dx[b] xsum[b])`` per block (m = -16 d for Q5_0), in the block's first lane (the
    7 zeros keep the other lanes exact).
    """
    nl = vw // 4
    bpv = vw // 32  # blocks per vector
    V8, V16, V32, VF = f"<{vw} x i8>", f"<{vw // 2} x i16>", f"<{nl} x i32>", f"<{nl} x float>"
    q5 = kind != "q8"  # the 5-bit layouts, with their mins
    L = []
    a = L.append
    ro = "ptr noalias nocapture readonly"
    a(
        f"define void @{kind}_rows({ro} %qs, {ro} %dw, {ro} %xq, {ro} %dxv, "
        "ptr noalias nocapture %y, i64 %nb, i64 %r0, i64 %r1) #0 {"
    )
    a("entry:")
    a("  %e1 = icmp sge i64 %r0, %r1")
    a("  %e2 = icmp sle i64 %nb, 0")
    a("  %skip = or i1 %e1, %e2")
    a("  br i1 %skip, label %exit, label %pre")
    a("pre:")
    a(f"  %np = udiv i64 %nb, {bpv}")
    a("  %hasp = icmp sgt i64 %np, 0")
    a("  %nbo = and i64 %nb, 1")
    a("  %nbp = add i64 %nb, %nbo")
    a(f"  %rowb = mul i64 {'%nbp' if q5 else '%nb'}, {20 if q5 else 32}")
    a(f"  %drs = mul i64 %nb, {2 if kind == 'q5_1' else 1}")  # f16 values per row of d
    a("  %xso = mul i64 %nbp, 8")  # dxv: dx * xsum after the dx part
    a("  %dxs = getelementptr float, ptr %dxv, i64 %xso")
    if bpv == 2:
        a("  %odd = icmp ne i64 %nbo, 0")
        a("  %lastb = sub i64 %nb, 1")
        a("  %tqo = mul i64 %lastb, 32")
        a("  %txp = getelementptr i8, ptr %xq, i64 %tqo")
        a("  %tx32 = load <32 x i8>, ptr %txp, align 1")
        a(f"  %tx = shufflevector <32 x i8> %tx32, <32 x i8> zeroinitializer, {mask(range(64))}")
        a("  %tdxo = mul i64 %np, 16")
        a("  %tdxp = getelementptr float, ptr %dxv, i64 %tdxo")
    a("  br label %row")

    def weights(tag, blk):
        """The weight vector of block(s) ``blk`` (the first block of the vector) -> name."""
        if not q5:
            a(f"  %wo{tag} = mul i64 {blk}, 32")
            a(f"  %wp{tag} = getelementptr i8, ptr %qrow, i64 %wo{tag}")
            if prefetch and not tag:
                a(f"  %pfp = getelementptr i8, ptr %wp, i64 {prefetch}")
                codegen.emit_prefetch(a, "%pfp")
            if tag:  # the odd last block (avx512): 32 bytes, zero-extended
                a(f"  %w32{tag} = load <32 x i8>, ptr %wp{tag}, align 1")
                a(f"  %w{tag} = shufflevector <32 x i8> %w32{tag}, <32 x i8> zeroinitializer, {mask(range(64))}")
            else:
                a(f"  %w{tag} = load {V8}, ptr %wp{tag}, align 1")
            return f"%w{tag}"
        # a pair of blocks is 40 bytes: 32 of nibbles (low: block 2p, high: 2p + 1), 2 x 32 bits
        a(f"  %pr{tag} = lshr i64 {blk}, 1")
        a(f"  %po{tag} = mul i64 %pr{tag}, 40")
        a(f"  %pp{tag} = getelementptr i8, ptr %qrow, i64 %po{tag}")
        if prefetch and not tag:
            a(f"  %pfp = getelementptr i8, ptr %pp, i64 {prefetch * 5 // 8}")
            codegen.emit_prefetch(a, "%pfp")
        a(f"  %nib{tag} = load <32 x i8>, ptr %pp{tag}, align 1")
        a(f"  %lo{tag} = and <32 x i8> %nib{tag}, {splat('i8', 32, 15)}")
        a(f"  %hp{tag} = getelementptr i8, ptr %pp{tag}, i64 32")
        if vw == 64 and not tag:
            a(f"  %hi{tag} = lshr <32 x i8> %nib{tag}, {splat('i8', 32, 4)}")
            a(f"  %c{tag} = shufflevector <32 x i8> %lo{tag}, <32 x i8> %hi{tag}, {mask(range(64))}")
            a(f"  %hb{tag} = load i64, ptr %hp{tag}, align 1")
            a(f"  %hm{tag} = bitcast i64 %hb{tag} to <64 x i1>")
        elif vw == 64:  # the odd last block: low nibbles only
            a(f"  %c{tag} = shufflevector <32 x i8> %lo{tag}, <32 x i8> zeroinitializer, {mask(range(64))}")
            a(f"  %hb32{tag} = load i32, ptr %hp{tag}, align 1")
            a(f"  %hb{tag} = zext i32 %hb32{tag} to i64")
            a(f"  %hm{tag} = bitcast i64 %hb{tag} to <64 x i1>")
        else:  # avx2: one block per vector; odd blocks take the high nibbles
            a(f"  %h1{tag} = and i64 {blk}, 1")
            a(f"  %sh{tag} = trunc i64 %h1{tag} to i8")
            a(f"  %sh4{tag} = mul i8 %sh{tag}, 4")
            a(f"  %shi{tag} = insertelement <32 x i8> poison, i8 %sh4{tag}, i32 0")
            a(f"  %shv{tag} = shufflevector <32 x i8> %shi{tag}, <32 x i8> poison, <32 x i32> zeroinitializer")
            a(f"  %ns{tag} = lshr <32 x i8> %nib{tag}, %shv{tag}")
            a(f"  %c{tag} = and <32 x i8> %ns{tag}, {splat('i8', 32, 15)}")
            a(f"  %ho{tag} = mul i64 %h1{tag}, 4")
            a(f"  %hq{tag} = getelementptr i8, ptr %hp{tag}, i64 %ho{tag}")
            a(f"  %hb{tag} = load i32, ptr %hq{tag}, align 1")
            a(f"  %hm{tag} = bitcast i32 %hb{tag} to <32 x i1>")
        a(f"  %h16{tag} = select <{vw} x i1> %hm{tag}, {V8} {splat('i8', vw, 16)}, {V8} zeroinitializer")
        a(f"  %w{tag} = or {V8} %c{tag}, %h16{tag}")
        return f"%w{tag}"

    def block(tag, w, x, dvec, acc, out):
        """acc + float(lane partials of w . x) * dvec -> out."""
        mad = "@llvm.x86.avx512.pmaddubs.w.512" if vw == 64 else "@llvm.x86.avx2.pmadd.ub.sw"
        madd = "@llvm.x86.avx512.pmaddw.d.512" if vw == 64 else "@llvm.x86.avx2.pmadd.wd"
        if q5 and combine == "vnni":  # u8 codes . s8 activations
            a(f"  %I{tag} = call {V32} @llvm.x86.avx512.vpdpbusd.512({V32} zeroinitializer, {V8} {w}, {V8} {x})")
        elif q5:  # pairs <= 2 * 31 * 127: no saturation
            a(f"  %m{tag} = call {V16} {mad}({V8} {w}, {V8} {x})")
            a(f"  %I{tag} = call {V32} {madd}({V16} %m{tag}, {V16} {splat('i16', vw // 2, 1)})")
        elif combine == "vnni":
            a(f"  %xu{tag} = xor {V8} {x}, {splat('i8', vw, -128)}")
            a(f"  %p1{tag} = call {V32} @llvm.x86.avx512.vpdpbusd.512({V32} zeroinitializer, {V8} %xu{tag}, {V8} {w})")
            a(
                f"  %p2{tag} = call {V32} @llvm.x86.avx512.vpdpbusd.512({V32} zeroinitializer, "
                f"{V8} {splat('i8', vw, -128)}, {V8} {w})"
            )
            a(f"  %I{tag} = sub {V32} %p1{tag}, %p2{tag}")
        else:
            a(f"  %aw{tag} = call {V8} @llvm.abs.v{vw}i8({V8} {w}, i1 false)")
            a(f"  %ng{tag} = icmp slt {V8} {w}, zeroinitializer")
            a(f"  %nx{tag} = sub {V8} zeroinitializer, {x}")
            a(f"  %sx{tag} = select <{vw} x i1> %ng{tag}, {V8} %nx{tag}, {V8} {x}")
            a(f"  %m{tag} = call {V16} {mad}({V8} %aw{tag}, {V8} %sx{tag})")
            a(f"  %I{tag} = call {V32} {madd}({V16} %m{tag}, {V16} {splat('i16', vw // 2, 1)})")
        a(f"  %f{tag} = sitofp {V32} %I{tag} to {VF}")
        a(f"  {out} = call {VF} @llvm.fma.v{nl}f32({VF} %f{tag}, {VF} {dvec}, {VF} {acc})")

    def halves(tag, base, off, n):
        """n (1 or 2) f16 values at base[off] -> a float vector (8 lanes each; 1: all lanes)."""
        a(f"  %hp{tag}.h = getelementptr i16, ptr {base}, i64 {off}")
        if n == 2:
            a(f"  %h2{tag}.h = load <2 x half>, ptr %hp{tag}.h, align 2")
            a(f"  %f2{tag}.h = fpext <2 x half> %h2{tag}.h to <2 x float>")
            a(f"  %V{tag} = shufflevector <2 x float> %f2{tag}.h, <2 x float> poison, {mask([0] * 8 + [1] * 8)}")
        else:
            a(f"  %h1{tag}.h = load half, ptr %hp{tag}.h, align 2")
            a(f"  %f1{tag}.h = fpext half %h1{tag}.h to float")
            a(f"  %i{tag}.h = insertelement {VF} poison, float %f1{tag}.h, i32 0")
            a(f"  %V{tag} = shufflevector {VF} %i{tag}.h, {VF} poison, <{nl} x i32> zeroinitializer")
        return f"%V{tag}"

    def step(tag, blk, x, nblk, dxp, xsp, acc, out):
        """acc + the vector of blocks blk.. (nblk of them) -> out."""
        w = weights(tag, blk)
        D = halves(f"d{tag}", "%drow", blk, nblk)
        a(f"  %DX{tag} = load {VF}, ptr {dxp}, align 4, !invariant.load !0")
        a(f"  %S{tag} = fmul {VF} {D}, %DX{tag}")
        if not q5:
            block(tag, w, x, f"%S{tag}", acc, out)
            return
        block(tag, w, x, f"%S{tag}", acc, f"%acc1{tag}")
        if kind == "q5_1":
            M = halves(f"m{tag}", "%mrow", blk, nblk)
        else:
            a(f"  %M{tag} = fmul {VF} {D}, {splat('float', nl, flt(-16.0))}")
            M = f"%M{tag}"
        a(f"  %XS{tag} = load {VF}, ptr {xsp}, align 4, !invariant.load !0")
        a(f"  {out} = call {VF} @llvm.fma.v{nl}f32({VF} {M}, {VF} %XS{tag}, {VF} %acc1{tag})")

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
    a(f"  %blk = mul i64 %k, {bpv}")
    a(f"  %xo = mul i64 %k, {vw}")
    a("  %xp = getelementptr i8, ptr %xq, i64 %xo")
    a(f"  %x = load {V8}, ptr %xp, align 1, !invariant.load !0")
    a(f"  %dxo = mul i64 %k, {nl}")
    a("  %dxp = getelementptr float, ptr %dxv, i64 %dxo")
    a("  %xsp = getelementptr float, ptr %dxs, i64 %dxo")
    step("", "%blk", "%x", bpv, "%dxp", "%xsp", "%acc", "%accn")
    a("  %k.next = add i64 %k, 1")
    a("  %kdone = icmp eq i64 %k.next, %np")
    a("  br i1 %kdone, label %after, label %inner")
    a("after:")
    a(f"  %accA = phi {VF} [zeroinitializer, %row], [%accn, %inner]")
    if bpv == 2:
        a("  br i1 %odd, label %tail, label %fin")
        a("tail:")
        a("  %txsp = getelementptr float, ptr %dxs, i64 %tdxo")
        step("t", "%lastb", "%tx", 1, "%tdxp", "%txsp", "%accA", "%accT")
        a("  br label %fin")
        a("fin:")
        a(f"  %accF = phi {VF} [%accA, %after], [%accT, %tail]")
    else:
        a("  br label %fin")
        a("fin:")
        a(f"  %accF = fadd {VF} %accA, {splat('float', nl, '-0.0')}")
    codegen.emit_hsum(a, "%accF", nl, "%ys")
    codegen.emit_row_end(a, "%ys")
    return L


KINDS = ("q8", "q5_0", "q5_1")  # the kernels of the module, in fn_address order
_KIND = {Q5_0: 1, Q5_1: 2}  # qtype -> index in KINDS (others: 0, q8_rows)


_SPECS = {"avx512": (64, "vnni"), "avx512-novnni": (64, "maddubs"), "avx2": (32, "maddubs")}


def kernel_ir(isa: str, prefetch: int = DEFAULT_PREFETCH, cpu: str = "", features: str = "") -> str:
    """The IR module text of ``q8_rows``, ``q5_0_rows`` and ``q5_1_rows`` for an x86 path."""
    vw, combine = _SPECS[isa]
    nl = vw // 4
    L = [
        _VNNI,
        "declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8>, <64 x i8>)",
        "declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)",
        "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)",
        "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)",
        f"declare <{vw} x i8> @llvm.abs.v{vw}i8(<{vw} x i8>, i1)",
        f"declare <{nl} x float> @llvm.fma.v{nl}f32(<{nl} x float>, <{nl} x float>, <{nl} x float>)",
    ]
    if combine != "vnni":
        L = L[1:]
    for kind in KINDS:
        L += _row_ir(vw, combine, prefetch, kind)
    return codegen.finish_module(L, cpu, features)


def _compile(isa: str, prefetch: int):
    """((addresses of the KINDS' kernels), owners to keep alive, compile seconds); once per
    process."""
    if isa not in codegen.host_isas() or isa not in _SPECS:
        raise ValueError(f"isa {isa!r} cannot be compiled for execution on this host")

    def build():
        spec = codegen.resolve_isa(isa)
        ee, owners, secs = codegen.jit(lambda cpu, feat: kernel_ir(spec, prefetch, cpu, feat), isa)
        return tuple(ee.get_function_address(f"{k}_rows") for k in KINDS), owners, secs

    return codegen.once(("q8", isa, prefetch), build)


def kernel_asm(isa: str = "avx512", prefetch: int = DEFAULT_PREFETCH) -> str:
    """The host assembly of the Q8_0 kernel (for inspection; runs nothing)."""
    spec = codegen.resolve_isa(isa)
    return codegen.host_asm(lambda cpu, feat: kernel_ir(spec, prefetch, cpu, feat), isa)


_choice: dict = {}


def reset_kernel_choice() -> None:
    _choice.clear()


def fn_address(kernel: str | None = None, prefetch: int | None = None, qtype: int = 8) -> int:
    """Address of the kernel for ``qtype`` (Q8_0 and the EXACT_INT8 types: ``q8_rows``; Q5_0,
    Q5_1: ``q5_0_rows``, ``q5_1_rows``) on a kernel path (0: portable)."""
    kind = _KIND.get(qtype, 0)
    key = (kernel, prefetch, kind)
    r = _choice.get(key)
    if r is None:
        name = codegen.select_kernel(kernel)
        if name not in _SPECS:  # portable (neon is never executed here)
            r = 0
        else:
            pf = codegen.prefetch_bytes(DEFAULT_PREFETCH) if prefetch is None else prefetch
            r = _compile(name, pf)[0][kind]
        _choice[key] = r
    return r


# ---------------------------------------------------------------------------------------------
# numba


@intrinsic
def _call_rows(typingctx, fn, qs, d, xq, dxv, y, nb, r0, r1):
    """<kind>_rows(q, d, xq, dxv, y, nb, r0, r1) through a runtime address (q: int8 Q8_0 codes
    or a PackedQ5's uint8 bytes)."""
    qdt = qs.dtype if isinstance(qs, types.Array) and qs.dtype in (types.int8, types.uint8) else types.int8
    check_types(
        (fn, qs, d, xq, dxv, y, nb, r0, r1),
        (None, qdt, types.uint16, types.int8, types.float32, types.float32, None, None, None),
    )
    return types.void(fn, qs, d, xq, dxv, y, nb, r0, r1), emit_call


@njit(cache=True, nogil=True)
def quantize_x_nb(x, xq, dxv):
    """int8 xq [n_in] and dxv [16 * (nb + nb % 2)]: d_x per block repeated 8x (zero padded),
    then per block float32(d_x * xsum) and 7 zeros (xsum: the block's sum of xq; the mins)."""
    nb = x.size // 32
    q127 = np.float32(127.0)
    half = 8 * (nb + nb % 2)  # dxv may be longer (a scratch buffer)
    dxv[half : 2 * half] = 0
    for b in range(nb):
        o = 32 * b
        inv, dx = absmax_scale(x, o, 32, q127)
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
def _rows_portable(qs, d, xq, dxv, y, kind, r0, r1):
    """Plain numba: 32 float32 lanes ``acc[j] += q[j] * (xq[j] * s_b)`` per row (+ ``m_b *
    dxs_b`` in lane 0 for Q5_0/Q5_1), then a tree sum of the lanes.

    The lanes are the vector, so LLVM vectorizes without fastmath (which would make the
    rounding depend on the inlining context: serial and threaded calls would differ). Differs
    from the oracle by float32 rounding only. ``kind``: 0 Q8_0 codes, 1 Q5_0, 2 Q5_1 bytes.
    """
    nb = xq.size // 32
    half = 8 * (nb + nb % 2)
    xqf = np.empty(xq.size, np.float32)
    for j in range(xq.size):
        xqf[j] = np.float32(xq[j])
    acc = np.empty(32, np.float32)
    w = np.empty(32, np.float32)
    for r in range(r0, r1):
        acc[:] = 0
        for b in range(nb):
            o = 32 * b
            dd = half_to_f32(d[r, b])
            sc = dd * dxv[8 * b]
            if kind == 0:
                for j in range(32):
                    w[j] = np.float32(qs[r, o + j])
            else:
                po = 40 * (b >> 1)
                sh = 4 * (b & 1)
                hw = po + 32 + 4 * (b & 1)
                for j in range(32):
                    hb = (np.int32(qs[r, hw + (j >> 3)]) >> (j & 7)) & 1
                    w[j] = np.float32(((np.int32(qs[r, po + j]) >> sh) & 15) | (hb << 4))
            for j in range(32):
                acc[j] += w[j] * (xqf[o + j] * sc)
            if kind == 1:
                acc[0] += (np.float32(-16.0) * dd) * dxv[half + 8 * b]
            elif kind == 2:
                acc[0] += half_to_f32(d[r, nb + b]) * dxv[half + 8 * b]
        y[r] = tree_sum(acc)


@njit(cache=True, nogil=True, inline="always")
def _rows(fn, qs, d, xq, dxv, y, kind, r0, r1):
    if fn != 0:
        _call_rows(fn, qs, d, xq, dxv, y, xq.size // 32, r0, r1)
    else:
        _rows_portable(qs, d, xq, dxv, y, kind, r0, r1)


@njit(cache=True, nogil=True, inline="always")
def _prep(x, qs, d, out):
    """(xq, dxv, kind) for x; the kind of the matrix from its shapes (0: Q8_0 layout, 1: Q5_0,
    2: Q5_1 PackedQ5); ValueError if they do not fit x and out."""
    nb = x.size // 32
    nbp = nb + nb % 2
    kind = -1
    if qs.shape[1] == x.size and d.shape[1] == nb:
        kind = 0
    elif qs.shape[1] == 20 * nbp and d.shape[1] == nb:
        kind = 1
    elif qs.shape[1] == 20 * nbp and d.shape[1] == 2 * nb:
        kind = 2
    if x.size % 32 or kind < 0 or d.shape[0] != qs.shape[0] or out.size != qs.shape[0]:
        raise ValueError("q8_matvec: the shapes of x, the packed matrix and out differ")
    xq = np.empty(x.size, np.int8)
    dxv = np.empty(16 * nbp, np.float32)
    quantize_x_nb(x, xq, dxv)
    return xq, dxv, kind


@njit(cache=True, nogil=True)
def _mv_serial(fn, x, qs, d, out):
    xq, dxv, kind = _prep(x, qs, d, out)
    _rows(fn, qs, d, xq, dxv, out, kind, 0, qs.shape[0])


@njit(cache=True, nogil=True, parallel=True)
def _mv_parallel(fn, x, qs, d, out, nthreads):
    xq, dxv, kind = _prep(x, qs, d, out)
    n = qs.shape[0]
    nch = min(nthreads, n)
    for c in prange(nch):
        _rows(fn, qs, d, xq, dxv, out, kind, c * n // nch, (c + 1) * n // nch)


@njit(cache=True, nogil=True)
def matvec_nb(fn, x, qs, d, out):
    """numba-callable single-threaded matvec; ``fn`` from ``fn_address`` (0: portable)."""
    _mv_serial(fn, x, qs, d, out)


_F32 = np.dtype(np.float32)


def q8_matvec(x, p, out: np.ndarray | None = None, threads: int = 1, kernel: str | None = None) -> np.ndarray:
    """y = W @ x for a PackedQ8 or PackedQ5 matrix (float32 [n_out]); ``out`` may be given."""
    qtype = getattr(p, "qtype", 8)
    fn = _choice.get((kernel, None, _KIND.get(qtype, 0)))
    if fn is None:
        fn = fn_address(kernel, qtype=qtype)
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 1 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if out is None:
        out = np.empty(p.n_out, np.float32)
    q = p.q if qtype != 8 else p.qs
    if threads > 1:
        _mv_parallel(fn, x, q, p.d, out, threads)
    else:
        _mv_serial(fn, x, q, p.d, out)
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


def q8_matvec_reference(x, p, return_scale: bool = False):
    """What the kernels compute for a PackedQ8 or PackedQ5: ``sum_b float32(d_w[b] * d_x[b]) *
    I_b`` with ``I_b = sum_j q_j xq_j`` (PackedQ5: q the unsigned 5-bit codes, plus ``m[b] *
    float32(d_x[b] * xsum[b])``, m = -16 d for Q5_0), the sum in float64.

    With ``return_scale`` also (per row) the sum of the |terms| (the size of float32 rounding
    differences) and the guaranteed activation-quantization error bound against the float
    truth, ``sum_b d_x[b] / 2 sum_j |w_j|`` (half an activation step per weight).
    """
    xq, dx = quantize_x_reference(x)
    nb = p.n_in // 32
    q5 = isinstance(p, PackedQ5)
    q = (p.codes() if q5 else p.qs).reshape(p.n_out, nb, 32).astype(np.int32)
    dw, m = p.scales() if q5 else (p.d_f32, None)
    xb = xq.reshape(nb, 32).astype(np.int32)
    I = np.einsum("rbj,bj->rb", q, xb)
    s = (dw * dx[None, :]).astype(np.float32).astype(np.float64)
    t = I.astype(np.float64) * s
    absum = np.abs(s) * np.einsum("rbj,bj->rb", np.abs(q), np.abs(xb))
    if m is not None:
        dxs = (dx * xb.sum(axis=1).astype(np.float32)).astype(np.float64)  # float32 products
        tm = m.astype(np.float64) * dxs[None, :]
        t, absum = t + tm, absum + np.abs(tm)
    y = t.sum(axis=1).astype(np.float32)
    if not return_scale:
        return y
    w = np.abs(p.dequantize().astype(np.float64)).reshape(p.n_out, nb, 32).sum(axis=2)
    bound = (w * dx.astype(np.float64)[None, :] / 2).sum(axis=1)
    return y, absum.sum(axis=1), bound
