"""LLVM IR micro-kernels for the 4-bit table-lookup (T-MAC) matvec, emitted as text and compiled
with llvmlite (MCJIT for this host; an object file for aarch64).

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
    on both streams (+20-30 % when the matrix streams from DRAM, measured).

Per 64 bytes of codes (16 rows x 4 planes x 2 nibbles): 1 load, 1 and, 1 shift (LLVM emits
``vgf2p8affineqb``), 2 ``vpshufb`` (4 with 16-bit tables), and the plane weighting 1, 2, 4, 8
plus the widening in ONE instruction per lookup: ``vpdpbusd`` (AVX-512 VNNI: the 4 plane bytes
of a row are 4 neighbouring bytes, i.e. one int32 lane), ``vpmaddubsw`` (+ one ``vpmaddwd`` per
block: AVX2 and AVX-512 without VNNI), ``sdot``/``udot`` (NEON). The int16 table variant adds
2 shuffles and 2 dot products per 64 bytes (a ~1.5x longer inner loop when compute bound, free
when DRAM bound). The avx512 ``tmac_q4_1`` block loop (64 rows x 32 weights) is ~140 (8-bit) /
~210 (16-bit) instructions with no spills; avx2 spills a little (16 ymm registers).

ISAs: ``avx512`` (avx512bw; vpdpbusd when the host has avx512vnni, else the pmaddubsw form),
``avx512-novnni`` (forces the pmaddubsw form: lets a VNNI host test it), ``avx2`` (compiled for
``x86-64-v3``: exactly the code an AVX2-only machine runs, no EVEX), ``neon`` (``compile_object``
to an aarch64 ELF object with ``+neon,+dotprod``; never executed here). A native module is
compiled once per process and argument set with MCJIT (measured 100-130 ms avx512, 180-260 ms
avx2; the aarch64 object 440 ms) and cached, engine included, for the life of the process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from dataclasses import dataclass

import llvmlite
import llvmlite.binding as llvm

__all__ = [
    "ISAS",
    "host_isas",
    "best_isa",
    "select_kernel",
    "kernel_ir",
    "native_kernels",
    "kernel_asm",
    "compile_object",
    "NativeKernels",
]

ISAS = ("avx512", "avx512-novnni", "avx2", "neon")
DEFAULT_PREFETCH = 8  # software prefetch distance in (tile, block) steps: 8 KiB ahead of the codes
_W = (1, 2, 4, 8)  # plane weights, repeated per 4-byte lane

_lock = threading.Lock()
_initialized = False
_cache: dict = {}


def _init() -> None:
    global _initialized
    if not _initialized:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        _initialized = True


def _host_features() -> dict:
    _init()
    try:
        return dict(llvm.get_host_cpu_features())
    except RuntimeError:  # some hosts cannot report features
        return {}


def host_isas() -> list[str]:
    """The kernel paths this host can execute, best first (``portable`` always last)."""
    f = _host_features()
    triple = llvm.get_default_triple()
    out = []
    if triple.startswith(("x86_64", "amd64")):
        if f.get("avx512f") and f.get("avx512bw"):
            out += ["avx512", "avx512-novnni"]
        if f.get("avx2") and f.get("fma"):
            out.append("avx2")
    elif triple.startswith(("aarch64", "arm64")) and f.get("neon", True) and f.get("dotprod"):
        out.append("neon")  # never executed in this project's tests
    out.append("portable")
    return out


def best_isa() -> str:
    """The fastest path for this host (``neon`` is opt-in only, see ``select_kernel``)."""
    for isa in host_isas():
        if isa != "neon":
            return isa
    return "portable"


def select_kernel(kernel: str | None = None) -> str:
    """Resolve a kernel name: an explicit name, else ``$EMBER_KERNEL``, else ``best_isa()``."""
    name = kernel or os.environ.get("EMBER_KERNEL", "").strip().lower() or best_isa()
    if name not in host_isas():
        raise ValueError(f"kernel {name!r} is not available on this host "
                         f"(available: {', '.join(host_isas())})")
    return name


# ---------------------------------------------------------------------------------------------
# IR text


@dataclass(frozen=True)
class _Isa:
    name: str
    vw: int          # bytes per vector register
    combine: str     # vnni | maddubs | dot
    shuffle: str     # intrinsic name
    decls: tuple


_ISA_SPECS = {
    "avx512": _Isa("avx512", 64, "vnni", "@llvm.x86.avx512.pshuf.b.512", (
        "declare <64 x i8> @llvm.x86.avx512.pshuf.b.512(<64 x i8>, <64 x i8>)",
        "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)")),
    "avx512-novnni": _Isa("avx512-novnni", 64, "maddubs", "@llvm.x86.avx512.pshuf.b.512", (
        "declare <64 x i8> @llvm.x86.avx512.pshuf.b.512(<64 x i8>, <64 x i8>)",
        "declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8>, <64 x i8>)",
        "declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)")),
    "avx2": _Isa("avx2", 32, "maddubs", "@llvm.x86.avx2.pshuf.b", (
        "declare <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8>, <32 x i8>)",
        "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)",
        "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)")),
    "neon": _Isa("neon", 16, "dot", "@llvm.aarch64.neon.tbl1.v16i8", (
        "declare <16 x i8> @llvm.aarch64.neon.tbl1.v16i8(<16 x i8>, <16 x i8>)",
        "declare <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)",
        "declare <4 x i32> @llvm.aarch64.neon.udot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)")),
}


def _splat(elem: str, n: int, val) -> str:
    return "<" + ", ".join([f"{elem} {val}"] * n) + ">"


def _vec(elem: str, vals) -> str:
    return "<" + ", ".join(f"{elem} {v}" for v in vals) + ">"


def _mask(idx) -> str:
    idx = list(idx)
    return f"<{len(idx)} x i32> <" + ", ".join(f"i32 {i}" for i in idx) + ">"


def _flt(v: float) -> str:
    """An LLVM float literal (a double that is exactly representable as float)."""
    import struct
    return f"0x{struct.unpack('<Q', struct.pack('<d', float(v)))[0]:016X}"


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
    S = [_vec("float", [_flt(0.5 if (i >> j) & 1 else -0.5) for i in range(16)]) for j in range(4)]
    V = "<16 x float>"
    a("define void @tmac_tables(ptr noalias nocapture readonly %x, ptr noalias nocapture %tab, "
      "ptr noalias nocapture %bc, i64 %nb) #0 {")
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
            a(f"  %e{g}_{j} = call {V} @llvm.fma.v16f32({V} %X{g}_{j}, {V} {S[j]}, "
              f"{V} %e{g}_{j - 1})")
        a(f"  %E{g} = fadd {V} %e{g}_3, {_splat('float', 16, '-0.0')}")  # (a no-op, a name)
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
    a(f"  %inv0 = fdiv float {_flt(qmax)}, %amax")
    a("  %inv = select i1 %pos, float %inv0, float 0.0")
    a(f"  %sc0 = fdiv float %amax, {_flt(qmax)}")
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
            a(f"  %qs{g} = ashr <16 x i32> %q{g}, {_splat('i32', 16, 8)}")
            a(f"  %hb{g} = trunc <16 x i32> %qs{g} to <16 x i8>")
            a(f"  %tq{g} = getelementptr i8, ptr %tb, i64 {128 + 16 * g}")
            a(f"  store <16 x i8> %hb{g}, ptr %tq{g}, align 1")
    a(f"  %z0 = fmul float %xs, {_flt(-0.5)}")
    a(f"  %z1 = fmul float %xs, {_flt(7.5)}")
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


def _matvec_ir(spec: _Isa, name: str, tile: int, bits: int, has_min: bool,
               prefetch: int) -> list[str]:
    vw = spec.vw
    nl = vw // 4                      # rows (int32 / float lanes) per vector
    nv = tile * 4 // vw               # vectors per (block, group pair)
    assert tile % 16 == 0 and nv >= 1
    V8, V16, V32, VF = f"<{vw} x i8>", f"<{vw // 2} x i16>", f"<{nl} x i32>", f"<{nl} x float>"
    tstride = 128 if bits == 8 else 256
    W = _vec("i8", list(_W) * nl)
    c15 = _splat("i8", vw, 15)
    c4 = _splat("i8", vw, 4)
    L = []
    a = L.append
    ro = "ptr noalias nocapture readonly"
    a(f"define void @{name}({ro} %codes, {ro} %dm, {ro} %tab, {ro} %bc, "
      "ptr noalias nocapture %y, i64 %nb, i64 %t0, i64 %t1) #0 {")
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
    a("  %tbk = add i64 %tb0, %b")                     # (t * nb + b)
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
    bmask = _mask([i % 16 for i in range(vw)])
    for g in range(8):
        for part, off in (("L", 0), ("H", 128)) if bits == 16 else (("L", 0),):
            a(f"  %tp{part}{g} = getelementptr i8, ptr %tb, i64 {off + 16 * g}")
            a(f"  %t16{part}{g} = load <16 x i8>, ptr %tp{part}{g}, align 1, !invariant.load !0")
            if vw == 16:
                a(f"  %T{part}{g} = or <16 x i8> %t16{part}{g}, zeroinitializer")
            else:
                a(f"  %T{part}{g} = shufflevector <16 x i8> %t16{part}{g}, <16 x i8> poison, "
                  f"{bmask}")
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
        if spec.combine == "vnni":      # vpdpbusd: u8 x s8, 4 neighbours into one i32
            u, s_ = (W, r) if signed else (r, W)
            a(f"  {out} = call {V32} @llvm.x86.avx512.vpdpbusd.512("
              f"{V32} {acc or 'zeroinitializer'}, {V8} {u}, {V8} {s_})")
        elif spec.combine == "dot":     # sdot / udot
            op = "sdot" if signed else "udot"
            a(f"  {out} = call {V32} @llvm.aarch64.neon.{op}.v4i32.v16i8("
              f"{V32} {acc or 'zeroinitializer'}, {V8} {r}, {V8} {W})")
        else:                           # vpmaddubsw into i16 pairs (no overflow in a block)
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
                second = "A" if spec.combine == "maddubs" else "B"   # 2 short chains
                terms = [("A", f"%rlL{n}", True), (second, f"%rhL{n}", True)]
            else:
                shuf(f"%TH{gp}", f"%lo{n}", f"%rlH{n}")
                shuf(f"%TH{gp + 4}", f"%hi{n}", f"%rhH{n}")
                terms = [("A", f"%rlL{n}", False), ("A", f"%rhL{n}", False),
                         ("B", f"%rlH{n}", True), ("B", f"%rhH{n}", True)]
            for k, (which, r, signed) in enumerate(terms):
                acc[which] = accumulate(acc[which], r, signed, f"%acc{which}{n}_{k}")
        accA, accB = acc["A"], acc["B"]
        # the block's exact integer I for this vector of rows
        if spec.combine == "maddubs":
            madd = "@llvm.x86.avx512.pmaddw.d.512" if vw == 64 else "@llvm.x86.avx2.pmadd.wd"
            a(f"  %iA{v} = call {V32} {madd}({V16} {accA}, {V16} {_splat('i16', vw // 2, 1)})")
            if bits == 8:
                a(f"  %I{v} = or {V32} %iA{v}, zeroinitializer")
            else:
                a(f"  %iB{v} = call {V32} {madd}({V16} {accB}, "
                  f"{V16} {_splat('i16', vw // 2, 256)})")
                a(f"  %I{v} = add {V32} %iA{v}, %iB{v}")
        elif bits == 8:
            a(f"  %I{v} = add {V32} {accA}, {accB}")
        else:
            a(f"  %iB{v} = shl {V32} {accB}, {_splat('i32', nl, 8)}")
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


def emit_tile_end(a, var: str, limit: str, loop: str, tile: int, nv: int, nl: int) -> None:
    """The ends of an inner loop over ``%<var>`` (to ``limit``, block ``%<loop>``) and of the
    tile loop around it over ``%t`` (``%t0`` to ``%t1``, block ``%tile``): the ``nv`` row sums
    ``%ynew<v>`` (<nl x float>) into ``y[(t - t0) * tile + v * nl]``, then the next tile or the
    function's return."""
    VF = f"<{nl} x float>"
    a(f"  %{var}.next = add i64 %{var}, 1")
    a(f"  %{var}done = icmp eq i64 %{var}.next, {limit}")
    a(f"  br i1 %{var}done, label %tile.end, label %{loop}")
    a("tile.end:")
    a("  %tr = sub i64 %t, %t0")
    a(f"  %yo = mul i64 %tr, {tile}")
    a("  %yb = getelementptr float, ptr %y, i64 %yo")
    for v in range(nv):
        a(f"  %yp{v} = getelementptr float, ptr %yb, i64 {v * nl}")
        a(f"  store {VF} %ynew{v}, ptr %yp{v}, align 4")
    a("  %t.next = add i64 %t, 1")
    a("  %tdone = icmp eq i64 %t.next, %t1")
    a("  br i1 %tdone, label %exit, label %tile")
    a("exit:")
    a("  ret void")
    a("}")


