"""Routing of a mixture-of-experts layer inside the fused step: each row's top experts and their
weights from the router, and the rows grouped by expert, so that each chosen expert's weights
are read once for all the rows that chose it.

Every thread computes the same routing (a few hundred thousand multiply-adds a row), so the
threads need no barrier to agree on it. Ties between experts go to the lower id, as NumPy's
stable argsort in `Transformer._moe` does.
"""

from __future__ import annotations

import numpy as np
from numba import njit


# reassociation lets the dot products run in vector lanes (docs/moe.md); every thread and every
# row still run the same code, so they agree bit for bit
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def route(h, router, n_used, norm, top, wts, logits):
    """Row `h`'s top `n_used` experts (into `top`, best first) and their softmax probabilities
    over all experts (into `wts`; renormalised to sum to 1 when `norm`), from `router`
    [n_expert * d] float32; `logits`: float32 scratch of n_expert."""
    d = h.size
    n_exp = logits.size
    for e in range(n_exp):
        w = router[e * d : (e + 1) * d]
        acc = np.float32(0.0)
        for j in range(d):
            acc += h[j] * w[j]
        logits[e] = acc
    mx = logits.max()
    total = np.float32(0.0)
    for e in range(n_exp):
        logits[e] = np.exp(logits[e] - mx)
        total += logits[e]
    for e in range(n_exp):
        logits[e] /= total
    for j in range(n_used):
        best = -1
        for e in range(n_exp):
            if logits[e] >= 0 and (best < 0 or logits[e] > logits[best]):
                best = e
        if best < 0:  # NaN logits (a broken model): garbage out, but never an id out of range
            best = j % n_exp
        top[j] = best
        wts[j] = logits[best]
        logits[best] = -1.0  # taken
    if norm:
        s = np.float32(0.0)
        for j in range(n_used):
            s += wts[j]
        for j in range(n_used):
            wts[j] /= s


@njit(cache=True, nogil=True, inline="always")
def group(top, n_exp, count, order, qe, qs):
    """The slots (row i's j-th choice is slot i * n_used + j; `top` [k, n_used]) grouped by
    expert: `qe[:nq]` the chosen experts in increasing id, the slots of `qe[q]` are
    `order[qs[q]:qs[q + 1]]` (rows in increasing order). Returns nq; `count`: int64 scratch of
    n_exp + 1."""
    k, n_used = top.shape
    count[:] = 0
    for i in range(k):
        for j in range(n_used):
            count[top[i, j] + 1] += 1
    nq = 0
    for e in range(n_exp):
        if count[e + 1] > 0:
            qe[nq] = e
            nq += 1
        count[e + 1] += count[e]
    q = 0
    for e in range(n_exp):
        if count[e + 1] > count[e]:
            qs[q] = count[e]
            q += 1
    qs[nq] = k * n_used
    for i in range(k):
        for j in range(n_used):
            e = top[i, j]
            order[count[e]] = i * n_used + j
            count[e] += 1
    return nq
