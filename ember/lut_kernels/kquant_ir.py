"""LLVM IR of the K-quant kernels (Q2_K..Q6_K, int8 activations): ``kernel_ir`` emits one
module per type (and one for the activation quantizer, ``kquant_acts.quant_ir``), for the x86
paths of ``SPECS``: ``avx512`` (VNNI ``vpdpbusd``), ``avx512-novnni`` (``vpmaddubsw``),
``avx2`` (compiled for x86-64-v3). ``kquant.py`` compiles them and calls them.

``void kq_<type>(ptr q, ptr sc, ptr d, ptr xq, ptr xd, ptr xp, ptr y, i64 nsb, i64 r0, i64 r1,
                 i64 k, i64 y_stride)`` (``kq_q2_k`` .. ``kq_q6_k``; every argument an i64 or a
pointer, C ABI): ``y[i * y_stride + r]`` for r0 <= r < r1 (absolute row indices; Q4_K/Q5_K:
rows of the pairs) and i < k, from a ``PackedKQ`` (``kquant_layout``) and the activation format
of ``kquant_acts``.

Math (exact integers, then float32)
-----------------------------------
Per 16-group (Q2_K, Q3_K, Q6_K), per (weight row, super-block, act row): ``I_L = sum (code -
o) xq`` over lane L's 16 weights (o: Q2_K 0, Q3_K 4, Q6_K 32), exactly, as int32: the unsigned
codes times the signed acts, a chain of 4 ``vpdpbusd`` that starts at ``-o * xsum16``
(``xd[2]`` / ``xd[3]``; 0 for Q2_K); or ``vpmaddubsw`` pairs (<= 2 * 63 * 127), two summed in
int16 (<= 32004), ``vpmaddwd``, the start added. ``y += float(I_L) * dx * SC_L`` per lane, Q2_K
``- MM_L * float32(dx xsum16_L)``. The acts are the memory operand, and no per-weight-row
correction is needed.
Per 32-block (Q4_K, Q5_K), per (row pair, super-block, act row): 8 ``vpdpbusd``, one per code
vector (v, h), against act vector v's half h (32 bytes, both halves of a zmm: lane 8 j + p
meets 16-group 2 p + h) give ``I_b`` of block b = p of both rows of the pair in one vector
(|I_b| <= 32 * 31 * 127, int32); ``y += float(I_b) * dx_b * SC_b - MM_b * float32(dx_b
xsum_b)``: one cvt, mul and 2 FMAs per pair and act row. Per weight row and act row: 4
``vpdpbusd`` + 2 ops. Q5_K's codes need no offset: int32 sums.
A call's rows need not start or end on a pair: the half pair is computed, its other row not
stored.
Accumulation in float32 lanes (FMA); at the end of a row (pair) the chunk's accumulators are
summed together, neighbours folded into one vector level by level (``_reduce_accs``; avx512).

Structure
---------
Super-blocks in tiles whose act data stays in L1 (``tile_bytes``: the act bytes of the
``min(kp, kb)`` rows one chunk call reads; up to 16 rows, the fused step's batches, the tiles of
16 rows, so a row's partial sums, added into y tile by tile, fall where they fall when it runs
alone: a verified token is bit for bit a decoded one), rows in groups of 32, per group
act-row chunks of 16 (Q4_K/Q5_K: 8), 8, 4, 2, 1 (each weight is read from memory once; a group's
later chunks re-read it from L1/L2); each chunk function (``noinline``) loops over the group's
rows and the tile's super-blocks, decodes a super-block's weights once (software-pipelined one
super-block ahead on avx512) and applies them to every act row of the chunk with one
accumulator per act row (and row pair for Q4_K, Q5_K; on avx2 one per row of the pair).
Software prefetch (``codegen.emit_prefetch``) of the same super-blocks ``ceil(prefetch / tile
bytes)`` rows ahead on the q, sc and d streams. ``width=32`` (``kquant.host_opts`` on AMD Zen
with AVX-512VL, the row-pair types) emits the chunks of 2+ act rows on ymm: each lane sums what
it does on zmm, in the same order, so a row's result stays bit-identical whatever k.
The defaults below are the measured best on the hosts tried (docs/kernels.md).
"""

from __future__ import annotations

from . import codegen
from .codegen import fold, mask, splat
from .kquant_acts import quant_ir
from .kquant_layout import NAMES, OFFSET, PAIR_TYPES, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, unit_bytes

__all__ = [
    "SPECS",
    "DEFAULT_PREFETCH",
    "DEFAULT_GROUP",
    "DEFAULT_PIPE",
    "DEFAULT_TILE_BYTES",
    "DEFAULT_KB",
    "PAIR_KB",
    "DEFAULT_NR",
    "default_kb",
    "kernel_ir",
]

DEFAULT_PREFETCH = 2048  # software prefetch distance, bytes of codes ahead (0: none)
DEFAULT_GROUP = 32  # weight rows per group (a group's later act chunks hit cache)
DEFAULT_PIPE = {"avx512": True, "avx512-novnni": True, "avx2": False}  # pipelined decode
DEFAULT_TILE_BYTES = 36864  # act bytes a chunk call reads per tile, 48 KB L1D (7 sb at kb = 16)
DEFAULT_KB = {"avx512": 16, "avx512-novnni": 16, "avx2": 8}  # act rows per register block
# Q4_K/Q5_K: 16 accumulators + two super-blocks' 8 code vectors spill at 16 act rows
PAIR_KB = 8
DEFAULT_NR = {"avx512": 1, "avx512-novnni": 1, "avx2": 1}  # weight rows per register block


def default_kb(isa: str, qt) -> int:
    return min(DEFAULT_KB[isa], PAIR_KB) if qt in PAIR_TYPES else DEFAULT_KB[isa]


_DECLS = (
    "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)",
    "declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <32 x i8>, <32 x i8>)",
    "declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8>, <64 x i8>)",
    "declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)",
    "declare <32 x i16> @llvm.x86.avx512.packssdw.512(<16 x i32>, <16 x i32>)",
    "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)",
    "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)",
    "declare <16 x i16> @llvm.x86.avx2.packssdw(<8 x i32>, <8 x i32>)",
    "declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)",
    "declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)",
)


