"""Decode matvec for F16 and BF16 weights: ``y = W @ x`` with float32 activations, the weights
read in the file's 2 bytes and widened in registers (``vcvtph2ps`` for F16; a 16-bit shift for
BF16), float32 FMAs.

API
---
``pack_f16(raw2d, qtype) -> PackedF16``: a view of the file's rows as uint16 [n_out, n_in] (no
    copy: the layout is the file's, so nothing is written to the pack cache).
``f16_matvec(x, p, out=None, threads=1, kernel=None) -> float32 [n_out]``
``f16_matvec_reference(x, p)``: the float64 truth of the same float32 weights and activations.
``fn_address(qtype, kernel=None)`` (0: portable); ``rows_nb(fn, w, x, y, qtype, r0, r1)``
    (numba entry: rows r0 <= r < r1 of y; no checks).

The IR (``f16_rows`` / ``bf16_rows(ptr w, ptr x, ptr y, i64 n, i64 r0, i64 r1)``): per row,
4 accumulators of one vector each over runs of 4 vectors (64 weights on avx512, 32 on avx2),
then a tree sum of the lanes and the last ``n % (4 vw)`` weights one by one; software prefetch
``DEFAULT_PREFETCH`` bytes ahead. ``portable``: numba, 32 float32 lanes per row.

Accuracy: kernel vs the float64 truth: float32 accumulation only (each lane sums n / 64 or n /
32 products; tests assert 1e-5 of sum |w x|).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import codegen
from .codegen import check_types, emit_call
from .pack import half_to_f32, tree_sum

__all__ = [
    "F16",
    "BF16",
    "PackedF16",
    "pack_f16",
    "f16_matvec",
    "f16_matvec_reference",
    "fn_address",
    "rows_nb",
    "kernel_ir",
]

F16, BF16 = 1, 30  # GGMLQuantizationType values
DEFAULT_PREFETCH = 4096
_NAMES = {F16: "f16_rows", BF16: "bf16_rows"}
_SPECS = {"avx512": 64, "avx512-novnni": 64, "avx2": 32}  # vector bytes of float32 lanes


@dataclass
class PackedF16:
    """An F16 / BF16 matrix [n_out, n_in]: the file's rows, viewed as uint16."""

    w: np.ndarray
    n_out: int
    n_in: int
    qtype: int

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def dequantize(self) -> np.ndarray:
        if self.qtype == F16:
            return self.w.view(np.float16).astype(np.float32)
        return (self.w.astype(np.uint32) << np.uint32(16)).view(np.float32)


def pack_f16(raw2d, qtype: int) -> PackedF16:
    """GGUF F16 / BF16 rows (uint8 [n_out, 2 n_in] or any 2-byte view) -> PackedF16 (a view)."""
    qtype = int(qtype)
    if qtype not in _NAMES:
        raise ValueError(f"pack_f16 handles F16 (1) and BF16 (30), not type {qtype}")
    raw = np.asarray(raw2d)
    if raw.ndim != 2 or raw.shape[1] * raw.itemsize % 2 or raw.shape[1] == 0 or not raw.flags.c_contiguous:
        raise ValueError(f"pack_f16: expected C-contiguous [n_out, 2 n_in] bytes, got {raw.dtype} {raw.shape}")
    w = raw.view(np.uint16)
    return PackedF16(w, w.shape[0], w.shape[1], qtype)


# ---------------------------------------------------------------------------------------------
# IR


