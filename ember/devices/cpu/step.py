"""The fused decode step: the whole forward pass of one token (or a few) inside one numba call.

`FusedDecoder.step(token, cache)` runs `_decode` (``nogil``, ``cache=True``) on `threads` OS
threads at once: the calling thread and `threads - 1` workers of a small pool. Every thread keeps
its own copy of the residual stream and computes the cheap vector work (norms, activation tables,
RoPE inputs) itself; the matvecs and the attention heads are split between the threads, which
meet at a spin barrier (`lut_kernels.fused`) whenever a full vector is needed next: five times
per layer. Work units (64 rows of a matrix, a kv group of attention heads) are claimed with an
atomic counter, so a thread the OS delays does less of a phase. Past one part of keys
(`attention.PART`), when the kv groups are too few to keep every thread busy, a group's parts
are shared out between the threads (flash decoding), which costs a sixth barrier. Python runs once per token: the
embedding row, the call, the logits.

`step_rows(tokens, cache)` runs up to MAX_ROWS new tokens through the same step. The K-quant
kernels read each weight once for all rows, so speculative verification of 8 tokens costs ~1.4x
one token (Qwen2.5-1.5B, 2 threads, AVX-512 VNNI Xeon; ~1.9x on a Zen 4 EPYC, where the kernels
are compute-bound at 8 rows), where the op-by-op forward spent 1.65x in Python glue,
thread-pool regions and scalar exp calls. The one-row kernels (T-MAC, q8, F16) run row by row
over L2-sized groups of a matrix's rows, so the weights still stream from DRAM once (SmolLM2,
16 prompt tokens: ~2x faster than 16 steps). With `all_logits=False` only the last token's
logits are computed (a prompt's other positions need none).

It covers the dense architectures (llama, qwen2, gemma3) when every matrix has a kernel
(`fused.fusable`); other models decode through `Transformer.forward`. The arithmetic is the same as
`Transformer.forward` on the same positions up to float32 summation order (tested), and does not
depend on the thread count: every row is computed whole by one thread.
"""

from __future__ import annotations

import os
import weakref
from typing import NamedTuple

import numpy as np
from numba import njit

from ...errors import EmberError
from ...lut_kernels import fused
from ...lut_kernels.fused import UNIT, barrier, matvec_rows, prepare_rows, scratch, take
from ...lut_kernels.split import Team
from ...runtime.config import ROPE_NEOX
from ...runtime.kv_cache import KV_TYPES
from ...runtime.rope import rope_tables
from .attention import PART, attend, attend_part, combine, first_key, kernel_addresses, parts_of, work
from .kv_rows import rotate_queries, store_key, store_row
from .moe import group, route
from .vmath import exp_into

# per-layer vectors, columns of the offsets table (-1: absent)
V_ATTN_NORM, V_FFN_NORM, V_BQ, V_BK, V_BV, V_QNORM, V_KNORM, V_POST_ATTN, V_POST_FFW, V_ROUTER, V_SHEXP_GATE = range(11)
_VEC_NAMES = (
    "attn_norm",
    "ffn_norm",
    "attn_q.bias",
    "attn_k.bias",
    "attn_v.bias",
    "attn_q_norm",
    "attn_k_norm",
    "post_attention_norm",
    "post_ffw_norm",
    "ffn_gate_inp",  # an MoE layer's router [n_expert, n_embd], as float32
    "ffn_gate_inp_shexp",  # the shared expert's sigmoid gate [n_embd]
)
# matrices per layer, in descriptor order; an MoE layer has the attention's four, then gate, up and
# down of each expert, then of the shared expert if it has one
M_Q, M_K, M_V, M_O, M_GATE, M_UP, M_DOWN = range(7)
_MAT_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NM = len(_MAT_NAMES)
_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_SHARED = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
# integer parameters
(P_NLAYER, P_D, P_NHEAD, P_NKV, P_HD, P_HDV, P_ROPE_DIM, P_NEOX, P_GELU, P_QKNORM, P_GEMMA, P_WINDOW, P_VOCAB) = range(
    13
)
P_NEXP, P_NUSED, P_NORMK, P_SHARED = range(13, 17)  # experts (0: dense), used per token, renormalised, shared
PHASES = 6  # per layer: q/k/v, cache writes, attention, o, gate/up, down (+1: the output matrix)
CHUNKS_PER_THREAD = 3
MAX_ROWS = 16  # tokens one fused step takes at once (the K-quant kernels' register block)
HANDOFF_ALIGN = 4096  # bytes: the q, k, v blocks handed to a device start at multiples of it


def compiled() -> bool:
    """Whether the fused step's machine code is in numba's on-disk cache (False: the first call
    compiles it and the kernels around it, ~30 s)."""
    try:
        return os.path.exists(_decode._cache._cache_file._index_path)
    except AttributeError:  # another numba version: assume it is
        return True


class NotFusable(EmberError):
    """The model has a part the fused step does not cover; it decodes op by op."""