class _Emit:
    """IR text helpers for one x86 vector width (vw bytes) and dot-product flavour."""

    def __init__(self, a, vw: int, combine: str):
        self.a, self.vw, self.combine = a, vw, combine
        self.nl = vw // 4
        self.V8, self.V16 = f"<{vw} x i8>", f"<{vw // 2} x i16>"
        self.V32, self.VF = f"<{self.nl} x i32>", f"<{self.nl} x float>"
        self.fma = f"@llvm.fma.v{self.nl}f32"

    def dot(self, tag: str, W, X, init: str | None) -> str:
        """init + sum_v (per 4-byte lane) W[v] (u8 codes) . X[v] (s8 acts) -> an exact int32
        vector (X[v] are loads: the acts are the memory operand; an even number of them).

        vnni: vpdpbusd chained. maddubs: vpmaddubsw(W u8, X s8) (|pair| <= 2 * 63 * 127 = 16002),
        two of them summed in int16 (<= 32004, no wrap), vpmaddwd by 1, added in int32."""
        a, V8, V16, V32, vw = self.a, self.V8, self.V16, self.V32, self.vw
        if self.combine == "vnni":
            prev = init or "zeroinitializer"
            for v in range(len(W)):
                a(
                    f"  %{tag}d{v} = call {V32} @llvm.x86.avx512.vpdpbusd.{8 * vw}({V32} {prev}, "
                    f"{V8} {W[v]}, {V8} {X[v]})"
                )
                prev = f"%{tag}d{v}"
            return prev
        mad = "@llvm.x86.avx512.pmaddubs.w.512" if vw == 64 else "@llvm.x86.avx2.pmadd.ub.sw"
        madd = "@llvm.x86.avx512.pmaddw.d.512" if vw == 64 else "@llvm.x86.avx2.pmadd.wd"
        ones = splat("i16", vw // 2, 1)
        parts = []
        for v in range(0, len(W), 2):
            for u in (v, v + 1):
                a(f"  %{tag}p{u} = call {V16} {mad}({V8} {W[u]}, {V8} {X[u]})")
            a(f"  %{tag}p{v}s = add {V16} %{tag}p{v}, %{tag}p{v + 1}")
            a(f"  %{tag}i{v} = call {V32} {madd}({V16} %{tag}p{v}s, {V16} {ones})")
            parts.append(f"%{tag}i{v}")
        if init is not None:
            parts.append(init)
        while len(parts) > 1:
            a(f"  %{tag}a{len(parts)} = add {V32} {parts[0]}, {parts[1]}")
            parts = [f"%{tag}a{len(parts)}"] + parts[2:]
        return parts[0]


def _chunk_ir(qt: int, vw: int, combine: str, nr: int, kb: int, pipe: bool) -> list[str]:
    """``@kq_<t>.r<nr>c<kb>(q, sc, d, xq, xd, xp, y, ns, nsb, ys, kp, first, pfr, nrow, skip0,
    last1)``: ``nrow`` blocks of ``nr`` consecutive units x ``kb`` act rows over ``ns``
    super-blocks. A unit is one weight row, or (Q4_K, Q5_K) a row pair.

    ``q``/``sc``/``d`` point at (first unit, first super-block of the tile); a unit is ``nsb``
    super-blocks long. ``xq``/``xd``/``xp`` point at the tile's first super-block and the
    chunk's first act row; a super-block of act data holds ``kp`` rows. ``y`` points at
    y[i0, r] (r: the first unit's first row): y[i * ys + j] = (first ? 0 : y[i * ys + j]) + the
    sum for act row i0 + i and weight row r + j; row pairs: not the first row of the first unit
    when ``skip0``, not the second row of the last one when ``last1`` (rows of another range,
    or past the matrix). ``pfr``: software prefetch of the same super-blocks ``pfr`` units
    ahead in the three weight streams (0: none). Every loaded act vector serves all ``nr``
    units. ``pipe``: the weights of super-block s + 1 are loaded and decoded in iteration s
    (shorter dependency chains inside an iteration).
    """
    L = []
    a = L.append
    E_ = _Emit(a, vw, combine)
    nl, nh = E_.nl, 64 // vw
    V8, V32, VF, fma = E_.V8, E_.V32, E_.VF, E_.fma
    QB, SCB, ND = unit_bytes(qt)
    pair, coff = qt in PAIR_TYPES, OFFSET[qt]
    lmin = qt == Q2_K  # mins per 16-group
    name = f"@kq_{NAMES[qt]}.r{nr}c{kb}"
    ro = "ptr noalias nocapture readonly"
    a(
        f"define internal void {name}({ro} %q, {ro} %sc, {ro} %d, {ro} %xq, {ro} %xd, {ro} %xp, "
        "ptr noalias nocapture %y, i64 %ns, i64 %nsb, i64 %ys, i64 %kp, i64 %first, i64 %pfr, "
        "i64 %nrow, i64 %skip0, i64 %last1) noinline #0 {"
    )
    a("entry:")
    a("  %dummy = alloca float, align 4")  # where the stores of skipped rows go
    a("  %xqs = mul i64 %kp, 256")  # act strides per super-block (elements)
    a("  %xds = mul i64 %kp, 16")
    a("  %xsn = mul i64 %nsb, %kp")  # xd[1] (dx xsum16) is nsb kp 16 floats after xd[0]
    a("  %xso = mul i64 %xsn, 16")
    if coff:
        a(f"  %xsoc = mul i64 %xsn, {48 if coff == 32 else 32}")  # xd[3] or xd[2] (int32)
    a(f"  %qrs = mul i64 %nsb, {QB}")  # unit strides (elements)
    a(f"  %scrs = mul i64 %nsb, {SCB}")
    a(f"  %drs = mul i64 %nsb, {ND}")
    a("  %pf = icmp ne i64 %pfr, 0")
    a("  %pfq = mul i64 %pfr, %qrs")
    a("  %pfs = mul i64 %pfr, %scrs")
    a("  %pfd = mul i64 %pfr, %drs")
    a("  %nsm1 = sub i64 %ns, 1")
    a("  %isfirst = icmp ne i64 %first, 0")
    a(f"  %nu = mul i64 %nrow, {nr}")
    a("  %nrm1u = sub i64 %nu, 1")  # the last unit of the call
    a("  %sk0 = icmp ne i64 %skip0, 0")
    a("  %la1 = icmp ne i64 %last1, 0")
    a("  br label %rowhead")
    a("rowhead:")  # unit blocks: nrow of them, nr units each
    a("  %rr = phi i64 [0, %entry], [%rr.next, %rownext]")
    a(f"  %rb = mul i64 %rr, {nr}")
    a("  %rqo = mul i64 %rb, %qrs")
    a("  %qR = getelementptr i8, ptr %q, i64 %rqo")
    a("  %rso = mul i64 %rb, %scrs")
    a("  %scR = getelementptr i8, ptr %sc, i64 %rso")
    a("  %rdo = mul i64 %rb, %drs")
    a("  %dR = getelementptr i16, ptr %d, i64 %rdo")
    a(f"  %yro = mul i64 %rb, {2 if pair else 1}")
    a("  %yR = getelementptr float, ptr %y, i64 %yro")
    for j in range(nr):
        a(f"  %qro{j} = mul i64 %qrs, {j}")
        a(f"  %q{j} = getelementptr i8, ptr %qR, i64 %qro{j}")
        a(f"  %scro{j} = mul i64 %scrs, {j}")
        a(f"  %sc{j} = getelementptr i8, ptr %scR, i64 %scro{j}")
        a(f"  %dro{j} = mul i64 %drs, {j}")
        a(f"  %d{j} = getelementptr i16, ptr %dR, i64 %dro{j}")
    c15 = splat("i8", vw, 15)

    def ptrs(sx: str, sidx: str):
        a(f"  %qo{sx} = mul i64 {sidx}, {QB}")
        a(f"  %so{sx} = mul i64 {sidx}, {SCB}")
        a(f"  %dso{sx} = mul i64 {sidx}, {ND}")
        for j in range(nr):
            a(f"  %qp{j}{sx} = getelementptr i8, ptr %q{j}, i64 %qo{sx}")
            a(f"  %scp{j}{sx} = getelementptr i8, ptr %sc{j}, i64 %so{sx}")
            a(f"  %dp{j}{sx} = getelementptr i16, ptr %d{j}, i64 %dso{sx}")

    def nibbles(t: str, base: str, e: int, n: int) -> list[str]:
        """The low and high nibbles of n 64-byte vectors at base (half e on ymm), interleaved."""
        src = []
        for c in range(n):
            a(f"  %qlp{c}.{t} = getelementptr i8, ptr {base}, i64 {64 * c + vw * e}")
            a(f"  %ql{c}.{t} = load {V8}, ptr %qlp{c}.{t}, align 1")
            a(f"  %lo{c}.{t} = and {V8} %ql{c}.{t}, {c15}")
            a(f"  %hi{c}.{t} = lshr {V8} %ql{c}.{t}, {splat('i8', vw, 4)}")
            src += [f"%lo{c}.{t}", f"%hi{c}.{t}"]
        return src

    def merge_bits(t: str, src: list[str], hsrc: str, hpos: list[int], hmask: int) -> list[str]:
        """src[u] | (hsrc shifted left by hpos[u] (right when negative) & hmask)."""
        W = []
        for u, wv in enumerate(src):
            sh = hpos[u]
            if sh > 0:
                a(f"  %hs{u}.{t} = shl {V8} {hsrc}, {splat('i8', vw, sh)}")
            elif sh < 0:
                a(f"  %hs{u}.{t} = lshr {V8} {hsrc}, {splat('i8', vw, -sh)}")
            hs = f"%hs{u}.{t}" if sh else hsrc
            a(f"  %hm{u}.{t} = and {V8} {hs}, {splat('i8', vw, hmask)}")
            a(f"  %wu{u}.{t} = or {V8} {wv}, %hm{u}.{t}")
            W.append(f"%wu{u}.{t}")
        return W

    def weights_pair(sx: str) -> dict:
        """Per unit (row pair): SC, MM (lanes 0..7 the first row's 8 blocks, 8..15 the
        second's) and the 8 code vectors (v, h) of the super-block."""
        out = {}
        for j in range(nr):
            t0 = f"{j}{sx}"
            a(f"  %sc8_{t0} = load <16 x i8>, ptr %scp{j}{sx}, align 1")
            a(f"  %mnp{t0} = getelementptr i8, ptr %scp{j}{sx}, i64 16")
            a(f"  %mn8_{t0} = load <16 x i8>, ptr %mnp{t0}, align 1")
            a(f"  %dh{t0} = load <4 x half>, ptr %dp{j}{sx}, align 2")
            a(f"  %df{t0} = fpext <4 x half> %dh{t0} to <4 x float>")
            for nm, src, lanes in (("SCF", "sc8_", [0] * 8 + [1] * 8), ("MMF", "mn8_", [2] * 8 + [3] * 8)):
                a(f"  %{nm}d{t0} = shufflevector <4 x float> %df{t0}, <4 x float> poison, {mask(lanes)}")
                a(f"  %{nm}i{t0} = zext <16 x i8> %{src}{t0} to <16 x i32>")
                a(f"  %{nm}f{t0} = uitofp <16 x i32> %{nm}i{t0} to <16 x float>")
                a(f"  %{nm}{t0} = fmul <16 x float> %{nm}f{t0}, %{nm}d{t0}")  # exact
            for e in range(nh):
                t = f"{j}.{e}{sx}"
                for nm in ("SC", "MM"):
                    if nh == 1:
                        out[nm, j, e] = (VF, f"%{nm}F{t0}")
                    else:
                        a(
                            f"  %{nm}{t} = shufflevector <16 x float> %{nm}F{t0}, <16 x float> "
                            f"poison, {mask(range(nl * e, nl * e + nl))}"
                        )
                        out[nm, j, e] = (VF, f"%{nm}{t}")
                W = nibbles(t, f"%qp{j}{sx}", e, 4)
                if qt == Q5_K:  # bit 4: bit u = 2 v + h of the plane's byte
                    a(f"  %hbp.{t} = getelementptr i8, ptr %qp{j}{sx}, i64 {256 + vw * e}")
                    a(f"  %hb.{t} = load {V8}, ptr %hbp.{t}, align 1")
                    W = merge_bits(t, W, f"%hb.{t}", [4 - u for u in range(8)], 0x10)
                for u in range(8):
                    out["W", j, e, u] = (V8, W[u])
        return out

    def weights(sx: str) -> dict:
        """Per weight row: scales (float, exact products), codes (u8)."""
        if pair:
            return weights_pair(sx)
        out = {}
        for j in range(nr):
            t0 = f"{j}{sx}"
            a(f"  %sc8_{t0} = load <16 x i8>, ptr %scp{j}{sx}, align 1")
            if ND == 2:  # d, dmin: lanes 0..7 d, 8..15 dmin
                a(f"  %dh{t0} = load <2 x half>, ptr %dp{j}{sx}, align 2")
                a(f"  %df{t0} = fpext <2 x half> %dh{t0} to <2 x float>")
                a(f"  %DD{t0} = shufflevector <2 x float> %df{t0}, <2 x float> poison, {mask([0] * 8 + [1] * 8)}")
            else:
                a(f"  %dh{t0} = load half, ptr %dp{j}{sx}, align 2")
                a(f"  %df{t0} = fpext half %dh{t0} to float")
                a(f"  %Di{t0} = insertelement {VF} poison, float %df{t0}, i32 0")
                a(f"  %D{t0} = shufflevector {VF} %Di{t0}, {VF} poison, <{nl} x i32> zeroinitializer")
            if qt == Q2_K:  # scale | min << 4 (4 bits each) per 16-group
                a(f"  %sc32_{t0} = zext <16 x i8> %sc8_{t0} to <16 x i32>")
                a(f"  %scl{t0} = and <16 x i32> %sc32_{t0}, {splat('i32', 16, 15)}")
                a(f"  %sch{t0} = lshr <16 x i32> %sc32_{t0}, {splat('i32', 16, 4)}")
                a(f"  %scf{t0} = uitofp <16 x i32> %scl{t0} to <16 x float>")
                a(f"  %mnf{t0} = uitofp <16 x i32> %sch{t0} to <16 x float>")
                a(f"  %Dd{t0} = shufflevector <16 x float> %DD{t0}, <16 x float> poison, <16 x i32> zeroinitializer")
                a(f"  %Dm{t0} = shufflevector <16 x float> %DD{t0}, <16 x float> poison, {mask([8] * 16)}")
                a(f"  %SCL{t0} = fmul <16 x float> %scf{t0}, %Dd{t0}")
                a(f"  %MML{t0} = fmul <16 x float> %mnf{t0}, %Dm{t0}")
            else:  # int8 scales per 16-group
                a(f"  %sc32_{t0} = sext <16 x i8> %sc8_{t0} to <16 x i32>")
                a(f"  %scf{t0} = sitofp <16 x i32> %sc32_{t0} to <16 x float>")
            if qt == Q3_K:  # bit 2, 32 bytes: lanes 8..15 in the high nibble
                a(f"  %hbp{t0} = getelementptr i8, ptr %qp{j}{sx}, i64 64")
                a(f"  %hb{t0} = load <32 x i8>, ptr %hbp{t0}, align 1")
                a(f"  %hbs{t0} = lshr <32 x i8> %hb{t0}, {splat('i8', 32, 4)}")
                if vw == 64:
                    a(f"  %hbw{t0} = shufflevector <32 x i8> %hb{t0}, <32 x i8> %hbs{t0}, {mask(range(64))}")
            for e in range(nh):
                t = f"{j}.{e}{sx}"
                if qt == Q2_K:  # lane L: 16-group L
                    lanes = mask(range(nl * e, nl * e + nl))
                    a(f"  %SC{t} = shufflevector <16 x float> %SCL{t0}, <16 x float> poison, {lanes}")
                    a(f"  %MM{t} = shufflevector <16 x float> %MML{t0}, <16 x float> poison, {lanes}")
                    out["MM", j, e] = (VF, f"%MM{t}")
                else:
                    a(
                        f"  %scr{t} = shufflevector <16 x float> %scf{t0}, <16 x float> poison, "
                        f"{mask(range(nl * e, nl * e + nl))}"
                    )
                    a(f"  %SC{t} = fmul {VF} %scr{t}, %D{t0}")
                out["SC", j, e] = (VF, f"%SC{t}")
                if qt in (Q2_K, Q3_K):  # 2-bit codes: bits 2v..2v+1 of byte 4L + t
                    a(f"  %qcp.{t} = getelementptr i8, ptr %qp{j}{sx}, i64 {vw * e}")
                    a(f"  %qc.{t} = load {V8}, ptr %qcp.{t}, align 1")
                    W = []
                    for v in range(4):
                        if v:
                            a(f"  %qcs{v}.{t} = lshr {V8} %qc.{t}, {splat('i8', vw, 2 * v)}")
                        a(f"  %cr{v}.{t} = and {V8} {f'%qcs{v}.{t}' if v else f'%qc.{t}'}, {splat('i8', vw, 3)}")
                        W.append(f"%cr{v}.{t}")
                else:
                    W = nibbles(t, f"%qp{j}{sx}", e, 2)
                if qt == Q6_K:  # high 2 bits of virtual vector v at bits 2v..2v+1 -> bits 4, 5
                    a(f"  %qhp.{t} = getelementptr i8, ptr %qp{j}{sx}, i64 {128 + vw * e}")
                    a(f"  %qh.{t} = load {V8}, ptr %qhp.{t}, align 1")
                    W = merge_bits(t, W, f"%qh.{t}", [4 - 2 * v for v in range(4)], 0x30)
                elif qt == Q3_K:  # bit v of the (widened) byte -> bit 2
                    hsrc = f"%hbw{t0}" if vw == 64 else f"%hb{t0}" if e == 0 else f"%hbs{t0}"
                    W = merge_bits(t, W, hsrc, [2 - v for v in range(4)], 4)
                for v in range(4):
                    out["W", j, e, v] = (V8, W[v])
        return out

    # accumulators: per (unit, act row) and ymm half e (pair: e is the row of the pair on
    # ymm), or per (unit, act row) with the halves chained (the others)
    accs = [(j, i, e) for j in range(nr) for i in range(kb) for e in range(nh if pair else 1)]
    last = (lambda j, i, e: f"%acc{j}_{i}_{e}.x") if pair else (lambda j, i, e: f"%acc{j}_{i}_0.{nh - 1}")
    if pipe:
        ptrs(".w0", "0")
        w0 = weights(".w0")
    a("  br label %loop")
    a("loop:")
    a("  %s = phi i64 [0, %rowhead], [%s.next, %loop.end]")
    for j, i, e in accs:
        a(f"  %acc{j}_{i}_{e} = phi {VF} [zeroinitializer, %rowhead], [{last(j, i, e)}, %loop.end]")
    if pipe:
        cur = {}
        for key, (ty, val) in w0.items():
            nm = "%cur." + ".".join(str(x) for x in key)
            a(f"  {nm} = phi {ty} [{val}, %rowhead], [%nx.{nm[5:]}, %loop.end]")
            cur[key] = nm
    ptrs("", "%s")
    a("  br i1 %pf, label %loop.pf, label %loop.body")
    a("loop.pf:")
    for j in range(nr):
        for nm, base, nbytes, ty, off in (
            ("q", f"%qp{j}", QB, "i8", "%pfq"),
            ("s", f"%scp{j}", SCB, "i8", "%pfs"),
            ("d", f"%dp{j}", 2 * ND, "i16", "%pfd"),
        ):
            for o in range(0, nbytes, 64):
                a(f"  %pf{nm}{j}_{o}.b = getelementptr {ty}, ptr {base}, i64 {off}")
                a(f"  %pf{nm}{j}_{o} = getelementptr i8, ptr %pf{nm}{j}_{o}.b, i64 {o}")
                codegen.emit_prefetch(a, f"%pf{nm}{j}_{o}")
    a("  br label %loop.body")
    a("loop.body:")
    a("  %xqo = mul i64 %s, %xqs")
    a("  %xqb = getelementptr i8, ptr %xq, i64 %xqo")
    a("  %xdo = mul i64 %s, %xds")
    a("  %xdb = getelementptr float, ptr %xd, i64 %xdo")
    if pair:
        a("  %xpb = getelementptr float, ptr %xp, i64 %xdo")
    if pipe:  # the next super-block's weights (the last iteration repeats its own: no overrun)
        a("  %s1a = add i64 %s, 1")
        a("  %s1 = call i64 @llvm.umin.i64(i64 %s1a, i64 %nsm1)")
        ptrs(".wn", "%s1")
        wn = weights(".wn")
        for key, (ty, val) in wn.items():
            nm = ".".join(str(x) for x in key)
            a(
                f"  %nx.{nm} = or {ty} {val}, zeroinitializer"
                if ty != VF
                else f"  %nx.{nm} = fadd {VF} {val}, {splat('float', nl, '-0.0')}"
            )
        wv = {key: (ty, cur[key]) for key, (ty, _) in w0.items()}
    else:
        wv = weights("")
    for i in range(kb):
        if pair:  # act vector v, half h: 32 bytes, both halves of a zmm (lane p: block p)
            X = []
            for u in range(8):
                a(f"  %xp{u}.{i} = getelementptr i8, ptr %xqb, i64 {256 * i + 32 * u}")
                a(f"  %xh{u}.{i} = load <32 x i8>, ptr %xp{u}.{i}, align 1, !invariant.load !0")
                if vw == 64:
                    a(
                        f"  %x{u}.{i} = shufflevector <32 x i8> %xh{u}.{i}, <32 x i8> poison, "
                        f"{mask(list(range(32)) * 2)}"
                    )
                    X.append(f"%x{u}.{i}")
                else:
                    X.append(f"%xh{u}.{i}")
        for e in range(nh):
            if not pair:
                X = []
                for v in range(4):
                    a(f"  %xp{v}.{i}.{e} = getelementptr i8, ptr %xqb, i64 {256 * i + 64 * v + vw * e}")
                    a(f"  %x{v}.{i}.{e} = load {V8}, ptr %xp{v}.{i}.{e}, align 1, !invariant.load !0")
                    X.append(f"%x{v}.{i}.{e}")
            X0 = None
            if coff:  # the chain starts at -coff * xsum16 (xd[2]: -4 xsum16, xd[3]: -32)
                a(f"  %oxp.{i}.{e} = getelementptr i32, ptr %xdb, i64 {16 * i + nl * e}")
                a(f"  %oxq.{i}.{e} = getelementptr i32, ptr %oxp.{i}.{e}, i64 %xsoc")
                a(f"  %ox.{i}.{e} = load {V32}, ptr %oxq.{i}.{e}, align 4, !invariant.load !0")
                X0 = f"%ox.{i}.{e}"
            a(f"  %dxp.{i}.{e} = getelementptr float, ptr %xdb, i64 {16 * i + nl * e}")
            a(f"  %DX.{i}.{e} = load {VF}, ptr %dxp.{i}.{e}, align 4, !invariant.load !0")
            if pair or lmin:  # float32(dx xsum): per block (xp, pair), per 16-group (xd[1])
                if pair:
                    a(f"  %dsp.{i}.{e} = getelementptr float, ptr %xpb, i64 {16 * i + nl * e}")
                else:
                    a(f"  %dsp.{i}.{e} = getelementptr float, ptr %dxp.{i}.{e}, i64 %xso")
                a(f"  %DS.{i}.{e} = load {VF}, ptr %dsp.{i}.{e}, align 4, !invariant.load !0")
            for j in range(nr):
                u = f"{j}_{i}.{e}"
                Wv = [wv["W", j, e, v][1] for v in range(8 if pair else 4)]
                isum = E_.dot(f"I{u}.", Wv, X, X0)
                a(f"  %F.{u} = sitofp {V32} {isum} to {VF}")
                a(f"  %T.{u} = fmul {VF} %F.{u}, %DX.{i}.{e}")
                prev = f"%acc{j}_{i}_{e}" if pair or e == 0 else f"%acc{j}_{i}_0.{e - 1}"
                if pair or lmin:  # - dmin m * float32(dx xsum)
                    a(f"  %mn.{u} = fneg {VF} {wv['MM', j, e][1]}")
                    a(f"  %m.{u} = call {VF} {fma}({VF} %mn.{u}, {VF} %DS.{i}.{e}, {VF} {prev})")
                    prev = f"%m.{u}"
                dst = f"%acc{j}_{i}_{e}.x" if pair else f"%acc{j}_{i}_0.{e}"
                a(f"  {dst} = call {VF} {fma}({VF} %T.{u}, {VF} {wv['SC', j, e][1]}, {VF} {prev})")
    a("  br label %loop.end")
    a("loop.end:")
    a("  %s.next = add i64 %s, 1")
    a("  %done = icmp eq i64 %s.next, %ns")
    a("  br i1 %done, label %rowend, label %loop")
    a("rowend:")
    outs = []  # (act row i, column j from yR, float sum)
    for j in range(nr):
        if vw == 64 and (kb > 1 or pair):  # all at once (transposed): fewer ops
            seg0 = 8 if pair else 16
            for g, val in _reduce_accs(a, [last(j, i, 0) for i in range(kb)], seg0, f"rd{j}_"):
                outs.append((g // 2, 2 * j + g % 2, val) if pair else (g, j, val))
            continue
        for i in range(kb):
            for e in range(nh if pair else 1):
                codegen.emit_hsum(a, last(j, i, e), nl, f"%o{j}_{i}_{e}")
                outs.append((i, 2 * j + e if pair else j, f"%o{j}_{i}_{e}"))
    for i, col, _ in outs:
        a(f"  %yo{col}_{i} = mul i64 %ys, {i}")
        a(f"  %yo{col}_{i}b = add i64 %yo{col}_{i}, {col}")
        a(f"  %yq{col}_{i} = getelementptr float, ptr %yR, i64 %yo{col}_{i}b")
        if pair:  # rows outside the range: the store goes to %dummy
            j, row = divmod(col, 2)
            a(f"  %u{col}_{i} = add i64 %rb, {j}")
            if row == 0:
                a(f"  %e{col}_{i} = icmp eq i64 %u{col}_{i}, 0")
                a(f"  %bad{col}_{i} = and i1 %e{col}_{i}, %sk0")
            else:
                a(f"  %e{col}_{i} = icmp eq i64 %u{col}_{i}, %nrm1u")
                a(f"  %bad{col}_{i} = and i1 %e{col}_{i}, %la1")
            a(f"  %yp{col}_{i} = select i1 %bad{col}_{i}, ptr %dummy, ptr %yq{col}_{i}")
    yp = (lambda col, i: f"%yp{col}_{i}") if pair else (lambda col, i: f"%yq{col}_{i}")
    a("  br i1 %isfirst, label %yset, label %yadd")
    a("yset:")  # the first tile: y = the sums
    for i, col, val in outs:
        a(f"  store float {val}, ptr {yp(col, i)}, align 4")
    a("  br label %rownext")
    a("yadd:")  # later tiles: y += the sums
    for i, col, val in outs:
        a(f"  %yl{col}_{i} = load float, ptr {yp(col, i)}, align 4")
        a(f"  %ya{col}_{i} = fadd float %yl{col}_{i}, {val}")
        a(f"  store float %ya{col}_{i}, ptr {yp(col, i)}, align 4")
    a("  br label %rownext")
    a("rownext:")
    a("  %rr.next = add i64 %rr, 1")
    a("  %rdone = icmp eq i64 %rr.next, %nrow")
    a("  br i1 %rdone, label %exit, label %rowhead")
    a("exit:")
    a("  ret void")
    a("}")
    return L


def _fn_ir(qt: int, nr: int, kbs: list[int], tile_bytes: int, prefetch: int, group: int = 32) -> list[str]:
    """``@kq_<t>(q, sc, d, xq, xd, xp, y, nsb, r0, r1, k, ys)``: y[i * ys + r] for
    r0 <= r < r1 and every act row i < k.

    Super-blocks go in tiles of ``ns = max(1, tile_bytes / (min(kp, kb) * 384))`` (the act
    data a chunk call streams over a tile stays in L1); per tile, rows in groups of ``group``;
    per group, act rows in chunks of ``kbs[0]``, then one chunk of each smaller size for the
    rest; each chunk call runs over the group's rows (in blocks of ``nr``, then single rows):
    a group's weights are read from memory once and re-read from cache by its later chunks."""
    kb = kbs[0]
    nm = NAMES[qt]
    QB, SCB, ND = unit_bytes(qt)
    pair = qt in PAIR_TYPES
    group = max(group // (2 * nr if pair else nr), 1) * nr  # units (32 weight rows)
    L = []
    a = L.append
    ro = "ptr noalias nocapture readonly"
    a(
        f"define void @kq_{nm}({ro} %q, {ro} %sc, {ro} %d, {ro} %xq, {ro} %xd, {ro} %xp, "
        "ptr noalias nocapture %y, i64 %nsb, i64 %r0, i64 %r1, i64 %k, i64 %ys) #0 {"
    )
    a("entry:")
    a("  %e1 = icmp sge i64 %r0, %r1")
    a("  %e2 = icmp sle i64 %nsb, 0")
    a("  %e3 = icmp sle i64 %k, 0")
    a("  %e12 = or i1 %e1, %e2")
    a("  %skip = or i1 %e12, %e3")
    a("  br i1 %skip, label %exit, label %pre")
    a("pre:")
    if pair:  # units: row pairs; a half pair at either end is computed, not stored
        a("  %u0 = lshr i64 %r0, 1")
        a("  %r1p = add i64 %r1, 1")
        a("  %u1 = lshr i64 %r1p, 1")
        a("  %r0odd = and i64 %r0, 1")
        a("  %r1odd = and i64 %r1, 1")
    else:
        a("  %u0 = add i64 %r0, 0")
        a("  %u1 = add i64 %r1, 0")
    a("  %kodd = and i64 %k, 1")
    a("  %kp = add i64 %k, %kodd")
    a(f"  %nfull = udiv i64 %k, {kb}")
    a(f"  %rem = urem i64 %k, {kb}")
    # the act data a chunk call streams per super-block: min(kp, kb) rows (a call only reads
    # its own rows; sizing by all kp rows made tiles of 1 super-block at large k: per (row,
    # chunk, super-block) a reduction, y update and decode prologue, 2x slower at k = 256)
    # up to MAX_ROWS (16) rows, the fused step's batches, tiles as for 16 rows: a row's partial
    # sums fall at the same super-blocks whether it runs alone or with up to 15 others, so
    # speculative verification gives plain decoding's logits bit for bit; and 16 rows' act data
    # of a tile stays in L1 (sized for one row pair, a 1536 x 8960 Q6_K tile was the whole row:
    # 8 rows' 107 KB of acts streamed from L2 for each weight row, 4x the time of 8960 x 1536)
    a(f"  %kpc = call i64 @llvm.umin.i64(i64 %kp, i64 {kb})")
    a("  %few = icmp ule i64 %kp, 16")
    a("  %kpt = select i1 %few, i64 16, i64 %kpc")
    a("  %tb = mul i64 %kpt, 384")
    a(f"  %tsb0 = udiv i64 {tile_bytes}, %tb")
    a("  %tsb1 = call i64 @llvm.umax.i64(i64 %tsb0, i64 1)")
    a("  %tsb = call i64 @llvm.umin.i64(i64 %tsb1, i64 %nsb)")
    a("  br label %tile")
    a("tile:")
    a("  %s0 = phi i64 [0, %pre], [%s0.next, %tile.end]")
    a("  %s0e = add i64 %s0, %tsb")
    a("  %s1 = call i64 @llvm.umin.i64(i64 %s0e, i64 %nsb)")
    a("  %ns = sub i64 %s1, %s0")
    a("  %isf = icmp eq i64 %s0, 0")
    a("  %first = zext i1 %isf to i64")
    if prefetch:  # software prefetch: the same tile of a later row, >= prefetch bytes ahead
        a(f"  %segb = mul i64 %ns, {QB}")
        a(f"  %pfr0 = add i64 %segb, {prefetch - 1}")
        a("  %pfr = udiv i64 %pfr0, %segb")
    else:
        a("  %pfr = add i64 0, 0")
    a("  %xqt.o = mul i64 %s0, %kp")
    a("  %xqt.o2 = mul i64 %xqt.o, 256")
    a("  %xqt = getelementptr i8, ptr %xq, i64 %xqt.o2")
    a("  %xdt.o2 = mul i64 %xqt.o, 16")
    a("  %xdt = getelementptr float, ptr %xd, i64 %xdt.o2")
    a("  %xpt = getelementptr float, ptr %xp, i64 %xdt.o2")
    a("  br label %grp")
    a("grp:")
    a("  %rg = phi i64 [%u0, %tile], [%rg.next, %grp.end]")
    a(f"  %rge = add i64 %rg, {group}")
    a("  %rg1 = call i64 @llvm.umin.i64(i64 %rge, i64 %u1)")
    a("  %gn = sub i64 %rg1, %rg")
    a(f"  %gnb = udiv i64 %gn, {nr}")
    a(f"  %gnr = urem i64 %gn, {nr}")
    a(f"  %gr2 = mul i64 %gnb, {nr}")
    a("  %rgs = add i64 %rg, %gr2")

    def body(tag, rows, r, nrow, nxt):
        """The chunks of one group's rows (``nrow`` blocks of ``rows`` from ``r``), then ``nxt``."""
        a(f"  %rs{tag} = mul i64 {r}, %nsb")
        a(f"  %rs2{tag} = add i64 %rs{tag}, %s0")
        a(f"  %qo{tag} = mul i64 %rs2{tag}, {QB}")
        a(f"  %qr{tag} = getelementptr i8, ptr %q, i64 %qo{tag}")
        a(f"  %so{tag} = mul i64 %rs2{tag}, {SCB}")
        a(f"  %scr{tag} = getelementptr i8, ptr %sc, i64 %so{tag}")
        a(f"  %do{tag} = mul i64 %rs2{tag}, {ND}")
        a(f"  %dr{tag} = getelementptr i16, ptr %d, i64 %do{tag}")
        if pair:  # skip0: r is the range's first unit and r0 odd; last1: its last and r1 odd
            a(f"  %isu0{tag} = icmp eq i64 {r}, %u0")
            a(f"  %sk{tag} = select i1 %isu0{tag}, i64 %r0odd, i64 0")
            a(f"  %nru{tag} = mul i64 {nrow}, {rows}")
            a(f"  %ru{tag} = add i64 {r}, %nru{tag}")
            a(f"  %isu1{tag} = icmp eq i64 %ru{tag}, %u1")
            a(f"  %la{tag} = select i1 %isu1{tag}, i64 %r1odd, i64 0")
            flags = f"i64 %sk{tag}, i64 %la{tag}"
        else:
            flags = "i64 0, i64 0"
        a(f"  %hasfull{tag} = icmp ugt i64 %nfull, 0")
        a(f"  br i1 %hasfull{tag}, label %full{tag}, label %tail{tag}")

        def call(ksz, i0, sfx):
            a(f"  %xqo{sfx} = mul i64 {i0}, 256")
            a(f"  %xqp{sfx} = getelementptr i8, ptr %xqt, i64 %xqo{sfx}")
            a(f"  %xdo{sfx} = mul i64 {i0}, 16")  # 16 floats per act row (xd), 32 per pair (xp)
            a(f"  %xdp{sfx} = getelementptr float, ptr %xdt, i64 %xdo{sfx}")
            a(f"  %xpp{sfx} = getelementptr float, ptr %xpt, i64 %xdo{sfx}")
            a(f"  %yo{sfx} = mul i64 {i0}, %ys")
            a(f"  %yr{sfx} = mul i64 {r}, {2 if pair else 1}")
            a(f"  %yo2{sfx} = add i64 %yo{sfx}, %yr{sfx}")
            a(f"  %yp{sfx} = getelementptr float, ptr %y, i64 %yo2{sfx}")
            a(
                f"  call void @kq_{nm}.r{rows}c{ksz}(ptr %qr{tag}, ptr %scr{tag}, ptr %dr{tag}, "
                f"ptr %xqp{sfx}, ptr %xdp{sfx}, ptr %xpp{sfx}, ptr %yp{sfx}, i64 %ns, i64 %nsb, "
                f"i64 %ys, i64 %kp, i64 %first, i64 %pfr, i64 {nrow}, {flags})"
            )

        a(f"full{tag}:")
        a(f"  %c{tag} = phi i64 [0, %{tag}], [%c.next{tag}, %full{tag}]")
        a(f"  %i0f{tag} = mul i64 %c{tag}, {kb}")
        call(kb, f"%i0f{tag}", f"f{tag}")
        a(f"  %c.next{tag} = add i64 %c{tag}, 1")
        a(f"  %cdone{tag} = icmp eq i64 %c.next{tag}, %nfull")
        a(f"  br i1 %cdone{tag}, label %tail{tag}, label %full{tag}")
        a(f"tail{tag}:")  # the remainder, one chunk per bit of rem (largest first)
        a(f"  %ti0{tag} = mul i64 %nfull, {kb}")
        prev = f"%ti0{tag}"
        for j, ksz in enumerate(kbs[1:]):
            a(f"  %tb{j}{tag} = and i64 %rem, {ksz}")
            a(f"  %th{j}{tag} = icmp ne i64 %tb{j}{tag}, 0")
            a(f"  br i1 %th{j}{tag}, label %tdo{j}{tag}, label %tnext{j}{tag}")
            a(f"tdo{j}{tag}:")
            call(ksz, prev, f"t{j}{tag}")
            a(f"  br label %tnext{j}{tag}")
            a(f"tnext{j}{tag}:")
            a(f"  %tia{j}{tag} = add i64 {prev}, {ksz}")
            a(f"  %ti{j + 1}{tag} = select i1 %th{j}{tag}, i64 %tia{j}{tag}, i64 {prev}")
            prev = f"%ti{j + 1}{tag}"
        a(f"  br label %{nxt}")

    a("  %hasb = icmp ugt i64 %gnb, 0")
    a("  br i1 %hasb, label %B, label %Bend")
    a("B:")
    body("B", nr, "%rg", "%gnb", "Bend")
    a("Bend:")
    if nr > 1:
        a("  %hass = icmp ugt i64 %gnr, 0")
        a("  br i1 %hass, label %S, label %grp.end")
        a("S:")
        body("S", 1, "%rgs", "%gnr", "grp.end")
    else:
        a("  br label %grp.end")
    a("grp.end:")
    a("  %rg.next = add i64 %rg, %gn")
    a("  %gdone = icmp uge i64 %rg.next, %u1")
    a("  br i1 %gdone, label %tile.end, label %grp")
    a("tile.end:")
    a("  %s0.next = add i64 %s0, %tsb")
    a("  %tdone = icmp uge i64 %s0.next, %nsb")
    a("  br i1 %tdone, label %exit, label %tile")
    a("exit:")
    a("  ret void")
    a("}")
    return L


SPECS = {"avx512": (64, "vnni"), "avx512-novnni": (64, "maddubs"), "avx2": (32, "maddubs")}


def _kbs(kb: int) -> list[int]:
    if kb < 2 or kb & (kb - 1):
        raise ValueError("kb must be a power of two >= 2")
    out = [kb]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _reduce_accs(a, accs: list[str], seg0: int, tag: str) -> list[tuple[int, str]]:
    """[(segment g, its float sum)] of a chunk's 16-lane accumulators, each 16 / seg0 segments
    of seg0 lanes in order: one per act row (seg0 = 16), or (row pairs, seg0 = 8) one per (act
    row i, row j of the pair), g = 2 i + j.

    Neighbouring accumulators are folded into one vector level by level (each level adds the
    two halves of every segment: 3 ops per pair of vectors), then the rest of each segment is
    summed in place. At kb = 8: 23 ops for the 8 sums, where one tree per sum took 64."""
    V = "<16 x float>"
    level, seg = fold(a, accs, "float", tag, lambda x, y, o: f"  {o} = fadd {V} {x}, {y}", seg0=seg0)
    tag = "%" + tag
    nseg = len(accs) * (16 // seg0)
    out = []
    for vi, v in enumerate(level):
        h = seg // 2
        while h >= 1:  # lanes j and j + h of every segment (garbage lanes are never read)
            a(f"  {tag}v{vi}_{h} = shufflevector {V} {v}, {V} poison, {mask([(j + h) % 16 for j in range(16)])}")
            a(f"  {tag}w{vi}_{h} = fadd {V} {v}, {tag}v{vi}_{h}")
            v, h = f"{tag}w{vi}_{h}", h // 2
        per = 16 // seg
        for t in range(per):
            g = vi * per + t
            if g < nseg:
                a(f"  {tag}o{g} = extractelement {V} {v}, i32 {t * seg}")
                out.append((g, f"{tag}o{g}"))
    return out


def kernel_ir(
    isa: str,
    cpu: str = "",
    features: str = "",
    *,
    what=Q4_K,
    kb: int | None = None,
    nr: int | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    pipe: bool | None = None,
    group: int = DEFAULT_GROUP,
    width: int | None = None,
) -> str:
    """The IR module text for an x86 path (an ``SPECS`` name): ``kq_<type>`` for ``what`` a
    qtype, or ``kq_quant`` for ``what="quant"`` (a module each, so a process parses only the
    ones its model uses). ``width``: the vector bytes of the chunks of 2+ act rows, when not
    the path's own (32 on avx512: ymm ``vpdpbusd``, AVX-512VL; not pipelined)."""
    L = list(_DECLS) + ["declare i64 @llvm.umax.i64(i64, i64)", "declare i64 @llvm.umin.i64(i64, i64)"]
    if what == "quant":
        L += [
            "declare <16 x float> @llvm.fabs.v16f32(<16 x float>)",
            "declare <16 x float> @llvm.maxnum.v16f32(<16 x float>, <16 x float>)",
            "declare float @llvm.vector.reduce.fmax.v16f32(<16 x float>)",
            "declare <16 x float> @llvm.roundeven.v16f32(<16 x float>)",
            "declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)",
            "declare <8 x float> @llvm.maxnum.v8f32(<8 x float>, <8 x float>)",
        ]
        L += quant_ir()
        return codegen.finish_module(L, cpu, features)
    vw, combine = SPECS[isa]
    if width is not None and (width not in (32, 64) or (width == 64 and vw == 32)):
        raise ValueError(f"kernel_ir: width {width} on the {isa} path")
    kbs = _kbs(kb or default_kb(isa, what))
    nr = nr or DEFAULT_NR[isa]
    pipe = DEFAULT_PIPE[isa] if pipe is None else pipe
    for ksz in kbs:
        w = vw if ksz == 1 else width or vw
        for rows in sorted({1, nr}):
            L += _chunk_ir(what, w, combine, rows, ksz, pipe and w == vw)
    L += _fn_ir(what, nr, kbs, tile_bytes, prefetch, group)
    return codegen.finish_module(L, cpu, features)
