"""The activation format every K-quant kernel reads, and its two quantizers (LLVM IR and numba).

``quantize_x_alloc(x, fq=0) -> (xq, xd, xp)`` (numba; ``fq`` from ``kquant.quant_address``: the
vectorized IR routine ``kq_quant``, 0: the numba ``quantize_x_nb``, bit-identical),
``act_buffers(nsb, kp)`` (the three arrays in one 64-byte aligned block: act loads that split
cache lines slow the compute-bound k-row kernels), ``quant_ir()`` (the IR function, put into a
module by ``kquant_ir.kernel_ir(..., what="quant")``).

Format (one for all types; ``kp`` = k rounded up to even, the padding row is 0)
-------------------------------------------------------------------------------
(No kernel reads the padding row any more: it served the act-row pairs that the Q4_K/Q5_K row
pairs replaced. Dropping it is a layout change of its own, not yet made.)
Per 32-block of a row: ``amax = max |x|``, ``dx = amax / 127``, ``xq = rint(x * (127 /
amax))`` (half to even, |xq| <= 127; amax = 0 gives dx = 0, xq = 0; x must be finite).
``xq`` int8 [nsb, kp, 256]: the codes in the lane order of ``kquant_layout`` (the signed,
    memory operand of ``vpdpbusd``/``vpmaddubsw``; the weights' unsigned codes are the register
    one).
``xd`` float32 [4, nsb, kp, 16], per lane L: ``xd[0]``: dx of its 32-block (L % 8);
    ``xd[1]``: ``float32(dx * xsum16)`` (xsum16: its 16-group's sum of xq; Q2_K's mins);
    ``xd[2]``, ``xd[3]``: int32 bit patterns (``xd.view(np.int32)``) of ``-4 * xsum16`` and
    ``-32 * xsum16``, where the integer dot products of Q3_K and of Q6_K start.
``xp`` float32 [nsb, kp, 16]: lane L: ``float32(dx * xsum32)`` of 32-block L % 8 (xsum32: the
    block's sum of xq; Q4_K/Q5_K's mins).
Super-block-major, so a kernel reads the k rows of one super-block as one contiguous span.

IR: ``void kq_quant(ptr x, ptr xq, ptr xd, ptr xp, i64 nsb, i64 k, i64 kp, i64 x_stride)``
(C ABI, called from numba through a runtime address).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from .codegen import check_types, emit_call, flt, mask, splat, transpose_reduce
from .kquant_layout import LANE_GROUP
from .pack import absmax_scale

__all__ = ["quant_ir", "quantize_x_nb", "act_buffers", "quantize_x_alloc"]


def quant_ir() -> list[str]:
    """``@kq_quant(x, xq, xd, xp, nsb, k, kp, xs)``: the act format of x float32 [k, xs >= n_in]
    (row stride ``xs`` floats), the same float32 operations as ``quantize_x_nb`` (x finite)."""
    L = []
    a = L.append
    V, VI = "<16 x float>", "<16 x i32>"
    a(
        "define void @kq_quant(ptr noalias nocapture readonly %x, ptr noalias nocapture %xq, "
        "ptr noalias nocapture %xd, ptr noalias nocapture %xp, i64 %nsb, i64 %k, i64 %kp, "
        "i64 %xs) #0 {"
    )
    a("entry:")
    a("  %e1 = icmp sle i64 %nsb, 0")
    a("  %e2 = icmp sle i64 %kp, 0")
    a("  %skip = or i1 %e1, %e2")
    a("  %xsn = mul i64 %nsb, %kp")  # xd[1] starts nsb kp 16 floats after xd[0]
    a("  %xso = mul i64 %xsn, 16")
    a("  br i1 %skip, label %exit, label %row")
    a("row:")
    a("  %i = phi i64 [0, %entry], [%i.next, %row.end]")
    a("  %real = icmp slt i64 %i, %k")
    a("  %xro = mul i64 %i, %xs")
    a("  %xr = getelementptr float, ptr %x, i64 %xro")
    a("  br label %sb")
    a("sb:")
    a("  %s = phi i64 [0, %row], [%s.next, %sb.end]")
    a("  %sk = mul i64 %s, %kp")
    a("  %sko = add i64 %sk, %i")
    a("  %qo = mul i64 %sko, 256")
    a("  %qp = getelementptr i8, ptr %xq, i64 %qo")
    a("  %dxo = mul i64 %sko, 16")
    a("  %dxp = getelementptr float, ptr %xd, i64 %dxo")
    a("  %pp = getelementptr float, ptr %xp, i64 %dxo")
    a("  br i1 %real, label %q, label %pad")
    a("q:")
    a("  %xbo = mul i64 %s, 256")
    a("  %xb = getelementptr float, ptr %xr, i64 %xbo")
    dw = []
    for b in range(8):
        for h in range(2):
            a(f"  %xp{b}{h} = getelementptr float, ptr %xb, i64 {32 * b + 16 * h}")
            a(f"  %v{b}{h} = load {V}, ptr %xp{b}{h}, align 4")
            a(f"  %a{b}{h} = call {V} @llvm.fabs.v16f32({V} %v{b}{h})")
        a(f"  %m{b} = call nnan {V} @llvm.maxnum.v16f32({V} %a{b}0, {V} %a{b}1)")
    # the 8 blocks' amax, dx and 1/dx at once (a transposed reduction, vector divisions)
    am = transpose_reduce(
        a,
        [f"%m{b}" for b in range(8)],
        "float",
        "am",
        lambda x, y, o: f"  {o} = call nnan {V} @llvm.maxnum.v16f32({V} {x}, {V} {y})",
    )
    a(f"  %am8a = shufflevector {V} {am}, {V} poison, {mask(range(0, 16, 2))}")
    a(f"  %am8b = shufflevector {V} {am}, {V} poison, {mask(range(1, 16, 2))}")
    a("  %AM = call nnan <8 x float> @llvm.maxnum.v8f32(<8 x float> %am8a, <8 x float> %am8b)")
    a("  %POS = fcmp ogt <8 x float> %AM, zeroinitializer")
    a(f"  %INVd = fdiv <8 x float> {splat('float', 8, flt(127.0))}, %AM")
    a("  %INV8 = select <8 x i1> %POS, <8 x float> %INVd, <8 x float> zeroinitializer")
    a(f"  %DXd = fdiv <8 x float> %AM, {splat('float', 8, flt(127.0))}")
    a("  %DX8 = select <8 x i1> %POS, <8 x float> %DXd, <8 x float> zeroinitializer")
    for b in range(8):
        a(f"  %INV{b} = shufflevector <8 x float> %INV8, <8 x float> poison, {mask([b] * 16)}")
        for h in range(2):
            a(f"  %p{b}{h} = fmul {V} %v{b}{h}, %INV{b}")
            a(f"  %r{b}{h} = call {V} @llvm.roundeven.v16f32({V} %p{b}{h})")
            a(f"  %qi{b}{h} = fptosi {V} %r{b}{h} to {VI}")
            a(f"  %qb{b}{h} = trunc {VI} %qi{b}{h} to <16 x i8>")
        a(f"  %nat{b} = shufflevector <16 x i8> %qb{b}0, <16 x i8> %qb{b}1, {mask(range(32))}")
        a(f"  %natd{b} = bitcast <32 x i8> %nat{b} to <8 x i32>")
        dw.append(f"%natd{b}")
    # per 16-group (lane g = 2 b + h) sums of xq, then per 32-block; dx and dx * xsum
    xs = transpose_reduce(
        a, [f"%qi{g // 2}{g % 2}" for g in range(16)], "i32", "xs", lambda x, y, o: f"  {o} = add {VI} {x}, {y}"
    )
    # in the lane order: lane L holds 16-group LANE_GROUP[L] (of 32-block L % 8)
    a(f"  %DX16 = shufflevector <8 x float> %DX8, <8 x float> poison, {mask([L % 8 for L in range(16)])}")
    a(f"  store {V} %DX16, ptr %dxp, align 4")
    a(f"  %XSL = shufflevector {VI} {xs}, {VI} poison, {mask(LANE_GROUP.tolist())}")
    a(f"  %XS16f = sitofp {VI} %XSL to {V}")
    a(f"  %DS16 = fmul {V} %DX16, %XS16f")
    a("  %xdsp = getelementptr float, ptr %dxp, i64 %xso")
    a(f"  store {V} %DS16, ptr %xdsp, align 4")
    a(f"  %XS4n = mul {VI} %XSL, {splat('i32', 16, -4)}")
    a("  %xdip = getelementptr float, ptr %xdsp, i64 %xso")
    a(f"  store {VI} %XS4n, ptr %xdip, align 4")
    a(f"  %XS32n = mul {VI} %XSL, {splat('i32', 16, -32)}")
    a("  %xdip3 = getelementptr float, ptr %xdip, i64 %xso")
    a(f"  store {VI} %XS32n, ptr %xdip3, align 4")
    a(f"  %xs8a = shufflevector {VI} {xs}, {VI} poison, {mask(range(0, 16, 2))}")
    a(f"  %xs8b = shufflevector {VI} {xs}, {VI} poison, {mask(range(1, 16, 2))}")
    a("  %XS8 = add <8 x i32> %xs8a, %xs8b")
    a("  %XS8f = sitofp <8 x i32> %XS8 to <8 x float>")
    a("  %DXS8 = fmul <8 x float> %DX8, %XS8f")
    # xp: lane L holds float32(dx xsum32) of block L % 8
    a(f"  %XPS = shufflevector <8 x float> %DXS8, <8 x float> poison, {mask([L % 8 for L in range(16)])}")
    a(f"  store {V} %XPS, ptr %pp, align 4")
    # natural dword 4 g + v (g: 16-group, v: 0..3) -> position 16 v + L (g = LANE_GROUP[L])
    a(f"  %n01 = shufflevector <8 x i32> {dw[0]}, <8 x i32> {dw[1]}, {mask(range(16))}")
    a(f"  %n23 = shufflevector <8 x i32> {dw[2]}, <8 x i32> {dw[3]}, {mask(range(16))}")
    a(f"  %n45 = shufflevector <8 x i32> {dw[4]}, <8 x i32> {dw[5]}, {mask(range(16))}")
    a(f"  %n67 = shufflevector <8 x i32> {dw[6]}, <8 x i32> {dw[7]}, {mask(range(16))}")
    a(f"  %n03 = shufflevector {VI} %n01, {VI} %n23, {mask(range(32))}")
    a(f"  %n47 = shufflevector {VI} %n45, {VI} %n67, {mask(range(32))}")
    a(f"  %n07 = shufflevector <32 x i32> %n03, <32 x i32> %n47, {mask(range(64))}")
    for v in range(4):
        a(f"  %o{v} = shufflevector <64 x i32> %n07, <64 x i32> poison, {mask([4 * int(g) + v for g in LANE_GROUP])}")
        a(f"  %op{v} = getelementptr i8, ptr %qp, i64 {64 * v}")
        a(f"  store {VI} %o{v}, ptr %op{v}, align 4")
    a("  br label %sb.end")
    a("pad:")  # the padding row: x = 0
    for v in range(4):
        a(f"  %pq{v} = getelementptr i8, ptr %qp, i64 {64 * v}")
        a(f"  store <64 x i8> zeroinitializer, ptr %pq{v}, align 1")
    a(f"  store {V} zeroinitializer, ptr %dxp, align 4")
    a("  %dxp16 = getelementptr float, ptr %dxp, i64 %xso")
    a(f"  store {V} zeroinitializer, ptr %dxp16, align 4")
    a("  %dxp32 = getelementptr float, ptr %dxp16, i64 %xso")
    a(f"  store {V} zeroinitializer, ptr %dxp32, align 4")
    a("  %dxp48 = getelementptr float, ptr %dxp32, i64 %xso")
    a(f"  store {V} zeroinitializer, ptr %dxp48, align 4")
    a(f"  store {V} zeroinitializer, ptr %pp, align 4")
    a("  br label %sb.end")
    a("sb.end:")
    a("  %s.next = add i64 %s, 1")
    a("  %sdone = icmp eq i64 %s.next, %nsb")
    a("  br i1 %sdone, label %row.end, label %sb")
    a("row.end:")
    a("  %i.next = add i64 %i, 1")
    a("  %idone = icmp eq i64 %i.next, %kp")
    a("  br i1 %idone, label %exit, label %row")
    a("exit:")
    a("  ret void")
    a("}")
    return L


@intrinsic
def _call_quant(typingctx, fq, x, xq, xd, xp, nsb, k, kp, xs):
    """kq_quant(x, xq, xd, xp, nsb, k, kp, xs) through a runtime address."""
    args = (fq, x, xq, xd, xp, nsb, k, kp, xs)
    check_types(args, (None, types.float32, types.int8, types.float32, types.float32, None, None, None, None))
    return types.void(*args), emit_call


@njit(cache=True, nogil=True)
def quantize_x_nb(x, xq, xd, xp):
    """x float32 [k, n_in] -> the act format (module docstring): xq int8 [nsb, kp, 256],
    xd float32 [4, nsb, kp, 16], xp float32 [nsb, kp, 16]; kp = k rounded up to even (the
    padding row is x = 0)."""
    k, n = x.shape
    nsb = n // 256
    kp = xq.shape[1]
    xi = xd.view(np.int32)
    q127 = np.float32(127.0)
    for s in range(nsb):
        for i in range(kp):
            for b in range(8):
                o = 256 * s + 32 * b
                inv, dx = absmax_scale(x[i], o, 32, q127) if i < k else (np.float32(0.0), np.float32(0.0))
                xs = 0
                for h in range(2):
                    g = 8 * h + b  # lane of 16-group 2 b + h
                    xs16 = 0
                    for v in range(4):
                        for t in range(4):
                            val = 0
                            if i < k:
                                val = np.int32(np.rint(x[i, o + 16 * h + 4 * v + t] * inv))
                            xs16 += val
                            xq[s, i, 64 * v + 4 * g + t] = np.int8(val)
                    xs += xs16
                    xd[0, s, i, g] = dx
                    xd[1, s, i, g] = dx * np.float32(xs16)
                    xi[2, s, i, g] = -4 * xs16
                    xi[3, s, i, g] = -32 * xs16
                for h in range(2):
                    xp[s, i, 8 * h + b] = dx * np.float32(xs)


@njit(cache=True, nogil=True)
def act_buffers(nsb, kp):
    """Empty (xq, xd, xp) for kp (even) act rows of nsb super-blocks, in one 64-byte aligned
    block (act loads that split cache lines slowed the compute-bound k-row kernels)."""
    nq, nd, npp = nsb * kp * 256, nsb * kp * 256, nsb * kp * 64  # bytes of xq, xd, xp
    buf = np.empty(nq + nd + npp + 64, np.uint8)
    o = (-buf.ctypes.data) % 64
    xq = buf[o : o + nq].view(np.int8).reshape((nsb, kp, 256))
    xd = buf[o + nq : o + nq + nd].view(np.float32).reshape((4, nsb, kp, 16))
    xp = buf[o + nq + nd : o + nq + nd + npp].view(np.float32).reshape((nsb, kp, 16))
    return xq, xd, xp


@njit(cache=True, nogil=True)
def quantize_x_alloc(x, fq=0):
    """(xq, xd, xp) = the act format of x float32 [k, n_in] (n_in a multiple of 256, x
    C-contiguous); ``fq`` from ``quant_address`` (the vectorized IR routine; 0: numba)."""
    k, n = x.shape
    nsb = n // 256
    kp = k + (k & 1)
    xq, xd, xp = act_buffers(nsb, kp)
    if fq != 0:
        _call_quant(fq, x, xq, xd, xp, nsb, k, kp, n)
    else:
        quantize_x_nb(x, xq, xd, xp)
    return xq, xd, xp
