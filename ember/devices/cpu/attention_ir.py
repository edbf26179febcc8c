"""One part of a kv group's decode attention over a half (f16) or 8-bit (q8_0) KV cache as an
LLVM IR kernel: scores, online softmax and the weighted sum of values in registers, for AVX-512.

``part_address(heads, d, dv, kernel, kv)`` (0 where no kernel applies: no AVX-512 on this host,
or d / dv not a multiple of 16) is called by `attention.attend_part` through `call_part`:

    attn_part(ptr q, ptr k, ptr v, i64 n, ptr o, ptr ml)

q [heads, d] float32 (already scaled), k [n, d] and v [n, dv] the rows of keys lo..lo+n-1 as
the cache stores them (halves, or int8 codes followed by their blocks' float32 scales:
`runtime.kv_cache`), n >= 1; o [heads, dv] = sum_j e_hj v_j, ml [heads, 2] = (m_h, sum_j e_hj), e_hj = exp(q_h . k_j
- m_h), m_h the largest score: `attend_part`'s contract.

Keys are read in blocks of one vector's lanes (16): each key's products with a head's query
are a vector, and the block's 16 such vectors are folded into one (`codegen.fold_pair`, as
each pair is ready), not summed horizontally key by key (what the numba loops do), so a head's
scores of a block come out as one vector, keys across the lanes. The online softmax runs on
that vector (the block's max, an exp of the vector; the running sums rescaled only when the
max rose), and each value row is widened once and added into every head's output, which stays
in registers over all n keys. Each block asks for the lines of the keys and values PREFETCH
blocks ahead (the hardware prefetchers left the loop waiting on memory). A last block of fewer
keys is copied to the stack with key n - 1 repeated, its extra lanes weighing 0.
Measured history: docs/kernels.md ("Attention over a long context").
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic

from ...lut_kernels import codegen
from ...lut_kernels.codegen import check_types, emit_call, flt, mask, splat
from ...runtime.kv_cache import KV_TYPES, Q8_BLOCK, row_width

# float32 lanes of a vector. No AVX2 kernel: with 16 registers a group's outputs and queries
# do not stay in them, and the numba loops were faster (Zen 5 compiling for znver3, 4096 keys
# of one SmolLM2 group: 60 us vs 86 us from cache, 103 vs 95 from DRAM)
_LANES = {"avx512": 16, "avx512-novnni": 16}
_REGS = {16: 32}  # vector registers
PREFETCH = 3  # blocks of keys whose lines a block asks for ahead: 2-3 beat 4 and 8 on Zen 5
EMPTY = float(np.float32(-3.0e38))  # attention.EMPTY: the running max before any key


def heads_per_call(g: int, dv: int, lanes: int) -> int:
    """How many of a group's heads one call takes: their outputs (dv / lanes vectors each) in
    at most half the registers (Zen 5, 4096 keys from DRAM: 7 heads of 64 in passes of 4 took
    91 us, of 3 105; 6 heads of 128 in passes of 2 176 us, of 1 or 3 229 / 199)."""
    return max(1, min(g, (_REGS[lanes] // 2) // max(1, dv // lanes)))


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


def row_bytes(kv: str, n: int) -> int:
    """Bytes of a cache row of n values: halves, or int8 codes and a float32 scale a block."""
    return row_width(kv, n) * np.dtype(KV_TYPES[kv]).itemsize


def _widened_row(a, name: str, ptr: str, off: int, nv: int, nl: int, kv: str) -> None:
    """{name}f0 .. {name}f{nv - 1}: the nv vectors of nl values of the row at byte ptr + off,
    widened to float32 (an 8-bit row's codes times their block's scale)."""
    VF = f"<{nl} x float>"
    for c in range(nv):
        if kv == "f16":
            a(f"  {name}p{c} = getelementptr i8, ptr {ptr}, i64 {off + 2 * c * nl}")
            a(f"  {name}h{c} = load <{nl} x i16>, ptr {name}p{c}, align 2")
            a(f"  {name}b{c} = bitcast <{nl} x i16> {name}h{c} to <{nl} x half>")
            a(f"  {name}f{c} = fpext <{nl} x half> {name}b{c} to {VF}")
            continue
        blk = c * nl // Q8_BLOCK
        if c * nl % Q8_BLOCK == 0:
            a(f"  {name}sp{blk} = getelementptr i8, ptr {ptr}, i64 {off + nv * nl + 4 * blk}")
            a(f"  {name}s{blk} = load float, ptr {name}sp{blk}, align 1")
            a(f"  {name}sv{blk} = insertelement {VF} poison, float {name}s{blk}, i32 0")
            a(f"  {name}ss{blk} = shufflevector {VF} {name}sv{blk}, {VF} poison, {mask([0] * nl)}")
        a(f"  {name}p{c} = getelementptr i8, ptr {ptr}, i64 {off + c * nl}")
        a(f"  {name}h{c} = load <{nl} x i8>, ptr {name}p{c}, align 1")
        a(f"  {name}w{c} = sext <{nl} x i8> {name}h{c} to <{nl} x i32>")
        a(f"  {name}c{c} = sitofp <{nl} x i32> {name}w{c} to {VF}")
        a(f"  {name}f{c} = fmul {VF} {name}c{c}, {name}ss{blk}")


def _block(
    a, x: str, pred: str, hp: int, d: int, dv: int, nl: int, kv: str, kp: str, vp: str, valid: str | None, st: dict
) -> dict:
    """Emit one block of nl keys (rows at kp, values at vp; lanes where `valid` is false weigh
    0) on the running state st {"m": [float per head], "l": [vector], "o": [[vectors]]}, in the
    basic block labelled pred (%...); returns the new state's names, computed in the basic
    block %{x}go. x prefixes the block's local names."""
    VF = f"<{nl} x float>"
    fma = f"@llvm.fma.v{nl}f32"
    nc, ncv = d // nl, dv // nl
    # scores: per key and head a vector of products, folded across the block's keys as soon as
    # two of a level are there (`codegen.fold`'s pairs, in its order), so few stay live
    add = lambda u, w, o: f"  {o} = fadd {VF} {u}, {w}"  # noqa: E731
    stack: dict[int, list[tuple[str, int]]] = {h: [] for h in range(hp)}
    for j in range(nl):
        _widened_row(a, f"%{x}k{j}", kp, j * row_bytes(kv, d), nc, nl, kv)
        for h in range(hp):
            acc = f"%{x}p{h}_{j}_0"
            a(f"  {acc} = fmul {VF} %{x}k{j}f0, %q{h}_0")
            for c in range(1, nc):
                nxt = f"%{x}p{h}_{j}_{c}"
                a(f"  {nxt} = call {VF} {fma}({VF} %{x}k{j}f{c}, {VF} %q{h}_{c}, {VF} {acc})")
                acc = nxt
            top, level = acc, 0
            while stack[h] and stack[h][-1][1] == level:
                u, _ = stack[h].pop()
                top = codegen.fold_pair(a, u, top, "float", nl >> level, nl, f"%{x}f{h}_{j}_{level}", add)
                level += 1
            stack[h].append((top, level))
    out: dict = {"m": [], "l": [], "o": []}
    ups = []
    for h in range(hp):
        sc, m = stack[h][0][0], st["m"][h]
        # invalid lanes hold key n - 1's score again: the max is the valid keys'; they weigh 0
        codegen.emit_hsum(a, sc, nl, f"%{x}bm{h}", "maxnum")
        a(f"  %{x}mn{h} = call float @llvm.maxnum.f32(float {m}, float %{x}bm{h})")
        a(f"  %{x}up{h} = fcmp ogt float %{x}bm{h}, {m}")
        ups.append(f"%{x}up{h}")
        a(f"  %{x}mv{h} = insertelement {VF} poison, float %{x}mn{h}, i32 0")
        a(f"  %{x}ms{h} = shufflevector {VF} %{x}mv{h}, {VF} poison, {mask([0] * nl)}")
        a(f"  %{x}z{h} = fsub {VF} {sc}, %{x}ms{h}")
        e = f"%{x}e{h}"
        _exp(a, f"%{x}z{h}", e if valid is None else f"%{x}ex{h}", nl)
        if valid is not None:
            a(f"  {e} = select <{nl} x i1> {valid}, {VF} %{x}ex{h}, {VF} zeroinitializer")
        out["m"].append(f"%{x}mn{h}")
    # a block that raised no head's max leaves the sums as they are (the correction exp(0) is
    # exactly 1): after the first blocks of a part, most do not
    any_up = ups[0]
    for i, u in enumerate(ups[1:]):
        a(f"  %{x}any{i} = or i1 {any_up}, {u}")
        any_up = f"%{x}any{i}"
    a(f"  br i1 {any_up}, label %{x}fix, label %{x}go")
    a(f"{x}fix:")
    for h in range(hp):
        # the running sums' correction exp(m_old - m_new), in every lane
        a(f"  %{x}dv{h} = insertelement {VF} poison, float {st['m'][h]}, i32 0")
        a(f"  %{x}ds{h} = shufflevector {VF} %{x}dv{h}, {VF} poison, {mask([0] * nl)}")
        a(f"  %{x}dz{h} = fsub {VF} %{x}ds{h}, %{x}ms{h}")
        _exp(a, f"%{x}dz{h}", f"%{x}cr{h}", nl)
        a(f"  %{x}lc{h} = fmul {VF} {st['l'][h]}, %{x}cr{h}")
        for c in range(ncv):
            a(f"  %{x}oc{h}_{c} = fmul {VF} {st['o'][h][c]}, %{x}cr{h}")
    a(f"  br label %{x}go")
    a(f"{x}go:")
    for h in range(hp):
        a(f"  %{x}lk{h} = phi {VF} [%{x}lc{h}, %{x}fix], [{st['l'][h]}, {pred}]")
        for c in range(ncv):
            a(f"  %{x}ok{h}_{c} = phi {VF} [%{x}oc{h}_{c}, %{x}fix], [{st['o'][h][c]}, {pred}]")
    for h in range(hp):
        a(f"  %{x}ln{h} = fadd {VF} %{x}lk{h}, %{x}e{h}")
        out["l"].append(f"%{x}ln{h}")
    # values: each row widened once, added into every head's output with its weight
    cur = {(h, c): f"%{x}ok{h}_{c}" for h in range(hp) for c in range(ncv)}
    for j in range(nl):
        _widened_row(a, f"%{x}v{j}", vp, j * row_bytes(kv, dv), ncv, nl, kv)
        for h in range(hp):
            a(f"  %{x}w{h}_{j} = shufflevector {VF} %{x}e{h}, {VF} poison, {mask([j] * nl)}")
            for c in range(ncv):
                nxt = f"%{x}a{h}_{c}_{j}"
                a(f"  {nxt} = call {VF} {fma}({VF} %{x}w{h}_{j}, {VF} %{x}v{j}f{c}, {VF} {cur[h, c]})")
                cur[h, c] = nxt
    out["o"] = [[cur[h, c] for c in range(ncv)] for h in range(hp)]
    return out


