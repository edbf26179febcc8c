"""ember's CUDA kernels (numba.cuda): a transformer block's math on float32 activations, weights
in their GGUF blocks (dequantized in the kernel), keys and values in half precision; the same
math and launch shapes as the OpenCL device's group-per-row kernels (`opencl/kernels.cl`).

They compile for a GPU through numba-cuda, and run on the CPU under numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1, set before numba.cuda is first imported), which the tests use on small
shapes. Launch: `kernel[grid, block](args)`; block sizes WG (a warp's multiple), ROWS
activation rows a matmul block multiplies. The reductions take one barrier (`syncthreads`, each
of which costs the simulator ~30 ms a block), then a thread sums the WG partial sums itself.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32

WG = 32  # threads of a block (a warp): the matmul's chunks and the attention's keys are shared out
ROWS = 8  # activation rows one matmul block multiplies
MAXG = 16  # query heads per key/value head, at most
MAXDPT = 8  # value dims per attention thread, at most: head_dim_v <= MAXDPT * WG
MAXD = 256  # head dims, at most


@cuda.jit(device=True, inline=True)
def f16(b, o):
    """The little-endian IEEE half at b[o:o + 2] (uint8) as a float32, exactly."""
    h = int32(b[o]) | (int32(b[o + 1]) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 31:
        v = math.inf if m == 0 else math.nan
    elif e == 0:
        v = float32(m) * float32(2.0**-24)
    else:
        v = float32(m | 1024) * float32(2.0 ** (e - 25)) if e >= 25 else float32(m | 1024) / float32(2 ** (25 - e))
    return -v if h & 32768 else v


@cuda.jit(device=True, inline=True)
def i8(x):
    return int32(x) - 256 if x >= 128 else int32(x)


@cuda.jit(device=True, inline=True)
def u32(b, o):
    return int32(b[o]) | (int32(b[o + 1]) << 8) | (int32(b[o + 2]) << 16) | (int32(b[o + 3]) << 24)


# ---- the 32 weights of chunk c of a row (uint8 bytes from offset r) into w -------------------


@cuda.jit(device=True, inline=True)
def _nibbles(W, q, qh, d, m, zero, w):
    for j in range(16):
        x = int32(W[q + j])
        lo = (x & 15) | (((qh >> j) & 1) << 4)
        hi = (x >> 4) | (((qh >> (j + 16)) & 1) << 4)
        w[j] = d * float32(lo - zero) + m
        w[j + 16] = d * float32(hi - zero) + m


@cuda.jit(device=True)
def deq_f32(W, r, c, w):
    """W: the rows as float32 (the bytes viewed), r still in bytes."""
    for j in range(32):
        w[j] = W[r // 4 + c * 32 + j]


@cuda.jit(device=True)
def deq_f16(W, r, c, w):
    for j in range(32):
        w[j] = f16(W, r + 2 * (c * 32 + j))


@cuda.jit(device=True)
def deq_q4_0(W, r, c, w):
    b = r + c * 18
    _nibbles(W, b + 2, 0, f16(W, b), float32(0.0), 8, w)


@cuda.jit(device=True)
def deq_q4_1(W, r, c, w):
    b = r + c * 20
    _nibbles(W, b + 4, 0, f16(W, b), f16(W, b + 2), 0, w)


@cuda.jit(device=True)
def deq_q5_0(W, r, c, w):
    b = r + c * 22
    _nibbles(W, b + 6, u32(W, b + 2), f16(W, b), float32(0.0), 16, w)


@cuda.jit(device=True)
def deq_q5_1(W, r, c, w):
    b = r + c * 24
    _nibbles(W, b + 8, u32(W, b + 4), f16(W, b), f16(W, b + 2), 0, w)


@cuda.jit(device=True)
def deq_q8_0(W, r, c, w):
    b = r + c * 34
    d = f16(W, b)
    for j in range(32):
        w[j] = d * float32(i8(W[b + 2 + j]))


@cuda.jit(device=True, inline=True)
def _kq_run(W, b, j, qs, qh, w):
    s = b + 4
    if j < 4:
        sc = int32(W[s + j]) & 63
        mn = int32(W[s + j + 4]) & 63
    else:
        sc = (int32(W[s + j + 4]) & 15) | ((int32(W[s + j - 4]) >> 2) & 48)
        mn = (int32(W[s + j + 4]) >> 4) | ((int32(W[s + j]) >> 2) & 48)
    dl = f16(W, b) * float32(sc)
    ml = f16(W, b + 2) * float32(mn)
    q = qs + (j >> 1) * 32
    shift = 4 * (j & 1)
    for l in range(32):
        v = (int32(W[q + l]) >> shift) & 15
        if qh >= 0:
            v |= ((int32(W[qh + l]) >> j) & 1) << 4
        w[l] = dl * float32(v) - ml


@cuda.jit(device=True)
def deq_q4_k(W, r, c, w):
    b = r + (c >> 3) * 144
    _kq_run(W, b, c & 7, b + 16, -1, w)


@cuda.jit(device=True)
def deq_q5_k(W, r, c, w):
    b = r + (c >> 3) * 176
    _kq_run(W, b, c & 7, b + 48, b + 16, w)


@cuda.jit(device=True)
def deq_q6_k(W, r, c, w):
    b = r + (c >> 3) * 210
    g = c & 7
    h, s = g >> 2, g & 3
    d = f16(W, b + 208)
    dl0 = d * float32(i8(W[b + 192 + 2 * g]))
    dl1 = d * float32(i8(W[b + 193 + 2 * g]))
    lo = b + h * 64 + (s & 1) * 32
    hi = b + 128 + h * 32
    ls, hs = 4 * (s >> 1), 2 * s
    for l in range(32):
        q = ((int32(W[lo + l]) >> ls) & 15) | (((int32(W[hi + l]) >> hs) & 3) << 4)
        w[l] = (dl0 if l < 16 else dl1) * float32(q - 32)


def _matmul(deq):
    """Y[r, o] = sum_i X[r, i] W[o, i] (+ bias[o]): a block per output o (grid x) and ROWS rows
    of X (grid y); its threads take the row's 32-weight chunks in turn."""

    @cuda.jit
    def matmul(W, row_bytes, n_in, X, n, Y, n_out, bias, has_bias):
        o, t, r0 = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockIdx.y * ROWS
        nr = min(ROWS, n - r0)
        w = cuda.local.array(32, float32)
        acc = cuda.local.array(ROWS, float32)
        for r in range(ROWS):
            acc[r] = 0.0
        c = t
        while c < n_in // 32:
            deq(W, o * row_bytes, c, w)
            for r in range(nr):
                s = float32(0.0)
                for j in range(32):
                    s += w[j] * X[r0 + r, c * 32 + j]
                acc[r] += s
            c += WG
        red = cuda.shared.array((ROWS, WG), float32)
        for r in range(ROWS):
            red[r, t] = acc[r]
        cuda.syncthreads()  # the one barrier: thread r sums row r's WG partial sums
        if t < nr:
            s = float32(0.0)
            for u in range(WG):
                s += red[t, u]
            Y[r0 + t, o] = s + (bias[o] if has_bias else float32(0.0))

    return matmul