def _rows_ir(vw: int, qtype: int, prefetch: int) -> list[str]:
    nl = vw // 4  # float lanes per vector
    VH, VI, VF = f"<{nl} x i16>", f"<{nl} x i32>", f"<{nl} x float>"
    ch = 4 * nl  # weights per inner iteration
    fma = f"@llvm.fma.v{nl}f32"
    L = []
    a = L.append

    def widen(src, out, vec=True):
        if qtype == F16:
            ht = f"<{nl} x half>" if vec else "half"
            a(f"  {out}.h = bitcast {VH if vec else 'i16'} {src} to {ht}")
            a(f"  {out} = fpext {ht} {out}.h to {VF if vec else 'float'}")
        else:
            it, ft = (VI, VF) if vec else ("i32", "float")
            a(f"  {out}.z = zext {VH if vec else 'i16'} {src} to {it}")
            sh = codegen.splat("i32", nl, 16) if vec else "16"
            a(f"  {out}.s = shl {it} {out}.z, {sh}")
            a(f"  {out} = bitcast {it} {out}.s to {ft}")

    ro = "ptr noalias nocapture readonly"
    a(f"define void @{_NAMES[qtype]}({ro} %w, {ro} %x, ptr noalias nocapture %y, i64 %n, i64 %r0, i64 %r1) #0 {{")
    a("entry:")
    a("  %e1 = icmp sge i64 %r0, %r1")
    a("  %e2 = icmp sle i64 %n, 0")
    a("  %skip = or i1 %e1, %e2")
    a("  br i1 %skip, label %exit, label %pre")
    a("pre:")
    a(f"  %nv = udiv i64 %n, {ch}")
    a(f"  %nt = mul i64 %nv, {ch}")
    a("  %hasv = icmp ugt i64 %nv, 0")
    a("  br label %row")
    a("row:")
    a("  %r = phi i64 [%r0, %pre], [%r.next, %rowend]")
    a("  %ro = mul i64 %r, %n")
    a("  %wr = getelementptr i16, ptr %w, i64 %ro")
    a("  br i1 %hasv, label %inner, label %after")
    a("inner:")
    a("  %k = phi i64 [0, %row], [%k.next, %inner]")
    for j in range(4):
        a(f"  %acc{j} = phi {VF} [zeroinitializer, %row], [%accn{j}, %inner]")
    a(f"  %ko = mul i64 %k, {ch}")
    if prefetch:
        a("  %pfb = getelementptr i16, ptr %wr, i64 %ko")
        a(f"  %pfp = getelementptr i8, ptr %pfb, i64 {prefetch}")
        codegen.emit_prefetch(a, "%pfp")
    for j in range(4):
        a(f"  %o{j} = add i64 %ko, {j * nl}")
        a(f"  %wp{j} = getelementptr i16, ptr %wr, i64 %o{j}")
        a(f"  %wv{j} = load {VH}, ptr %wp{j}, align 2")
        widen(f"%wv{j}", f"%wf{j}")
        a(f"  %xp{j} = getelementptr float, ptr %x, i64 %o{j}")
        a(f"  %xv{j} = load {VF}, ptr %xp{j}, align 4, !invariant.load !0")
        a(f"  %accn{j} = call {VF} {fma}({VF} %wf{j}, {VF} %xv{j}, {VF} %acc{j})")
    a("  %k.next = add i64 %k, 1")
    a("  %kdone = icmp eq i64 %k.next, %nv")
    a("  br i1 %kdone, label %after, label %inner")
    a("after:")
    for j in range(4):
        a(f"  %af{j} = phi {VF} [zeroinitializer, %row], [%accn{j}, %inner]")
    a(f"  %s01 = fadd {VF} %af0, %af1")
    a(f"  %s23 = fadd {VF} %af2, %af3")
    a(f"  %sv = fadd {VF} %s01, %s23")
    codegen.emit_hsum(a, "%sv", nl, "%hs")
    a("  %hastail = icmp ult i64 %nt, %n")
    a("  br i1 %hastail, label %tail, label %rowend")
    a("tail:")  # the last n % ch weights, one by one
    a("  %i = phi i64 [%nt, %after], [%i.next, %tail]")
    a("  %ts = phi float [%hs, %after], [%ts.next, %tail]")
    a("  %twp = getelementptr i16, ptr %wr, i64 %i")
    a("  %tw = load i16, ptr %twp, align 2")
    widen("%tw", "%twf", vec=False)
    a("  %txp = getelementptr float, ptr %x, i64 %i")
    a("  %tx = load float, ptr %txp, align 4")
    a("  %ts.next = call float @llvm.fma.f32(float %twf, float %tx, float %ts)")
    a("  %i.next = add i64 %i, 1")
    a("  %tdone = icmp eq i64 %i.next, %n")
    a("  br i1 %tdone, label %rowend, label %tail")
    a("rowend:")
    a("  %yv = phi float [%hs, %after], [%ts.next, %tail]")
    codegen.emit_row_end(a, "%yv")
    return L


def kernel_ir(isa: str, prefetch: int = DEFAULT_PREFETCH, cpu: str = "", features: str = "") -> str:
    """The IR module text of ``f16_rows`` and ``bf16_rows`` for an x86 path."""
    vw = _SPECS[isa]
    nl = vw // 4
    L = [
        f"declare <{nl} x float> @llvm.fma.v{nl}f32(<{nl} x float>, <{nl} x float>, <{nl} x float>)",
        "declare float @llvm.fma.f32(float, float, float)",
    ]
    for qt in _NAMES:
        L += _rows_ir(vw, qt, prefetch)
    return codegen.finish_module(L, cpu, features)


