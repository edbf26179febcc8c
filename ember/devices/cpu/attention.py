"""Grouped-query attention in numba: one kv group of query heads at one position (`attend`,
used by the fused decode step) and a whole batch of positions (`attention_batch`, prefill and
verification), split over the batch path's threads.

`model.attention` (NumPy) is the reference both are tested against. The batch form skips the
keys a causal (or sliding-window) mask hides instead of computing and masking them, so a prompt
of n tokens costs n^2/2 dot products, not n^2; its threads are `lut_kernels.split`'s, like the
rest of the batch path's.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ...lut_kernels.split import MIN_ROWS, split
from .vmath import exp_into

Q_CHUNK = 8  # query positions per work item of attention_batch


@njit(cache=True, nogil=True, fastmath=True)
def attend(Q, K, V, lo, hi, scale, S, out):
    """out[h] = softmax(scale * K[lo:hi] Q[h]) @ V[lo:hi] for the query heads Q [g, d] of one
    kv group (K [T, d], V [T, dv]; S [g, >= hi - lo] scratch). Register-blocked: the scores
    of 2 heads x 4 keys share one pass over d (8 sums), and the output adds 4 keys per pass
    over dv (rows are views walked from index 0, so LLVM vectorizes the inner loops): 6 heads
    x 72 keys x 128 took ~5.3 us, ~7.8 one dot product and one row update at a time (a timing
    script, not bench/)."""
    n = hi - lo
    g = Q.shape[0]
    Ks, Vs = K[lo:hi], V[lo:hi]
    d, dv = Ks.shape[1], out.shape[1]
    n4, g2 = n - n % 4, g - g % 2
    for h in range(0, g2, 2):
        qa, qb = Q[h], Q[h + 1]
        for j in range(0, n4, 4):
            k0, k1, k2, k3 = Ks[j], Ks[j + 1], Ks[j + 2], Ks[j + 3]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            for i in range(d):
                x, y = qa[i], qb[i]
                a0 += x * k0[i]
                a1 += x * k1[i]
                a2 += x * k2[i]
                a3 += x * k3[i]
                b0 += y * k0[i]
                b1 += y * k1[i]
                b2 += y * k2[i]
                b3 += y * k3[i]
            S[h, j], S[h, j + 1], S[h, j + 2], S[h, j + 3] = a0, a1, a2, a3
            S[h + 1, j], S[h + 1, j + 1], S[h + 1, j + 2], S[h + 1, j + 3] = b0, b1, b2, b3
    for h in range(g):  # the keys (and heads) left over
        qh = Q[h]
        for j in range(n4 if h < g2 else 0, n):
            kj = Ks[j]
            s = np.float32(0.0)
            for i in range(d):
                s += qh[i] * kj[i]
            S[h, j] = s
    e2 = np.empty(n, np.int32)
    for h in range(g):
        sh = S[h, :n]
        for j in range(n):
            sh[j] *= scale
        mx = sh.max()
        for j in range(n):
            sh[j] -= mx
        exp_into(sh, sh, e2)
        tot = np.float32(0.0)
        for j in range(n):
            tot += sh[j]
        inv = np.float32(1.0) / tot
        for j in range(n):
            sh[j] *= inv
    for h in range(g):
        ah = out[h]
        ah[:] = 0
        for j in range(0, n4, 4):
            p0, p1, p2, p3 = S[h, j], S[h, j + 1], S[h, j + 2], S[h, j + 3]
            v0, v1, v2, v3 = Vs[j], Vs[j + 1], Vs[j + 2], Vs[j + 3]
            for i in range(dv):
                ah[i] += (p0 * v0[i] + p1 * v1[i]) + (p2 * v2[i] + p3 * v3[i])
        for j in range(n4, n):
            p = S[h, j]
            vj = Vs[j]
            for i in range(dv):
                ah[i] += p * vj[i]


@njit(cache=True, nogil=True)
def _items(q, k, v, q_pos, scale, window, out, w0, w1):
    """Work items w0..w1-1 of a batch: item w = one kv group and one chunk of Q_CHUNK queries,
    in an order where cheap (early) and costly (late) chunks alternate, so that contiguous
    shares of the items cost about the same."""
    n, n_head, d = q.shape
    n_kv, T, dv = v.shape
    g = n_head // n_kv
    nq = -(-n // Q_CHUNK)
    for w in range(w0, w1):
        kv = w % n_kv
        c = w // n_kv
        c = c // 2 if c % 2 == 0 else nq - 1 - c // 2
        i0 = c * Q_CHUNK
        i1 = min(i0 + Q_CHUNK, n)
        S = np.empty((g, q_pos[i1 - 1] + 1), np.float32)
        for i in range(i0, i1):
            lo = 0 if window == 0 else max(0, q_pos[i] - window + 1)
            attend(
                q[i, kv * g : (kv + 1) * g],
                k[kv],
                v[kv],
                lo,
                q_pos[i] + 1,
                scale,
                S,
                out[i, kv * g * dv : (kv + 1) * g * dv].reshape((g, dv)),
            )


def attention_batch(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float, window: int, threads: int = 1
) -> np.ndarray:
    """Same contract as `model.attention`: q [n, n_head, d]; k [n_kv, T, d]; v [n_kv, T, dv]
    (key j at position j); returns [n, n_head * dv]. Causal; window > 0: a query at p sees keys
    p - window < j <= p. Positions must be consecutive (a batch after the cache) and < T."""
    n, n_head, _ = q.shape
    n_kv, T, dv = v.shape
    q_pos = np.ascontiguousarray(q_pos, dtype=np.int64)
    if q_pos.size != n or (n and (q_pos[0] < 0 or q_pos[-1] >= T or np.any(np.diff(q_pos) != 1))):
        raise ValueError("attention_batch: query positions must lie inside the keys")
    out = np.empty((n, n_head * dv), np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)
    scale, window = np.float32(scale), int(window)
    split(
        n_kv * -(-n // Q_CHUNK),
        threads if n >= MIN_ROWS else 1,
        lambda w0, w1: _items(q, k, v, q_pos, scale, window, out, w0, w1),
    )
    return out
