"""One part of a kv group's decode attention over a half (f16) KV cache as an LLVM IR kernel:
scores, online softmax and the weighted sum of values in registers, for AVX-512 and AVX2.

``part_address(heads, d, dv)`` (0 where no kernel applies: no IR path on this host, or d / dv
not a multiple of the vector) is called by `attention.attend_part` through `call_part`:

    attn_part(ptr q, ptr k, ptr v, i64 n, ptr o, ptr ml)

q [heads, d] float32 (already scaled), k [n, d] and v [n, dv] the halves of keys lo..lo+n-1,
n >= 1; o [heads, dv] = sum_j e_hj v_j, ml [heads, 2] = (m_h, sum_j e_hj), e_hj = exp(q_h . k_j
- m_h), m_h the largest score: `attend_part`'s contract.

Keys are read in blocks of one vector's lanes (16 on AVX-512, 8 on AVX2): each key's products
with a head's query are a vector whose lanes are summed across the block's keys by one fold
(n - 1 shuffle pairs for n keys, `codegen.fold`), not a horizontal sum per key (what the numba
loops do), so a head's scores of a block come out as one vector, keys across the lanes. The
online softmax runs on that vector (the block's max, an exp of the vector, the running sums
rescaled), and each value row is widened once and added into every head's output, which stays
in registers over all n keys. The last block's keys past n are read as key n - 1 and weigh 0.
Measured history: docs/kernels.md ("Attention over a long context").
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic

from ...lut_kernels import codegen
from ...lut_kernels.codegen import check_types, emit_call, flt, mask, splat

_LANES = {"avx512": 16, "avx512-novnni": 16, "avx2": 8}  # float32 lanes of a vector
_REGS = {16: 32, 8: 16}  # vector registers
EMPTY = float(np.float32(-3.0e38))  # attention.EMPTY: the running max before any key


def heads_per_call(g: int, dv: int, lanes: int) -> int:
    """How many of a group's heads one call takes: their outputs (dv / lanes vectors each) in
    at most 3/8 of the registers, so values, scores and sums fit beside them."""
    return max(1, min(g, (_REGS[lanes] * 3 // 8) // max(1, dv // lanes)))


def _exp(a, x: str, out: str, nl: int) -> None:
    """out = exp(x) for a <nl x float> (x clipped to +-87): `vmath.exp_into`'s Cephes expf."""
    VF, VI = f"<{nl} x float>", f"<{nl} x i32>"

    def c(v):
        return splat("float", nl, flt(float(np.float32(v))))

    a(f"  {out}.lo = call {VF} @llvm.maxnum.v{nl}f32({VF} {x}, {VF} {c(-87.0)})")
    a(f"  {out}.v = call {VF} @llvm.minnum.v{nl}f32({VF} {out}.lo, {VF} {c(87.0)})")
    a(f"  {out}.t = call {VF} @llvm.fma.v{nl}f32({VF} {out}.v, {VF} {c(1.44269504088896341)}, {VF} {c(0.5)})")
    a(f"  {out}.n = call {VF} @llvm.floor.v{nl}f32({VF} {out}.t)")
    a(f"  {out}.r1 = call {VF} @llvm.fma.v{nl}f32({VF} {out}.n, {VF} {c(-0.693359375)}, {VF} {out}.v)")
    a(f"  {out}.r = call {VF} @llvm.fma.v{nl}f32({VF} {out}.n, {VF} {c(2.12194440e-4)}, {VF} {out}.r1)")
    prev = c(1.9875691500e-4)
    for i, k in enumerate((1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)):
        a(f"  {out}.p{i} = call {VF} @llvm.fma.v{nl}f32({VF} {prev}, {VF} {out}.r, {VF} {c(k)})")
        prev = f"{out}.p{i}"
    a(f"  {out}.rr = fmul {VF} {out}.r, {out}.r")
    a(f"  {out}.q = fadd {VF} {out}.r, {c(1.0)}")
    a(f"  {out}.e = call {VF} @llvm.fma.v{nl}f32({VF} {prev}, {VF} {out}.rr, {VF} {out}.q)")
    a(f"  {out}.ni = fptosi {VF} {out}.n to {VI}")
    a(f"  {out}.sh = shl {VI} {out}.ni, {splat('i32', nl, 23)}")
    a(f"  {out}.eb = bitcast {VF} {out}.e to {VI}")
    a(f"  {out}.b = add {VI} {out}.eb, {out}.sh")
    a(f"  {out} = bitcast {VI} {out}.b to {VF}")


