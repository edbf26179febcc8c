"""The portable K-quant path: plain numba, for hosts (or ``kernel="portable"``) without an IR
kernel path.

``rows_portable(q, sc, d, xq, xd, xp, y, r0, r1)`` computes what the IR kernels compute
(``kquant_ir``) for rows r0 <= r < r1 of y [k, >= r1], from a ``PackedKQ``'s arrays and the
activation format of ``kquant_acts``: each super-block is decoded to float32 weights, 256
float32 lanes per act row accumulate ``w * (xq dx)`` (exact products of the same quantized
values), a tree sum at the end; it differs from the integer kernels by float32 rounding only.
The type is read from the arrays' shapes; no shape checks (``kquant.matmul_nb`` checks them).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .pack import half_to_f32, tree_sum

__all__ = ["rows_portable"]


@njit(cache=True, nogil=True)
def rows_portable(q, sc, d, xq, xd, xp, y, r0, r1):
    """Plain numba: each super-block of a row is decoded to float32 weights once (``SC q - MM``
    or ``SC (q - offset)``, kernel lane order; the type from the shapes), then 256 float32
    lanes per act row accumulate ``w * xhat`` with ``xhat = xq dx`` (exact products of
    the same quantized values: differs from the integer kernels by float32 rounding only), a
    tree sum at the end. The lanes are the vector: LLVM vectorizes without fastmath."""
    nsb, k = xq.shape[0], y.shape[0]
    qb = q.shape[1] // nsb
    pair = qb == 128 or qb == 160  # Q4_K, Q5_K: row pairs, per 32-block
    crumbs = qb == 64 or qb == 96  # Q2_K, Q3_K: 2-bit low codes
    off = 32 if qb == 192 else 4 if qb == 96 else 0
    w = np.empty(256, np.float32)
    qi = np.empty(256, np.int32)
    scv = np.empty(64, np.float32)
    mmv = np.zeros(64, np.float32)
    xf = np.empty((nsb, k, 256), np.float32)
    for s in range(nsb):
        for i in range(k):
            xs_, xo_, dx_ = xf[s, i], xq[s, i], xd[0, s, i]
            for o in range(256):
                xs_[o] = np.float32(xo_[o]) * dx_[(o & 63) >> 2]
    acc = np.empty((k, 256), np.float32)
    qf, scf, df = q.reshape(q.size), sc.reshape(sc.size), d.reshape(d.size)
    for r in range(r0, r1):
        acc[:] = 0
        qrow = q[r]
        m, jr = r >> 1, r & 1
        for s in range(nsb):
            qo = s * qb
            if pair:  # the pair's super-block: code vector (v, h) lane 8 jr + p, byte t
                base = 2 * m * nsb * qb + 2 * qb * s
                for v in range(4):
                    for j in range(64):  # act lane L = j >> 2 = 8 h + p, byte t = j & 3
                        h, pl = j >> 5, (j >> 2) & 7
                        o = base + 64 * v + 4 * (8 * jr + pl) + (j & 3)
                        c = (np.int32(qf[o]) >> (4 * h)) & 15
                        if qb == 160:  # Q5_K: bit 2 v + h of the plane byte
                            c |= ((np.int32(qf[o - 64 * v + 256]) >> (2 * v + h)) & 1) << 4
                        qi[64 * v + j] = c
                sb, db = 2 * m * nsb * 16 + 32 * s, 2 * m * nsb * 2 + 4 * s
                dd = half_to_f32(df[db + jr])
                dm = half_to_f32(df[db + 2 + jr])
                for j in range(64):  # lane j >> 2: block (j >> 2) & 7
                    scv[j] = dd * np.float32(scf[sb + 8 * jr + ((j >> 2) & 7)])
                    mmv[j] = dm * np.float32(scf[sb + 16 + 8 * jr + ((j >> 2) & 7)])
            elif crumbs:  # byte j, bits 2v..2v+1: code (v, j)
                for v in range(4):
                    for j in range(64):
                        qi[64 * v + j] = (np.int32(qrow[qo + j]) >> (2 * v)) & 3
            else:  # nibbles: byte 64 c + j = v 2c | 2c+1 << 4
                for c in range(2):
                    for j in range(64):
                        byte = np.int32(qrow[qo + 64 * c + j])
                        qi[128 * c + j] = byte & 15
                        qi[128 * c + 64 + j] = byte >> 4
            if qb == 192:  # Q6_K: 2 high bits at bits 2v..2v+1
                for v in range(4):
                    for j in range(64):
                        qi[64 * v + j] |= ((np.int32(qrow[qo + 128 + j]) >> (2 * v)) & 3) << 4
            elif qb == 96:  # Q3_K: a 32-byte bit plane
                for v in range(4):
                    for j in range(64):
                        byte = np.int32(qrow[qo + 64 + (j & 31)])
                        qi[64 * v + j] |= ((byte >> (v + 4 * (j >> 5))) & 1) << 2
            if qb == 64:  # Q2_K: scale | min << 4 per 16-group j >> 2
                dd = half_to_f32(d[r, 2 * s])
                dm = half_to_f32(d[r, 2 * s + 1])
                for j in range(64):
                    b = np.int32(sc[r, 16 * s + (j >> 2)])
                    scv[j] = dd * np.float32(b & 15)
                    mmv[j] = dm * np.float32(b >> 4)
            elif not pair:  # int8 scales per 16-group j >> 2
                dd = half_to_f32(d[r, s])
                for j in range(64):
                    scv[j] = dd * np.float32((np.int32(sc[r, 16 * s + (j >> 2)]) ^ 0x80) - 0x80)
            for v in range(4):
                wv = w[64 * v : 64 * v + 64]
                qv = qi[64 * v : 64 * v + 64]
                for j in range(64):
                    wv[j] = scv[j] * np.float32(qv[j] - off) - mmv[j]
            for i in range(k):
                a = acc[i]
                x = xf[s, i]
                for o in range(256):
                    a[o] += w[o] * x[o]
        for i in range(k):
            y[i, r] = tree_sum(acc[i])
