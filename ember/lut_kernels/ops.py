"""matmul: the one function every projection in the model goes through.

Weights arrive in one of two forms:
- a float32 array [n_out, n_in] (the NumPy reference path): BLAS;
- a `QuantMatrix`: the file's own blocks, memory-mapped, plus a kernel layout when ember has a
  kernel for the type. One or a few rows of activations run a matvec kernel: table lookup (T-MAC,
  `tmac.py`) on Q4_0/Q4_1, int8 dot products (`q8.py`) on Q8_0 and on Q5_0/Q5_1 (5-bit
  codes, the file's bytes), float FMAs on F16/BF16 rows as they are in the file (`f16.py`);
  K-quant matrices (Q2_K..Q6_K, and TQ1_0/TQ2_0 rewritten exactly as Q2_K) run the int8
  kernels of `kquant.py` for any number of rows (weights read once per 16 rows, faster than
  BLAS on dequantized tiles for prefill too). Other types and larger batches dequantize the
  file's blocks a tile of rows at a time into one reused buffer per thread and use
  single-threaded BLAS, the output columns split
  between ember's threads, so no float32 copy of the model is ever kept; a matrix that also has
  a kernel layout then gives its file pages back (`release`), so they do not stay resident
  twice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ..formats.quants import dequantize_into
from .f16 import f16_matvec, pack_f16
from .kquant import QTYPES as KQ_TYPES  # Q2_K..Q6_K
from .kquant import TERNARY, PackedKQ, kq_matmul, kq_matvec, pack_kquant, ternary_as_q2_k
from .pack import pack_q4
from .q8 import (
    INT8_TYPES,  # Q8_0, Q5_0/Q5_1
    pack_q5,
    pack_q8_0,
    q8_matvec,
)
from .split import MIN_ROWS, split
from .tmac import lut_matvec

_local = threading.local()
SMALL_BATCH = 8  # up to this many rows of activations use the matvec kernel row by row
TILE_BYTES = 4 << 20  # float32 bytes of weights dequantized per BLAS tile, at most
BLOCK = 64  # output columns: a tile is a multiple of this


@dataclass
class QuantMatrix:
    """A 2-D quantized weight [n_out, n_in] in its file encoding, with an optional kernel layout."""

    name: str
    raw: np.ndarray  # uint8 [n_out, row_bytes], usually a view of the memory-mapped file
    qtype: int
    n_out: int
    n_in: int
    packed: object | None = None  # e.g. a PackedQ4 for the table-lookup kernel
    matvec: object | None = None  # the kernel for `packed`: matvec(x, packed, out=, threads=)
    release: object | None = None  # drops the resident pages of `raw` (set by the WeightStore)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the matrix reads."""
        return self.packed.nbytes if self.packed is not None else self.raw.nbytes

    def rows_f32(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) dequantized into this thread's tile buffer (valid until its next
        use)."""
        n = stop - start
        buf = getattr(_local, "tile", None)
        if buf is None or buf.size < n * self.n_in:
            buf = _local.tile = np.empty(max(n * self.n_in, TILE_BYTES // 4), np.float32)
        out = buf[: n * self.n_in].reshape(n, self.n_in)
        dequantize_into(self.raw[start:stop], self.qtype, out.reshape(-1), name=self.name)
        return out


def matmul(x: np.ndarray, w, threads: int = 1) -> np.ndarray:
    """x [n, n_in] times a weight stored as [n_out, n_in] -> [n, n_out]. BLAS is expected to
    run single-threaded (the session sets it): `threads` splits a batch's output columns
    between ember's own threads, so that dequantizing the tiles runs in parallel too and no
    second pool of spinning BLAS threads competes with numba's."""
    if isinstance(w, np.ndarray):
        if x.shape[0] < MIN_ROWS:
            return x @ w.T
        return _blocks(x, w.shape[0], w.shape[1], threads, lambda a, b: w[a:b])
    if isinstance(w.packed, PackedKQ):  # the weights read once per 16 rows
        return kq_matmul(np.ascontiguousarray(x, dtype=np.float32), w.packed, threads=threads)
    if w.packed is not None and x.shape[0] <= SMALL_BATCH:
        matvec = w.matvec
        out = np.empty((x.shape[0], w.n_out), np.float32)
        for i in range(x.shape[0]):
            matvec(x[i], w.packed, out=out[i], threads=threads)
        return out
    return _tiled(x, w, threads)