def _phis(a, tag: str, hp: int, ncv: int, nl: int, incoming: list[tuple[dict, str]]) -> dict:
    """phi nodes joining the states of `incoming` ((state, predecessor label) pairs)."""
    VF = f"<{nl} x float>"

    def phi(name, ty, key, h, c=None):
        ins = ", ".join(f"[{st[key][h] if c is None else st[key][h][c]}, %{lab}]" for st, lab in incoming)
        a(f"  {name} = phi {ty} {ins}")
        return name

    return {
        "m": [phi(f"%{tag}m{h}", "float", "m", h) for h in range(hp)],
        "l": [phi(f"%{tag}l{h}", VF, "l", h) for h in range(hp)],
        "o": [[phi(f"%{tag}o{h}_{c}", VF, "o", h, c) for c in range(ncv)] for h in range(hp)],
    }


def part_ir(hp: int, d: int, dv: int, nl: int, kv: str = "f16") -> list[str]:
    """The IR of ``attn_part`` for hp heads of d (keys) / dv (values) dimensions, nl lanes, rows
    stored as kv ("f16" or "q8_0"): a
    loop over the full blocks of nl keys, then the last, ragged block's keys copied to the
    stack (row n - 1 repeated), so that every block reads its rows at fixed offsets."""
    VF = f"<{nl} x float>"
    nc, ncv = d // nl, dv // nl
    kw, vw = row_bytes(kv, d), row_bytes(kv, dv)
    L: list[str] = []
    a = L.append
    ro, rw = "ptr noalias nocapture readonly", "ptr noalias nocapture"
    a(f"define void @attn_part({ro} %q, {ro} %k, {ro} %v, i64 %n, {rw} %o, {rw} %ml) #0 {{")
    a("entry:")
    a(f"  %ks = alloca [{nl * kw} x i8], align 64")
    a(f"  %vs = alloca [{nl * vw} x i8], align 64")
    a(f"  %nfull = udiv i64 %n, {nl}")
    a(f"  %rem = urem i64 %n, {nl}")
    for h in range(hp):
        for c in range(nc):
            a(f"  %qp{h}_{c} = getelementptr float, ptr %q, i64 {h * d + c * nl}")
            a(f"  %q{h}_{c} = load {VF}, ptr %qp{h}_{c}, align 4")
    zero = {"m": [flt(EMPTY)] * hp, "l": ["zeroinitializer"] * hp, "o": [["zeroinitializer"] * ncv] * hp}
    a("  %none = icmp eq i64 %nfull, 0")
    a("  br i1 %none, label %after, label %blk")
    a("blk:")
    a("  %b = phi i64 [0, %entry], [%b.next, %xgo]")
    # the state's phis name the block's results, known only after emitting it: emit the block
    # into its own list first
    body: list[str] = []
    st_in = {
        "m": [f"%m{h}" for h in range(hp)],
        "l": [f"%l{h}" for h in range(hp)],
        "o": [[f"%o{h}_{c}" for c in range(ncv)] for h in range(hp)],
    }
    b = body.append
    b(f"  %base = mul i64 %b, {nl}")
    b(f"  %kbo = mul i64 %base, {kw}")
    b("  %kb = getelementptr i8, ptr %k, i64 %kbo")
    b(f"  %vbo = mul i64 %base, {vw}")
    b("  %vb = getelementptr i8, ptr %v, i64 %vbo")
    # the keys and values PREFETCH blocks ahead, a cache line at a time (past n: harmless hints),
    # into L1 even on Zen, unlike `codegen.emit_prefetch`'s weight streams: 60 us a group at 4096
    # keys from DRAM against 72-76 with prefetcht1 (docs/kernels.md)
    for src, width in (("k", kw), ("v", vw)):
        for i in range(0, nl * width, 64):
            b(f"  %pf{src}{i} = getelementptr i8, ptr %{src}b, i64 {PREFETCH * nl * width + i}")
            b(f"  call void @llvm.prefetch.p0(ptr %pf{src}{i}, i32 0, i32 3, i32 1)")
    loop_out = _block(b, "x", "%blk", hp, d, dv, nl, kv, "%kb", "%vb", None, st_in)
    _phis(a, "", hp, ncv, nl, [(zero, "entry"), (loop_out, "xgo")])
    L.extend(body)
    a("  %b.next = add i64 %b, 1")
    a("  %bdone = icmp eq i64 %b.next, %nfull")
    a("  br i1 %bdone, label %after, label %blk")
    a("after:")
    st = _phis(a, "a", hp, ncv, nl, [(zero, "entry"), (loop_out, "xgo")])
    a("  %ragged = icmp ne i64 %rem, 0")
    a("  br i1 %ragged, label %tail, label %end")
    a("tail:")
    a(f"  %tbase = mul i64 %nfull, {nl}")
    a("  %last = sub i64 %n, 1")
    for j in range(nl):
        a(f"  %t{j}.a = add i64 %tbase, {j}")
        a(f"  %t{j}.c = icmp ult i64 %t{j}.a, %n")
        a(f"  %t{j} = select i1 %t{j}.c, i64 %t{j}.a, i64 %last")
        for src, width in (("k", kw), ("v", vw)):
            a(f"  %t{src}{j}.o = mul i64 %t{j}, {width}")
            a(f"  %t{src}{j}.p = getelementptr i8, ptr %{src}, i64 %t{src}{j}.o")
            a(f"  %t{src}{j}.d = getelementptr i8, ptr %{src}s, i64 {j * width}")
            a(f"  call void @llvm.memcpy.p0.p0.i64(ptr %t{src}{j}.d, ptr %t{src}{j}.p, i64 {width}, i1 false)")
    VL = f"<{nl} x i64>"
    a(f"  %rv = insertelement {VL} poison, i64 %rem, i32 0")
    a(f"  %rs = shufflevector {VL} %rv, {VL} poison, {mask([0] * nl)}")
    a(f"  %valid = icmp ult {VL} <{', '.join(f'i64 {j}' for j in range(nl))}>, %rs")
    tail_out = _block(a, "t", "%tail", hp, d, dv, nl, kv, "%ks", "%vs", "%valid", st)
    a("  br label %end")
    a("end:")
    fin = _phis(a, "e", hp, ncv, nl, [(st, "after"), (tail_out, "tgo")])
    for h in range(hp):
        for c in range(ncv):
            a(f"  %op{h}_{c} = getelementptr float, ptr %o, i64 {h * dv + c * nl}")
            a(f"  store {VF} {fin['o'][h][c]}, ptr %op{h}_{c}, align 4")
        codegen.emit_hsum(a, fin["l"][h], nl, f"%lt{h}")
        a(f"  %mlp{h} = getelementptr float, ptr %ml, i64 {2 * h}")
        a(f"  store float {fin['m'][h]}, ptr %mlp{h}, align 4")
        a(f"  %mlq{h} = getelementptr float, ptr %ml, i64 {2 * h + 1}")
        a(f"  store float %lt{h}, ptr %mlq{h}, align 4")
    a("  ret void")
    a("}")
    return L


