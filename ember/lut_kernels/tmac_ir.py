"""LLVM IR of the T-MAC table-lookup kernels (Q4_0, Q4_1; ``tmac.py`` runs them), emitted as
text and compiled with ``codegen.jit`` (MCJIT for this host) or to an aarch64 object.

Two functions per compiled module (C ABI; numpy buffers, every pointer may be unaligned):

``tmac_tables(const float *x, int8 *tab, float *bc, int64 nb)``
    The lookup tables of one activation vector ``x[32 * nb]``. For group ``g`` (activations
    ``x[4g .. 4g+3]``) and index ``i`` (0..15) the float entry is the mirrored subset sum
    ``E[i] = sum_j (bit_j(i) - 1/2) x[4g + j]``, in float32 in exactly this order:
    ``((s0*h0 + s1*h1) + s2*h2) + s3*h3`` with ``h = x / 2``, ``s = +-1`` (the products are exact,
    so the FMAs used here round like separate multiplies and adds). Per 32-block one scale:
    ``amax = max |E|`` (= ``max_g ((|h0| + |h1|) + |h2|) + |h3|``), ``q = roundeven(E * (QMAX /
    amax))``, QMAX = 127 (8-bit tables) or 32767 (16-bit tables). ``tab`` gets, per block, 8
    tables of 16 int8 (8-bit), or 8 tables of the low bytes then 8 of the high bytes (16-bit:
    ``q = lo_u8 + 256 * hi_s8``). ``bc[4b:4b+4] = (amax / QMAX, -0.5 xs, 7.5 xs, xs)`` with ``xs``
    the block sum of x, added as a tree (16 lanes ``x[0:16] + x[16:32]``, then halves 8, 4, 2,
    1). ``amax == 0`` gives scale 0 and a zero table. The mirror makes ``E[15 - i] = -E[i]`` and
    halves the range an unsigned subset sum would need (it is T-MAC's +-1 trick).

``tmac_q4_0 / tmac_q4_1(codes, dm, tab, bc, float *y, int64 nb, int64 t0, int64 t1)``
    Row tiles ``t0 <= t < t1`` of a ``PackedQ4`` (``pack.py``; ``codes`` and ``dm`` are the base
    pointers of the whole matrix) into ``y[(t - t0) * tile + r]``. Per 32-block the integer
    ``I = sum_gp sum_p 2^p (T[gp][lo nibble] + T[gp + 4][hi nibble])`` is exact in int32; then
    ``y += d * (scale * I + z)`` (``+ m * xs`` for Q4_1) in float32 FMAs, ``z = -0.5 xs`` for
    Q4_0 (value ``(q - 8) d``) and ``7.5 xs`` for Q4_1 (value ``q d + m``); 7.5 = the mirror
    offset ``sum_p 2^p / 2``. Software prefetch ``DEFAULT_PREFETCH`` (tile, block) steps ahead
    on both streams.

Per 64 bytes of codes (16 rows x 4 planes x 2 nibbles): 1 load, 1 and, 1 shift, 2 ``vpshufb``
(4 with 16-bit tables), and the plane weighting 1, 2, 4, 8 plus the widening in ONE instruction
per lookup: ``vpdpbusd`` (AVX-512 VNNI: the 4 plane bytes of a row are 4 neighbouring bytes,
i.e. one int32 lane), ``vpmaddubsw`` (+ one ``vpmaddwd`` per block: AVX2 and AVX-512 without
VNNI), ``sdot``/``udot`` (NEON).

ISAs: ``avx512`` (avx512bw; vpdpbusd when the host has avx512vnni, else the pmaddubsw form),
``avx512-novnni`` (forces the pmaddubsw form: lets a VNNI host test it), ``avx2`` (compiled for
``x86-64-v3``: exactly the code an AVX2-only machine runs, no EVEX), ``neon`` (``compile_object``
to an aarch64 ELF object with ``+neon,+dotprod``; never executed here). ``native_kernels``
compiles a native module once per process and argument set and keeps it, engine included, for
the life of the process. Measured costs: docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.binding as llvm

from .codegen import (
    emit_hsum,
    emit_prefetch,
    emit_tile_end,
    finish_module,
    flt,
    host_asm,
    host_isas,
    jit,
    mask,
    once,
    optimize,
    resolve_isa,
    splat,
    vec,
)

__all__ = ["DEFAULT_PREFETCH", "kernel_ir", "native_kernels", "kernel_asm", "compile_object", "NativeKernels"]

DEFAULT_PREFETCH = 8  # software prefetch distance in (tile, block) steps: 8 KiB ahead of the codes
_W = (1, 2, 4, 8)  # plane weights, repeated per 4-byte lane


@dataclass(frozen=True)
class _Isa:
    name: str
    vw: int  # bytes per vector register
    combine: str  # vnni | maddubs | dot
    shuffle: str  # intrinsic name
    decls: tuple


_ISA_SPECS = {
    "avx512": _Isa(
        "avx512",
        64,
        "vnni",
        "@llvm.x86.avx512.pshuf.b.512",
        (
            "declare <64 x i8> @llvm.x86.avx512.pshuf.b.512(<64 x i8>, <64 x i8>)",
            "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)",
        ),
    ),
    "avx512-novnni": _Isa(
        "avx512-novnni",
        64,
        "maddubs",
        "@llvm.x86.avx512.pshuf.b.512",
        (
            "declare <64 x i8> @llvm.x86.avx512.pshuf.b.512(<64 x i8>, <64 x i8>)",
            "declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8>, <64 x i8>)",
            "declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)",
        ),
    ),
    "avx2": _Isa(
        "avx2",
        32,
        "maddubs",
        "@llvm.x86.avx2.pshuf.b",
        (
            "declare <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8>, <32 x i8>)",
            "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)",
            "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)",
        ),
    ),
    "neon": _Isa(
        "neon",
        16,
        "dot",
        "@llvm.aarch64.neon.tbl1.v16i8",
        (
            "declare <16 x i8> @llvm.aarch64.neon.tbl1.v16i8(<16 x i8>, <16 x i8>)",
            "declare <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)",
            "declare <4 x i32> @llvm.aarch64.neon.udot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)",
        ),
    ),
}


def _tables_ir(bits: int) -> list[str]:
    """``tmac_tables``: 8 groups x 16 entries per block, one 16-lane float vector per group.

    ``(+-0.5) * x`` is exact, so each product is exact and ``fma`` rounds exactly like the
    oracle's separate multiply and add: ``E = ((s0 h0 + s1 h1) + s2 h2) + s3 h3``. The largest
    |entry| of a group is the one whose signs match x's, i.e. ``((|h0|+|h1|)+|h2|)+|h3|``.
    """
    qmax = 127.0 if bits == 8 else 32767.0
    tstride = 128 if bits == 8 else 256
    L = []
    a = L.append
    S = [vec("float", [flt(0.5 if (i >> j) & 1 else -0.5) for i in range(16)]) for j in range(4)]
    V = "<16 x float>"
    a(
        "define void @tmac_tables(ptr noalias nocapture readonly %x, ptr noalias nocapture %tab, "
        "ptr noalias nocapture %bc, i64 %nb) #0 {"
    )
    a("entry:")
    a("  %none = icmp sle i64 %nb, 0")
    a("  br i1 %none, label %exit, label %loop")
    a("loop:")
    a("  %b = phi i64 [0, %entry], [%b.next, %loop]")
    a("  %xo = mul i64 %b, 32")
    a("  %xb = getelementptr float, ptr %x, i64 %xo")
    for g in range(8):
        for j in range(4):
            a(f"  %xp{g}_{j} = getelementptr float, ptr %xb, i64 {4 * g + j}")
            a(f"  %x{g}_{j} = load float, ptr %xp{g}_{j}, align 4")
            a(f"  %xi{g}_{j} = insertelement {V} poison, float %x{g}_{j}, i32 0")
            a(f"  %X{g}_{j} = shufflevector {V} %xi{g}_{j}, {V} poison, <16 x i32> zeroinitializer")
        a(f"  %e{g}_0 = fmul {V} %X{g}_0, {S[0]}")
        for j in range(1, 4):
            a(f"  %e{g}_{j} = call {V} @llvm.fma.v16f32({V} %X{g}_{j}, {V} {S[j]}, {V} %e{g}_{j - 1})")
        a(f"  %E{g} = fadd {V} %e{g}_3, {splat('float', 16, '-0.0')}")  # (a no-op, a name)
        a(f"  %ab{g} = call {V} @llvm.fabs.v16f32({V} %E{g})")
    level, k = [f"%ab{g}" for g in range(8)], 0
    while len(level) > 1:  # a tree: short dependency chains
        nxt = []
        for i in range(0, len(level), 2):
            a(f"  %mv{k} = call nnan {V} @llvm.maxnum.v16f32({V} {level[i]}, {V} {level[i + 1]})")
            nxt.append(f"%mv{k}")
            k += 1
        level = nxt
    a(f"  %amax = call nnan float @llvm.vector.reduce.fmax.v16f32({V} {level[0]})")
    # block sum, as a tree
    a("  %xhi.p = getelementptr float, ptr %xb, i64 16")
    a("  %xlo = load <16 x float>, ptr %xb, align 4")
    a("  %xhi = load <16 x float>, ptr %xhi.p, align 4")
    a("  %v16 = fadd <16 x float> %xlo, %xhi")
    emit_hsum(a, "%v16", 16, "%xs")
    a("  %pos = fcmp ogt float %amax, 0.0")
    a(f"  %inv0 = fdiv float {flt(qmax)}, %amax")
    a("  %inv = select i1 %pos, float %inv0, float 0.0")
    a(f"  %sc0 = fdiv float %amax, {flt(qmax)}")
    a("  %sc = select i1 %pos, float %sc0, float 0.0")
    a(f"  %invi = insertelement {V} poison, float %inv, i32 0")
    a(f"  %INV = shufflevector {V} %invi, {V} poison, <16 x i32> zeroinitializer")
    a(f"  %to = mul i64 %b, {tstride}")
    a("  %tb = getelementptr i8, ptr %tab, i64 %to")
    for g in range(8):
        a(f"  %p{g} = fmul {V} %E{g}, %INV")
        a(f"  %rd{g} = call {V} @llvm.roundeven.v16f32({V} %p{g})")
        a(f"  %q{g} = fptosi {V} %rd{g} to <16 x i32>")
        a(f"  %lo{g} = trunc <16 x i32> %q{g} to <16 x i8>")
        a(f"  %tp{g} = getelementptr i8, ptr %tb, i64 {16 * g}")
        a(f"  store <16 x i8> %lo{g}, ptr %tp{g}, align 1")
        if bits == 16:
            a(f"  %qs{g} = ashr <16 x i32> %q{g}, {splat('i32', 16, 8)}")
            a(f"  %hb{g} = trunc <16 x i32> %qs{g} to <16 x i8>")
            a(f"  %tq{g} = getelementptr i8, ptr %tb, i64 {128 + 16 * g}")
            a(f"  store <16 x i8> %hb{g}, ptr %tq{g}, align 1")
    a(f"  %z0 = fmul float %xs, {flt(-0.5)}")
    a(f"  %z1 = fmul float %xs, {flt(7.5)}")
    a("  %c0 = insertelement <4 x float> poison, float %sc, i32 0")
    a("  %c1 = insertelement <4 x float> %c0, float %z0, i32 1")
    a("  %c2 = insertelement <4 x float> %c1, float %z1, i32 2")
    a("  %c3 = insertelement <4 x float> %c2, float %xs, i32 3")
    a("  %bo = mul i64 %b, 4")
    a("  %bp = getelementptr float, ptr %bc, i64 %bo")
    a("  store <4 x float> %c3, ptr %bp, align 4")
    a("  %b.next = add i64 %b, 1")
    a("  %done = icmp eq i64 %b.next, %nb")
    a("  br i1 %done, label %exit, label %loop")
    a("exit:")
    a("  ret void")
    a("}")
    return L


def _matvec_ir(spec: _Isa, name: str, tile: int, bits: int, has_min: bool, prefetch: int) -> list[str]:
    vw = spec.vw
    nl = vw // 4  # rows (int32 / float lanes) per vector
    nv = tile * 4 // vw  # vectors per (block, group pair)
    assert tile % 16 == 0 and nv >= 1
    V8, V16, V32, VF = f"<{vw} x i8>", f"<{vw // 2} x i16>", f"<{nl} x i32>", f"<{nl} x float>"
    tstride = 128 if bits == 8 else 256
    W = vec("i8", list(_W) * nl)
    c15 = splat("i8", vw, 15)
    c4 = splat("i8", vw, 4)
    L = []
    a = L.append
    ro = "ptr noalias nocapture readonly"
    a(
        f"define void @{name}({ro} %codes, {ro} %dm, {ro} %tab, {ro} %bc, "
        "ptr noalias nocapture %y, i64 %nb, i64 %t0, i64 %t1) #0 {"
    )
    a("entry:")
    a("  %e1 = icmp sge i64 %t0, %t1")
    a("  %e2 = icmp sle i64 %nb, 0")
    a("  %skip = or i1 %e1, %e2")
    a("  br i1 %skip, label %exit, label %tile")
    a("tile:")
    a("  %t = phi i64 [%t0, %entry], [%t.next, %tile.end]")
    a("  %tb0 = mul i64 %t, %nb")
    a("  br label %blk")
    a("blk:")
    a("  %b = phi i64 [0, %tile], [%b.next, %blk]")
    for v in range(nv):
        a(f"  %yacc{v} = phi {VF} [zeroinitializer, %tile], [%ynew{v}, %blk]")
    a("  %tbk = add i64 %tb0, %b")  # (t * nb + b)
    a(f"  %co = mul i64 %tbk, {16 * tile}")
    a("  %cb = getelementptr i8, ptr %codes, i64 %co")
    a(f"  %so = mul i64 %tbk, {tile * (2 if has_min else 1)}")
    a("  %db = getelementptr i16, ptr %dm, i64 %so")
    if prefetch:  # software prefetch `prefetch` (tile, block) steps ahead, both streams
        dm_bytes = 2 * tile * (2 if has_min else 1)
        for base, nbytes, nm in (("%cb", 16 * tile, "c"), ("%db", dm_bytes, "d")):
            for k in range(0, nbytes, 64):
                a(f"  %pf{nm}{k} = getelementptr i8, ptr {base}, i64 {prefetch * nbytes + k}")
                emit_prefetch(a, f"%pf{nm}{k}")
    if has_min:
        a(f"  %mb = getelementptr i16, ptr %db, i64 {tile}")
    a(f"  %to = mul i64 %b, {tstride}")
    a("  %tb = getelementptr i8, ptr %tab, i64 %to")
    bmask = mask([i % 16 for i in range(vw)])
    for g in range(8):
        for part, off in (("L", 0), ("H", 128)) if bits == 16 else (("L", 0),):
            a(f"  %tp{part}{g} = getelementptr i8, ptr %tb, i64 {off + 16 * g}")
            a(f"  %t16{part}{g} = load <16 x i8>, ptr %tp{part}{g}, align 1, !invariant.load !0")
            if vw == 16:
                a(f"  %T{part}{g} = or <16 x i8> %t16{part}{g}, zeroinitializer")
            else:
                a(f"  %T{part}{g} = shufflevector <16 x i8> %t16{part}{g}, <16 x i8> poison, {bmask}")
    a("  %bo = mul i64 %b, 4")
    a("  %bcp = getelementptr float, ptr %bc, i64 %bo")
    a("  %s = load float, ptr %bcp, align 4")
    a(f"  %zp = getelementptr float, ptr %bcp, i64 {2 if has_min else 1}")
    a("  %z = load float, ptr %zp, align 4")
    a(f"  %si = insertelement {VF} poison, float %s, i32 0")
    a(f"  %S = shufflevector {VF} %si, {VF} poison, <{nl} x i32> zeroinitializer")
    a(f"  %zi = insertelement {VF} poison, float %z, i32 0")
    a(f"  %Z = shufflevector {VF} %zi, {VF} poison, <{nl} x i32> zeroinitializer")
    if has_min:
        a("  %xsp = getelementptr float, ptr %bcp, i64 3")
        a("  %xs = load float, ptr %xsp, align 4")
        a(f"  %xsi = insertelement {VF} poison, float %xs, i32 0")
        a(f"  %XS = shufflevector {VF} %xsi, {VF} poison, <{nl} x i32> zeroinitializer")

    def shuf(tab, idx, out):
        a(f"  {out} = call {V8} {spec.shuffle}({V8} {tab}, {V8} {idx})")

    def accumulate(acc, r, signed, out):
        """acc (or None) + the plane-weighted 4-byte sums of lookup vector r -> out."""
        if spec.combine == "vnni":  # vpdpbusd: u8 x s8, 4 neighbours into one i32
            u, s_ = (W, r) if signed else (r, W)
            a(
                f"  {out} = call {V32} @llvm.x86.avx512.vpdpbusd.512("
                f"{V32} {acc or 'zeroinitializer'}, {V8} {u}, {V8} {s_})"
            )
        elif spec.combine == "dot":  # sdot / udot
            op = "sdot" if signed else "udot"
            a(
                f"  {out} = call {V32} @llvm.aarch64.neon.{op}.v4i32.v16i8("
                f"{V32} {acc or 'zeroinitializer'}, {V8} {r}, {V8} {W})"
            )
        else:  # vpmaddubsw into i16 pairs (no overflow in a block)
            mad = "@llvm.x86.avx512.pmaddubs.w.512" if vw == 64 else "@llvm.x86.avx2.pmadd.ub.sw"
            u, s_ = (W, r) if signed else (r, W)
            tgt = out if acc is None else out + "m"
            a(f"  {tgt} = call {V16} {mad}({V8} {u}, {V8} {s_})")
            if acc is not None:
                a(f"  {out} = add {V16} {acc}, {tgt}")
        return out

    for v in range(nv):
        # A: low table bytes (16-bit, unsigned) or low-nibble lookups (8-bit); B: the rest
        acc = {"A": None, "B": None}
        for gp in range(4):
            n = f"{v}_{gp}"
            a(f"  %cp{n} = getelementptr i8, ptr %cb, i64 {gp * 4 * tile + v * vw}")
            a(f"  %c{n} = load {V8}, ptr %cp{n}, align 1")
            a(f"  %lo{n} = and {V8} %c{n}, {c15}")
            a(f"  %hi{n} = lshr {V8} %c{n}, {c4}")
            shuf(f"%TL{gp}", f"%lo{n}", f"%rlL{n}")
            shuf(f"%TL{gp + 4}", f"%hi{n}", f"%rhL{n}")
            if bits == 8:
                second = "A" if spec.combine == "maddubs" else "B"  # 2 short chains
                terms = [("A", f"%rlL{n}", True), (second, f"%rhL{n}", True)]
            else:
                shuf(f"%TH{gp}", f"%lo{n}", f"%rlH{n}")
                shuf(f"%TH{gp + 4}", f"%hi{n}", f"%rhH{n}")
                terms = [
                    ("A", f"%rlL{n}", False),
                    ("A", f"%rhL{n}", False),
                    ("B", f"%rlH{n}", True),
                    ("B", f"%rhH{n}", True),
                ]
            for k, (which, r, signed) in enumerate(terms):
                acc[which] = accumulate(acc[which], r, signed, f"%acc{which}{n}_{k}")
        accA, accB = acc["A"], acc["B"]
        # the block's exact integer I for this vector of rows
        if spec.combine == "maddubs":
            madd = "@llvm.x86.avx512.pmaddw.d.512" if vw == 64 else "@llvm.x86.avx2.pmadd.wd"
            a(f"  %iA{v} = call {V32} {madd}({V16} {accA}, {V16} {splat('i16', vw // 2, 1)})")
            if bits == 8:
                a(f"  %I{v} = or {V32} %iA{v}, zeroinitializer")
            else:
                a(f"  %iB{v} = call {V32} {madd}({V16} {accB}, {V16} {splat('i16', vw // 2, 256)})")
                a(f"  %I{v} = add {V32} %iA{v}, %iB{v}")
        elif bits == 8:
            a(f"  %I{v} = add {V32} {accA}, {accB}")
        else:
            a(f"  %iB{v} = shl {V32} {accB}, {splat('i32', nl, 8)}")
            a(f"  %I{v} = add {V32} {accA}, %iB{v}")
        a(f"  %f{v} = sitofp {V32} %I{v} to {VF}")
        a(f"  %u{v} = call {VF} @llvm.fmuladd.v{nl}f32({VF} %f{v}, {VF} %S, {VF} %Z)")
        a(f"  %dp{v} = getelementptr i16, ptr %db, i64 {v * nl}")
        a(f"  %dh{v} = load <{nl} x half>, ptr %dp{v}, align 2")
        a(f"  %d{v} = fpext <{nl} x half> %dh{v} to {VF}")
        fma = f"call {VF} @llvm.fmuladd.v{nl}f32"
        if has_min:
            a(f"  %y1_{v} = {fma}({VF} %u{v}, {VF} %d{v}, {VF} %yacc{v})")
            a(f"  %mp{v} = getelementptr i16, ptr %mb, i64 {v * nl}")
            a(f"  %mh{v} = load <{nl} x half>, ptr %mp{v}, align 2")
            a(f"  %m{v} = fpext <{nl} x half> %mh{v} to {VF}")
            a(f"  %ynew{v} = {fma}({VF} %m{v}, {VF} %XS, {VF} %y1_{v})")
        else:
            a(f"  %ynew{v} = {fma}({VF} %u{v}, {VF} %d{v}, {VF} %yacc{v})")
    emit_tile_end(a, "b", "%nb", "blk", tile, nv, nl)
    return L


def kernel_ir(
    isa: str,
    *,
    tile: int = 64,
    table_bits: int = 16,
    prefetch: int = DEFAULT_PREFETCH,
    cpu: str = "",
    features: str = "",
) -> str:
    """The IR module text for one ISA: ``tmac_tables``, ``tmac_q4_0`` and ``tmac_q4_1``."""
    if isa not in _ISA_SPECS:
        raise ValueError(f"unknown isa {isa!r}")
    if table_bits not in (8, 16):
        raise ValueError("table_bits must be 8 or 16")
    spec = _ISA_SPECS[isa]
    nl = spec.vw // 4
    L = list(spec.decls)
    L += [
        "declare <16 x float> @llvm.fabs.v16f32(<16 x float>)",
        "declare <16 x float> @llvm.maxnum.v16f32(<16 x float>, <16 x float>)",
        "declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)",
        "declare float @llvm.vector.reduce.fmax.v16f32(<16 x float>)",
        "declare <16 x float> @llvm.roundeven.v16f32(<16 x float>)",
        f"declare <{nl} x float> @llvm.fmuladd.v{nl}f32(<{nl} x float>, <{nl} x float>, <{nl} x float>)",
    ]
    L += _tables_ir(table_bits)
    L += _matvec_ir(spec, "tmac_q4_0", tile, table_bits, False, prefetch)
    L += _matvec_ir(spec, "tmac_q4_1", tile, table_bits, True, prefetch)
    return finish_module(L, cpu, features)


@dataclass
class NativeKernels:
    """Addresses of one compiled module's functions. ``engine`` keeps the machine code alive."""

    isa: str
    tile: int
    table_bits: int
    tables: int
    q4_0: int
    q4_1: int
    engine: object
    compile_s: float


