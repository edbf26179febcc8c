"""NumPy oracles of the K-quant kernels: what they compute, from the same packed matrix.

``quantize_x_reference(X)``: the activation quantization in natural order (``kquant_acts``'s
format without the lane order). ``kq_matmul_reference(X, p, return_scale=False)``: the kernels'
result in float64 sums with exact integer dots, and with ``return_scale`` the scale of float32
rounding and the guaranteed bound against the float truth ``dequantize(W) @ x`` (float64):
``|err| <= sum_j |w_j| (dx_j (1/2 + 2^-22 |xq_j|) + 2^-23 |x_j|)`` (half an activation step per
weight, with float32 rounding of the quantization and of the dequantized weights). The kernels
agree with the oracle to float32 rounding (tests assert 1e-5 of the output's sum of |terms|).
"""

from __future__ import annotations

import numpy as np

from .kquant_layout import OFFSET, PAIR_TYPES, PackedKQ

__all__ = ["quantize_x_reference", "kq_matmul_reference"]


def quantize_x_reference(X):
    """(xq int8 [k, n_in], natural order; dx float32 [k, n_in / 32]; xsum int32 [k, n_in / 16])."""
    X = np.asarray(X, np.float32)
    X = X.reshape(1, -1) if X.ndim == 1 else X
    k, n = X.shape
    xb = X.reshape(k, n // 32, 32)
    amax = np.abs(xb).max(axis=2)
    pos = amax > 0
    safe = np.where(pos, amax, np.float32(1))
    inv = np.where(pos, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    dx = np.where(pos, safe / np.float32(127), np.float32(0)).astype(np.float32)
    xq = np.rint(xb * inv[:, :, None]).astype(np.int8).reshape(k, n)
    xs = xq.reshape(k, n // 16, 16).astype(np.int32).sum(axis=2)
    return xq, dx, xs


def kq_matmul_reference(X, p: PackedKQ, return_scale: bool = False):
    """What the kernels compute, [k, n_out] float32 (float64 sums, exact integer dots).

    Q4_K / Q5_K, per 32-block b of a row: ``I_b dx_b SC_b - MM_b float32(dx_b xsum_b)`` with
    ``I_b = sum (q - o) xq``, ``xsum_b = sum xq``, ``SC_b = d sc_b`` and ``MM_b = float32(dmin
    m_b - o SC_b)`` (o = 0 for Q4_K, 16 for Q5_K: the kernel's integer dots); Q2_K, Q3_K,
    Q6_K, per 16-group g: ``(sum (q - o) xq) dx SC_g`` (o = 0, 4, 32), Q2_K minus ``MM_g
    float32(dx xsum_g)``. ``SC``, ``MM``: ``PackedKQ.scales``. With ``return_scale`` also (per
    [k, n_out]) the sum over blocks / groups of the |terms| (the scale of float32 rounding)
    and the guaranteed bound of |y - dequantize(W) @ x| (module docstring).
    """
    X = np.asarray(X, np.float32)
    X = X.reshape(1, -1) if X.ndim == 1 else X
    k, n = X.shape
    if n != p.n_in:
        raise ValueError("kq_matmul_reference: x does not match the matrix")
    xq, dx, xs = quantize_x_reference(X)
    o = OFFSET[p.qtype]
    codes = p.codes().astype(np.float64) - o
    SC, MM = p.scales()
    gw = 32 if p.qtype in PAIR_TYPES else 16  # weights per scale
    ng = n // gw
    ig = np.einsum(
        "rgj,igj->irg", codes.reshape(p.n_out, ng, gw), xq.reshape(k, ng, gw).astype(np.float64)
    )  # exact (< 2^53)
    dxg = np.repeat(dx, 32 // gw, axis=1)
    t1 = ig * dxg.astype(np.float64)[:, None, :] * SC.astype(np.float64)[None]
    y, absum = t1.sum(axis=2), np.abs(t1).sum(axis=2)
    if MM is not None:
        if o:
            MM = MM - np.float32(o) * SC  # float32, one rounding
        xsg = xs.reshape(k, ng, gw // 16).sum(axis=2)
        dxs = (dxg * xsg.astype(np.float32)).astype(np.float64)  # float32 products
        t2 = MM.astype(np.float64)[None] * dxs[:, None, :]
        y = y - t2.sum(axis=2)
        absum = absum + np.abs(t2).sum(axis=2)
    y = y.astype(np.float32)
    if not return_scale:
        return y
    # guaranteed: |x - xq dx| <= dx (1/2 + 2^-22 |xq|) per activation (the rounding of x * inv
    # and of dx included), the dequantized weights' float32 rounding 2^-23 |w x|
    w = np.abs(p.dequantize().astype(np.float64))  # [n_out, n]
    step = np.repeat(dx, 32, axis=1).astype(np.float64) * (0.5 + 2.0**-22 * np.abs(xq.astype(np.float64)))  # [k, n]
    bound = step @ w.T + 2.0**-23 * (np.abs(X.astype(np.float64)) @ w.T)
    return y, absum, bound