_KERNEL_TYPES = (T.Q4_0, T.Q4_1, *INT8_TYPES, *KQ_TYPES, *TERNARY)
VIEW_TYPES = (T.F16, T.BF16)  # kernels on the file's own rows (f16.py): no repacking, no cache


def _layout_qtype(qtype: int):
    """The qtype a matrix's kernel layout records: None for Q8_0's PackedQ8, Q2_K for the
    ternary types (run as Q2_K), else the type itself."""
    return None if qtype == T.Q8_0 else T.Q2_K if qtype in TERNARY else qtype


def has_kernel(qtype: int) -> bool:
    """Whether matrices of this type get a kernel layout (and so a place in the pack cache)."""
    return qtype in _KERNEL_TYPES


def pack(raw: np.ndarray, qtype: int):
    """The kernel layout of a matrix's GGUF rows (a PackedQ4, PackedQ8, PackedQ5 or PackedKQ)."""
    if qtype in (T.Q4_0, T.Q4_1):
        return pack_q4(raw, qtype)
    if qtype in KQ_TYPES:
        return pack_kquant(raw, qtype)
    if qtype in TERNARY:
        return pack_kquant(ternary_as_q2_k(raw, qtype), T.Q2_K)
    if qtype in (T.Q5_0, T.Q5_1):
        return pack_q5(raw, qtype)
    if qtype == T.Q8_0:
        return pack_q8_0(raw)
    raise ValueError(f"no kernel layout for ggml type {qtype}")


def quant_matrix(name: str, raw: np.ndarray, qtype: int, n_out: int, n_in: int, packed=None) -> QuantMatrix:
    """A QuantMatrix, with its kernel layout when ember has a kernel for the type (`packed`, e.g.
    from the pack cache, or packed now)."""
    if qtype in VIEW_TYPES:
        return QuantMatrix(name, raw, qtype, n_out, n_in, pack_f16(raw, qtype), f16_matvec)
    if not has_kernel(qtype):
        return QuantMatrix(name, raw, qtype, n_out, n_in)
    if packed is None:
        packed = pack(raw, qtype)
    elif (packed.n_out, packed.n_in) != (n_out, n_in) or getattr(packed, "qtype", None) != _layout_qtype(qtype):
        raise ValueError(f"{name}: the cached kernel layout does not match the tensor")
    if qtype in INT8_TYPES:
        return QuantMatrix(name, raw, qtype, n_out, n_in, packed, q8_matvec)
    if isinstance(packed, PackedKQ):
        return QuantMatrix(name, raw, qtype, n_out, n_in, packed, kq_matvec)
    return QuantMatrix(name, raw, qtype, n_out, n_in, packed, lut_matvec)


def _blocks(x: np.ndarray, n_out: int, n_in: int, threads: int, rows) -> np.ndarray:
    """x @ rows(a, b).T on fixed blocks of output columns, the blocks shared out between the
    threads. The blocks do not depend on the thread count: BLAS picks its kernels by a call's
    shape, and on some CPUs (a Zen 5 EPYC) a column's bits change with the width of the call, which
    would make a prompt's KV cache differ between --threads 1 and 2."""
    out = np.empty((x.shape[0], n_out), np.float32)
    step = max(BLOCK, TILE_BYTES // (4 * n_in) // BLOCK * BLOCK)
    step = min(step, -(-n_out // (8 * BLOCK)) * BLOCK)  # at least ~8 blocks to share out
    n_blocks = -(-n_out // step)

    def run(b0: int, b1: int) -> None:
        for b in range(b0, b1):
            a, e = b * step, min(n_out, (b + 1) * step)
            np.matmul(x, rows(a, e).T, out=out[:, a:e])

    split(n_blocks, threads if x.shape[0] >= MIN_ROWS else 1, run)
    return out


def _tiled(x: np.ndarray, w: QuantMatrix, threads: int = 1) -> np.ndarray:
    out = _blocks(x, w.n_out, w.n_in, threads, w.rows_f32)
    if w.packed is not None and w.release is not None:
        w.release()
    return out