def _units(n: int) -> int:
    return -(-n // UNIT) * UNIT


# ---------------------------------------------------------------------------------------------
# numba


@njit(cache=True, nogil=True, inline="always")
def _rms(x, w, eps, out):
    s = 0.0
    for i in range(x.size):
        s += np.float64(x[i]) * np.float64(x[i])
    den = np.sqrt(np.float32(s / x.size) + eps)
    for i in range(x.size):
        out[i] = (x[i] / den) * w[i]


@njit(cache=True, nogil=True)
def _final_norm(x, w, eps, out):
    """The rows of x after the final norm, as the output projection of `_decode` reads them."""
    for i in range(x.shape[0]):
        _rms(x[i], w, np.float32(eps), out[i])


@njit(cache=True, nogil=True, inline="always")
def _rope(x, cos, sin, neox):
    half = cos.size
    if neox:
        for j in range(half):
            a = x[j]
            b = x[j + half]
            x[j] = a * cos[j] - b * sin[j]
            x[j + half] = a * sin[j] + b * cos[j]
    else:
        for j in range(half):
            a = x[2 * j]
            b = x[2 * j + 1]
            x[2 * j] = a * cos[j] - b * sin[j]
            x[2 * j + 1] = a * sin[j] + b * cos[j]


@njit(cache=True, nogil=True, inline="always")
def _vec(vecs, voff, il, which, n):
    o = voff[il, which]
    return vecs[o : o + n]


@njit(cache=True, nogil=True, inline="always")
def _heads(t, vecs, voff, il, bias_col, norm_col, full, nh, hd, eps, tmp):
    """t (a q or k projection, nh heads of hd) + bias, then the full-vector q/k norm if any, in place."""
    n = nh * hd
    if voff[il, bias_col] >= 0:
        b = _vec(vecs, voff, il, bias_col, n)
        for i in range(n):
            t[i] += b[i]
    if full and voff[il, norm_col] >= 0:
        tmp[:n] = t[:n]
        _rms(tmp[:n], _vec(vecs, voff, il, norm_col, n), eps, t[:n])


@njit(cache=True, nogil=True, inline="always")
def _qk_heads(i, il, qb, kb, ql, kl, vecs, voff, qkn, nh, nkv, hd, eps, t2):
    """Row i's query and key projections into ql[i], kl[i], + bias and the full q/k norm."""
    kl[i] = kb[i, : kl.shape[1]]
    _heads(kl[i], vecs, voff, il, V_BK, V_KNORM, qkn == 2, nkv, hd, eps, t2)
    ql[i] = qb[i, : ql.shape[1]]
    _heads(ql[i], vecs, voff, il, V_BQ, V_QNORM, qkn == 2, nh, hd, eps, t2)


@njit(cache=True, nogil=True, inline="always")
def _kv_row(g, i, il, kl, vb, vecs, voff, qkn, hd, hdv, nkv, eps, cs, sn, neox, t2):
    """Row i's key of kv group g made ready in place in kl (k norm, RoPE); its value (+ bias),
    returned as a view of t2."""
    kh = kl[i, g * hd : (g + 1) * hd]
    if qkn == 1:
        t2[:hd] = kh
        _rms(t2[:hd], _vec(vecs, voff, il, V_KNORM, hd), eps, kh)
    _rope(kh, cs, sn, neox)
    vh = t2[:hdv]
    vh[:] = vb[i, g * hdv : (g + 1) * hdv]
    if voff[il, V_BV] >= 0:
        vh += _vec(vecs, voff, il, V_BV, nkv * hdv)[g * hdv : (g + 1) * hdv]
    return vh


@njit(cache=True, nogil=True, inline="always")
def _store_kv(g, i, p, il, kl, vb, kc, vc, vecs, voff, qkn, hd, hdv, nkv, eps, cs, sn, neox, t2):
    """Row i's key and value of kv group g (k norm, RoPE; v bias) into the cache at position p."""
    vh = _kv_row(g, i, il, kl, vb, vecs, voff, qkn, hd, hdv, nkv, eps, cs, sn, neox, t2)
    store_key(kl[i, g * hd : (g + 1) * hd], kc[il, g, p])
    store_row(vh, vc[il, g, p])


@njit(cache=True, nogil=True, inline="always")
def _rope_q(g, group, i, il, ql, vecs, voff, qkn, hd, eps, cs, sn, neox, t2):
    """Row i's query heads of kv group g: q norm, RoPE, in place."""
    for hh in range(g * group, (g + 1) * group):
        qh = ql[i, hh * hd : (hh + 1) * hd]
        if qkn == 1:
            t2[:hd] = qh
            _rms(t2[:hd], _vec(vecs, voff, il, V_QNORM, hd), eps, qh)
        _rope(qh, cs, sn, neox)


@njit(cache=True, nogil=True, inline="always")
def _chunk(n, nth):
    """Units claimed at once: all of them on one thread; else about CHUNKS_PER_THREAD claims
    per thread (a kernel call per unit costs more than the balance it buys)."""
    if nth == 1:
        return max(n, 1)
    return max(1, -(-n // (CHUNKS_PER_THREAD * nth)))


@njit(cache=True, nogil=True, inline="always")
def _sync(bfn, yfn, bst, nth):
    """The barrier; on a failure, the abort word releases the other threads."""
    st = barrier(bfn, yfn, bst, nth)
    if st:
        bst[fused.ABORT] = 1
    return st


@njit(cache=True, nogil=True, inline="always")
def _matvec_phase(tfn, cnt, ci, nth, desc, m, fns, X, n_in, buf, Y):
    """Y = X[:, :n_in] W_m^T, this thread's claimed share of the units (phase counter ci)."""
    prepare_rows(desc, m, m + 1, fns, X, n_in, buf)
    n = desc[m, 6]
    ch = _chunk(n, nth)
    u = take(tfn, cnt, ci, nth, -ch, ch)
    while u < n:
        matvec_rows(desc, m, buf, Y, u, min(u + ch, n))
        u = take(tfn, cnt, ci, nth, u, ch)


@njit(cache=True, nogil=True, inline="always")
def _residual(x, y, post_norm, w, eps, tmp):
    """x += y, or x += rmsnorm(y) * w (Gemma's post-norms)."""
    if post_norm:
        _rms(y, w, eps, tmp)
        x += tmp
    else:
        x += y


@njit(cache=True, nogil=True, inline="always")
def _act(gb, ub, ab, r0, r1, gelu, e2):
    """ab[r] = act(gate[r]) * up[r] for rows r0..r1-1 (``e2``: int32 scratch of >= r1 - r0)."""
    if gelu:
        for r in range(r0, r1):
            gv = gb[r]
            c = np.float32(0.7978845608028654)
            a = np.float32(0.5) * gv * (np.float32(1.0) + np.tanh(c * (gv + np.float32(0.044715) * gv * gv * gv)))
            ab[r] = a * ub[r]
        return
    g, out = gb[r0:r1], ab[r0:r1]
    for i in range(g.size):
        out[i] = -g[i]
    exp_into(out, out, e2[: r1 - r0])
    u = ub[r0:r1]
    for i in range(g.size):
        out[i] = g[i] / (np.float32(1.0) + out[i]) * u[i]


@njit(cache=True, nogil=True)
def _moe_scratch(k, d, ip, ma, md):
    """One thread's scratch for `_moe_ffn` (empty for a dense model)."""
    n_exp, n_used = ip[P_NEXP], max(ip[P_NUSED], 1)
    k = k if n_exp else 0
    width = max(d, ma.shape[1], md.shape[1]) if n_exp else 0
    return (
        np.zeros((k, n_used), np.int64),
        np.zeros((k, n_used), np.float32),
        np.zeros(k, np.float32),
        np.zeros(max(n_exp, 1), np.float32),
        np.zeros(n_exp + 1, np.int64),
        np.zeros(k * n_used, np.int64),
        np.zeros(k * n_used, np.int64),
        np.zeros(k * n_used + 1, np.int64),
        np.empty((k, width), np.float32),
        np.empty((k, width), np.float32),
        np.empty((k, width), np.float32),
    )


@njit(cache=True, nogil=True, inline="always")
def _route_rows(h, il, vecs, voff, ip, top, wts, wsh, lg):
    """Each row of h's top experts and weights (`moe.route`) and its shared expert's gate."""
    k, d = h.shape
    router = _vec(vecs, voff, il, V_ROUTER, ip[P_NEXP] * d)
    for i in range(k):
        route(h[i], router, ip[P_NUSED], ip[P_NORMK], top[i], wts[i], lg)
        wsh[i] = 1.0
        if voff[il, V_SHEXP_GATE] >= 0:
            g = _vec(vecs, voff, il, V_SHEXP_GATE, d)
            z = np.float32(0.0)
            for c in range(d):
                z += h[i, c] * g[c]
            wsh[i] = np.float32(1.0) / (np.float32(1.0) + np.exp(-z))


@njit(cache=True, nogil=True, inline="always")
def _moe_ffn(
    tfn, cnt, ci, nth, bfn, yfn, bst, desc, mx, fns, h, x, il, vecs, voff, ip, ma, md, buf, mw, e2, given, rt, rw, rs
):
    """An MoE layer's FFN for the k rows of h (normed) into the residual x: routing (every
    thread alike, `moe.route`), then two phases, each a barrier: gate and up of each chosen
    expert over the rows that chose it (its weights read once for them) and of the shared
    expert over all rows, the activations into ma [slot, ...] (row i's j-th choice is slot
    i * n_used + j; the shared expert's rows follow); then down, into md. Every thread then
    adds its rows' weighted sum in a fixed order: no result depends on the thread count or
    (with one-row kernels) on which other rows share the batch. Units: (expert, 64 output rows).
    `given`: the routing is rt, rw, rs (top experts, weights, shared gates), not computed here."""
    top, wts, wsh, lg, count, order, qe, qs, hs, yg, yu = mw
    k, d = h.shape
    n_exp, n_used, shared = ip[P_NEXP], ip[P_NUSED], ip[P_SHARED]
    if given:  # routed by the call before (`route_last`)
        top[:k] = rt[:k]
        wts[:k] = rw[:k]
        wsh[:k] = rs[:k]
    else:
        _route_rows(h, il, vecs, voff, ip, top, wts, wsh, lg)
    nq = group(top[:k], n_exp, count, order, qe, qs)
    ffe = desc[mx, 1]
    ue = -(-ffe // UNIT)
    ms = mx + 3 * n_exp  # the shared expert's gate
    ffs = desc[ms, 1] if shared else 0
    s0 = k * n_used  # the shared expert's first slot
    gelu = ip[P_GELU]
    for which in range(2):  # 0: gate and up, 1: down
        wu = ue if which == 0 else -(-d // UNIT)  # units of one expert
        wsu = -(-ffs // UNIT) if which == 0 else (wu if shared else 0)
        n = nq * wu + wsu
        ch = _chunk(n, nth)
        prepared = -1
        c0 = take(tfn, cnt, ci + which, nth, -ch, ch)
        while c0 < n:
            w, end = c0, min(c0 + ch, n)
            while w < end:
                if w < nq * wu:  # units u0..u1 of chosen expert q
                    q = w // wu
                    u0, u1 = w - q * wu, min(end - q * wu, wu)
                    m = mx + 3 * qe[q] + 2 * which
                    r = qs[q + 1] - qs[q]
                    if prepared != q:
                        for t in range(r):
                            slot = order[qs[q] + t]
                            if which == 0:
                                hs[t, :d] = h[slot // n_used]
                            else:
                                hs[t, :ffe] = ma[slot, :ffe]
                        prepare_rows(desc, m, m + 2 - which, fns, hs[:r], d if which == 0 else ffe, buf)
                        prepared = q
                    matvec_rows(desc, m, buf, yg[:r], u0, u1)
                    if which == 0:
                        matvec_rows(desc, m + 1, buf, yu[:r], u0, u1)
                    for t in range(r):
                        slot = order[qs[q] + t]
                        if which == 0:
                            _act(yg[t], yu[t], ma[slot], UNIT * u0, min(UNIT * u1, ffe), gelu, e2)
                        else:
                            md[slot, UNIT * u0 : min(UNIT * u1, d)] = yg[t, UNIT * u0 : min(UNIT * u1, d)]
                    w = q * wu + u1
                else:  # units of the shared expert, all k rows
                    u0, u1 = w - nq * wu, end - nq * wu
                    m = ms + 2 * which
                    if prepared != -2:
                        if which == 0:
                            prepare_rows(desc, m, m + 2, fns, h, d, buf)
                        else:
                            prepare_rows(desc, m, m + 1, fns, ma[s0 : s0 + k], ffs, buf)
                        prepared = -2
                    if which == 0:
                        matvec_rows(desc, m, buf, yg[:k], u0, u1)
                        matvec_rows(desc, m + 1, buf, yu[:k], u0, u1)
                        for i in range(k):
                            _act(yg[i], yu[i], ma[s0 + i], UNIT * u0, min(UNIT * u1, ffs), gelu, e2)
                    else:
                        matvec_rows(desc, m, buf, md[s0 : s0 + k], u0, u1)
                    w = end
            c0 = take(tfn, cnt, ci + which, nth, c0, ch)
        st = _sync(bfn, yfn, bst, nth)
        if st:
            return st
    for i in range(k):
        for c in range(d):
            acc = np.float32(0.0)
            for j in range(n_used):
                acc += wts[i, j] * md[i * n_used + j, c]
            if shared:
                acc += wsh[i] * md[s0 + i, c]
            x[i, c] += acc
    return 0


# error_model="numpy": float divisions without a zero test, so _act's SiLU loop vectorizes (the
# test kept it scalar: ~1.2% of the perf samples of Qwen2.5-1.5B's 8-token step)
@njit(cache=True, nogil=True, error_model="numpy")
def _decode(tid, nth, sync, weights, call, bufs):
    """Layers l0..l1-1 of k = x0.shape[0] new tokens at positions pos..pos+k-1, from their
    hidden state x0 (the embeddings when l0 = 0); activations and outputs are [k, ...]
    (cos_*/sin_* [k, rope_dim / 2]). When l1 is the last layer: the logits (``last_only``: of
    the last token only, into logits[k - 1]); else the hidden state, into xo (by thread 0).
    The arguments are the `Sync`, `Weights`, `Call` and `Buffers` tuples."""
    bfn, yfn, tfn, cnt, bst = sync
    fns, desc, lay, vecs, voff, out_norm, swa, ip, eps, scale = weights
    (
        x0,
        kc,
        vc,
        pos,
        cos_g,
        sin_g,
        cos_l,
        sin_l,
        logits,
        last_only,
        l0,
        l1,
        xo,
        po,
        pm,
        ffn_first,
        route_last,
        rt,
        rw,
        rs,
        attn_in,
        attn_out,
        ai,
        qo,
        ko,
        vo,
        head,
    ) = call
    qb, kb, vb, ab, ob, gb, ub, fb, ma, md = bufs
    nl, d, nh, nkv, hd, hdv = ip[P_NLAYER], ip[P_D], ip[P_NHEAD], ip[P_NKV], ip[P_HD], ip[P_HDV]
    neox, gelu, qkn, gemma, window = ip[P_NEOX], ip[P_GELU], ip[P_QKNORM], ip[P_GEMMA], ip[P_WINDOW]
    k = x0.shape[0]
    group = nh // nkv
    eps = np.float32(eps)
    buf = scratch(max(desc[:, 2].max(), ab.shape[1]), k)
    x = x0.copy()
    h = np.empty((k, d), np.float32)
    t2 = np.empty(max(d, nh * hd, nkv * hd, ab.shape[1]), np.float32)
    ql = np.empty((k, nh * hd), np.float32)
    kl = np.empty((k, nkv * hd), np.float32)
    W = work(group, hd, hdv, fns[2:5])
    ab2 = np.empty((k, nh * hdv), np.float32)
    e2 = np.empty(max(ab.shape[1], ma.shape[1]), np.int32)
    mw = _moe_scratch(k, d, ip, ma, md)
    ci = 0  # phase counter index (work units are claimed with take())
    for il in range(l0, l1):
        m0 = lay[il] - lay[l0]  # desc holds the range's matrices only
        cs = cos_l if swa[il] else cos_g
        sn = sin_l if swa[il] else sin_g
        win = window if swa[il] else 0
        att = ai  # layer l0's attention output when it ran elsewhere (`attn_in`)
        if not (ffn_first and il == l0) and not (attn_in and il == l0):
            # q, k, v: one unit = 64 rows of q, then of k, then of v
            for i in range(k):
                _rms(x[i], _vec(vecs, voff, il, V_ATTN_NORM, d), eps, h[i])
            prepare_rows(desc, m0 + M_Q, m0 + M_V + 1, fns, h, d, buf)
            uq, uk, uv = desc[m0 + M_Q, 6], desc[m0 + M_K, 6], desc[m0 + M_V, 6]
            n = uq + uk + uv
            ch = _chunk(n, nth)
            u = take(tfn, cnt, ci, nth, -ch, ch)
            while u < n:
                e = min(u + ch, n)
                matvec_rows(desc, m0 + M_Q, buf, qb, min(u, uq), min(e, uq))
                matvec_rows(desc, m0 + M_K, buf, kb, min(max(u - uq, 0), uk), min(max(e - uq, 0), uk))
                matvec_rows(desc, m0 + M_V, buf, vb, min(max(u - uq - uk, 0), uv), min(max(e - uq - uk, 0), uv))
                u = take(tfn, cnt, ci, nth, u, ch)
            ci += 1
            st = _sync(bfn, yfn, bst, nth)
            if st:
                return st
            if attn_out and il == l1 - 1:  # stop before the attention: its inputs, made ready
                if tid == 0:
                    for i in range(k):
                        _qk_heads(i, il, qb, kb, ql, kl, vecs, voff, qkn, nh, nkv, hd, eps, t2)
                        for g in range(nkv):
                            vo[i, g * hdv : (g + 1) * hdv] = _kv_row(
                                g, i, il, kl, vb, vecs, voff, qkn, hd, hdv, nkv, eps, cs[i], sn[i], neox, t2
                            )
                            _rope_q(g, group, i, il, ql, vecs, voff, qkn, hd, eps, cs[i], sn[i], neox, t2)
                        qo[i] = ql[i]
                        ko[i] = kl[i]
                    xo[:] = x
                return 0
            # attention: every new token's k and v into the cache (bias, norm, RoPE), then its query
            # heads, token i seeing positions up to pos + i, part by part (`attention.attend`). A
            # short context: one unit = one kv group, all of it. A long one, when the groups are
            # too few to go round the threads: the cache writes, a barrier, then one unit = one part
            # of one group's keys, the parts combined after the next barrier by every thread itself
            for i in range(k):
                _qk_heads(i, il, qb, kb, ql, kl, vecs, voff, qkn, nh, nkv, hd, eps, t2)
            lo0 = first_key(pos, win)  # the first key any of the rows sees
            c_lo, c_hi = parts_of(lo0, pos + k)
            split = nth > 1 and nkv < 4 * nth and c_hi - c_lo > 1
            g = take(tfn, cnt, ci, nth, -1, 1)
            while g < nkv:
                for i in range(k):
                    p = pos + i
                    _store_kv(g, i, p, il, kl, vb, kc, vc, vecs, voff, qkn, hd, hdv, nkv, eps, cs[i], sn[i], neox, t2)
                    if split:
                        continue
                    _rope_q(g, group, i, il, ql, vecs, voff, qkn, hd, eps, cs[i], sn[i], neox, t2)
                    rotate_queries(kc, ql[i, g * group * hd : (g + 1) * group * hd], hd)
                    heads = slice(g * group, (g + 1) * group)
                    attend(
                        ql[i, g * group * hd : (g + 1) * group * hd].reshape((group, hd)),
                        kc[il, g],
                        vc[il, g],
                        first_key(p, win),
                        p + 1,
                        scale,
                        W,
                        po[i, :, heads],
                        pm[i, :, heads],
                        ab[i, g * group * hdv : (g + 1) * group * hdv],
                    )
                g = take(tfn, cnt, ci, nth, g, 1)
            ci += 1
            att = ab
            if split:
                st = _sync(bfn, yfn, bst, nth)
                if st:
                    return st
                for i in range(k):
                    for g in range(nkv):
                        _rope_q(g, group, i, il, ql, vecs, voff, qkn, hd, eps, cs[i], sn[i], neox, t2)
                        rotate_queries(kc, ql[i, g * group * hd : (g + 1) * group * hd], hd)
                # a unit is a run of consecutive parts, about four units a thread: a thread that
                # took every other part restarted its reads (and the prefetch) at each one
                n_parts = c_hi - c_lo
                run = max(1, n_parts * nkv // (4 * nth))
                per = -(-n_parts // run)
                w = take(tfn, cnt, ci, nth, -1, 1)
                while w < nkv * per:
                    g, cr = w // per, c_lo + (w % per) * run
                    heads = slice(g * group, (g + 1) * group)
                    for c in range(cr, min(c_hi, cr + run)):
                        for i in range(k):
                            p = pos + i
                            lo = first_key(p, win)
                            c0, c1 = parts_of(lo, p + 1)
                            if c0 <= c < c1:
                                attend_part(
                                    ql[i, g * group * hd : (g + 1) * group * hd].reshape((group, hd)),
                                    kc[il, g],
                                    vc[il, g],
                                    max(lo, c * PART),
                                    min(p + 1, (c + 1) * PART),
                                    scale,
                                    W,
                                    po[i, c - c0, heads],
                                    pm[i, c - c0, heads],
                                )
                    w = take(tfn, cnt, ci, nth, w, 1)
                att = ab2
            ci += 1
            st = _sync(bfn, yfn, bst, nth)
            if st:
                return st
            if split:
                for i in range(k):
                    p = pos + i
                    c0, c1 = parts_of(first_key(p, win), p + 1)
                    combine(po[i, : c1 - c0], pm[i, : c1 - c0], ab2[i])
        if not (ffn_first and il == l0):
            # output projection, residual
            _matvec_phase(tfn, cnt, ci, nth, desc, m0 + M_O, fns, att, nh * hdv, buf, ob)
            ci += 1
            st = _sync(bfn, yfn, bst, nth)
            if st:
                return st
            for i in range(k):
                _residual(x[i], ob[i, :d], gemma, _vec(vecs, voff, il, V_POST_ATTN, d), eps, h[i])
        # FFN: one unit = 64 rows of gate and of up, and their activation
        for i in range(k):
            _rms(x[i], _vec(vecs, voff, il, V_FFN_NORM, d), eps, h[i])
        if route_last and il == l1 - 1:  # stop at the routing: the hidden state and the chosen experts
            if tid == 0:
                _route_rows(h, il, vecs, voff, ip, rt, rw, rs, mw[3])
                xo[:] = x
            return 0
        if ip[P_NEXP]:
            given = ffn_first and il == l0
            # fmt: off
            st = _moe_ffn(tfn, cnt, ci, nth, bfn, yfn, bst, desc, m0 + M_GATE, fns, h, x, il, vecs, voff, ip, ma,
                          md, buf, mw, e2, given, rt, rw, rs)
            # fmt: on
            if st:
                return st
            ci += 2
            continue
        prepare_rows(desc, m0 + M_GATE, m0 + M_UP + 1, fns, h, d, buf)
        nff = desc[m0 + M_GATE, 1]
        n = desc[m0 + M_GATE, 6]
        ch = _chunk(n, nth)
        u = take(tfn, cnt, ci, nth, -ch, ch)
        while u < n:
            e = min(u + ch, n)
            matvec_rows(desc, m0 + M_GATE, buf, gb, u, e)
            matvec_rows(desc, m0 + M_UP, buf, ub, u, e)
            for i in range(k):
                _act(gb[i], ub[i], ab[i], UNIT * u, min(UNIT * e, nff), gelu, e2)
            u = take(tfn, cnt, ci, nth, u, ch)
        ci += 1
        st = _sync(bfn, yfn, bst, nth)
        if st:
            return st
        _matvec_phase(tfn, cnt, ci, nth, desc, m0 + M_DOWN, fns, ab, nff, buf, fb)
        ci += 1
        st = _sync(bfn, yfn, bst, nth)
        if st:
            return st
        for i in range(k):
            _residual(x[i], fb[i, :d], gemma, _vec(vecs, voff, il, V_POST_FFW, d), eps, h[i])
    if l1 < nl or not head:
        if tid == 0:
            xo[:] = x
        return 0
    # final norm, output projection
    i0 = k - 1 if last_only else 0
    for i in range(i0, k):
        _rms(x[i], vecs[out_norm : out_norm + d], eps, h[i])
    _matvec_phase(tfn, cnt, ci, nth, desc, lay[l1] - lay[l0], fns, h[i0:], d, buf, logits[i0:])
    return 0


# ---------------------------------------------------------------------------------------------
# Python side


class Sync(NamedTuple):
    """The threads' meeting points: barrier and yield function addresses, the work counters."""

    bfn: int
    yfn: int
    tfn: int
    cnt: np.ndarray
    bst: np.ndarray


class Weights(NamedTuple):
    """The model as the step reads it: kernel entry points, the descriptors of the call's
    matrices (a layer's in `_keys` order, then the output matrix when the range ends at the last
    layer), the norm and bias vectors with their offsets, the shape parameters."""

    fns: np.ndarray
    desc: np.ndarray
    lay: np.ndarray  # layer il's first row of desc (of the whole model's; the call's are offsets from lay[l0])
    vecs: np.ndarray
    voff: np.ndarray
    out_norm: int
    swa: np.ndarray
    ip: np.ndarray
    eps: float
    scale: np.float32


class Call(NamedTuple):
    """One call: the rows' hidden state, the KV cache, positions, RoPE tables, outputs, range;
    the attention's parts [k, n, n_head, head_dim_v] and their (max, sum) [k, n, n_head, 2];
    whether layer l0 starts at its FFN (x0: the residual after its attention) and whether layer
    l1 - 1 stops at its routing (xo: the residual; rt, rw, rs: the routing, `_route_rows`), the
    routing then given to the call that starts there; whether layer l0's attention ran elsewhere
    (`attn_in`: its output in ai [k, n_head * head_dim_v]) and whether layer l1 - 1 stops before
    its attention (`attn_out`: xo, and the attention's inputs, RoPE done, in qo, ko, vo);
    whether a range that ends at the last layer computes the logits (`head`; else xo)."""

    x0: np.ndarray
    kc: np.ndarray
    vc: np.ndarray
    pos: int
    cos_g: np.ndarray
    sin_g: np.ndarray
    cos_l: np.ndarray
    sin_l: np.ndarray
    logits: np.ndarray
    last_only: bool
    l0: int
    l1: int
    xo: np.ndarray
    po: np.ndarray
    pm: np.ndarray
    ffn_first: bool
    route_last: bool
    rt: np.ndarray
    rw: np.ndarray
    rs: np.ndarray
    attn_in: bool
    attn_out: bool
    ai: np.ndarray
    qo: np.ndarray
    ko: np.ndarray
    vo: np.ndarray
    head: bool


class Buffers(NamedTuple):
    """Activation buffers [k, ...]: q, k, v, attention/activation, o, gate, up, down outputs;
    an MoE layer's activations and down outputs [slot, ...] (`_moe_ffn`)."""

    qb: np.ndarray
    kb: np.ndarray
    vb: np.ndarray
    ab: np.ndarray
    ob: np.ndarray
    gb: np.ndarray
    ub: np.ndarray
    fb: np.ndarray
    ma: np.ndarray
    md: np.ndarray


class FusedDecoder:
    """One-token decode of a dense model in one numba call per thread."""

    def __init__(self, model, threads: int = 1):
        if not fused.available():
            raise NotFusable("no native kernel path on this host")
        c, st = model.cfg, model.store
        if c.n_head % c.n_head_kv:
            raise NotFusable("heads do not divide into kv groups")
        self.model = model
        self.threads = max(1, int(threads))
        keys = [self._keys(il) for il in range(c.n_layer)]
        self.lay = np.cumsum([0] + [len(ks) for ks in keys]).astype(np.int64)
        mats = [st.matrix(name, e) for ks in keys for name, e in ks] + [st.matrix(model.output_name)]
        self._mats = mats  # keeps the packed arrays alive
        self.desc = self._describe(mats)  # every layer's, then the output matrix
        self._range_desc: dict[tuple[int, int], np.ndarray] = {}
        self._rope: tuple = (None, ())  # ((first position, rows), the RoPE tables) of the last call
        # every matrix's kernel reads its weights once for all k rows (K-quants)
        self.multi_row = bool((self.desc[:, 0] == fused.KIND_KQ).all())
        # the activation builders, then the attention part kernel's addresses (fns[2:5])
        att = kernel_addresses(c.n_head // c.n_head_kv, c.head_dim, c.head_dim_v, KV_TYPES[model.kv_type])
        self.fns = np.concatenate([fused.prep_fns(), att])
        vecs, voff, n = [], np.full((c.n_layer, len(_VEC_NAMES)), -1, np.int64), 0
        for il in range(c.n_layer):
            for j, part in enumerate(_VEC_NAMES):
                name = f"blk.{il}.{part}" + ("" if part.endswith(".bias") else ".weight")
                if st.has(name):
                    v = np.ascontiguousarray(st.get(name), np.float32).reshape(-1)
                    voff[il, j] = n
                    vecs.append(v)
                    n += v.size
        self.out_norm = n
        vecs.append(np.ascontiguousarray(st.get("output_norm.weight"), np.float32).reshape(-1))
        self.vecs = np.concatenate(vecs)
        self.voff = voff
        qkn = {"": 0, None: 0, "head": 1, "full": 2}[c.spec.qk_norm or ""]
        self.ip = np.array(
            [
                c.n_layer,
                c.n_embd,
                c.n_head,
                c.n_head_kv,
                c.head_dim,
                c.head_dim_v,
                c.rope_dim,
                c.spec.rope == ROPE_NEOX,
                c.spec.ffn_act == "gelu",
                qkn,
                bool(c.spec.gemma),
                c.sliding_window,
                c.n_vocab,
                c.n_expert,
                c.n_expert_used,
                bool(c.spec.moe_norm_topk),
                st.has("blk.0.ffn_up_shexp.weight"),
            ],
            np.int64,
        )
        self.swa = np.array(c.swa_layers, np.int64)
        widths = (
            c.n_head * c.head_dim,
            c.n_head_kv * c.head_dim,
            c.n_head_kv * c.head_dim_v,
            max(c.n_ff, c.n_head * c.head_dim_v),
            c.n_embd,
            c.n_ff,
            c.n_ff,
            c.n_embd,
        )
        dense = [np.zeros((MAX_ROWS, _units(w)), np.float32) for w in widths]
        slots = MAX_ROWS * (c.n_expert_used + 1) if c.is_moe else 0
        ff_moe = 0  # the widest expert: routed, or shared
        if c.is_moe:
            ff_moe = max(
                int(self.desc[self.lay[0] + M_GATE + 3 * c.n_expert * j, 1]) for j in range(1 + self.ip[P_SHARED])
            )
        self.bufs = Buffers(
            *dense, np.zeros((slots, _units(ff_moe)), np.float32), np.zeros((slots, _units(c.n_embd)), np.float32)
        )
        n_used = max(c.n_expert_used, 1)
        # a call's routing, for the call after it (MoE layers split at their routing: `step_rows`)
        self.routing = (np.zeros((MAX_ROWS, n_used), np.int64), np.zeros((MAX_ROWS, n_used), np.float32))
        self.routing += (np.zeros(MAX_ROWS, np.float32),)
        # the attention's inputs when it runs elsewhere (`step_rows`' attn_out): q, k and v blocks
        # of MAX_ROWS rows in one array (one copy to a device), each at a multiple of
        # HANDOFF_ALIGN bytes (where a device's sub-buffers may start); its output (attn_in)
        widths = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v)
        block = [-(-MAX_ROWS * w * 4 // HANDOFF_ALIGN) * HANDOFF_ALIGN for w in widths]
        self.handoff_offsets = (0, block[0], block[0] + block[1])
        self.handoff_flat = np.zeros(sum(block) // 4, np.float32)
        self.handoff = tuple(
            self.handoff_flat[o // 4 : o // 4 + MAX_ROWS * w].reshape(MAX_ROWS, w)
            for o, w in zip(self.handoff_offsets, widths)
        ) + (np.zeros((MAX_ROWS, c.n_head * c.head_dim_v), np.float32),)
        self.parts = np.zeros((MAX_ROWS, 0, c.n_head, c.head_dim_v), np.float32)  # grown with the context
        self.parts_ml = np.zeros((MAX_ROWS, 0, c.n_head, 2), np.float32)
        self.logits_width = _units(c.n_vocab)
        shapes = [(M_Q, c.n_head * c.head_dim)] + ([] if c.is_moe else [(M_GATE, c.n_ff), (M_DOWN, c.n_embd)])
        for m, n_out in shapes:
            if self.desc[m, 1] != n_out:
                raise NotFusable("unexpected matrix shapes")
        self.bfn, self.yfn, self.tfn = fused.barrier_address()
        self.bst = fused.new_barrier_state()
        self.cnt = np.zeros(8 * (PHASES * c.n_layer + 1), np.int64)  # one cache line per phase
        self.sync = Sync(self.bfn, self.yfn, self.tfn, self.cnt, self.bst)
        self.weights = Weights(
            self.fns,
            self.desc,
            self.lay,
            self.vecs,
            self.voff,
            self.out_norm,
            self.swa,
            self.ip,
            float(c.rms_eps),
            np.float32(c.attn_scale),
        )
        self._pool = Team(self.threads - 1, "ember-decode") if self.threads > 1 else None
        if self._pool is not None:
            weakref.finalize(self, self._pool.close)

    def _keys(self, il: int) -> list[tuple[str, int | None]]:
        """Layer il's matrices in descriptor order, as (tensor name, expert or None)."""
        c, st = self.model.cfg, self.model.store
        if not c.is_moe:
            return [(f"blk.{il}.{part}.weight", None) for part in _MAT_NAMES]
        keys = [(f"blk.{il}.{part}.weight", None) for part in _MAT_NAMES[:4]]
        keys += [(f"blk.{il}.{part}.weight", e) for e in range(c.n_expert) for part in _EXPERTS]
        if st.has(f"blk.{il}.ffn_up_shexp.weight"):
            keys += [(f"blk.{il}.{part}.weight", None) for part in _SHARED]
        return keys

    def matrix_names(self, layers: range) -> list[str]:
        """The matrices a call over the dense `layers` reads, in descriptor order: NM a layer,
        then the output matrix when the range ends at the last layer."""
        if self.model.cfg.is_moe:
            raise NotFusable("an MoE layer's experts are no whole matrices to stream")
        names = [name for il in layers for name, _ in self._keys(il)]
        if layers.stop == self.model.cfg.n_layer:
            names.append(self.model.output_name)
        return names

    @staticmethod
    def _describe(mats) -> np.ndarray:
        for m in mats:
            if isinstance(m, np.ndarray) or not fused.fusable(m):
                name = getattr(m, "name", "a float matrix")
                raise NotFusable(f"{name} has no fused kernel")
        return np.stack([fused.describe(m) for m in mats])

    def rows(self, layers: range) -> np.ndarray:
        """The rows of `desc` a call over `layers` reads: the layers', then the output matrix's
        when the range ends at the last layer."""
        rows = list(range(self.lay[layers.start], self.lay[layers.stop]))
        if layers.stop == self.model.cfg.n_layer:
            rows.append(len(self.desc) - 1)
        return np.array(rows, np.int64)

    def describe(self, layers: range, mats=None) -> np.ndarray:
        """The descriptors of a call over `layers`: of the placed matrices (cached per range), or
        of `mats` (the matrices of `matrix_names(layers)`, in that order, e.g. buffers a streamer
        has just filled; they must outlive the call), checked against the placed ones' kernels
        and shapes."""
        key = (layers.start, layers.stop)
        full = self._range_desc.get(key)
        if full is None:
            full = self._range_desc[key] = np.ascontiguousarray(self.desc[self.rows(layers)])
        if mats is None:
            return full
        if len(mats) != len(full):
            raise ValueError(f"layers {layers.start}..{layers.stop - 1} read {len(full)} matrices, got {len(mats)}")
        desc = self._describe(mats)
        if not np.array_equal(desc[:, [0, 1, 2, 6]], full[:, [0, 1, 2, 6]]):
            raise ValueError("the matrices given differ in kernel or shape from the model's")
        return desc

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """Hidden state rows [k, n_embd] (a `head=False` call's) after the final norm: what the
        output matrix multiplies."""
        out = np.empty_like(x)
        _final_norm(x, self.vecs[self.out_norm :], self.weights.eps, out)
        return out

    def parts_bytes(self, n_ctx: int) -> int:
        """Bytes of the attention's parts (and their max and sum) at a context of n_ctx tokens."""
        c = self.model.cfg
        return MAX_ROWS * -(-n_ctx // PART) * c.n_head * (c.head_dim_v + 2) * 4

    def step(self, token: int, cache) -> np.ndarray:
        """Logits [n_vocab] after `token` at position len(cache); appends its keys and values."""
        return self.step_rows([token], cache)[0]

    def step_rows(
        self,
        tokens,
        cache,
        all_logits: bool = True,
        layers: range | None = None,
        mats=None,
        offset: int = 0,
        commit: bool = True,
        desc: np.ndarray | None = None,
        ffn_first: bool = False,
        route_last: bool = False,
        attn_in: np.ndarray | None = None,
        attn_out: bool = False,
        head: bool = True,
    ) -> np.ndarray:
        """Logits [k, n_vocab] of k <= MAX_ROWS new tokens at positions len(cache)... (only
        the last one's, [1, n_vocab], when all_logits is False); appends their keys and
        values. With `layers`, a range of layers only (`Transformer.forward`'s contract): from
        the hidden state [k, n_embd] given for `tokens` when it starts past layer 0, and to
        the hidden state when it ends before the last layer (the positions are committed to
        the cache by the range that ends there). `mats`: the range's matrices to read instead
        of the placed ones (see `describe`). `offset`, `commit=False`: the rows sit `offset`
        positions past the cache's length, and the caller commits them (a batch run layer by
        layer in chunks of MAX_ROWS, every chunk of a layer before the next layer).

        An MoE model's layers can run in pieces that meet at a layer's routing, so the experts
        it chose can be fetched in between (`experts.ExpertModel`): `route_last`, the call
        stops there and returns the hidden state, the routing in `self.routing`; `ffn_first`,
        the call starts there, from that hidden state and routing. `desc`: the descriptors of
        the range's matrices (`rows(layers)` of a table like `self.desc`) to read instead.

        A layer's attention can run elsewhere (a GPU: `devices.hybrid`): `attn_out`, the call
        stops before layer l1 - 1's attention and returns the hidden state, the attention's
        inputs in `self.handoff` (q, k, v rows, RoPE done: [k, n_head * head_dim], [k, n_kv *
        head_dim], [k, n_kv * head_dim_v]; blocks of MAX_ROWS rows of `self.handoff_flat`, at
        `self.handoff_offsets` bytes); `attn_in` [k, n_head * head_dim_v], the call starts
        at layer l0's output projection with that attention output, from the hidden state
        given. Such a call neither reads nor writes the cache; `cache` still gives the rows'
        positions (its length).

        `head=False`: a range that ends at the last layer returns its hidden state instead of
        the logits (the output matrix streams: `head_rows` and `streaming`)."""
        c = self.model.cfg
        layers = self.model.check_layers(layers)
        if (ffn_first or route_last) and not c.is_moe:
            raise ValueError("only an MoE model's layers run in pieces split at the routing")
        if (ffn_first or route_last) and (attn_in is not None or attn_out):
            raise ValueError("a call splits at the routing or at the attention, not both")
        if layers.start == 0 and not ffn_first and attn_in is None:
            k = len(tokens)
            if not 1 <= k <= MAX_ROWS:
                raise ValueError(f"the fused step takes 1..{MAX_ROWS} tokens at once, got {k}")
            x0 = self.model.embed(tokens)
        else:
            x0 = np.ascontiguousarray(tokens, dtype=np.float32)
            k = x0.shape[0]
            if not 1 <= k <= MAX_ROWS or x0.shape != (k, c.n_embd):
                raise ValueError(
                    f"the fused step takes a hidden state of 1..{MAX_ROWS} rows of {c.n_embd}, got {x0.shape}"
                )
        last = layers.stop == c.n_layer and not route_last and not attn_out and head
        q_o, k_o, v_o, a_i = (b[:k] for b in self.handoff)
        if attn_in is not None:
            if attn_in.shape != a_i.shape:
                raise ValueError(f"the attention output given is {attn_in.shape}, not {a_i.shape}")
            a_i[:] = attn_in
        cache.reserve(offset + k)
        pos = cache.length + offset
        if self._rope[0] != (pos, k):  # the same rows' calls a layer at a time share them
            positions = np.arange(pos, pos + k)
            tables = (
                *rope_tables(positions, c.rope_dim, c.rope_base),
                *rope_tables(positions, c.rope_dim, c.rope_base_local),
            )
            self._rope = ((pos, k), tables)
        cg, sg, cl, sl = self._rope[1]
        self.bst[:] = 0
        self.cnt[:] = 0
        # returned, no copy to make; the other output is a placeholder of the same type
        logits = np.empty((k if last else 1, self.logits_width), np.float32)
        xo = np.empty((1 if last else k, c.n_embd), np.float32)
        n_parts = -(-(pos + k) // PART)
        if self.parts.shape[1] < n_parts:
            grown = max(n_parts, 2 * self.parts.shape[1])
            self.parts = np.zeros((MAX_ROWS, grown, c.n_head, c.head_dim_v), np.float32)
            self.parts_ml = np.zeros((MAX_ROWS, grown, c.n_head, 2), np.float32)
        call = Call(
            *(x0, cache.k_all, cache.v_all, pos, cg, sg, cl, sl, logits, not all_logits, layers.start, layers.stop, xo),
            *(self.parts[:k], self.parts_ml[:k], ffn_first, route_last, *self.routing),
            *(attn_in is not None, attn_out, a_i, q_o, k_o, v_o, head),
        )
        weights = self.weights._replace(desc=self.describe(layers, mats) if desc is None else desc)
        bufs = Buffers(*(b[:k] for b in self.bufs[:-2]), *self.bufs[-2:])  # MoE slots: k * (n_used + 1) of them
        args = (self.threads, self.sync, weights, call, bufs)
        if self._pool is None:
            status = [_decode(0, *args)]
        else:
            status = self._pool.run(_decode, args, self._abort)
        for s in status:
            if isinstance(s, BaseException):
                raise s
        if any(status):
            raise EmberError(
                f"fused decode: a thread stalled at a barrier (status {status}); "
                "another process may be starving the CPU"
            )
        if not last:
            return xo
        if commit:
            cache.commit(k)
        out = logits[0 if all_logits else k - 1 :]
        return out if out.shape[1] == c.n_vocab else np.ascontiguousarray(out[:, : c.n_vocab])

    def _abort(self) -> None:
        self.bst[fused.ABORT] = 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