def kernel_ir(isa: str, *, tile: int = 64, table_bits: int = 16, prefetch: int = DEFAULT_PREFETCH,
              cpu: str = "", features: str = "") -> str:
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
        f"declare <{nl} x float> @llvm.fmuladd.v{nl}f32(<{nl} x float>, <{nl} x float>, "
        f"<{nl} x float>)",
    ]
    L += _tables_ir(table_bits)
    L += _matvec_ir(spec, "tmac_q4_0", tile, table_bits, False, prefetch)
    L += _matvec_ir(spec, "tmac_q4_1", tile, table_bits, True, prefetch)
    return finish_module(L, cpu, features)


def emit_hsum(a, src: str, n: int, out: str) -> None:
    """Emit `out` = the sum of the float vector `src` (<n x float>, n a power of two), as a tree."""
    prev = src
    while n > 1:
        h = n // 2
        a(f"  {out}.{h}a = shufflevector <{n} x float> {prev}, <{n} x float> poison, {_mask(range(h))}")
        a(f"  {out}.{h}b = shufflevector <{n} x float> {prev}, <{n} x float> poison, {_mask(range(h, n))}")
        a(f"  {out}.{h} = fadd <{h} x float> {out}.{h}a, {out}.{h}b")
        prev, n = f"{out}.{h}", h
    a(f"  {out} = extractelement <1 x float> {prev}, i32 0")


