"""Building blocks for fused, multi-threaded numba code: matrices as descriptors, a spin barrier.

A fused step (``devices/cpu/step.py``) runs the same ``nogil`` numba function on N OS threads at
once; each thread computes its share of every matvec's rows, and the threads meet at a barrier
wherever a full vector is needed next. This module gives that code:

- ``describe(matrix)``: one int64 row per weight matrix (kind, shape, kernel address, data
  addresses), so numba code can run any packed matrix through its llvmlite kernel;
- ``prepare_rows(desc, m0, m1, X, buf)``: the activation formats a set of matrices needs (T-MAC
  tables for Q4_0/Q4_1, int8 blocks for the q8 kernels (``q8.INT8_TYPES``), int8
  super-blocks for the K-quants, the float32 row for F16/BF16) of k input rows, each
  built once into a thread's ``scratch``;
  ``matvec_rows``: the rows of a matrix for those k rows (the K-quant kernels read each weight
  once for all k; the others run row by row over L2-sized groups of units);
- ``matvec_units(desc, m, buf, y, u0, u1)``: rows ``[64 u0, 64 u1)`` of matrix ``m`` (``UNIT``
  rows per unit; outputs are padded to whole units);
- ``take(...)``: the next work units of a phase, claimed with an atomic fetch-and-add (dynamic
  scheduling: a thread the OS delays does less of the phase);
- ``barrier(state, nth)``: a sense-counting spin barrier in LLVM IR (atomic add, ``pause``),
  which falls back to ``sched_yield`` after ``SPIN`` polls (a second busy process on a 2-core
  machine must not turn every barrier into a scheduler tick) and gives up with status 1 after
  ``GIVE_UP`` yields, or at once with status 2 when ``state[ABORT]`` is set, so an error in one
  thread can never hang the others.

Only x86 hosts with a native kernel path run fused code (``available()``); elsewhere the model runs
op by op through ``ops.matmul``.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
from numba import njit, types
from numba.core import errors
from numba.extending import intrinsic

from . import codegen, f16, kquant, kquant_acts, q8, tmac
from .pack import DEFAULT_TILE, Q4_0, Q4_1

__all__ = [
    "KIND_Q4",
    "KIND_Q8",
    "KIND_KQ",
    "KIND_F16",
    "UNIT",
    "NCOL",
    "available",
    "describe",
    "fusable",
    "barrier_address",
    "new_barrier_state",
    "ABORT",
]

UNIT = DEFAULT_TILE  # rows per work unit (the T-MAC tile)
KIND_Q4, KIND_Q8, KIND_KQ, KIND_F16 = 1, 2, 3, 4
ROW_GROUP = 8  # units a one-row kernel runs over for each of k rows in turn (L2-resident)
NCOL = 8  # descriptor: kind, n_out, n_in, kernel fn, data0, data1, units, data2 (or 0)
SPIN = 1024
GIVE_UP = 1 << 26
ABORT = 16  # index of the abort word in the barrier state (count at 0, generation at 8)


# ---------------------------------------------------------------------------------------------
# calls through runtime addresses


def _check(tys):
    for t in tys:
        if not (isinstance(t, types.Integer) or (isinstance(t, types.Array) and t.layout == "C")):
            raise errors.TypingError(f"expected an integer or a C-contiguous array, got {t}")


@intrinsic
def addr(typingctx, a):
    """The data address of a C-contiguous array, as int64."""
    _check((a,))

    def gen(context, builder, sig, args):
        return codegen.as_i64(context, builder, sig.args[0], args[0])

    return types.int64(a), gen


@intrinsic
def call4(typingctx, fn, a, b, c, d):
    """void fn(a, b, c, d); arrays pass their data pointers, integers their values."""
    _check((fn, a, b, c, d))
    return types.void(fn, a, b, c, d), codegen.call_codegen(False)


@intrinsic
def call6(typingctx, fn, a, b, c, d, e, f):
    _check((fn, a, b, c, d, e, f))
    return types.void(fn, a, b, c, d, e, f), codegen.call_codegen(False)


@intrinsic
def call8(typingctx, fn, a, b, c, d, e, f, g, h):
    _check((fn, a, b, c, d, e, f, g, h))
    return types.void(fn, a, b, c, d, e, f, g, h), codegen.call_codegen(False)


@intrinsic
def call12(typingctx, fn, a, b, c, d, e, f, g, h, i, j, k, m):
    _check((fn, a, b, c, d, e, f, g, h, i, j, k, m))
    return types.void(fn, a, b, c, d, e, f, g, h, i, j, k, m), codegen.call_codegen(False)


@intrinsic
def call3_i64(typingctx, fn, a, b, c):
    _check((fn, a, b, c))
    return types.int64(fn, a, b, c), codegen.call_codegen(True)


# ---------------------------------------------------------------------------------------------
# the barrier


def _barrier_ir(cpu: str, features: str) -> str:
    L = [
        "declare void @llvm.x86.sse2.pause()",
        "define i64 @ember_barrier(ptr %st, i64 %n, i64 %yield) #0 {",
        "entry:",
        "  %gp = getelementptr i64, ptr %st, i64 8",
        f"  %ap = getelementptr i64, ptr %st, i64 {ABORT}",
        "  %gen = load atomic i64, ptr %gp acquire, align 8",
        "  %old = atomicrmw add ptr %st, i64 1 acq_rel",
        "  %n1 = sub i64 %n, 1",
        "  %last = icmp eq i64 %old, %n1",
        "  br i1 %last, label %release, label %spin",
        "release:",
        "  store atomic i64 0, ptr %st monotonic, align 8",
        "  %g1 = add i64 %gen, 1",
        "  store atomic i64 %g1, ptr %gp release, align 8",
        "  ret i64 0",
        "spin:",
        "  %i = phi i64 [0, %entry], [%i1, %next]",
        "  %cur = load atomic i64, ptr %gp acquire, align 8",
        "  %moved = icmp ne i64 %cur, %gen",
        "  br i1 %moved, label %done, label %check",
        "check:",
        "  %ab = load atomic i64, ptr %ap monotonic, align 8",
        "  %abort = icmp ne i64 %ab, 0",
        "  br i1 %abort, label %aborted, label %wait",
        "wait:",
        "  %i1 = add i64 %i, 1",
        f"  %hot = icmp ult i64 %i1, {SPIN}",
        "  br i1 %hot, label %pause, label %slow",
        "pause:",
        "  call void @llvm.x86.sse2.pause()",
        "  br label %next",
        "slow:",
        f"  %over = icmp ugt i64 %i1, {SPIN + GIVE_UP}",
        "  br i1 %over, label %timeout, label %yield_",
        "yield_:",
        "  %yf = inttoptr i64 %yield to ptr",
        "  %yr = call i32 %yf()",
        "  br label %next",
        "next:",
        "  br label %spin",
        "done:",
        "  ret i64 0",
        "aborted:",
        "  ret i64 2",
        "timeout:",
        "  ret i64 1",
        "}",
        "define i64 @ember_take(ptr %c, i64 %n, i64 %unused) #0 {",
        "  %old = atomicrmw add ptr %c, i64 %n monotonic",
        "  ret i64 %old",
        "}",
    ]
    return codegen.finish_module(L, cpu, features)


_lock = threading.Lock()
_state: dict = {}


def available() -> bool:
    """Fused code needs an x86 native kernel path (the barrier and the kernels are x86 IR)."""
    return codegen.select_kernel(None) in ("avx512", "avx512-novnni", "avx2")


def barrier_address() -> tuple[int, int, int]:
    """Addresses of ember_barrier(state, n, yield_fn) -> status, of sched_yield, and of
    ember_take(counter, n, 0) -> the counter's old value (an atomic fetch-and-add)."""
    with _lock:
        if "barrier" not in _state:
            isa = codegen.select_kernel(None)
            ee, owners, _ = codegen.jit(_barrier_ir, isa)
            libc = ctypes.CDLL(None)
            _state["barrier"] = (
                ee.get_function_address("ember_barrier"),
                ctypes.cast(libc.sched_yield, ctypes.c_void_p).value,
                ee.get_function_address("ember_take"),
            )
            _state["owners"] = owners
        return _state["barrier"]