def _hreduce(a, x: str, out: str, nl: int, op: str) -> None:
    """out (float) = the `op` (fadd / maxnum) of x's nl lanes, as a tree."""
    prev, n = x, nl
    while n > 1:
        h = n // 2
        a(f"  {out}.{h}a = shufflevector <{n} x float> {prev}, <{n} x float> poison, {mask(range(h))}")
        a(f"  {out}.{h}b = shufflevector <{n} x float> {prev}, <{n} x float> poison, {mask(range(h, n))}")
        if op == "fadd":
            a(f"  {out}.{h} = fadd <{h} x float> {out}.{h}a, {out}.{h}b")
        else:
            V = f"<{h} x float>"
            a(f"  {out}.{h} = call {V} @llvm.maxnum.v{h}f32({V} {out}.{h}a, {V} {out}.{h}b)")
        prev, n = f"{out}.{h}", h
    a(f"  {out} = extractelement <1 x float> {prev}, i32 0")


def part_ir(hp: int, d: int, dv: int, nl: int) -> list[str]:
    """The IR of ``attn_part`` for hp heads of d (keys) / dv (values) dimensions, nl lanes."""
    VF, VH = f"<{nl} x float>", f"<{nl} x i16>"
    fma = f"@llvm.fma.v{nl}f32"
    nc, ncv = d // nl, dv // nl
    L: list[str] = []
    a = L.append
    ro, rw = "ptr noalias nocapture readonly", "ptr noalias nocapture"
    a(f"define void @attn_part({ro} %q, {ro} %k, {ro} %v, i64 %n, {rw} %o, {rw} %ml) #0 {{")
    a("entry:")
    a(f"  %nb1 = add i64 %n, {nl - 1}")
    a(f"  %nb = udiv i64 %nb1, {nl}")
    a("  %last = sub i64 %n, 1")
    VL = f"<{nl} x i64>"
    a(f"  %nv = insertelement {VL} poison, i64 %n, i32 0")
    a(f"  %nsplat = shufflevector {VL} %nv, {VL} poison, {mask([0] * nl)}")
    for h in range(hp):
        for c in range(nc):
            a(f"  %qp{h}_{c} = getelementptr float, ptr %q, i64 {h * d + c * nl}")
            a(f"  %q{h}_{c} = load {VF}, ptr %qp{h}_{c}, align 4")
    a("  br label %blk")
    a("blk:")
    a("  %b = phi i64 [0, %entry], [%b.next, %blk]")
    for h in range(hp):
        a(f"  %m{h} = phi float [{flt(EMPTY)}, %entry], [%mn{h}, %blk]")
        a(f"  %l{h} = phi {VF} [zeroinitializer, %entry], [%ln{h}, %blk]")
        for c in range(ncv):
            a(f"  %o{h}_{c} = phi {VF} [zeroinitializer, %entry], [%on{h}_{c}, %blk]")
    a(f"  %base = mul i64 %b, {nl}")
    # the block's keys: row min(base + j, n - 1), valid lanes base + j < n
    a(f"  %bv = insertelement {VL} poison, i64 %base, i32 0")
    a(f"  %bs = shufflevector {VL} %bv, {VL} poison, {mask([0] * nl)}")
    a(f"  %idx = add {VL} %bs, <{', '.join(f'i64 {j}' for j in range(nl))}>")
    a(f"  %valid = icmp ult {VL} %idx, %nsplat")
    for j in range(nl):
        a(f"  %i{j}.a = add i64 %base, {j}")
        a(f"  %i{j}.c = icmp ult i64 %i{j}.a, %n")
        a(f"  %i{j} = select i1 %i{j}.c, i64 %i{j}.a, i64 %last")
    # scores: per key and head a vector of products, folded across the block's keys
    prods: dict[int, list[str]] = {h: [] for h in range(hp)}
    for j in range(nl):
        a(f"  %ko{j} = mul i64 %i{j}, {d}")
        a(f"  %kr{j} = getelementptr i16, ptr %k, i64 %ko{j}")
        for c in range(nc):
            a(f"  %kp{j}_{c} = getelementptr i16, ptr %kr{j}, i64 {c * nl}")
            a(f"  %kh{j}_{c} = load {VH}, ptr %kp{j}_{c}, align 2")
            a(f"  %kb{j}_{c} = bitcast {VH} %kh{j}_{c} to <{nl} x half>")
            a(f"  %kf{j}_{c} = fpext <{nl} x half> %kb{j}_{c} to {VF}")
        for h in range(hp):
            acc = f"%p{h}_{j}_0"
            a(f"  {acc} = fmul {VF} %kf{j}_0, %q{h}_0")
            for c in range(1, nc):
                nxt = f"%p{h}_{j}_{c}"
                a(f"  {nxt} = call {VF} {fma}({VF} %kf{j}_{c}, {VF} %q{h}_{c}, {VF} {acc})")
                acc = nxt
            prods[h].append(acc)
    for h in range(hp):
        s = codegen.transpose_reduce(
            a, prods[h], "float", f"f{h}_", lambda x, y, o: f"  {o} = fadd {VF} {x}, {y}", lanes=nl
        )
        # lanes past n hold key n - 1's score again: the max is the valid keys'; their weight is 0
        _hreduce(a, s, f"%bm{h}", nl, "max")
        a(f"  %mn{h} = call float @llvm.maxnum.f32(float %m{h}, float %bm{h})")
        a(f"  %mv{h} = insertelement {VF} poison, float %mn{h}, i32 0")
        a(f"  %ms{h} = shufflevector {VF} %mv{h}, {VF} poison, {mask([0] * nl)}")
        a(f"  %z{h} = fsub {VF} {s}, %ms{h}")
        _exp(a, f"%z{h}", f"%ex{h}", nl)
        a(f"  %e{h} = select <{nl} x i1> %valid, {VF} %ex{h}, {VF} zeroinitializer")
        # the running sums' correction exp(m_old - m_new), in every lane
        a(f"  %dv{h} = insertelement {VF} poison, float %m{h}, i32 0")
        a(f"  %ds{h} = shufflevector {VF} %dv{h}, {VF} poison, {mask([0] * nl)}")
        a(f"  %dz{h} = fsub {VF} %ds{h}, %ms{h}")
        _exp(a, f"%dz{h}", f"%cr{h}", nl)
        a(f"  %ln{h} = call {VF} {fma}({VF} %l{h}, {VF} %cr{h}, {VF} %e{h})")
        for c in range(ncv):
            a(f"  %oc{h}_{c} = fmul {VF} %o{h}_{c}, %cr{h}")
    # values: each row widened once, added into every head's output with its weight
    cur = {(h, c): f"%oc{h}_{c}" for h in range(hp) for c in range(ncv)}
    for j in range(nl):
        a(f"  %vo{j} = mul i64 %i{j}, {dv}")
        a(f"  %vr{j} = getelementptr i16, ptr %v, i64 %vo{j}")
        for c in range(ncv):
            a(f"  %vp{j}_{c} = getelementptr i16, ptr %vr{j}, i64 {c * nl}")
            a(f"  %vh{j}_{c} = load {VH}, ptr %vp{j}_{c}, align 2")
            a(f"  %vb{j}_{c} = bitcast {VH} %vh{j}_{c} to <{nl} x half>")
            a(f"  %vf{j}_{c} = fpext <{nl} x half> %vb{j}_{c} to {VF}")
        for h in range(hp):
            a(f"  %w{h}_{j} = shufflevector {VF} %e{h}, {VF} poison, {mask([j] * nl)}")
            for c in range(ncv):
                nxt = f"%a{h}_{c}_{j}"
                a(f"  {nxt} = call {VF} {fma}({VF} %w{h}_{j}, {VF} %vf{j}_{c}, {VF} {cur[h, c]})")
                cur[h, c] = nxt
    for h in range(hp):
        for c in range(ncv):
            a(f"  %on{h}_{c} = fadd {VF} {cur[h, c]}, zeroinitializer")
    a("  %b.next = add i64 %b, 1")
    a("  %bdone = icmp eq i64 %b.next, %nb")
    a("  br i1 %bdone, label %end, label %blk")
    a("end:")
    for h in range(hp):
        for c in range(ncv):
            a(f"  %op{h}_{c} = getelementptr float, ptr %o, i64 {h * dv + c * nl}")
            a(f"  store {VF} %on{h}_{c}, ptr %op{h}_{c}, align 4")
        _hreduce(a, f"%ln{h}", f"%lt{h}", nl, "fadd")
        a(f"  %mlp{h} = getelementptr float, ptr %ml, i64 {2 * h}")
        a(f"  store float %mn{h}, ptr %mlp{h}, align 4")
        a(f"  %mlq{h} = getelementptr float, ptr %ml, i64 {2 * h + 1}")
        a(f"  store float %lt{h}, ptr %mlq{h}, align 4")
    a("  ret void")
    a("}")
    return L


