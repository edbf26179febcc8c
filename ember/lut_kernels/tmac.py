"""Table-lookup (T-MAC) matvec for 4-bit block-32 weights: ``y = W @ x`` for a ``PackedQ4`` W.

API
---
``lut_matvec(x, p, out=None, threads=1, kernel=None, table_bits=None) -> float32 [n_out]``
    One numba call builds the tables of ``x`` and runs the kernel over all row tiles.
``build_tables(x, table_bits=None, kernel=None) -> LutTables`` and
``lut_matvec_tables(t, p, out=None, threads=1, kernel=None)``
    The same in two steps, to share one ``x``'s tables between matrices (q/k/v, gate/up).
``lut_matvec_reference(x, p, table_bits=None)``
    A NumPy oracle that computes what the kernels compute: the same float32 tables and int8/int16
    quantization, the same exact integer sums, and the same float terms (in float64; the
    kernels add blocks in float32, so they agree to ~1e-6 of the row's sum of |terms|).
``matvec_nb(ftab, fkern, x, codes, dm, out, table_bits)``
    The numba entry itself, for callers that are numba code (``fn_addresses`` gives the first two).

Kernel paths (``kernel=`` or ``$EMBER_KERNEL``, read once; ``reset_kernel_choice()`` re-reads it):
``avx512`` (vpshufb zmm + vpdpbusd; default on AVX-512BW hosts), ``avx512-novnni``, ``avx2``
(compiled for x86-64-v3), ``portable`` (plain numba, no SIMD intrinsics, same results).

Math (see ``tmac_ir.py``): per group of 4 activations a 16-entry table of mirrored subset sums
``sum_j (bit_j - 1/2) x_j``, quantized per 32-block with one scale; per block and row an exact
integer ``I = sum_planes 2^p sum_groups T[...]``; ``y = sum_b d (scale I + z_b) (+ m xs_b)``
with ``z = -0.5 xs`` (Q4_0), ``7.5 xs`` (Q4_1).

Accuracy, against the float truth ``dequantize(W) @ x`` (float64). Default: 16-bit tables
(``DEFAULT_TABLE_BITS = 16``; 8-bit tables cost less compute but lose accuracy: docs/kernels.md).
Guaranteed per row: ``|y - y_true| <= 60 * sum_b |d_b| * scale_b`` (8 groups x (1+2+4+8) x half
a table step) plus float32 rounding. Tolerances in tests/test_lut_kernels.py: 1e-4 / 2e-4 of
``sum_j |w_j x_j|`` per row / of ``max |y|`` (16-bit), 2e-2 / 3e-2 (8-bit); every path against
the oracle: 1e-6 of the row's sum of |terms|.

Timing: ``python -m ember.lut_kernels.tmac`` (``benchmark()``); the measured speeds and costs are
in docs/kernels.md. Callers that are numba code call ``matvec_nb`` and skip numba's dispatch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import codegen, tmac_ir
from .codegen import check_types, emit_call
from .pack import Q4_0, Q4_1, PackedQ4, half_to_f32

__all__ = [
    "DEFAULT_TABLE_BITS",
    "LutTables",
    "build_tables",
    "build_tables_reference",
    "lut_matvec",
    "lut_matvec_tables",
    "lut_matvec_reference",
    "matvec_nb",
    "fn_addresses",
    "reset_kernel_choice",
]

DEFAULT_TABLE_BITS = 16


@intrinsic
def _call_tables(typingctx, fn, x, tab, bc, nb):
    """tmac_tables(x, tab, bc, nb) through a runtime address (so the caller stays cacheable)."""
    check_types((fn, x, tab, bc, nb), (None, types.float32, types.int8, types.float32, None))
    return types.void(fn, x, tab, bc, nb), emit_call


@intrinsic
def _call_kernel(typingctx, fn, codes, dm, tab, bc, y, nb, t0, t1):
    """tmac_q4_*(codes, dm, tab, bc, y, nb, t0, t1) through a runtime address."""
    check_types(
        (fn, codes, dm, tab, bc, y, nb, t0, t1),
        (None, types.uint8, types.uint16, types.int8, types.float32, types.float32, None, None, None),
    )
    return types.void(fn, codes, dm, tab, bc, y, nb, t0, t1), emit_call


# ---------------------------------------------------------------------------------------------
# the portable path (plain numba, bit-identical integer math, same float32 table building)


@njit(cache=True, nogil=True)
def _tables_portable(x, tab, bc, bits):
    """Same float32 operations, in the same order, as ``tmac_tables`` in tmac_ir.py."""
    qmax = np.float32(127.0) if bits == 8 else np.float32(32767.0)
    half = np.float32(0.5)
    nb = x.size // 32
    E = np.empty((8, 16), np.float32)
    v = np.empty(16, np.float32)
    for b in range(nb):
        o = 32 * b
        amax = np.float32(0.0)
        for g in range(8):
            h0 = x[o + 4 * g] * half
            h1 = x[o + 4 * g + 1] * half
            h2 = x[o + 4 * g + 2] * half
            h3 = x[o + 4 * g + 3] * half
            for i in range(16):
                e = (h0 if i & 1 else -h0) + (h1 if i & 2 else -h1)
                e = e + (h2 if i & 4 else -h2)
                E[g, i] = e + (h3 if i & 8 else -h3)
            a = ((abs(h0) + abs(h1)) + abs(h2)) + abs(h3)
            if a > amax:
                amax = a
        for i in range(16):
            v[i] = x[o + i] + x[o + 16 + i]
        n = 16
        while n > 1:
            n //= 2
            for i in range(n):
                v[i] = v[i] + v[i + n]
        xs = v[0]
        if amax > 0:
            inv = qmax / amax
            sc = amax / qmax
        else:
            inv = np.float32(0.0)
            sc = np.float32(0.0)
        for g in range(8):
            for i in range(16):
                q = np.int32(np.rint(E[g, i] * inv))
                if bits == 8:
                    tab[b, 0, g, i] = q
                else:
                    tab[b, 0, g, i] = q & 255
                    tab[b, 1, g, i] = q >> 8
        bc[b, 0] = sc
        bc[b, 1] = xs * np.float32(-0.5)
        bc[b, 2] = xs * np.float32(7.5)
        bc[b, 3] = xs


@njit(cache=True, nogil=True)
def table_values(tab):
    """int8 [nb, L, 8, 16] -> the int32 table entries [nb, 8, 16]."""
    nb = tab.shape[0]
    out = np.empty((nb, 8, 16), np.int32)
    for b in range(nb):
        for g in range(8):
            for i in range(16):
                if tab.shape[1] == 1:
                    out[b, g, i] = tab[b, 0, g, i]
                else:
                    out[b, g, i] = (np.int32(tab[b, 0, g, i]) & 255) + 256 * np.int32(tab[b, 1, g, i])
    return out


@njit(cache=True, nogil=True)
def _kernel_portable(codes, dm, tab, bc, y, t0, t1):
    """The kernel's math in plain numba: y[(t - t0) * tile + r] for tiles t0 <= t < t1.

    A code byte c of group pair gp looks up ``T[gp][c & 15] + T[gp + 4][c >> 4]`` at once in a
    256-entry pair table built per call, then the 4 planes are weighted 1, 2, 4, 8.
    """
    nb, tile = codes.shape[1], codes.shape[3]
    has_min = dm.shape[2] > 1
    tv = table_values(tab)
    pair = np.empty((nb, 4, 256), np.int32)
    for b in range(nb):
        for gp in range(4):
            for c in range(256):
                pair[b, gp, c] = tv[b, gp, c & 15] + tv[b, gp + 4, c >> 4]
    acc = np.empty(tile, np.float32)
    isum = np.empty(tile, np.int32)
    for t in range(t0, t1):
        acc[:] = 0
        for b in range(nb):
            isum[:] = 0
            for gp in range(4):
                pt = pair[b, gp]
                cg = codes[t, b, gp]
                for r in range(tile):
                    isum[r] += pt[cg[r, 0]] + 2 * pt[cg[r, 1]] + 4 * pt[cg[r, 2]] + 8 * pt[cg[r, 3]]
            sc = bc[b, 0]
            z = bc[b, 2] if has_min else bc[b, 1]
            xs = bc[b, 3]
            for r in range(tile):
                u = np.float32(isum[r]) * sc + z
                a = acc[r] + u * half_to_f32(dm[t, b, 0, r])
                if has_min:
                    a = a + half_to_f32(dm[t, b, 1, r]) * xs
                acc[r] = a
        y[(t - t0) * tile : (t - t0 + 1) * tile] = acc


# ---------------------------------------------------------------------------------------------
# orchestration


@njit(cache=True, nogil=True, inline="always")
def build_tables_nb(ftab, x, tab, bc, bits):
    if ftab != 0:
        _call_tables(ftab, x, tab, bc, tab.shape[0])
    else:
        _tables_portable(x, tab, bc, bits)


@njit(cache=True, nogil=True, inline="always")
def _run(fk, codes, dm, tab, bc, y, t0, t1):
    if fk != 0:
        _call_kernel(fk, codes, dm, tab, bc, y, codes.shape[1], t0, t1)
    else:
        _kernel_portable(codes, dm, tab, bc, y, t0, t1)


@njit(cache=True, nogil=True, inline="always")
def _tiles(fk, codes, dm, tab, bc, out, t0, t1):
    """Tiles [t0, t1) into out[t0 * tile:]; a last, partial tile goes through a scratch row."""
    tile = codes.shape[3]
    nfull = min(t1, out.size // tile)
    if nfull > t0:
        _run(fk, codes, dm, tab, bc, out[t0 * tile :], t0, nfull)
    s = max(nfull, t0)
    if t1 > s:
        tmp = np.empty((t1 - s) * tile, np.float32)
        _run(fk, codes, dm, tab, bc, tmp, s, t1)
        out[s * tile :] = tmp[: out.size - s * tile]


@njit(cache=True, nogil=True, inline="always")
def _check(codes, dm, out, nb, n_in):
    if (
        n_in != 32 * nb
        or codes.shape[1] != nb
        or codes.shape[3] % 16
        or codes.shape[2] != 4
        or codes.shape[4] != 4
        or dm.shape[0] != codes.shape[0]
        or dm.shape[1] != nb
        or dm.shape[3] != codes.shape[3]
        or out.size > codes.shape[0] * codes.shape[3]
        or out.size <= (codes.shape[0] - 1) * codes.shape[3]
    ):
        raise ValueError("lut_matvec: the shapes of x / tables, the packed matrix and out differ")


@njit(cache=True, nogil=True)
def _mv_serial(ftab, fk, x, codes, dm, out, bits):
    nb = x.size // 32
    _check(codes, dm, out, nb, x.size)
    tab = np.empty((nb, 1 if bits == 8 else 2, 8, 16), np.int8)
    bc = np.empty((nb, 4), np.float32)
    build_tables_nb(ftab, x, tab, bc, bits)
    _tiles(fk, codes, dm, tab, bc, out, 0, codes.shape[0])


@njit(cache=True, nogil=True, parallel=True)
def _mv_parallel(ftab, fk, x, codes, dm, out, bits, nthreads):
    nb = x.size // 32
    _check(codes, dm, out, nb, x.size)
    tab = np.empty((nb, 1 if bits == 8 else 2, 8, 16), np.int8)
    bc = np.empty((nb, 4), np.float32)
    build_tables_nb(ftab, x, tab, bc, bits)
    nt = codes.shape[0]
    nch = min(nthreads, nt)
    for c in prange(nch):
        _tiles(fk, codes, dm, tab, bc, out, c * nt // nch, (c + 1) * nt // nch)


@njit(cache=True, nogil=True)
def _mvt_serial(fk, tab, bc, codes, dm, out):
    _check(codes, dm, out, tab.shape[0], 32 * tab.shape[0])
    _tiles(fk, codes, dm, tab, bc, out, 0, codes.shape[0])


@njit(cache=True, nogil=True, parallel=True)
def _mvt_parallel(fk, tab, bc, codes, dm, out, nthreads):
    _check(codes, dm, out, tab.shape[0], 32 * tab.shape[0])
    nt = codes.shape[0]
    nch = min(nthreads, nt)
    for c in prange(nch):
        _tiles(fk, codes, dm, tab, bc, out, c * nt // nch, (c + 1) * nt // nch)


@njit(cache=True, nogil=True)
def matvec_nb(ftab, fkern, x, codes, dm, out, table_bits):
    """numba-callable single-threaded matvec: ``ftab``, ``fkern`` from ``fn_addresses`` (0, 0:
    the portable path); x float32 [n_in]; ``codes``/``dm`` of a PackedQ4; out float32 [n_out]."""
    _mv_serial(ftab, fkern, x, codes, dm, out, table_bits)


# ---------------------------------------------------------------------------------------------
# Python API

_choice: dict = {}


def reset_kernel_choice() -> None:
    """Forget the resolved kernel paths: the next call re-reads ``$EMBER_KERNEL`` (and
    ``DEFAULT_TABLE_BITS``). Compiled modules stay cached."""
    _choice.clear()


def fn_addresses(
    qtype: int, tile: int = 64, table_bits: int | None = None, kernel: str | None = None
) -> tuple[int, int, int]:
    """(tables fn, matvec fn, table_bits) for a kernel path; addresses 0, 0 mean portable."""
    key = (kernel, tile, table_bits)
    r = _choice.get(key)
    if r is None:
        bits = table_bits or DEFAULT_TABLE_BITS
        if bits not in (8, 16):
            raise ValueError("table_bits must be 8 or 16")
        name = codegen.select_kernel(kernel)
        if name == "portable":
            r = (0, 0, 0, bits)
        else:
            k = tmac_ir.native_kernels(name, tile=tile, table_bits=bits)
            r = (k.tables, k.q4_0, k.q4_1, bits)  # indexed by qtype - 1 (Q4_0 = 2, Q4_1 = 3)
        _choice[key] = r
    if qtype not in (Q4_0, Q4_1):
        raise ValueError(f"not a Q4_0/Q4_1 type: {qtype}")
    return r[0], r[qtype - 1], r[3]


class LutTables(NamedTuple):
    """The tables of one activation vector, as the kernels read them."""

    tab: np.ndarray  # int8 [nb, L, 8, 16]: L = 1 (8-bit) or 2 (low bytes, then high bytes)
    bc: np.ndarray  # float32 [nb, 4]: (table scale, -0.5 xs, 7.5 xs, xs)
    bits: int

    @property
    def scale(self) -> np.ndarray:
        return self.bc[:, 0]

    @property
    def xsum(self) -> np.ndarray:
        return self.bc[:, 3]

    @property
    def values(self) -> np.ndarray:
        """int32 [nb, 8, 16]: entry i of group g is ~ sum_j (bit_j(i) - 1/2) x_j / scale."""
        return table_values(self.tab)


def _x32(x) -> np.ndarray:
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous):
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(-1)


def build_tables(x, table_bits: int | None = None, kernel: str | None = None) -> LutTables:
    """The lookup tables of x (float32 [n_in], n_in a multiple of 32)."""
    x = _x32(x)
    if x.size % 32:
        raise ValueError("n_in must be a multiple of 32")
    ftab, _, bits = fn_addresses(Q4_0, table_bits=table_bits, kernel=kernel)
    nb = x.size // 32
    tab = np.empty((nb, 1 if bits == 8 else 2, 8, 16), np.int8)
    bc = np.empty((nb, 4), np.float32)
    _build_entry(ftab, x, tab, bc, bits)
    return LutTables(tab, bc, bits)


@njit(cache=True, nogil=True)
def _build_entry(ftab, x, tab, bc, bits):
    build_tables_nb(ftab, x, tab, bc, bits)


_F32 = np.dtype(np.float32)


def lut_matvec(
    x,
    p: PackedQ4,
    out: np.ndarray | None = None,
    threads: int = 1,
    kernel: str | None = None,
    table_bits: int | None = None,
) -> np.ndarray:
    """y = W @ x for a packed Q4_0/Q4_1 matrix W (float32 [n_out]); ``out`` may be given."""
    r = _choice.get((kernel, p.tile, table_bits))
    if r is None:
        fn_addresses(p.qtype, p.tile, table_bits, kernel)
        r = _choice[(kernel, p.tile, table_bits)]
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 1 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if out is None:
        out = np.empty(p.n_out, np.float32)
    if threads > 1:
        _mv_parallel(r[0], r[p.qtype - 1], x, p.codes, p.dm, out, r[3], threads)
    else:
        _mv_serial(r[0], r[p.qtype - 1], x, p.codes, p.dm, out, r[3])
    return out


def lut_matvec_tables(
    t: LutTables, p: PackedQ4, out: np.ndarray | None = None, threads: int = 1, kernel: str | None = None
) -> np.ndarray:
    """y = W @ x from prebuilt tables (``build_tables``)."""
    _, fk, _ = fn_addresses(p.qtype, p.tile, t.bits, kernel)
    if out is None:
        out = np.empty(p.n_out, np.float32)
    if threads > 1:
        _mvt_parallel(fk, t.tab, t.bc, p.codes, p.dm, out, threads)
    else:
        _mvt_serial(fk, t.tab, t.bc, p.codes, p.dm, out)
    return out


# ---------------------------------------------------------------------------------------------
# NumPy oracle

_SIGNS = np.array([[1.0 if (i >> j) & 1 else -1.0 for i in range(16)] for j in range(4)], np.float32)


def build_tables_reference(x, table_bits: int | None = None):
    """NumPy: (int32 table values [nb, 8, 16], float32 scale [nb], float32 xs [nb])."""
    bits = table_bits or DEFAULT_TABLE_BITS
    qmax = np.float32(127.0 if bits == 8 else 32767.0)
    x = np.asarray(x, np.float32).reshape(-1)
    nb = x.size // 32
    h = x.reshape(nb, 8, 4) * np.float32(0.5)
    E = ((h[..., 0:1] * _SIGNS[0] + h[..., 1:2] * _SIGNS[1]) + h[..., 2:3] * _SIGNS[2]) + h[..., 3:4] * _SIGNS[3]
    ah = np.abs(h)
    A = ((ah[..., 0] + ah[..., 1]) + ah[..., 2]) + ah[..., 3]
    amax = A.max(axis=1)
    pos = amax > 0
    safe = np.where(pos, amax, np.float32(1))
    inv = np.where(pos, qmax / safe, np.float32(0)).astype(np.float32)
    sc = np.where(pos, safe / qmax, np.float32(0)).astype(np.float32)
    q = np.rint(E * inv[:, None, None]).astype(np.int32)
    v = x.reshape(nb, 32)
    v = v[:, :16] + v[:, 16:]
    while v.shape[1] > 1:
        n = v.shape[1] // 2
        v = v[:, :n] + v[:, n:]
    return q, sc, v[:, 0].copy()


def lut_matvec_reference(x, p: PackedQ4, table_bits: int | None = None, return_scale: bool = False):
    """What the kernels compute, in NumPy (float64 sums of the float32 per-block terms).

    With ``return_scale`` also returns, per row, the sum of the |terms| before any cancellation,
    ``sum_b |d| (|scale I| + |z|) + |m xs|`` (the size against which float32 rounding differences
    are measured) and the guaranteed table-quantization
    error bound ``60 * sum_b |d| * scale_b`` against the float truth.
    """
    q, sc, xs = build_tables_reference(x, table_bits)
    nb = q.shape[0]
    c = p.codes.astype(np.intp)
    bidx = np.arange(nb)[None, :, None, None, None]
    gidx = np.arange(4)[None, None, :, None, None]
    vals = q[bidx, gidx, c & 15] + q[bidx, gidx + 4, c >> 4]  # [nt, nb, 4, tile, 4]
    I = (vals.astype(np.int64) * np.array([1, 2, 4, 8])).sum(axis=(2, 4))  # [nt, nb, tile]
    z = (xs * np.float32(7.5) if p.qtype == Q4_1 else xs * np.float32(-0.5)).astype(np.float64)
    si = I * sc.astype(np.float64)[None, :, None]
    u = si + z[None, :, None]
    d = p.d.astype(np.float64)  # [nt, nb, tile]
    terms = u * d
    absum = (np.abs(d) * (np.abs(si) + np.abs(z)[None, :, None])).sum(axis=1)
    y = terms.sum(axis=1)
    if p.qtype == Q4_1:
        mt = p.m.astype(np.float64) * xs.astype(np.float64)[None, :, None]  # [nt, nb, tile]
        y = y + mt.sum(axis=1)
        absum = absum + np.abs(mt).sum(axis=1)
    y = y.reshape(-1)[: p.n_out].astype(np.float32)
    if not return_scale:
        return y
    bound = 60.0 * (np.abs(d) * sc.astype(np.float64)[None, :, None]).sum(axis=1)
    return y, absum.reshape(-1)[: p.n_out], bound.reshape(-1)[: p.n_out]


# ---------------------------------------------------------------------------------------------
# benchmark: python -m ember.lut_kernels.tmac [--quick]


def _random_q4(rng, n_out: int, n_in: int, qtype: int) -> np.ndarray:
    nb = n_in // 32
    bb = 18 if qtype == Q4_0 else 20
    raw = rng.integers(0, 256, (n_out, nb, bb), dtype=np.uint8)
    for off in (0, 2) if qtype == Q4_1 else (0,):
        v = (rng.standard_normal((n_out, nb)) * 0.01).astype(np.float16)
        raw[:, :, off : off + 2] = v.view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * bb)


def benchmark(
    shapes=((576, 576), (1536, 576), (576, 1536), (4096, 4096)),
    rounds: int = 15,
    cold_bytes: int = 256 << 20,
    kernels=None,
    threads2: bool = True,
    out=print,
) -> list[dict]:
    """Time ``lut_matvec`` (the whole Python call, 1 thread) against float32 baselines.

    hot: the same matrix again and again (cache resident when it fits); cold: a rotation over
    copies totalling ``cold_bytes`` (streamed from DRAM). Median over ``rounds`` rounds, each
    round interleaving every variant, so load from other processes hits all of them alike.
    """
    import time

    from threadpoolctl import threadpool_limits

    from .pack import pack_q4

    @njit(fastmath=True, nogil=True, cache=True)
    def numba_f32(w, x, y):
        for r in range(w.shape[0]):
            s = np.float32(0)
            for j in range(w.shape[1]):
                s += w[r, j] * x[j]
            y[r] = s

    kernels = kernels or [codegen.best_isa()]
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(1):
        for n_out, n_in in shapes:
            x = rng.standard_normal(n_in).astype(np.float32)
            y = np.empty(n_out, np.float32)
            variants = {}  # name -> (callable(i), bytes per call, copies)
            for qt in (Q4_0, Q4_1):
                p = pack_q4(_random_q4(rng, n_out, n_in, qt), qt)
                ncold = max(2, cold_bytes // p.nbytes)
                cps = [p] + [
                    PackedQ4(p.codes.copy(), p.dm.copy(), p.n_out, p.n_in, p.qtype, p.tile) for _ in range(ncold - 1)
                ]
                for k in kernels:
                    for bits in (16, 8):
                        nm = f"{'Q4_0' if qt == Q4_0 else 'Q4_1'} {k} t{bits}"
                        variants[nm] = (
                            (
                                lambda i, cps=cps, k=k, bits=bits: lut_matvec(
                                    x, cps[i], out=y, kernel=k, table_bits=bits
                                )
                            ),
                            p.nbytes,
                            ncold,
                        )
                if threads2 and qt == Q4_1:
                    variants[f"Q4_1 {kernels[0]} t16 2thr"] = (
                        (lambda i, cps=cps: lut_matvec(x, cps[i], out=y, kernel=kernels[0], threads=2)),
                        p.nbytes,
                        ncold,
                    )
            w = rng.standard_normal((n_out, n_in)).astype(np.float32)
            ncold = max(2, cold_bytes // w.nbytes)
            ws = [w] + [w.copy() for _ in range(ncold - 1)]
            variants["f32 numpy x@W.T"] = ((lambda i, ws=ws: x @ ws[i].T), w.nbytes, ncold)
            variants["f32 numba"] = ((lambda i, ws=ws: numba_f32(ws[i], x, y)), w.nbytes, ncold)
            res = {nm: ([], []) for nm in variants}
            for _nm, (f, _, _) in variants.items():
                f(0)
                f(1)
            for _ in range(rounds):
                for nm, (f, nbytes, ncold) in variants.items():
                    reps = max(5, min(500, int(2e7 // nbytes)))
                    f(0)  # the previous variant's cold rotation evicted this one
                    f(0)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        f(0)
                    res[nm][0].append((time.perf_counter() - t0) / reps)
                    t0 = time.perf_counter()
                    for i in range(ncold):
                        f(i)
                    res[nm][1].append((time.perf_counter() - t0) / ncold)
            base = {c: np.median(res["f32 numpy x@W.T"][c]) for c in (0, 1)}
            out(f"{n_out}x{n_in}: hot us (GB/s, x numpy) | cold us (GB/s, x numpy)")
            for nm, (_f, nbytes, _) in variants.items():
                h, c = np.median(res[nm][0]), np.median(res[nm][1])
                rows.append(dict(shape=(n_out, n_in), name=nm, hot_us=h * 1e6, cold_us=c * 1e6, bytes=nbytes))
                out(
                    f"  {nm:23s} {h * 1e6:9.1f} ({nbytes / h / 1e9:5.1f}, {base[0] / h:5.1f}x) | "
                    f"{c * 1e6:9.1f} ({nbytes / c / 1e9:5.1f}, {base[1] / c:5.1f}x)"
                )
    # per-call overhead: a one-tile, one-block matrix
    p = pack_q4(_random_q4(rng, 1, 32, Q4_1), Q4_1)
    x, y = np.ones(32, np.float32), np.empty(1, np.float32)
    for k in kernels:
        lut_matvec(x, p, out=y, kernel=k)
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(2000):
                lut_matvec(x, p, out=y, kernel=k)
            ts.append((time.perf_counter() - t0) / 2000)
        ftab, fk, bits = fn_addresses(Q4_1, p.tile, None, k)
        ts2 = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(2000):
                _mv_serial(ftab, fk, x, p.codes, p.dm, y, bits)
            ts2.append((time.perf_counter() - t0) / 2000)
        out(
            f"empty call (1x32 Q4_1, {k}): lut_matvec {np.median(ts) * 1e6:.2f} us, "
            f"numba entry alone {np.median(ts2) * 1e6:.2f} us"
        )
    return rows


def _bench_pack(out=print) -> None:
    import time

    from .pack import pack_q4

    rng = np.random.default_rng(0)
    for n_out, n_in in ((1536, 576), (49152, 576)):
        for qt in (Q4_0, Q4_1):
            raw = _random_q4(rng, n_out, n_in, qt)
            pack_q4(raw, qt)
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                pack_q4(raw, qt)
                ts.append(time.perf_counter() - t0)
            t = np.median(ts)
            out(
                f"pack_q4 {n_out}x{n_in} {'Q4_0' if qt == Q4_0 else 'Q4_1'}: "
                f"{t * 1e3:.2f} ms ({raw.nbytes / t / 1e9:.2f} GB/s of GGUF)"
            )


if __name__ == "__main__":
    import subprocess
    import sys

    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("host:", codegen.host_isas(), "default:", codegen.best_isa())
    _bench_pack()
    quick = "--quick" in sys.argv
    benchmark(
        rounds=5 if quick else 15,
        kernels=[codegen.best_isa()] if quick else [k for k in codegen.host_isas() if k not in ("neon", "portable")],
    )
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