def native_kernels(isa: str, tile: int = 64, table_bits: int = 16, prefetch: int = DEFAULT_PREFETCH) -> NativeKernels:
    """Compile (once per process and argument set) the T-MAC module for ``isa`` on this host."""
    if isa not in host_isas() or isa in ("portable", "neon"):
        raise ValueError(f"isa {isa!r} cannot be compiled for execution on this host")

    def build():
        spec = resolve_isa(isa)
        ee, owners, secs = jit(
            lambda cpu, feat: kernel_ir(
                spec, tile=tile, table_bits=table_bits, prefetch=prefetch, cpu=cpu, features=feat
            ),
            isa,
        )
        addr = ee.get_function_address
        k = NativeKernels(isa, tile, table_bits, addr("tmac_tables"), addr("tmac_q4_0"), addr("tmac_q4_1"), ee, secs)
        k._owners = owners  # keep every owner of the code alive with the engine
        return k

    return once(("tmac", isa, tile, table_bits, prefetch), build)


def kernel_asm(isa: str, tile: int = 64, table_bits: int = 16, prefetch: int = DEFAULT_PREFETCH) -> str:
    """The host assembly of an x86 module (for inspection; compiles, runs nothing)."""
    spec = resolve_isa(isa)
    return host_asm(
        lambda cpu, feat: kernel_ir(spec, tile=tile, table_bits=table_bits, prefetch=prefetch, cpu=cpu, features=feat),
        isa,
    )


def compile_object(
    isa: str = "neon",
    triple: str = "aarch64-unknown-linux-gnu",
    *,
    cpu: str = "generic",
    features: str = "+neon,+dotprod",
    tile: int = 64,
    table_bits: int = 16,
    asm: bool = False,
) -> bytes | str:
    """Cross-compile the module for ``triple`` to an ELF object (or assembly text); nothing runs."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    mod = llvm.parse_assembly(kernel_ir(isa, tile=tile, table_bits=table_bits, cpu=cpu, features=features))
    mod.triple = triple
    mod.verify()
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3, reloc="pic")
    mod.data_layout = str(tm.target_data)
    optimize(mod, tm)
    return tm.emit_assembly(mod) if asm else tm.emit_object(mod)
