"""Decode matvec and small-batch matmul for GGUF K-quant weights (Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K) with int8 activations: the API the runtime calls, the compiled kernels' addresses and the
numba entries.

The K-quant code, by job: ``kquant_layout`` (the packed weight layout, ``pack_kquant``),
``kquant_acts`` (the activation format and its quantizers), ``kquant_ir`` (the kernels' LLVM
IR), ``kquant_portable`` (the plain numba path), ``kquant_reference`` (the NumPy oracles), this
module (compiling, dispatch, the calls). The layout's names are re-exported here.

API
---
``kq_matvec(x, p, out=None, threads=1, kernel=None) -> float32 [n_out]``
``kq_matmul(X, p, out=None, kernel=None, threads=1) -> float32 [k, n_out]``
    X float32 [k, n_in]: ONE pass over the weights for all k rows (k is any size; the kernels
    are register-blocked for up to 16 rows at a time, ``kquant_ir.DEFAULT_KB``).
``quantize_x(X, kernel=None) -> (xq, xd, xp)``: the activation format (``kquant_acts``).
numba entries (``nogil``, ``cache``): ``matmul_nb(fn, fq, x, q, sc, d, out)`` (shapes checked,
raises ValueError), ``rows_nb(fn, q, sc, d, xq, xd, xp, y, r0, r1)`` (rows r0 <= r < r1 of y
[k, >= r1] for pre-quantized activations; no checks), ``quantize_x_alloc(x, fq)``,
``quantize_x_nb(x, xq, xd, xp)`` (the plain numba quantizer). Addresses:
``fn_address(qtype, kernel=None)`` (0: portable), ``quant_address(kernel=None)`` (0: numba);
each type's kernels are a module of their own, compiled (or loaded from the disk cache) on
first use, with this host's options (``host_opts``: register blocking, prefetch distance,
``tile_bytes``, ymm on AMD Zen 4). Kernel choice: ``kernel=`` or ``$EMBER_KERNEL`` through
``codegen.select_kernel`` (read once; ``reset_kernel_choice()``): ``avx512`` (VNNI
``vpdpbusd``; the ``vpmaddubsw`` form on hosts without VNNI), ``avx512-novnni``, ``avx2``
(compiled for x86-64-v3), ``portable`` (numba, ``kquant_portable``).
``random_kquant(rng, qtype, n_out, n_in)``: random GGUF rows of a type (tests, benchmarks).

Accuracy: every path computes ``kquant_reference.kq_matmul_reference`` up to float32 rounding
(tests assert 1e-5 of the output's sum of |terms|); the oracle is within half an activation
step per weight of the float truth (its docstring has the bound).
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from ..formats.quants import block_info
from . import codegen
from .codegen import check_types, emit_call
from .kquant_acts import act_buffers, quantize_x_alloc, quantize_x_nb
from .kquant_ir import DEFAULT_NR, DEFAULT_PIPE, DEFAULT_PREFETCH, DEFAULT_TILE_BYTES, SPECS, default_kb, kernel_ir
from .kquant_layout import (
    NAMES,
    PAIR_TYPES,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    QTYPES,
    TERNARY,
    PackedKQ,
    pack_kquant,
    ternary_as_q2_k,
)
from .kquant_portable import rows_portable
from .split import MIN_ROWS, split

__all__ = [
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "QTYPES",
    "PackedKQ",
    "pack_kquant",
    "quantize_x",
    "quantize_x_nb",
    "kq_matvec",
    "kq_matmul",
    "rows_nb",
    "matmul_nb",
    "fn_address",
    "quant_address",
    "quantize_x_alloc",
    "act_buffers",
    "kernel_ir",
    "kernel_asm",
    "host_opts",
    "tile_bytes",
    "reset_kernel_choice",
    "random_kquant",
    "TERNARY",
    "ternary_as_q2_k",
]


def tile_bytes() -> int:
    """The act bytes per tile on this host: 3/4 of its L1D (``DEFAULT_TILE_BYTES`` at 48 KB)."""
    return DEFAULT_TILE_BYTES * codegen.l1d_bytes() // (48 << 10)


def host_opts(isa: str, what) -> dict:
    """The kernel options a K-quant module is compiled with on this host."""
    o = {
        "kb": default_kb(isa, what),
        "nr": DEFAULT_NR[isa],
        "pipe": DEFAULT_PIPE[isa],
        "prefetch": codegen.prefetch_bytes(DEFAULT_PREFETCH),
        "tile_bytes": tile_bytes(),
    }
    if (
        what in PAIR_TYPES
        and codegen.resolve_isa(isa) == "avx512"
        and codegen.splits_zmm()
        and codegen.host_features().get("avx512vl")
    ):  # ZEN_YMM
        o["width"] = 32
    return o


_lock = threading.Lock()
_cache: dict = {}


def _compile(isa: str, what, **opts):
    """(address of ``kq_<what>``, owners to keep alive, compile seconds); cached per process."""
    key = (isa, what, tuple(sorted(opts.items())))
    k = _cache.get(key)
    if k is not None:
        return k
    with _lock:
        k = _cache.get(key)
        if k is not None:
            return k
        if isa not in codegen.host_isas() or isa not in SPECS:
            raise ValueError(f"isa {isa!r} cannot be compiled for execution on this host")
        spec = codegen.resolve_isa(isa)
        if what != "quant":
            opts = {**host_opts(isa, what), **opts}
        ee, owners, secs = codegen.jit(lambda cpu, feat: kernel_ir(spec, cpu, feat, what=what, **opts), isa)
        name = "kq_quant" if what == "quant" else f"kq_{NAMES[what]}"
        k = _cache[key] = (ee.get_function_address(name), owners, secs)
        return k


def kernel_asm(isa: str = "avx512", what=Q4_K, **opts) -> str:
    """The host assembly of a module (for inspection; runs nothing)."""
    spec = codegen.resolve_isa(isa)
    opts = {**host_opts(isa, what), **opts}
    return codegen.host_asm(lambda cpu, feat: kernel_ir(spec, cpu, feat, what=what, **opts), isa)


_choice: dict = {}


def reset_kernel_choice() -> None:
    _choice.clear()


def quant_address(kernel: str | None = None) -> int:
    """Address of ``kq_quant`` (the vectorized activation quantizer) for a path (0: numba)."""
    key = ("quant", kernel, ())
    r = _choice.get(key)
    if r is None:
        name = codegen.select_kernel(kernel)
        r = _compile(name, "quant")[0] if name in SPECS else 0
        _choice[key] = r
    return r


def fn_address(qtype: int, kernel: str | None = None, **opts) -> int:
    """Address of ``kq_<type>`` (Q2_K..Q6_K) for a kernel path (0: portable). ``opts`` (kb, nr,
    prefetch, tile_bytes) are for experiments; the defaults are the measured best."""
    key = (qtype, kernel, tuple(sorted(opts.items())))
    r = _choice.get(key)
    if r is None:
        if qtype not in NAMES:
            raise ValueError(f"qtype {qtype} is not a K-quant (Q2_K..Q6_K, 10..14)")
        name = codegen.select_kernel(kernel)
        if name not in SPECS:  # portable (neon is never executed here)
            r = 0
        else:
            r = _compile(name, qtype, **opts)[0]
        _choice[key] = r
    return r


# ---------------------------------------------------------------------------------------------
# numba


@intrinsic
def _call_kq(typingctx, fn, q, sc, d, xq, xd, xp, y, nsb, r0, r1, k, ys):
    """kq_<t>(q, sc, d, xq, xd, xp, y, nsb, r0, r1, k, ys) through a runtime address."""
    args = (fn, q, sc, d, xq, xd, xp, y, nsb, r0, r1, k, ys)
    check_types(
        args,
        (
            None,
            types.uint8,
            types.uint8,
            types.uint16,
            types.int8,
            types.float32,
            types.float32,
            types.float32,
            None,
            None,
            None,
            None,
            None,
        ),
    )
    return types.void(*args), emit_call


@njit(cache=True, nogil=True, inline="always")
def rows_nb(fn, q, sc, d, xq, xd, xp, y, r0, r1):
    """y[i, r] for r0 <= r < r1 and every act row i < y.shape[0] (y float32 [k, >= r1],
    C-contiguous); ``fn`` from ``fn_address`` (0: portable). No shape checks: see ``_prep``."""
    if fn != 0:
        _call_kq(fn, q, sc, d, xq, xd, xp, y, xq.shape[0], r0, r1, y.shape[0], y.shape[1])
    else:
        rows_portable(q, sc, d, xq, xd, xp, y, r0, r1)


@njit(cache=True, nogil=True, inline="always")
def _prep(fq, x, q, sc, d, out):
    k, n = x.shape
    nsb = n // 256
    qb, nd = q.shape[1] // max(nsb, 1), d.shape[1] // max(nsb, 1)
    ok = (
        n % 256 == 0
        and nsb > 0
        and k > 0
        and sc.shape[1] == 16 * nsb
        and q.shape[0] == sc.shape[0]
        and q.shape[0] == d.shape[0]
        and q.shape[1] == qb * nsb
        and d.shape[1] == nd * nsb
        and (
            (qb == 128 and nd == 2)
            or (qb == 160 and nd == 2)
            or (qb == 192 and nd == 1)
            or (qb == 64 and nd == 2)
            or (qb == 96 and nd == 1)
        )
        and out.shape[0] == k
        and (
            out.shape[1] == q.shape[0]
            or ((qb == 128 or qb == 160) and q.shape[0] % 2 == 0 and out.shape[1] == q.shape[0] - 1)
        )
    )
    if not ok:
        raise ValueError("kq_matmul: the shapes of x, the packed matrix and out differ")
    return quantize_x_alloc(x, fq)


@njit(cache=True, nogil=True)
def matmul_nb(fn, fq, x, q, sc, d, out):
    """numba-callable, single-threaded: out[k, n_out] = x[k, n_in] @ W.T (shapes checked;
    ``fn`` from ``fn_address``, ``fq`` from ``quant_address``, 0: portable)."""
    xq, xd, xp = _prep(fq, x, q, sc, d, out)
    rows_nb(fn, q, sc, d, xq, xd, xp, out, 0, out.shape[1])


@njit(cache=True, nogil=True)
def _mv_serial(fn, fq, x, q, sc, d, out):
    """matmul_nb for one row: x float32 [n_in], out float32 [n_out]."""
    matmul_nb(fn, fq, x.reshape((1, x.size)), q, sc, d, out.reshape((1, out.size)))


@njit(cache=True, nogil=True, parallel=True)
def _mm_parallel(fn, fq, x, q, sc, d, out, nthreads):
    xq, xd, xp = _prep(fq, x, q, sc, d, out)
    n = out.shape[1]
    nch = min(nthreads, n)
    for c in prange(nch):
        rows_nb(fn, q, sc, d, xq, xd, xp, out, c * n // nch, (c + 1) * n // nch)


_F32 = np.dtype(np.float32)


def _addresses(qtype, kernel):
    fn = _choice.get((qtype, kernel, ()))
    fq = _choice.get(("quant", kernel, ()))
    if fn is None or fq is None:
        fn = fn_address(qtype, kernel)
        fq = quant_address(kernel)
    return fn, fq


def kq_matvec(x, p: PackedKQ, out: np.ndarray | None = None, threads: int = 1, kernel: str | None = None) -> np.ndarray:
    """y = W @ x for a packed K-quant matrix (float32 [n_out]); ``out`` may be given."""
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 1 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if out is None:
        out = np.empty(p.n_out, np.float32)
    elif out.shape != (p.n_out,) or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError("kq_matvec: out must be a C-contiguous float32 [n_out] array")
    fn, fq = _addresses(p.qtype, kernel)
    if threads > 1:
        _mm_parallel(fn, fq, x.reshape(1, -1), p.q, p.sc, p.d, out.reshape(1, -1), threads)
    else:
        _mv_serial(fn, fq, x, p.q, p.sc, p.d, out)
    return out


def kq_matmul(X, p: PackedKQ, out: np.ndarray | None = None, kernel: str | None = None, threads: int = 1) -> np.ndarray:
    """Y = X @ W.T for X float32 [k, n_in] (one pass over the weights for all k rows):
    float32 [k, n_out]; ``out`` may be given."""
    if type(X) is not np.ndarray or X.dtype is not _F32 or X.ndim != 2 or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError("kq_matmul: X must be [k, n_in]")
    if out is None:
        out = np.empty((X.shape[0], p.n_out), np.float32)
    elif out.ndim != 2 or out.shape[1] != p.n_out or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError("kq_matmul: out must be a C-contiguous float32 [k, n_out] array")
    fn, fq = _addresses(p.qtype, kernel)
    if threads > 1 and X.shape[0] >= MIN_ROWS:
        # a batch: quantized once, rows shared out on split's threads (the batch path's one
        # pool; numba's OpenMP workers would spin beside it); smaller ones: prange
        xq, xd, xp = _prep(fq, X, p.q, p.sc, p.d, out)
        split(p.n_out, threads, lambda r0, r1: rows_nb(fn, p.q, p.sc, p.d, xq, xd, xp, out, r0, r1))
    elif threads > 1:
        _mm_parallel(fn, fq, X, p.q, p.sc, p.d, out, threads)
    else:
        matmul_nb(fn, fq, X, p.q, p.sc, p.d, out)
    return out


def quantize_x(X, kernel: str | None = None):
    """(xq, xd, xp): the act format of X float32 [k, n_in] (or [n_in]) as the kernels read it."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    X = X.reshape(1, -1) if X.ndim == 1 else X
    if X.ndim != 2 or X.shape[1] % 256 or X.shape[1] == 0 or X.shape[0] == 0:
        raise ValueError("quantize_x: expected [k, n_in] with n_in a multiple of 256")
    return quantize_x_alloc(X, quant_address(kernel))


_F16_FIELDS = {Q2_K: (80, 82), Q3_K: (108,), Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208,)}


def random_kquant(rng, qtype: int, n_out: int, n_in: int) -> np.ndarray:
    """Random GGUF rows of a K-quant type: uint8 [n_out, n_in / 256 * block bytes]; random
    code and scale bytes, f16 d ~ 1e-3 (and dmin ~ 3e-4) of random sign."""
    nsb = n_in // 256
    bb = block_info(qtype)[1]
    raw = rng.integers(0, 256, (n_out, nsb, bb), dtype=np.uint8)
    for off, mag in zip(_F16_FIELDS[qtype], (1e-3, 3e-4), strict=False):
        v = rng.uniform(0.5, 1.5, (n_out, nsb)) * rng.choice([-1.0, 1.0], (n_out, nsb)) * mag
        raw[:, :, off : off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_out, nsb, 2)
    return raw.reshape(n_out, nsb * bb)