def emit_row_end(a, val: str) -> None:
    """The end of a row loop over ``%r`` (to ``%r1``, from block ``%row``): ``y[r] = val``, the
    next row or the function's return."""
    a("  %yp = getelementptr float, ptr %y, i64 %r")
    a(f"  store float {val}, ptr %yp, align 4")
    a("  %r.next = add i64 %r, 1")
    a("  %rdone = icmp eq i64 %r.next, %r1")
    a("  br i1 %rdone, label %exit, label %row")
    a("exit:")
    a("  ret void")
    a("}")


def emit_prefetch(a, ptr: str) -> None:
    """Emit a software prefetch (for reading) of the cache line at `ptr`; finish_module defines
    the call for this host (``prefetch_locality``)."""
    a(f"  call void @ember.prefetch(ptr {ptr})")


def is_zen() -> bool:
    """Whether this host is an AMD Zen core (its LLVM cpu name)."""
    return llvm.get_host_cpu_name().startswith("znver")


@functools.cache
def l1d_bytes(default: int = 48 << 10, root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """This host's L1 data cache per core, in bytes (Linux sysfs; `default` where it cannot be
    read: the 48 KB of the Intel hosts the kernels were first tuned on)."""
    try:
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            with open(os.path.join(d, "level")) as f1, open(os.path.join(d, "type")) as f2:
                if f1.read().strip() != "1" or f2.read().strip() != "Data":
                    continue
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip().upper()
            shift = {"K": 10, "M": 20}.get(size[-1:], 0)
            n = int(size.rstrip("KM")) << shift
            return n if n > 0 else default
    except (OSError, ValueError):
        pass
    return default


def prefetch_locality() -> int:
    """The llvm.prefetch locality of the kernels' weight streams on this host: 3 (``prefetcht0``,
    into L1) except on AMD Zen, 2 (``prefetcht1``, into L2), whatever ISA a module is compiled
    for. On an AMD EPYC Zen 4 (znver4, 32 KB L1D) t0 pushed the tables and activations the
    kernels re-read out of L1. Intel hosts (48 KB L1D) keep t0, measured there against no
    prefetch (+20-30 %), not against t1. Zen 4, the one-token step, two copies of the model in
    one process alternating (median of 40 each), t0 and the Intel distances -> t1 and
    prefetch_bytes, 1 / 2 threads, ms: SmolLM2 9.24 -> 5.96 / 6.68 -> 5.29, Qwen2.5-0.5B 24.0 ->
    23.5 / 17.9 -> 15.7, Qwen2.5-1.5B 55.3 -> 47.7 / 42.8 -> 37.4."""
    return 2 if is_zen() else 3


def prefetch_bytes(default: int) -> int:
    """A module's prefetch distance on this host: its `default` (tuned with t0 on Intel hosts),
    at least 8 KiB on AMD Zen, where the lines go to the 1 MB L2 (prefetch_locality). Zen 4,
    with t1, 1 thread: the one-token step as above, the modules' defaults -> 8 KiB, Qwen2.5-0.5B
    (Q8_0, Q5_0/Q5_1) 25.3 -> 22.8 ms, Qwen2.5-1.5B (K-quants) 54.5 -> 47.2; from DRAM, its 198
    K-quant matrices in a row 2048 B ahead 63.1 ms, 8192 55.5, 16384 58.5, 32768 56.9. (The
    T-MAC kernel's 8 steps are 8 KiB already: 4 and 16 steps measured slower there.)"""
    return max(default, 8192) if default and is_zen() else default


def finish_module(lines: list[str], cpu: str | None, features: str | None) -> str:
    """IR text of `lines` plus the function attributes #0 (nounwind, target cpu and features)
    and, where `lines` use it, ``@ember.prefetch`` (emit_prefetch)."""
    attrs = ["nounwind"]
    if cpu:
        attrs.append(f'"target-cpu"="{cpu}"')
    if features:
        attrs.append(f'"target-features"="{features}"')
    extra = []
    if any("@ember.prefetch(" in ln for ln in lines):
        extra += ["declare void @llvm.prefetch.p0(ptr, i32, i32, i32)",
                  "define internal void @ember.prefetch(ptr %p) alwaysinline nounwind {",
                  f"  call void @llvm.prefetch.p0(ptr %p, i32 0, i32 {prefetch_locality()}, i32 1)",
                  "  ret void", "}"]
    return "\n".join(lines + extra + ["attributes #0 = { " + " ".join(attrs) + " }", "!0 = !{}"]) + "\n"


def _optimize(mod, tm) -> None:
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)