def kernel_ir(hp: int, d: int, dv: int, isa: str, cpu: str = "", features: str = "", kv: str = "f16") -> str:
    """The IR module text of ``attn_part`` for an x86 path and a cache's storage (kv)."""
    nl = _LANES[isa]
    decl = [f"declare <{nl} x float> @llvm.{f}.v{nl}f32(<{nl} x float>, <{nl} x float>)" for f in ("maxnum", "minnum")]
    decl += [
        f"declare <{nl} x float> @llvm.fma.v{nl}f32(<{nl} x float>, <{nl} x float>, <{nl} x float>)",
        f"declare <{nl} x float> @llvm.floor.v{nl}f32(<{nl} x float>)",
        "declare float @llvm.maxnum.f32(float, float)",
        "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)",
        "declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)",
    ]
    h = nl // 2
    while h >= 1:
        decl.append(f"declare <{h} x float> @llvm.maxnum.v{h}f32(<{h} x float>, <{h} x float>)")
        h //= 2
    return codegen.finish_module(decl + part_ir(hp, d, dv, nl, kv), cpu, features)


def lanes(kernel: str | None = None) -> int:
    """The float32 lanes of the kernel path's vectors (0: no IR kernel there)."""
    return _LANES.get(codegen.select_kernel(kernel), 0)


def part_address(heads: int, d: int, dv: int, kernel: str | None = None, kv: str = "f16") -> int:
    """The address of ``attn_part`` for calls of `heads` heads over a cache stored as kv ("f16"
    or "q8_0") (0: use the numba loops)."""
    name = codegen.select_kernel(kernel)
    nl = _LANES.get(name)
    if nl is None or d % nl or dv % nl or heads < 1:
        return 0
    spec = codegen.resolve_isa(name)

    def build():
        ee, owners, _ = codegen.jit(lambda cpu, feat: kernel_ir(heads, d, dv, spec, cpu, feat, kv), name)
        return ee.get_function_address("attn_part"), owners

    return codegen.once(("attn_part", name, heads, d, dv, kv), build)[0]


@intrinsic
def call_part(typingctx, fn, q, k, v, n, o, ml):
    """attn_part(q, k, v, n, o, ml) through a runtime address."""
    rows = (types.uint16, types.int8)
    check_types((fn, q, k, v, n, o, ml), (None, types.float32, rows, rows, None, types.float32, types.float32))
    return types.void(fn, q, k, v, n, o, ml), emit_call