def new_barrier_state() -> np.ndarray:
    """Counter, generation and abort word, each on its own cache line."""
    return np.zeros(24, np.int64)


@njit(cache=True, nogil=True, inline="always")
def barrier(fn, yf, state, nth):
    if nth == 1:
        return 0
    return call3_i64(fn, state, nth, yf)


# ---------------------------------------------------------------------------------------------
# matrices as descriptors


def fusable(m) -> bool:
    """Whether ``m`` (a QuantMatrix) has a kernel the fused code can call."""
    p = getattr(m, "packed", None)
    if p is None:
        return False
    if m.qtype in (Q4_0, Q4_1):
        return p.tile == UNIT
    return m.qtype in (*q8.INT8_TYPES, f16.F16, f16.BF16) or isinstance(p, kquant.PackedKQ)


def describe(m) -> np.ndarray:
    """The int64 descriptor row of a fusable QuantMatrix (its arrays must outlive the row)."""
    p = m.packed
    units = -(-m.n_out // UNIT)
    if m.qtype in (Q4_0, Q4_1):
        _, fk, bits = tmac.fn_addresses(m.qtype)
        if bits != 16:
            raise ValueError("fused code expects 16-bit tables")
        return np.array([KIND_Q4, m.n_out, m.n_in, fk, p.codes.ctypes.data, p.dm.ctypes.data, units, 0], np.int64)
    if m.qtype in q8.INT8_TYPES:  # one activation format; PackedQ5 bytes or Q8_0 codes
        q = p.q if isinstance(p, q8.PackedQ5) else p.qs
        return np.array(
            [KIND_Q8, m.n_out, m.n_in, q8.fn_address(qtype=m.qtype), q.ctypes.data, p.d.ctypes.data, units, 0], np.int64
        )
    if m.qtype in (f16.F16, f16.BF16):
        return np.array([KIND_F16, m.n_out, m.n_in, f16.fn_address(m.qtype), p.w.ctypes.data, 0, units, 0], np.int64)
    return np.array(
        [
            KIND_KQ,
            m.n_out,
            m.n_in,
            kquant.fn_address(p.qtype),
            p.q.ctypes.data,
            p.sc.ctypes.data,
            units,
            p.d.ctypes.data,
        ],
        np.int64,
    )


def prep_fns() -> np.ndarray:
    """Addresses of the activation builders ``prepare_rows`` calls: T-MAC tables (16-bit), the
    K-quant int8 super-blocks."""
    return np.array([tmac.fn_addresses(Q4_1)[0], kquant.quant_address()], np.int64)


# ---------------------------------------------------------------------------------------------
# numba pieces


@njit(cache=True, nogil=True, inline="always")
def take(tfn, counters, ci, nth, prev, chunk):
    """The first of the next ``chunk`` work units of phase ``ci``: with one thread simply
    ``prev + chunk`` (start with prev = -chunk); with more, an atomic fetch-and-add on the
    phase's counter, so a thread that the OS delays takes fewer units instead of holding
    the others at the next barrier. Each unit is still computed whole by one thread."""
    if nth == 1:
        return prev + chunk
    return call3_i64(tfn, addr(counters) + 64 * ci, chunk, 0)


@njit(cache=True, nogil=True)
def scratch(n_in_max, k=1):
    """The activation buffers of one thread for k rows of inputs up to n_in_max: (tab, bc, xq,
    dxv) for the T-MAC and q8 kernels, then (xq, xd, xp) for the K-quant kernels (one set for
    all k rows), then the float32 rows for the F16/BF16 kernels. The one-row formats are
    [k, ...] arrays, one row per input row (``_row``)."""
    nb, nsb = n_in_max // 32 + 1, n_in_max // 256 + 1
    xq, xd, xp = kquant_acts.act_buffers(nsb, k + (k & 1))
    return (
        np.empty((k, nb * 256), np.int8),
        np.empty((k, nb * 4), np.float32),
        np.empty((k, nb * 32), np.int8),
        np.empty((k, 16 * (nb + 1)), np.float32),
        xq,
        xd,
        xp,
        np.empty((k, n_in_max), np.float32),
    )


@njit(cache=True, nogil=True, inline="always")
def _row(buf, i):
    """The buffers of input row i: its one-row formats, the shared K-quant ones."""
    return (buf[0][i], buf[1][i], buf[2][i], buf[3][i], buf[4], buf[5], buf[6], buf[7][i])


@njit(cache=True, nogil=True, inline="always")
def _kinds(desc, m0, m1):
    """Which activation formats matrices m0..m1-1 need: (T-MAC, q8, K-quant, float)."""
    q4 = False
    q8_ = False
    kq = False
    fl = False
    for m in range(m0, m1):
        if desc[m, 0] == KIND_Q4:
            q4 = True
        elif desc[m, 0] == KIND_Q8:
            q8_ = True
        elif desc[m, 0] == KIND_F16:
            fl = True
        else:
            kq = True
    return q4, q8_, kq, fl


@njit(cache=True, nogil=True, inline="always")
def _prepare_row(fns, x, rb, q4, q8_, fl):
    """The one-row formats of ``x`` into the row buffers ``rb`` (from ``_row``)."""
    if fl:
        rb[7][: x.size] = x
    if q4:
        call4(fns[0], x, rb[0], rb[1], x.size // 32)
    if q8_:
        q8.quantize_x_nb(x, rb[2], rb[3])


@njit(cache=True, nogil=True, inline="always")
def prepare_rows(desc, m0, m1, fns, X, n_in, buf):
    """Activation formats of the first n_in columns of each row of X [k, >= n_in]
    (C-contiguous, k <= the rows ``buf`` was made for) for matrices m0..m1-1 (rows of desc),
    each format built once into ``buf`` (from ``scratch``): the K-quant kernels' k-row format,
    one-row formats for the other kinds; ``fns`` from ``prep_fns``."""
    k = X.shape[0]
    q4, q8_, kq, fl = _kinds(desc, m0, m1)
    if q4 or q8_ or fl:
        for i in range(k):
            _prepare_row(fns, X[i][:n_in], _row(buf, i), q4, q8_, fl)
    if kq:
        call8(fns[1], X, buf[4], buf[5], buf[6], n_in // 256, k, k + (k & 1), X.shape[1])


@njit(cache=True, nogil=True, inline="always")
def matvec_units(desc, m, buf, y, u0, u1):
    """Rows [UNIT u0, UNIT u1) of matrix m into y (y padded to whole units), with the
    activation formats ``prepare_rows`` put in ``buf`` (one input row's buffers, ``_row``)."""
    if u1 <= u0:
        return
    nb = desc[m, 2] // 32
    r1 = min(UNIT * u1, desc[m, 1])
    if desc[m, 0] == KIND_Q4:
        call8(desc[m, 3], desc[m, 4], desc[m, 5], buf[0], buf[1], addr(y) + 4 * UNIT * u0, nb, u0, u1)
    elif desc[m, 0] == KIND_Q8:
        call8(desc[m, 3], desc[m, 4], desc[m, 5], buf[2], buf[3], y, nb, UNIT * u0, r1)
    elif desc[m, 0] == KIND_F16:
        call6(desc[m, 3], desc[m, 4], buf[7], y, desc[m, 2], UNIT * u0, r1)
    else:
        call12(
            desc[m, 3], desc[m, 4], desc[m, 5], desc[m, 7], buf[4], buf[5], buf[6], y, nb // 8, UNIT * u0, r1, 1, y.size
        )


@njit(cache=True, nogil=True, inline="always")
def matvec_rows(desc, m, buf, Y, u0, u1):
    """``matvec_units`` for the k rows of Y [k, units * UNIT] (C-contiguous) that
    ``prepare_rows`` prepared. K-quant kernels take all k rows in one pass over the weights;
    the one-row kernels run row by row over ``ROW_GROUP`` units at a time, so each group's
    weights come from DRAM once and from L2 for the other rows (one kernel call site: the
    fused step inlines this at every matrix)."""
    k = Y.shape[0]
    if u1 <= u0:
        return
    if k > 1 and desc[m, 0] == KIND_KQ:
        r1 = min(UNIT * u1, desc[m, 1])
        call12(
            desc[m, 3],
            desc[m, 4],
            desc[m, 5],
            desc[m, 7],
            buf[4],
            buf[5],
            buf[6],
            Y,
            desc[m, 2] // 256,
            UNIT * u0,
            r1,
            k,
            Y.shape[1],
        )
        return
    step = u1 - u0 if k == 1 else ROW_GROUP
    for g0 in range(u0, u1, step):
        g1 = min(g0 + step, u1)
        for i in range(k):
            matvec_units(desc, m, _row(buf, i), Y[i], g0, g1)