def _target_for(isa: str) -> tuple[str, str]:
    """(cpu, features) to compile an x86 ISA's module with on this host."""
    if isa == "avx2":
        return "x86-64-v3", ""  # honest AVX2 code: no EVEX, no AVX-512 registers
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


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


def resolve_isa(isa: str) -> str:
    """The IR variant to emit for `isa` on this host (AVX-512 without VNNI uses vpmaddubsw)."""
    return "avx512-novnni" if isa == "avx512" and not _host_features().get("avx512vnni") else isa


def _parsed(make_ir, isa: str):
    """(module, target machine) for the host, from make_ir(cpu, features) -> IR text, optimized."""
    _init()
    cpu, feat = _target_for(isa)
    mod = llvm.parse_assembly(make_ir(cpu, feat))
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=feat, opt=3)
    _optimize(mod, tm)
    return mod, tm


_OBJ_MAGIC = b"EMBEROBJ1"


def _object_path(key: str):
    from ..home import cache_dir

    return cache_dir("jit") / f"{key}.o"


def _read_object(key: str) -> bytes | None:
    """A cached object file, only if its recorded sha256 matches (a bad one is deleted)."""
    path = _object_path(key)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    n = len(_OBJ_MAGIC)
    if data[:n] == _OBJ_MAGIC and hashlib.sha256(data[n + 32:]).digest() == data[n:n + 32]:
        return data[n + 32:]
    path.unlink(missing_ok=True)
    return None


