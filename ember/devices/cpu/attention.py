"""Grouped-query attention over the KV cache (halves; 8-bit rows or float32 with kv_cache="q8_0"
/ "f32"): one kv group of query heads at one position (`attend`, and `attend_part` +
`combine` for a context split between threads: flash decoding; used by the fused decode step)
and a whole batch of positions (`attention_batch`, prefill and verification), split over the
batch path's threads. Over an 8-bit cache the queries come rotated as its keys are
(`runtime.kv_cache.hadamard`; `attention_batch` rotates its own, the fused step its rows').

A part of a half or 8-bit cache runs the LLVM IR kernel of `attention_ir` where the host has
one (AVX-512): scores, softmax and the weighted values of a block of keys in registers.
Elsewhere (a float32 cache, an AVX2 or portable host, a head size the vectors do not divide) numba
loops read keys and values in tiles of TILE keys, widened to float32 in the loops that use
them (an 8-bit tile is first dequantized into float32 scratch), for three heads at a time,
with an online softmax across tiles. Either way a long
context is read from memory once per kv group (docs/kernels.md, "Attention"). The softmax
runs over fixed parts of PART keys that `combine` joins: the fused step hands a long
context's parts to different threads, and a position's result is the same bits however the
parts were shared out (speculative verification of k rows must give plain decoding's logits
exactly).

`model.attention` (NumPy) is the reference both are tested against. The batch form skips the
keys a causal (or sliding-window) mask hides instead of computing and masking them, so a prompt
of n tokens costs n^2/2 dot products, not n^2; its threads are `lut_kernels.split`'s, like the
rest of the batch path's.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, types
from numba.extending import overload

from ...lut_kernels import codegen
from ...lut_kernels.split import MIN_ROWS, split
from ...runtime.kv_cache import Q8_BLOCK, hadamard, rotates
from . import attention_ir
from .kv_rows import dequant_rows, widen
from .vmath import exp_into

Q_CHUNK = 8  # query positions per work item of attention_batch
TILE = 64  # keys a pass of the online softmax: their halves (8 KiB at d = 64) stay in L1
PART = 256  # keys of one part of the flash-decoding split (a multiple of TILE)
EMPTY = np.float32(-3.0e38)  # the running max of a part that saw no key (fastmath: no -inf)


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _scores3(qa, qb, qc, K, t0, n4, sa, sb, sc):
    """Three heads' scores of keys t0..t0+n4-1 (n4 a multiple of 4): 3 heads x 4 keys, 12 sums
    a pass over d, each key widened once for the three."""
    for j in range(0, n4, 4):
        k0, k1, k2, k3 = K[t0 + j], K[t0 + j + 1], K[t0 + j + 2], K[t0 + j + 3]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = np.float32(0.0)
        for i in range(qa.size):
            x, y, z = qa[i], qb[i], qc[i]
            f0, f1, f2, f3 = widen(k0[i]), widen(k1[i]), widen(k2[i]), widen(k3[i])
            a0 += x * f0
            a1 += x * f1
            a2 += x * f2
            a3 += x * f3
            b0 += y * f0
            b1 += y * f1
            b2 += y * f2
            b3 += y * f3
            c0 += z * f0
            c1 += z * f1
            c2 += z * f2
            c3 += z * f3
        sa[j], sa[j + 1], sa[j + 2], sa[j + 3] = a0, a1, a2, a3
        sb[j], sb[j + 1], sb[j + 2], sb[j + 3] = b0, b1, b2, b3
        sc[j], sc[j + 1], sc[j + 2], sc[j + 3] = c0, c1, c2, c3


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _scores1(qa, K, t0, n4, sa):
    """One head's scores of keys t0..t0+n4-1: 4 keys a pass over d."""
    for j in range(0, n4, 4):
        k0, k1, k2, k3 = K[t0 + j], K[t0 + j + 1], K[t0 + j + 2], K[t0 + j + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for i in range(qa.size):
            x = qa[i]
            a0 += x * widen(k0[i])
            a1 += x * widen(k1[i])
            a2 += x * widen(k2[i])
            a3 += x * widen(k3[i])
        sa[j], sa[j + 1], sa[j + 2], sa[j + 3] = a0, a1, a2, a3


@njit(cache=True, nogil=True, fastmath=True)
def _scores(Q, K, t0, n, S):
    """S[h, j] = Q[h] . K[t0 + j] for j < n (K: half bits widened as they are read, so the
    loads from memory overlap the arithmetic). Register-blocked: 3 heads x 4 keys share a pass
    over d (12 sums), the last one or two heads of a group 4 keys a pass; rows are views walked
    from index 0, so LLVM vectorizes the inner loops. Three heads a pass rather than two:
    scores 47 -> 41 us for SmolLM2's group of 3 at 4096 keys from DRAM (Zen 4; docs/kernels.md)."""
    g = Q.shape[0]
    n4 = n - n % 4
    h = 0
    while h + 3 <= g:
        _scores3(Q[h], Q[h + 1], Q[h + 2], K, t0, n4, S[h], S[h + 1], S[h + 2])
        h += 3
    while h < g:
        _scores1(Q[h], K, t0, n4, S[h])
        h += 1
    for h in range(g):  # the keys left over
        qh, sh = Q[h], S[h]
        for j in range(n4, n):
            kj = K[t0 + j]
            s = np.float32(0.0)
            for i in range(qh.size):
                s += qh[i] * widen(kj[i])
            sh[j] = s


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _values3(sa, sb, sc, V, t0, n4, oa, ob, oc):
    """Three heads' outputs += their weights of values t0..t0+n4-1: 3 heads x 4 values a pass
    over dv, each value widened once for the three."""
    for j in range(0, n4, 4):
        p0, p1, p2, p3 = sa[j], sa[j + 1], sa[j + 2], sa[j + 3]
        q0, q1, q2, q3 = sb[j], sb[j + 1], sb[j + 2], sb[j + 3]
        r0, r1, r2, r3 = sc[j], sc[j + 1], sc[j + 2], sc[j + 3]
        v0, v1, v2, v3 = V[t0 + j], V[t0 + j + 1], V[t0 + j + 2], V[t0 + j + 3]
        for i in range(oa.size):
            f0, f1, f2, f3 = widen(v0[i]), widen(v1[i]), widen(v2[i]), widen(v3[i])
            oa[i] += (p0 * f0 + p1 * f1) + (p2 * f2 + p3 * f3)
            ob[i] += (q0 * f0 + q1 * f1) + (q2 * f2 + q3 * f3)
            oc[i] += (r0 * f0 + r1 * f1) + (r2 * f2 + r3 * f3)


@njit(cache=True, nogil=True, fastmath=True)
def _values(S, V, t0, n, O):
    """O[h] += sum_j S[h, j] V[t0 + j] for j < n (V: half bits widened as read): 3 heads x 4
    values a pass over dv, then the group's last heads one at a time (values 59 -> 42 us as
    the scores above)."""
    g = O.shape[0]
    n4 = n - n % 4
    h = 0
    while h + 3 <= g:
        _values3(S[h], S[h + 1], S[h + 2], V, t0, n4, O[h], O[h + 1], O[h + 2])
        h += 3
    while h < g:
        oh, sh = O[h], S[h]
        for j in range(0, n4, 4):
            p0, p1, p2, p3 = sh[j], sh[j + 1], sh[j + 2], sh[j + 3]
            v0, v1, v2, v3 = V[t0 + j], V[t0 + j + 1], V[t0 + j + 2], V[t0 + j + 3]
            for i in range(oh.size):
                oh[i] += (p0 * widen(v0[i]) + p1 * widen(v1[i])) + (p2 * widen(v2[i]) + p3 * widen(v3[i]))
        h += 1
    for h in range(g):
        oh, sh = O[h], S[h]
        for j in range(n4, n):
            p, vj = sh[j], V[t0 + j]
            for i in range(oh.size):
                oh[i] += p * widen(vj[i])


def _part_ir(fa, Qc, K, V, lo, hi, Oc, mlc):
    """The IR kernel's part (`attention_ir`) for half or 8-bit keys and values, a pass of fa[2]
    heads at a time (fa[0]: its address, fa[1]: the address for the group's last heads); True
    if it ran. A float32 cache has no kernel: False."""


@overload(_part_ir, inline="always")
def _part_ir_impl(fa, Qc, K, V, lo, hi, Oc, mlc):
    if K.dtype != V.dtype or K.dtype not in (types.uint16, types.int8):
        return lambda fa, Qc, K, V, lo, hi, Oc, mlc: False

    def run(fa, Qc, K, V, lo, hi, Oc, mlc):
        if fa[0] == 0:
            return False
        g, hp = Qc.shape[0], fa[2]
        for h0 in range(0, g, hp):
            h1 = min(g, h0 + hp)
            attention_ir.call_part(
                fa[0] if h1 - h0 == hp else fa[1], Qc[h0:h1], K[lo:hi], V[lo:hi], hi - lo, Oc[h0:h1], mlc[h0:h1]
            )
        return True

    return run


def _tile(K, t0, n, Kf):
    """Rows t0..t0+n-1 of a cache for the loops: (K, t0) as they are, or for an 8-bit cache
    (Kf, 0), Kf's first n rows dequantized."""


@overload(_tile, inline="always")
def _tile_impl(K, t0, n, Kf):
    if K.dtype == types.int8:

        def dequantized(K, t0, n, Kf):
            dequant_rows(K, t0, n, Kf)
            return Kf, 0

        return dequantized
    return lambda K, t0, n, Kf: (K, t0)


@njit(cache=True, nogil=True, fastmath=True)
def attend_part(Q, K, V, lo, hi, scale, W, out, ml):
    """Keys lo..hi-1 of one kv group for its query heads Q [g, d] (K [T, d], V [T, dv]: half
    bits, uint16, float32, or 8-bit rows, int8 [T, d + d / 8], whose keys are rotated, as Q
    must then be: `kv_rows.rotate_queries`), with an online
    softmax: out[h] = sum_j e_hj V[j] (not normalized), ml[h] = (m_h, sum_j e_hj), e_hj =
    exp(scale Q[h].K[j] - m_h), m_h the largest scaled score (scale applied to the query);
    ml[h] = (EMPTY, 0) and out[h] = 0 when lo >= hi. Half and 8-bit keys and values run the IR
    kernel where the host has one (W's addresses), else numba loops over tiles of TILE keys.
    The loops run over W's contiguous rows (a strided view, as a slice of the parts is, would
    not vectorize)."""
    S, one, e2, Qc, Oc, m, l, mlc, fa, Kf, Vf = W
    g, dv = Q.shape[0], out.shape[1]
    for h in range(g):
        for i in range(Qc.shape[1]):
            Qc[h, i] = Q[h, i] * scale
        Oc[h, :] = 0
        m[h] = EMPTY
        l[h] = 0
    if lo < hi and _part_ir(fa, Qc, K, V, lo, hi, Oc, mlc):
        for h in range(g):
            out[h] = Oc[h]
            ml[h, 0] = mlc[h, 0]
            ml[h, 1] = mlc[h, 1]
        return
    for t0 in range(lo, hi, TILE):
        n = min(TILE, hi - t0)
        Kt, kt0 = _tile(K, t0, n, Kf)
        _scores(Qc, Kt, kt0, n, S)
        for h in range(g):
            sh = S[h]
            mx = m[h]
            for j in range(n):
                mx = max(mx, sh[j])
            for j in range(n):
                sh[j] -= mx
            for j in range(n, TILE):
                sh[j] = -87.0
            exp_into(sh, sh, e2)
            t = np.float32(0.0)
            for j in range(n):
                t += sh[j]
            if mx > m[h] and m[h] != EMPTY:  # rescale what the earlier tiles summed
                one[0] = m[h] - mx
                exp_into(one, one, e2[:1])
                c = one[0]
                l[h] *= c
                oh = Oc[h]
                for i in range(dv):
                    oh[i] *= c
            m[h] = mx
            l[h] += t
        Vt, vt0 = _tile(V, t0, n, Vf)
        _values(S, Vt, vt0, n, Oc)
    for h in range(g):
        out[h] = Oc[h]
        ml[h, 0] = m[h]
        ml[h, 1] = l[h]


@njit(cache=True, nogil=True)
def combine(parts, ml, out):
    """out[h] = the softmax-weighted sum of the parts of a split attention: parts [c, nh, dv]
    and ml [c, nh, 2] as `attend_part` leaves them for c ranges of the keys (the flash-decoding
    reduction); out [nh * dv]. Strict float32 (no fastmath): a head's result is the same bits
    whether its group is combined alone or with the others."""
    nc, nh, dv = parts.shape
    w = np.empty(nc, np.float32)
    e2 = np.empty(nc, np.int32)
    for h in range(nh):
        mx = EMPTY
        for c in range(nc):
            if ml[c, h, 1] > 0:
                mx = max(mx, ml[c, h, 0])
        for c in range(nc):
            w[c] = ml[c, h, 0] - mx if ml[c, h, 1] > 0 else np.float32(-87.0)
        exp_into(w, w, e2)
        tot = np.float32(0.0)
        for c in range(nc):
            if ml[c, h, 1] > 0:
                tot += w[c] * ml[c, h, 1]
            else:
                w[c] = 0
        oh = out[h * dv : (h + 1) * dv]
        oh[:] = 0
        for c in range(nc):
            wc = w[c] / tot
            pc = parts[c, h]
            for i in range(dv):
                oh[i] += wc * pc[i]


@njit(cache=True, nogil=True, inline="always")
def first_key(p, window):
    """The first position a query at p sees: 0, or the start of its sliding window."""
    return 0 if window == 0 else max(0, p - window + 1)


@njit(cache=True, nogil=True, inline="always")
def parts_of(lo, hi):
    """The parts (first, end) keys lo..hi-1 fall into: fixed ranges of PART keys from 0, so a
    position's attention is the same sum of parts in any step and on any number of threads."""
    return lo // PART, -(-hi // PART)


@njit(cache=True, nogil=True)
def attend(Q, K, V, lo, hi, scale, W, parts, ml, out):
    """out = softmax(scale * K[lo:hi] Q[h]) @ V[lo:hi] for the query heads Q [g, d] of one kv
    group, [g * dv] (lo < hi; K, V and W as `attend_part`'s): part by part into parts [>= n, g,
    dv] and ml [>= n, g, 2] (n = the parts the keys span), then combined."""
    c0, c1 = parts_of(lo, hi)
    for c in range(c0, c1):
        attend_part(Q, K, V, max(lo, c * PART), min(hi, (c + 1) * PART), scale, W, parts[c - c0], ml[c - c0])
    combine(parts[: c1 - c0], ml[: c1 - c0], out)


@njit(cache=True, nogil=True)
def work(g, d, dv, fa):
    """The scratch of `attend_part` for groups of g heads: scores, one float, exp's integer
    scratch, the queries, the output, the running max and sum, the kernel's (max, sum) and
    the kernel's addresses `fa` (`kernel_addresses`), and a tile of keys and of values as
    float32 (an 8-bit cache's, for the loops)."""
    return (
        np.empty((g, TILE), np.float32),
        np.empty(1, np.float32),
        np.empty(TILE, np.int32),
        np.empty((g, d), np.float32),
        np.empty((g, dv), np.float32),
        np.empty(g, np.float32),
        np.empty(g, np.float32),
        np.empty((g, 2), np.float32),
        fa,
        np.empty((TILE, d), np.float32),
        np.empty((TILE, dv), np.float32),
    )


def kernel_addresses(g: int, d: int, dv: int, kv_dtype=np.uint16, kernel: str | None = None) -> np.ndarray:
    """[address for passes of hp heads, address for the group's last g % hp heads, hp] of the
    IR part kernel for a group of g heads over a half or 8-bit cache; zeros (the numba loops)
    for a float32 cache, a host without the kernel or shapes the kernel does not take."""
    kv = {np.dtype(np.uint16): "f16", np.dtype(np.int8): "q8_0"}.get(np.dtype(kv_dtype))
    if kv is None:
        return np.zeros(3, np.int64)
    return _addresses(g, d, dv, codegen.select_kernel(kernel), kv)


@functools.cache
def _addresses(g: int, d: int, dv: int, kernel: str, kv: str) -> np.ndarray:
    """`kernel_addresses` of a half or 8-bit cache, once per shape, kernel path and storage
    (prefill asks each layer)."""
    lanes = attention_ir.lanes(kernel)
    if lanes == 0:
        return np.zeros(3, np.int64)
    hp = attention_ir.heads_per_call(g, dv, lanes)
    full = attention_ir.part_address(hp, d, dv, kernel, kv)
    rest = attention_ir.part_address(g % hp, d, dv, kernel, kv) if g % hp else full
    if full == 0 or rest == 0:
        return np.zeros(3, np.int64)
    return np.array([full, rest, hp], np.int64)


@njit(cache=True, nogil=True)
def _items(q, k, v, q_pos, scale, window, out, w0, w1, fa):
    """Work items w0..w1-1 of a batch: item w = one kv group and one chunk of Q_CHUNK queries,
    in an order where cheap (early) and costly (late) chunks alternate, so that contiguous
    shares of the items cost about the same."""
    n, n_head, d = q.shape
    n_kv = v.shape[0]
    dv = out.shape[1] // n_head
    g = n_head // n_kv
    nq = -(-n // Q_CHUNK)
    W = work(g, q.shape[2], dv, fa)
    n_parts = -(-(q_pos[n - 1] + 1) // PART) + 1
    parts = np.empty((n_parts, g, dv), np.float32)
    ml = np.empty((n_parts, g, 2), np.float32)
    for w in range(w0, w1):
        kv = w % n_kv
        c = w // n_kv
        c = c // 2 if c % 2 == 0 else nq - 1 - c // 2
        i0 = c * Q_CHUNK
        i1 = min(i0 + Q_CHUNK, n)
        for i in range(i0, i1):
            attend(
                q[i, kv * g : (kv + 1) * g],
                k[kv],
                v[kv],
                first_key(q_pos[i], window),
                q_pos[i] + 1,
                scale,
                W,
                parts,
                ml,
                out[i, kv * g * dv : (kv + 1) * g * dv],
            )


def attention_batch(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_pos: np.ndarray,
    scale: float,
    window: int,
    threads: int = 1,
    kernel: str | None = None,
) -> np.ndarray:
    """Same contract as `model.attention`: q [n, n_head, d]; k [n_kv, T, d], v [n_kv, T, dv]:
    the cache's arrays, half bits, 8-bit rows or float32 (key j at position j); returns [n,
    n_head * dv].
    Causal; window > 0: a query at p sees keys p - window < j <= p. Positions must be
    consecutive (a batch after the cache) and < T."""
    n, n_head, _ = q.shape
    n_kv, T, dv = v.shape
    if v.dtype == np.int8:
        dv = dv * Q8_BLOCK // (Q8_BLOCK + 4)
    if k.dtype == np.int8 and rotates("q8_0", q.shape[2]):
        q = hadamard(q)  # as the cache's keys
    q_pos = np.ascontiguousarray(q_pos, dtype=np.int64)
    if q_pos.size != n or (n and (q_pos[0] < 0 or q_pos[-1] >= T or np.any(np.diff(q_pos) != 1))):
        raise ValueError("attention_batch: query positions must lie inside the keys")
    out = np.empty((n, n_head * dv), np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)
    scale, window = np.float32(scale), int(window)
    fa = kernel_addresses(n_head // n_kv, q.shape[2], dv, k.dtype if k.dtype == v.dtype else np.float32, kernel)
    split(
        n_kv * -(-n // Q_CHUNK),
        threads if n >= MIN_ROWS else 1,
        lambda w0, w1: _items(q, k, v, q_pos, scale, window, out, w0, w1, fa),
    )
    return out