def _compile(isa: str, prefetch: int):
    if isa not in codegen.host_isas() or isa not in _SPECS:
        raise ValueError(f"isa {isa!r} cannot be compiled for execution on this host")

    def build():
        spec = codegen.resolve_isa(isa)
        ee, owners, secs = codegen.jit(lambda cpu, feat: kernel_ir(spec, prefetch, cpu, feat), isa)
        return {qt: ee.get_function_address(nm) for qt, nm in _NAMES.items()}, owners, secs

    return codegen.once(("f16", isa, prefetch), build)


def kernel_asm(isa: str = "avx512", prefetch: int = DEFAULT_PREFETCH) -> str:
    """The host assembly of the module (for inspection; runs nothing)."""
    spec = codegen.resolve_isa(isa)
    return codegen.host_asm(lambda cpu, feat: kernel_ir(spec, prefetch, cpu, feat), isa)


_choice: dict = {}


def fn_address(qtype: int, kernel: str | None = None) -> int:
    """Address of ``f16_rows`` / ``bf16_rows`` for a kernel path (0: portable)."""
    key = (qtype, kernel)
    r = _choice.get(key)
    if r is None:
        if qtype not in _NAMES:
            raise ValueError(f"qtype {qtype} is not F16 (1) or BF16 (30)")
        name = codegen.select_kernel(kernel)
        r = _compile(name, DEFAULT_PREFETCH)[0][qtype] if name in _SPECS else 0
        _choice[key] = r
    return r


# ---------------------------------------------------------------------------------------------
# numba


@intrinsic
def _call_rows(typingctx, fn, w, x, y, n, r0, r1):
    """<f16|bf16>_rows(w, x, y, n, r0, r1) through a runtime address."""
    check_types((fn, w, x, y, n, r0, r1), (None, types.uint16, types.float32, types.float32, None, None, None))
    return types.void(fn, w, x, y, n, r0, r1), emit_call


@njit(cache=True, nogil=True)
def _rows_portable(w, x, y, qtype, r0, r1):
    """Plain numba: 32 float32 lanes per row, a tree sum (float32 rounding differs only)."""
    n = x.size
    acc = np.empty(32, np.float32)
    wf = np.empty(n, np.float32)
    for r in range(r0, r1):
        if qtype == 1:
            for j in range(n):
                wf[j] = half_to_f32(w[r, j])
        else:
            wf[:] = (w[r].astype(np.uint32) << np.uint32(16)).view(np.float32)
        acc[:] = 0
        for j0 in range(0, n - n % 32, 32):
            for j in range(32):
                acc[j] += wf[j0 + j] * x[j0 + j]
        for j in range(n - n % 32, n):
            acc[j % 32] += wf[j] * x[j]
        y[r] = tree_sum(acc)


@njit(cache=True, nogil=True, inline="always")
def rows_nb(fn, w, x, y, qtype, r0, r1):
    """y[r] = W[r] . x for r0 <= r < r1 (w uint16 [n_out, n], x float32 [n], C-contiguous)."""
    if fn != 0:
        _call_rows(fn, w, x, y, x.size, r0, r1)
    else:
        _rows_portable(w, x, y, qtype, r0, r1)


@njit(cache=True, nogil=True)
def _mv_serial(fn, w, x, y, qtype):
    rows_nb(fn, w, x, y, qtype, 0, w.shape[0])


@njit(cache=True, nogil=True, parallel=True)
def _mv_parallel(fn, w, x, y, qtype, nthreads):
    n = w.shape[0]
    nch = min(nthreads, n)
    for c in prange(nch):
        rows_nb(fn, w, x, y, qtype, c * n // nch, (c + 1) * n // nch)


_F32 = np.dtype(np.float32)


def f16_matvec(
    x, p: PackedF16, out: np.ndarray | None = None, threads: int = 1, kernel: str | None = None
) -> np.ndarray:
    """y = W @ x (float32 [n_out]); ``out`` may be given."""
    fn = _choice.get((p.qtype, kernel))
    if fn is None:
        fn = fn_address(p.qtype, kernel)
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 1 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.size != p.n_in:
        raise ValueError(f"f16_matvec: x has {x.size} values, the matrix {p.n_in} columns")
    if out is None:
        out = np.empty(p.n_out, np.float32)
    elif out.shape != (p.n_out,) or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError("f16_matvec: out must be a C-contiguous float32 [n_out] array")
    if threads > 1:
        _mv_parallel(fn, p.w, x, out, p.qtype, threads)
    else:
        _mv_serial(fn, p.w, x, out, p.qtype)
    return out


def f16_matvec_reference(x, p: PackedF16):
    """(y float64 [n_out], sum_j |w_j x_j| per row): the exact products of the same float32
    values, summed in float64."""
    w = p.dequantize().astype(np.float64)
    x = np.asarray(x, np.float32).astype(np.float64)
    return w @ x, np.abs(w) @ np.abs(x)