def _write_object(key: str, obj: bytes) -> None:
    from ..home import write_atomic

    try:
        write_atomic(_object_path(key), _OBJ_MAGIC + hashlib.sha256(obj).digest() + obj,
                     fsync=False)
    except OSError:
        pass  # a read-only cache only costs the compile time next run


def jit(make_ir, isa: str):
    """MCJIT-compile make_ir(cpu, features) for this host: (engine, owners to keep alive, seconds).

    The machine code is cached on disk (``cache_dir("jit")``), keyed by the sha256 of the IR, the
    target and the LLVM version, and checked against its own sha256 before LLVM loads it; a hit
    skips optimization and code generation (~80 + 75 ms for the T-MAC module).
    """
    t0 = time.perf_counter()
    _init()
    cpu, feat = _target_for(isa)
    text = make_ir(cpu, feat)
    key = hashlib.sha256("|".join((text, cpu, feat, llvm.__name__, str(llvm.llvm_version_info),
                                   llvmlite.__version__)).encode()).hexdigest()[:40]
    cached = _read_object(key)
    mod = llvm.parse_assembly(text)
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=feat, opt=3)
    if cached is None:
        _optimize(mod, tm)
    ee = llvm.create_mcjit_compiler(mod, tm)
    ee.set_object_cache(lambda m, obj: _write_object(key, obj) if cached is None else None,
                        lambda m: cached)
    ee.finalize_object()
    return ee, (ee, mod, tm), time.perf_counter() - t0