# the GGUF type names (as `gpu.MATMUL_TYPES` has them) -> their matmul kernels
MATMUL = {
    name: _matmul(deq)
    for name, deq in {
        "f32": deq_f32,
        "f16": deq_f16,
        "q4_0": deq_q4_0,
        "q4_1": deq_q4_1,
        "q5_0": deq_q5_0,
        "q5_1": deq_q5_1,
        "q8_0": deq_q8_0,
        "q4_k": deq_q4_k,
        "q5_k": deq_q5_k,
        "q6_k": deq_q6_k,
    }.items()
}


def matmul(kind: str, W, row_bytes: int, n_in: int, X, n: int, Y, n_out: int, bias, has_bias: bool) -> None:
    """Launch MATMUL[kind] over GGUF rows W (uint8, flat): Y [n, n_out] = X [n, n_in] @ W.T (+ bias)."""
    if kind == "f32":
        W = W.view(np.float32)
    MATMUL[kind][(n_out, -(-n // ROWS)), WG](W, row_bytes, n_in, X, n, Y, n_out, bias, has_bias)


@cuda.jit
def rms_norm(X, w, Y, eps):
    """Y[r] = X[r] / sqrt(mean(X[r]^2) + eps) * w: a block per row (X, Y [rows, width]; Y may be X)."""
    r, t = cuda.blockIdx.x, cuda.threadIdx.x
    width = X.shape[1]
    red = cuda.shared.array(WG, float32)
    s = float32(0.0)
    i = t
    while i < width:
        s += X[r, i] * X[r, i]
        i += WG
    red[t] = s
    cuda.syncthreads()
    s = float32(0.0)
    for u in range(WG):  # every thread sums the WG partial sums: no more barriers
        s += red[u]
    inv = float32(1.0) / math.sqrt(s / width + eps)
    i = t
    while i < width:
        Y[r, i] = X[r, i] * inv * w[i]
        i += WG


@cuda.jit
def add(X, Y):
    i = cuda.grid(1)
    if i < X.size:
        X[i] += Y[i]


@cuda.jit
def glu(G, U, gelu):
    """G = act(G) * U: SiLU, or the tanh approximation of GELU."""
    i = cuda.grid(1)
    if i < G.size:
        g = G[i]
        a = (
            0.5 * g * (1.0 + math.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
            if gelu
            else g / (1.0 + math.exp(-g))
        )
        G[i] = a * U[i]


@cuda.jit
def rope(X, cs, sn, neox):
    """RoPE in place on X [n, heads, head_dim], its first 2 * half dims (cs, sn [n, half])."""
    n, heads = X.shape[0], X.shape[1]
    half = cs.shape[1]
    k = cuda.grid(1)
    if k < n * heads * half:
        i, rh = k % half, k // half
        r, h = rh // heads, rh % heads
        a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
        xa, xb = X[r, h, a], X[r, h, b]
        c, s = cs[r, i], sn[r, i]
        X[r, h, a] = xa * c - xb * s
        X[r, h, b] = xa * s + xb * c


@cuda.jit
def kv_store(K, V, Kc, Vc, start):
    """Keys and values [n, n_kv, d] of n new positions into a layer's cache [n_kv, cap, d] at
    `start`, as halves."""
    n, n_kv, d = K.shape
    dv = V.shape[2]
    w = max(d, dv)
    k = cuda.grid(1)
    if k < n * n_kv * w:
        i, rh = k % w, k // w
        r, h = rh // n_kv, rh % n_kv
        if i < d:
            Kc[h, start + r, i] = K[r, h, i]
        if i < dv:
            Vc[h, start + r, i] = V[r, h, i]


@cuda.jit
def attn_split(Q, Kc, Vc, pos0, window, scale, split, Op, ML):
    """Split-K attention: a block per (row, key/value head) (grid x) and split of `split` keys
    (grid y); an online softmax over tiles of WG keys for the query heads of the kv head.
    Q [n, n_head, d]; Kc, Vc [n_kv, cap, d] halves; Op [n, n_head, n_split, dv] (unnormalized),
    ML [n, n_head, n_split, 2] (max, sum of exps). Row r sits at position pos0 + r and sees keys
    j <= pos0 + r (and j > pos0 + r - window when window > 0)."""
    n_head, d = Q.shape[1], Q.shape[2]
    n_kv, dv = Kc.shape[0], Vc.shape[2]
    t, rk, s = cuda.threadIdx.x, cuda.blockIdx.x, cuda.blockIdx.y
    r, kh = rk // n_kv, rk % n_kv
    g = n_head // n_kv
    p = pos0 + r
    lo = max(s * split, p - window + 1 if window > 0 else 0)
    hi = min((s + 1) * split, p + 1)
    sc = cuda.shared.array((MAXG, WG), float32)
    mnew = cuda.shared.array(MAXG, float32)
    corr = cuda.shared.array(MAXG, float32)
    m = cuda.local.array(MAXG, float32)
    l = cuda.local.array(MAXG, float32)
    acc = cuda.local.array((MAXG, MAXDPT), float32)
    for h in range(g):
        m[h] = -math.inf
        l[h] = 0.0
        for e in range(MAXDPT):
            acc[h, e] = 0.0
    j0 = lo
    while j0 < hi:
        nt = min(WG, hi - j0)
        if t < nt:
            for h in range(g):
                x = float32(0.0)
                for i in range(d):
                    x += Q[r, kh * g + h, i] * float32(Kc[kh, j0 + t, i])
                sc[h, t] = x * scale
        cuda.syncthreads()
        if t < g:
            mx = m[t]
            for u in range(nt):
                mx = max(mx, sc[t, u])
            mnew[t] = mx
            corr[t] = math.exp(m[t] - mx)
        cuda.syncthreads()
        for h in range(g):
            if t < nt:
                sc[h, t] = math.exp(sc[h, t] - mnew[h])
        cuda.syncthreads()
        for h in range(g):
            tot = float32(0.0)
            for u in range(nt):
                tot += sc[h, u]
            l[h] = l[h] * corr[h] + tot
            m[h] = mnew[h]
            for e in range(MAXDPT):
                i = t + e * WG
                if i < dv:
                    a = acc[h, e] * corr[h]
                    for u in range(nt):
                        a += sc[h, u] * float32(Vc[kh, j0 + u, i])
                    acc[h, e] = a
        cuda.syncthreads()
        j0 += WG
    for h in range(g):
        for e in range(MAXDPT):
            i = t + e * WG
            if i < dv:
                Op[r, kh * g + h, s, i] = acc[h, e]
        if t == 0:
            ML[r, kh * g + h, s, 0] = m[h]
            ML[r, kh * g + h, s, 1] = l[h]


@cuda.jit
def attn_merge(Op, ML, O):
    """O [n, n_head, dv] from attn_split's splits: a thread per (row and head, dim)."""
    n, n_head, n_split, dv = Op.shape
    k = cuda.grid(1)
    if k < n * n_head * dv:
        i, rh = k % dv, k // dv
        r, h = rh // n_head, rh % n_head
        mx = -math.inf
        for s in range(n_split):
            mx = max(mx, ML[r, h, s, 0])
        tot = float32(0.0)
        a = float32(0.0)
        for s in range(n_split):
            ms = ML[r, h, s, 0]
            if ms != -math.inf:
                f = math.exp(ms - mx)
                tot += ML[r, h, s, 1] * f
                a += Op[r, h, s, i] * f
        O[r, h, i] = a / tot