def kernel_ir(hp: int, d: int, dv: int, isa: str, cpu: str = "", features: str = "") -> str:
    """The IR module text of ``attn_part`` for an x86 path."""
    nl = _LANES[isa]
    decl = [f"declare <{nl} x float> @llvm.{f}.v{nl}f32(<{nl} x float>, <{nl} x float>)" for f in ("maxnum", "minnum")]
    decl += [
        f"declare <{nl} x float> @llvm.fma.v{nl}f32(<{nl} x float>, <{nl} x float>, <{nl} x float>)",
        f"declare <{nl} x float> @llvm.floor.v{nl}f32(<{nl} x float>)",
        "declare float @llvm.maxnum.f32(float, float)",
    ]
    h = nl // 2
    while h >= 1:
        decl.append(f"declare <{h} x float> @llvm.maxnum.v{h}f32(<{h} x float>, <{h} x float>)")
        h //= 2
    return codegen.finish_module(decl + part_ir(hp, d, dv, nl), cpu, features)


def lanes(kernel: str | None = None) -> int:
    """The float32 lanes of the kernel path's vectors (0: no IR kernel there)."""
    return _LANES.get(codegen.select_kernel(kernel), 0)


def part_address(heads: int, d: int, dv: int, kernel: str | None = None) -> int:
    """The address of ``attn_part`` for calls of `heads` heads (0: use the numba loops)."""
    name = codegen.select_kernel(kernel)
    nl = _LANES.get(name)
    if nl is None or d % nl or dv % nl or heads < 1:
        return 0
    spec = codegen.resolve_isa(name)

    def build():
        ee, owners, _ = codegen.jit(lambda cpu, feat: kernel_ir(heads, d, dv, spec, cpu, feat), name)
        return ee.get_function_address("attn_part"), owners

    return codegen.once(("attn_part", name, heads, d, dv), build)[0]


@intrinsic
def call_part(typingctx, fn, q, k, v, n, o, ml):
    """attn_part(q, k, v, n, o, ml) through a runtime address."""
    check_types(
        (fn, q, k, v, n, o, ml), (None, types.float32, types.uint16, types.uint16, None, types.float32, types.float32)
    )
    return types.void(fn, q, k, v, n, o, ml), emit_call