def host_asm(make_ir, isa: str) -> str:
    """The host assembly of make_ir(cpu, features) (for inspection; runs nothing)."""
    mod, tm = _parsed(make_ir, isa)
    return tm.emit_assembly(mod)


def once(key, build):
    """``build()``, run once per process and ``key`` (thread-safe) and kept for the life of the
    process: numba code holds raw addresses into what it compiled."""
    k = _cache.get(key)
    if k is None:
        with _lock:
            k = _cache.get(key)
            if k is None:
                k = _cache[key] = build()
    return k


def native_kernels(isa: str, tile: int = 64, table_bits: int = 16,
                   prefetch: int = DEFAULT_PREFETCH) -> NativeKernels:
    """Compile (once per process and argument set) the T-MAC module for ``isa`` on this host."""
    if isa not in host_isas() or isa in ("portable", "neon"):
        raise ValueError(f"isa {isa!r} cannot be compiled for execution on this host")

    def build():
        spec = resolve_isa(isa)
        ee, owners, secs = jit(lambda cpu, feat: kernel_ir(spec, tile=tile, table_bits=table_bits,
                                                          prefetch=prefetch, cpu=cpu, features=feat), isa)
        addr = ee.get_function_address
        k = NativeKernels(isa, tile, table_bits, addr("tmac_tables"), addr("tmac_q4_0"),
                          addr("tmac_q4_1"), ee, secs)
        k._owners = owners  # keep every owner of the code alive with the engine
        return k

    return once(("tmac", isa, tile, table_bits, prefetch), build)


def kernel_asm(isa: str, tile: int = 64, table_bits: int = 16,
               prefetch: int = DEFAULT_PREFETCH) -> str:
    """The host assembly of an x86 module (for inspection; compiles, runs nothing)."""
    spec = resolve_isa(isa)
    return host_asm(lambda cpu, feat: kernel_ir(spec, tile=tile, table_bits=table_bits, prefetch=prefetch,
                                                cpu=cpu, features=feat), isa)


def compile_object(isa: str = "neon", triple: str = "aarch64-unknown-linux-gnu", *,
                   cpu: str = "generic", features: str = "+neon,+dotprod", tile: int = 64,
                   table_bits: int = 16, asm: bool = False) -> bytes | str:
    """Cross-compile the module for ``triple`` to an ELF object (or assembly text); nothing runs."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    mod = llvm.parse_assembly(kernel_ir(isa, tile=tile, table_bits=table_bits, cpu=cpu,
                                        features=features))
    mod.triple = triple
    mod.verify()
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3,
                                                               reloc="pic")
    mod.data_layout = str(tm.target_data)
    _optimize(mod, tm)
    return tm.emit_assembly(mod) if asm else tm.emit_object(mod)
