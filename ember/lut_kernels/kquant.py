"""Decode matvec and small-batch matmul for GGUF K-quant weights (Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K) with int8 activations.

API
---
``pack_kquant(raw2d, qtype) -> PackedKQ``
    GGUF rows (uint8 [n_out, nsb * block bytes], nsb = n_in / 256) -> the kernel layout below.
    ``PackedKQ``: ``.q .sc .d .n_out .n_in .qtype .nsb .nbytes .gguf_nbytes``, ``arrays()`` /
    ``PackedKQ.from_arrays(a)`` (``np.savez`` / ``np.load``; ValueError on any inconsistency),
    ``codes()`` (natural-order unsigned codes), ``scales()`` (float32 per-block scales and
    mins), ``dequantize()`` (float32 [n_out, n_in], bit for bit
    ``ember.formats.quants.dequantize``).
``kq_matvec(x, p, out=None, threads=1, kernel=None) -> float32 [n_out]``
``kq_matmul(X, p, out=None, kernel=None, threads=1) -> float32 [k, n_out]``
    X float32 [k, n_in]: ONE pass over the weights for all k rows (k is any size; the kernels
    are register-blocked for up to 16 rows at a time, ``DEFAULT_KB``).
``kq_matmul_reference(X, p, return_scale=False)``: NumPy oracle (below).
``quantize_x(X, kernel=None) -> (xq, xd, xp)``, ``quantize_x_reference(X)``.
numba entries (``nogil``, ``cache``): ``matmul_nb(fn, fq, x, q, sc, d, out)`` (shapes checked,
raises ValueError), ``rows_nb(fn, q, sc, d, xq, xd, xp, y, r0, r1)`` (rows r0 <= r < r1 of y
[k, >= r1] for pre-quantized activations; no checks), ``quantize_x_alloc(x, fq)``,
``quantize_x_nb(x, xq, xd, xp)`` (the plain numba quantizer). Addresses:
``fn_address(qtype, kernel=None)`` (0: portable), ``quant_address(kernel=None)`` (0: numba);
each type's kernels are a module of their own, compiled (or loaded from the disk cache) on
first use. Kernel choice: ``kernel=`` or ``$EMBER_KERNEL`` through ``codegen.select_kernel``
(read once; ``reset_kernel_choice()``): ``avx512`` (VNNI ``vpdpbusd``; the ``vpmaddubsw`` form
on hosts without VNNI), ``avx512-novnni``, ``avx2`` (compiled for x86-64-v3), ``portable``
(numba).

Packed layout (``PackedKQ``; all plain C-contiguous numpy arrays, ``q`` 64-byte aligned)
-----------------------------------------------------------------------------------------
Within a super-block of 256 weights, 16-group ``g`` (weights 16 g .. 16 g + 15) is lane
``L`` with ``g = 2 (L % 8) + L // 8`` (``_LANE_GROUP``: lanes p and p + 8 hold the two halves
of 32-block p), and weight ``16 g + 4 v + t`` (v, t = 0..3) is "lane L, virtual vector v, byte
t": a 4-byte lane of a 64-byte vector holds 4 neighbouring weights of one 16-group, and 4
vectors cover a super-block. Codes are unsigned (Q2_K 0..3, Q3_K 0..7, Q4_K 0..15, Q5_K 0..31,
Q6_K 0..63).
Q2_K, Q3_K, Q6_K (scales per 16-group), per row and super-block, from these parts:
    nibbles (128 bytes): byte ``64 c + 4 L + t`` = low 4 bits of v = 2c | of v = 2c + 1 << 4;
    crumbs (64 bytes): byte ``4 L + t``, bits 2v..2v+1 = 2 bits of virtual vector v;
    bit plane (32 bytes): byte ``4 L + t`` (L < 8), bit v for lane L and bit 4 + v for lane
    L + 8 (a kernel widens it to 64 bytes with one shift and a shuffle).
    ``q`` uint8 [n_out, nsb * QB]: Q2_K (QB = 64): crumbs. Q3_K (96): crumbs, then the bit
    plane (bit 2 of the code). Q6_K (192): nibbles, then crumbs (bits 4, 5).
    ``sc`` uint8 [n_out, nsb * 16], in lane order: Q2_K: the file's bytes, scale | min << 4;
    Q3_K: the decoded 6-bit scales minus 32, Q6_K: the file's int8 scales, as int8 bytes
    (``p.sc.view(np.int8)``; one dtype for all keeps the numba entries to one compilation).
    ``d`` uint16 [n_out, nsb * ND]: IEEE half bits (numba has no float16): ``d, dmin`` (ND = 2,
    Q2_K) or ``d`` (ND = 1); the kernels widen them (``vcvtph2ps``).
Q4_K, Q5_K (scales and mins per 32-block): rows in pairs (a zero row appended to an odd
    count; the arrays have ``n_out + n_out % 2`` rows, and array rows 2m, 2m + 1 are pair m,
    super-block after super-block). Per pair and super-block, 8 code vectors (v, h), v, h =
    0..3, 0..1: lane ``8 j + p``, byte t = the code of row j of the pair, weight ``32 p + 16 h
    + 4 v + t`` (block p): a kernel lane sums one 32-block of one row over the 8 vectors.
    ``q``: 4 x 64 bytes of nibbles (vector v: (v, 0) | (v, 1) << 4), Q5_K then 64 bytes, byte
    ``4 lane + t`` bit ``2 v + h`` = bit 4 of code (v, h). ``sc``: 8 scales of row 0, 8 of row
    1, 8 mins of row 0, 8 of row 1 (6-bit, decoded). ``d``: d0, d1, dmin0, dmin1.
The weight is ``SC * code - MM`` (Q2_K, Q4_K, Q5_K; ``SC = d * scale``, ``MM = dmin * min``)
or ``SC * (code - o)`` (Q3_K o = 4, Q6_K o = 32), every product exact in float32.
Bytes per super-block against the file's: Q2_K 84 (84), Q3_K 114 (110: the 12 packed scale
bytes become 16), Q4_K 148 (144), Q5_K 180 (176), Q6_K 210 (210). Packing is vectorized NumPy
(``benchmark()``: 8960x1536 Q4_K ~55 ms, 1536x8960 Q6_K ~114 ms).

Activation format (one for all types; ``kp`` = k rounded up to even, the padding row is 0)
-----------------------------------------------------------------------------------------
(No kernel reads the padding row any more: it served the act-row pairs that the Q4_K/Q5_K row
pairs replaced. Dropping it is a layout change of its own, not yet made.)
Per 32-block of a row: ``amax = max |x|``, ``dx = amax / 127``, ``xq = rint(x * (127 /
amax))`` (half to even, |xq| <= 127; amax = 0 gives dx = 0, xq = 0; x must be finite).
``xq`` int8 [nsb, kp, 256]: the codes in the lane order above (the signed, memory operand of
    ``vpdpbusd``/``vpmaddubsw``; the weights' unsigned codes are the register one).
``xd`` float32 [4, nsb, kp, 16], per lane L: ``xd[0]``: dx of its 32-block (L % 8);
    ``xd[1]``: ``float32(dx * xsum16)`` (xsum16: its 16-group's sum of xq; Q2_K's mins);
    ``xd[2]``, ``xd[3]``: int32 bit patterns (``xd.view(np.int32)``) of ``-4 * xsum16`` and
    ``-32 * xsum16``, where the integer dot products of Q3_K and of Q6_K start.
``xp`` float32 [nsb, kp, 16]: lane L: ``float32(dx * xsum32)`` of 32-block L % 8 (xsum32: the
    block's sum of xq; Q4_K/Q5_K's mins).
Super-block-major, so a kernel reads the k rows of one super-block as one contiguous span.
``quantize_x_alloc`` allocates the three in one 64-byte aligned block and fills them with
``kq_quant`` (IR, vectorized; bit-identical to the numba ``quantize_x_nb``): 1x1536 ~1 us of
work (5 us per Python call), 16x8960 72 us (numba: 460 us).

Math (exact integers, then float32)
-----------------------------------
Per 16-group (Q2_K, Q3_K, Q6_K), per (weight row, super-block, act row): ``I_L = sum (code -
o) xq`` over lane L's 16 weights (o: Q2_K 0, Q3_K 4, Q6_K 32), exactly, as int32: the unsigned
codes times the signed acts, a chain of 4 ``vpdpbusd`` that starts at ``-o * xsum16``
(``xd[2]`` / ``xd[3]``; 0 for Q2_K); or ``vpmaddubsw`` pairs (<= 2 * 63 * 127), two summed in
int16 (<= 32004), ``vpmaddwd``, the start added. ``y += float(I_L) * dx * SC_L`` per lane, Q2_K
``- MM_L * float32(dx xsum16_L)``. The acts are the memory operand, and no per-weight-row
correction is needed (an earlier offset-binary form, acts + 128, subtracted ``128 * sum w`` per
weight row: 4 more vector ops per (row, super-block), Q4_K 8960x1536 k = 8 ~4% slower, k = 1
~5-10%).
Per 32-block (Q4_K, Q5_K), per (row pair, super-block, act row): 8 ``vpdpbusd``, one per code
vector (v, h), against act vector v's half h (32 bytes, both halves of a zmm: lane 8 j + p
meets 16-group 2 p + h) give ``I_b`` of block b = p of both rows of the pair in one vector
(|I_b| <= 32 * 31 * 127, int32); ``y += float(I_b) * dx_b * SC_b - MM_b * float32(dx_b
xsum_b)``: one cvt, mul and 2 FMAs per pair and act row. Per weight row and act row: 4
``vpdpbusd`` + 2 ops. (The earlier form, one row at a time, had lanes of 16-groups and
combined two act rows' lanes with ``vpackssdw`` + ``vpmaddwd``: + 1 op per weight row and act
row, and half the lanes of a row's decode: 67 vector ops per (row, super-block) at k = 8
against 56 now. Kernel alone, 8960x1536, 1 thread, hot: k = 8 965 -> 780 us, k = 1 351 -> 332-
348; Q5_K k = 8 1135 -> 897, k = 1 466 -> 387. Q5_K's codes need no offset: int32 sums.)
A call's rows need not start or end on a pair: the half pair is computed, its other row not
stored.
Accumulation in float32 lanes (FMA); at the end of a row (pair) the chunk's accumulators are
summed together, neighbours folded into one vector level by level (``_reduce_accs``; avx512).

The IR (``kernel_ir``; every argument an i64 or a pointer, C ABI, called from numba through a
runtime address like q8.py / tmac.py):
``void kq_<type>(ptr q, ptr sc, ptr d, ptr xq, ptr xd, ptr xp, ptr y, i64 nsb, i64 r0, i64 r1,
                i64 k, i64 y_stride)`` (``kq_q2_k`` .. ``kq_q6_k``)
    ``y[i * y_stride + r]`` for r0 <= r < r1 (absolute row indices; Q4_K/Q5_K: rows of the
    pairs) and i < k.
``void kq_quant(ptr x, ptr xq, ptr xd, ptr xp, i64 nsb, i64 k, i64 kp, i64 x_stride)``.
Structure: super-blocks in tiles whose act data stays in L1 (``tile_bytes()``, 3/4 of the L1D,
of the ``min(kp, kb)`` rows one chunk call reads; partial sums added into y: for n_in = 8960
and k >= 4 the act data of a whole row is 100+ KB and its loads from L2 were THE bottleneck;
sizing the tile by all kp rows instead gave 1-super-block tiles at k = 256 and a reduction + y
update + decode prologue per (row, chunk, super-block): k = 256 ran at half the k = 16 rate;
so a row's sum is bit-identical for any k only while its n_in fits one tile), rows in
groups of 32, per group act-row chunks of 16 (Q4_K/Q5_K: 8), 8, 4, 2, 1 (each weight is read
from memory once; a group's later chunks re-read it from L1/L2); each chunk function
(``noinline``) loops over
the group's rows and the tile's super-blocks, decodes a super-block's weights once
(software-pipelined one super-block ahead on avx512) and applies them to every act row of the
chunk with one accumulator per act row (and row pair for Q4_K, Q5_K; on avx2 one per row of
the pair). Software prefetch (``codegen.emit_prefetch``) of the same super-blocks ``ceil(2048
/ tile bytes)`` rows ahead on the q, sc and d streams (k = 1 cold: 8.5 GB/s without, 9.9 with,
151936x1536).
``portable``: numba, each super-block decoded to float32 weights, 256 float32 lanes per act
row accumulate ``w * (xq dx)`` (exact products; float32 rounding differs only).

Accuracy
--------
Kernel vs oracle: float32 rounding only; measured <= 2.9e-7 of the output's sum of |terms|
(all paths, 6 seeds x 3 shapes x both types); tests assert 1e-5. Oracle vs the float truth
``dequantize(W) @ x`` (float64): guaranteed ``|err| <= sum_j |w_j| (dx_j (1/2 + 2^-22 |xq_j|)
+ 2^-23 |x_j|)`` (half an activation step per weight, with float32 rounding of the
quantization and of the dequantized weights; ``kq_matmul_reference(..., return_scale=True)``
returns it), measured at <= 0.15 of it; typical (Gaussian x, random codes) max |err| /
sum_j |w_j x_j| per output: 2.0e-3 (n_in 256), 7-10e-4 (1536), 3.3e-4 (8960).

Timing: ``python -m ember.lut_kernels.kquant`` (``benchmark()``)
----------------------------------------------------------------
Dev box: 2 vCPUs "Intel Xeon" (KVM; AVX-512 VNNI, AMX present but unused; 2 MB L2/core,
105 MB L3), 2.0-2.3 GHz measured, shared with another engineer's benchmarks: the same command
moves up to ~1.6x between minutes (a ``vpdpbusd`` throughput probe read 0.49 cycles/instr on
a quiet core, 0.74 when the sibling was busy). Run 07:28-07:30, load average 0.46-0.81, probe
0.51-0.55 (quiet). One thread unless said, the whole Python call (``kq_matvec`` for k=1,
``kq_matmul`` above), median of 5 interleaved rounds; hot = the same matrix again, cold =
rotating over 512 MB of copies; GB/s = packed bytes / time; x = time / the k=1 time::

    us (GB/s)         1536x1536 Q4_K   8960x1536 Q4_K   1536x8960 Q6_K   151936x1536 Q6_K
    packed             1.36 MB          7.96 MB          11.29 MB         191.4 MB
    k=1 cold avx512     179 ( 7.6)      1040 ( 7.7)      1231 ( 9.2)     22412 ( 8.5)
      hot avx512        138 ( 9.9)       983 ( 8.1)      1027 (11.0)     21767 ( 8.8)
      cold novnni       188 ( 7.3)      1037 ( 7.7)      1270 ( 8.9)     21993 ( 8.7)
      cold avx2         190 ( 7.2)      1086 ( 7.3)      1334 ( 8.5)     23529 ( 8.1)
      cold portable    2298 ( 0.6)        -                -                -
      cold 2 threads    103 (13.2)       835 ( 9.5)       880 (12.8)     14132 (13.5)
    cold k=2  (x)       x1.04            x0.98            x1.06            x1.04
    cold k=4            x1.41            x1.26            x1.43            x1.17
    cold k=8            x2.02            x1.64            x1.82            x1.71
    cold k=16           x3.82            x3.19            x3.42            x3.37
    f32 numpy k=1 cold  906 (10.4)      5241 (10.5)      5135 (10.7)     83772 (11.1)
      f32 k=8 / k=1     x3.76            x3.88            x3.40            x4.03

So k=1 streams at 8-9 GB/s in these runs (a plain numba uint64 sum over the same bytes: 9.6
GB/s, and the bare kernel on 151936x1536 without Python: 9.9-10.2 GB/s, same minute; numpy's
float32 sgemv 10.4-11.1 GB/s on 4.9x the bytes), 4.3-5.2x faster than float32 numpy per
token, and speculative verification of k rows reads the weights once: k=2 costs what k=1
does, k=4 1.2-1.4x, k=8 1.6-2.0x, k=16 3.2-3.8x. At k >= 8 the kernel is compute bound: per
(weight row, act row, super-block) 4 ``vpdpbusd`` + ~3-4 more vector ops (~5 cycles measured
hot), plus ~20-30 ops per (row, super-block) of decode amortized over the chunk; 2 zmm ops /
cycle is the port limit here. (This table predates the signed acts and the Q4_K/Q5_K row
pairs, which took 71 -> 56 vector ops per (row, super-block) at k = 8 for Q4_K: see Math; the
8-token step of Qwen2.5-1.5B costs 1.40-1.44x one token in ``bench/``.) The same run hot (L2) at
1536x1536: k=8 x2.5, k=16 x4.8. Per call: 3.7 us for a 1x256 matrix from Python (2.2 us for
``matmul_nb``'s dispatch). MCJIT compile of a module: 25-40 ms, once per process and path.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange, types
from numba.core import errors
from numba.extending import intrinsic

from ..formats.quants import block_info
from . import codegen
from .codegen import _flt, _mask, _splat
from .pack import aligned, aligned_empty, gguf_blocks, stored_arrays, stored_meta, tree_sum
from .q8 import EXACT_INT8, pack_exact_int8
from .split import MIN_ROWS, split
from .tmac import _emit_call

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
    "quantize_x_reference",
    "kq_matvec",
    "kq_matmul",
    "kq_matmul_reference",
    "rows_nb",
    "matmul_nb",
    "fn_address",
    "quant_address",
    "quantize_x_alloc",
    "kernel_ir",
    "kernel_asm",
    "reset_kernel_choice",
    "random_kquant",
    "TERNARY",
    "ternary_as_q2_k",
]

Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14   # GGMLQuantizationType values
QTYPES = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
QK = 256                                  # weights per super-block
_QB = {Q2_K: 64, Q3_K: 96, Q4_K: 128, Q5_K: 160, Q6_K: 192}  # bytes of codes, packed layout
_ND = {Q2_K: 2, Q3_K: 1, Q4_K: 2, Q5_K: 2, Q6_K: 1}  # f16 values per super-block (d[, dmin])
_NAMES = {Q2_K: "q2_k", Q3_K: "q3_k", Q4_K: "q4_k", Q5_K: "q5_k", Q6_K: "q6_k"}
_PAIR = (Q4_K, Q5_K)        # scales and mins per 32-block, rows in pairs; others per 16-group
_OFFSET = {Q2_K: 0, Q3_K: 4, Q4_K: 0, Q5_K: 0, Q6_K: 32}   # the integer dots are of code - offset
# act lane L holds 16-group _LANE_GROUP[L] = 2 (L % 8) + L // 8: lanes p and p + 8 hold the two
# halves of 32-block p (what a row pair's kernel adds up in one lane)
_LANE_GROUP = np.array([2 * (L % 8) + L // 8 for L in range(16)])
_GROUP_LANE = np.argsort(_LANE_GROUP)


# Q5_K row pairs: bit 2 v + h of a plane byte is bit 4 of code vector (v, h); shaped to
# broadcast against [pair, sb, v, h, lane, t]
_Q5_PLANE_BIT = (2 * np.arange(4, dtype=np.uint8).reshape(4, 1)
                 + np.arange(2, dtype=np.uint8)).reshape(1, 1, 4, 2, 1, 1)


def _unit_bytes(qt: int) -> tuple[int, int, int]:
    """(code bytes, scale bytes, f16 values) per super-block of a kernel unit: one weight row,
    or a row pair for Q4_K / Q5_K."""
    if qt in _PAIR:
        return 2 * _QB[qt], 32, 2 * _ND[qt]
    return _QB[qt], 16, _ND[qt]

DEFAULT_PREFETCH = 2048   # software prefetch distance, bytes of codes ahead (0: none)
DEFAULT_GROUP = 32         # weight rows per group (a group's later act chunks hit cache)
DEFAULT_PIPE = {"avx512": True, "avx512-novnni": True, "avx2": False}   # pipelined decode
DEFAULT_TILE_BYTES = 36864   # act bytes a chunk call reads per tile, 48 KB L1D (7 sb at kb = 16)
DEFAULT_KB = {"avx512": 16, "avx512-novnni": 16, "avx2": 8}  # act rows per register block
# Q4_K/Q5_K: 16 accumulators + two super-blocks' 8 code vectors spill at 16 act rows; 8960x1536
# Q4_K at k = 16 / 64, 1 thread, two rounds: kb 16 1.67 / 7.03, 1.65 / 6.96 ms; kb 8 1.54 /
# 6.34, 1.55 / 6.46 (Q5_K within noise; k = 8 the same)
PAIR_KB = 8
# ZEN_YMM: on AMD Zen the row-pair kernels (Q4_K, Q5_K) of 2+ act rows run on ymm (EVEX
# vpdpbusd, 32 bytes, not pipelined; _host_opts), which Zen 4 executes as fast as the two
# halves of a zmm op; the zmm form takes a vbroadcasti64x4 per act half. Each lane sums what
# it does on zmm, in the same order, so a row's result stays bit-identical whatever k (as
# speculative verification needs). AMD EPYC Zen 4, 1 thread, from DRAM, zmm -> ymm, us: Q4_K
# 8960x1536 k = 8 939 -> 834, k = 16 1879 -> 1773; 1536x8960 k = 8 995 -> 889; Q5_K
# 8960x1536 k = 8 1028 -> 920. One row stays zmm (ymm: Q4_K -2 to -6 %, noise-level, Q5_K
# +15 % / -2 %). Q2_K, Q3_K, Q6_K stay zmm: ymm 2-13 % slower at k = 8, 9-46 % at k = 16
# (Q6_K's one row 10-14 % faster on ymm, but its ymm lanes sum in another order than zmm's).
# A throughput probe there (ad hoc, 3.6 GHz from the 4-cycle dot latency): vpdpbusd zmm 1 per
# cycle, sharing its pipes with FMAs and vmulps (8 dots + 4 FMAs: 11.8 cycles); conversions,
# shifts and logic run beside them. Qwen2.5-1.5B's 1.54 G weights x 8 rows are 193 M dots, ~27
# ms on 2 cores before any float work; the Q4_K loop runs ~14-16 cycles per 8 dots.
# Also tried on Zen 4, not kept: byte shifts as 16-bit shifts + masks instead of the
# vgf2p8affineqb LLVM emits (which shares the vpdpbusd pipes there): Q4_K k = 8 7 % slower,
# Q6_K the same; a "pair view" of the acts (each 32-byte half stored twice, so the zmm row-pair
# dots take a 64-byte memory operand): the kernel alone, hot, Q4_K 8960x1536 k = 8 917 -> 809
# us, but through kq_matmul from DRAM 954 -> 950 and Qwen2.5-1.5B's 198 matrices at k = 8
# 110.9 -> 110.4 ms (1 thread), 59.5 -> 59.7 (2), for twice the act bytes.
DEFAULT_NR = {"avx512": 1, "avx512-novnni": 1, "avx2": 1}   # weight rows per register block


def _default_kb(isa: str, qt) -> int:
    return min(DEFAULT_KB[isa], PAIR_KB) if qt in _PAIR else DEFAULT_KB[isa]


# ---------------------------------------------------------------------------------------------
# packing


@dataclass
class PackedKQ:
    """A K-quant matrix [n_out, n_in] (Q2_K..Q6_K) in the kernel layout (module docstring)."""
    q: np.ndarray       # uint8 [n_out, nsb * QB]  codes
    sc: np.ndarray      # uint8 [n_out, nsb * 16]  scales (and mins), per type
    d: np.ndarray       # uint16 [n_out, nsb * ND]  IEEE half bits (d[, dmin])
    n_out: int
    n_in: int
    qtype: int

    @property
    def nsb(self) -> int:
        return self.n_in // QK

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.sc.nbytes + self.d.nbytes

    @property
    def gguf_nbytes(self) -> int:
        return self.n_out * self.nsb * block_info(self.qtype)[1]

    def arrays(self) -> dict:
        return {"q": self.q, "sc": self.sc, "d": self.d,
                "meta": np.array([self.n_out, self.n_in, self.qtype], np.int64)}

    @classmethod
    def from_arrays(cls, a) -> PackedKQ:
        n_out, n_in, qtype = stored_meta(a, "PackedKQ", 3)
        if qtype not in _QB or n_out < 0 or n_in <= 0 or n_in % QK:
            raise ValueError(f"PackedKQ.from_arrays: bad meta {[n_out, n_in, qtype]}")
        nsb = n_in // QK
        nr = _array_rows(qtype, n_out)
        q, sc, d = stored_arrays(a, "PackedKQ", ("q", "sc", "d"), {
            "q": ((nr, nsb * _QB[qtype]), np.uint8), "sc": ((nr, nsb * 16), np.uint8),
            "d": ((nr, nsb * _ND[qtype]), np.uint16)})
        return cls(aligned(np.ascontiguousarray(q)), np.ascontiguousarray(sc),
                   np.ascontiguousarray(d), n_out, n_in, qtype)

    def codes(self) -> np.ndarray:
        """The unsigned integer codes in natural order, uint8 [n_out, n_in] (Q2_K 0..3, Q3_K
        0..7, Q4_K 0..15, Q5_K 0..31, Q6_K 0..63)."""
        n, nsb, qt = self.n_out, self.nsb, self.qtype
        if qt in _PAIR:
            m = self.q.shape[0] // 2
            b = self.q.reshape(m, nsb, 2 * _QB[qt])
            nib = b[:, :, :256].reshape(m, nsb, 4, 1, 16, 4)
            v = (nib >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1, 1)) & 15
            if qt == Q5_K:
                plane = b[:, :, 256:].reshape(m, nsb, 1, 1, 16, 4)
                v = v | (((plane >> _Q5_PLANE_BIT) & 1) << 4)
            nat = v.reshape(m, nsb, 4, 2, 2, 8, 4).transpose(0, 4, 1, 5, 3, 2, 6)
            return np.ascontiguousarray(nat).reshape(2 * m, self.n_in)[:n]
        b = self.q.reshape(n, nsb, _QB[qt])
        if qt in (Q2_K, Q3_K):
            v = _crumbs(b[:, :, :64])
        else:
            ql = b[:, :, :128].reshape(n, nsb, 2, 1, 16, 4)
            v = ((ql >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1, 1)) & 15)
            v = v.reshape(n, nsb, 4, 16, 4)
        if qt == Q6_K:
            v = v | (_crumbs(b[:, :, 128:]) << 4)
        elif qt == Q3_K:
            v = v | (_bits(b[:, :, 64:]) << 2)
        v = v.transpose(0, 1, 3, 2, 4)[:, :, _GROUP_LANE]
        return np.ascontiguousarray(v).reshape(n, self.n_in)

    def scales(self):
        """(SC, MM): float32 [n_out, nsb * 8] per 32-block (Q4_K, Q5_K) or [n_out, nsb * 16] per
        16-group (the others): the weight is ``SC * code - MM`` (MM None for Q3_K/Q6_K, whose
        weight is ``SC * (code - offset)``), each product exact in float32."""
        n, nsb, qt = self.n_out, self.nsb, self.qtype
        if qt in _PAIR:   # [pair, sb, kind, row, 8] -> [row, sb, kind, 8]
            m = self.q.shape[0] // 2
            s = self.sc.reshape(m, nsb, 2, 2, 8).transpose(0, 3, 1, 2, 4).reshape(2 * m, nsb, 2, 8)
            dd = self.d.view(np.float16).astype(np.float32).reshape(m, nsb, 2, 2)
            dd = dd.transpose(0, 3, 1, 2).reshape(2 * m, nsb, 2)[:n]
            s = s[:n].astype(np.float32)
            return ((dd[:, :, 0:1] * s[:, :, 0]).reshape(n, -1),
                    (dd[:, :, 1:2] * s[:, :, 1]).reshape(n, -1))
        dd = self.d.view(np.float16).astype(np.float32).reshape(n, nsb, _ND[qt])
        if qt == Q2_K:
            s = self.sc.reshape(n, nsb, 16)[:, :, _GROUP_LANE]
            return ((dd[:, :, 0:1] * (s & 15).astype(np.float32)).reshape(n, -1),
                    (dd[:, :, 1:2] * (s >> 4).astype(np.float32)).reshape(n, -1))
        s = self.sc.view(np.int8).reshape(n, nsb, 16)[:, :, _GROUP_LANE].astype(np.float32)
        return (dd[:, :, 0:1] * s).reshape(n, -1), None

    def dequantize(self) -> np.ndarray:
        """float32 [n_out, n_in], bit-identical to ``ember.formats.quants.dequantize``."""
        n = self.n_out
        SC, MM = self.scales()
        g = SC.shape[1]
        q = self.codes().reshape(n, g, -1).astype(np.float32)
        if MM is None:
            w = SC[:, :, None] * (q - np.float32(_OFFSET[self.qtype]))
        else:
            w = SC[:, :, None] * q - MM[:, :, None]
        return w.reshape(n, self.n_in)


def _array_rows(qt: int, n_out: int) -> int:
    """Rows of a PackedKQ's arrays: n_out, rounded up to even for the row-pair types."""
    return n_out + (n_out & 1) if qt in _PAIR else n_out


def _to_kernel_order(codes: np.ndarray) -> np.ndarray:
    """natural codes [n, nsb, 256] -> [n, nsb, 4 (v), 16 (L), 4 (t)] (virtual vectors; lane L
    holds 16-group _LANE_GROUP[L])."""
    n, nsb = codes.shape[:2]
    return codes.reshape(n, nsb, 16, 4, 4)[:, :, _LANE_GROUP].transpose(0, 1, 3, 2, 4)


def _pair_order(codes: np.ndarray) -> np.ndarray:
    """natural codes [n2, nsb, 256] (n2 even) -> [n2 / 2, nsb, 4 (v), 2 (h), 16 (lane), 4 (t)]:
    code vector (v, h) of a row pair, lane 8 j + p = row j of the pair, byte t = weight
    32 p + 16 h + 4 v + t (block p)."""
    n2, nsb = codes.shape[:2]
    return codes.reshape(n2 // 2, 2, nsb, 8, 2, 4, 4).transpose(0, 2, 5, 4, 1, 3, 6).reshape(
        n2 // 2, nsb, 4, 2, 16, 4)


def _nibbles(v: np.ndarray) -> np.ndarray:
    """[n, nsb, 4, 16, 4] codes -> [n, nsb, 128]: byte c*64 + 4L + t = v[2c] | v[2c+1] << 4
    (low 4 bits of each code)."""
    n, nsb = v.shape[:2]
    return ((v[:, :, 0::2] & 15) | ((v[:, :, 1::2] & 15) << 4)).reshape(n, nsb, 128)


def _pack_crumbs(v: np.ndarray) -> np.ndarray:
    """[n, nsb, 4, 16, 4] 2-bit values -> [n, nsb, 64]: byte 4L + t, bits 2v..2v+1."""
    n, nsb = v.shape[:2]
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(
        n, nsb, 64)


def _crumbs(b: np.ndarray) -> np.ndarray:
    """Inverse of ``_pack_crumbs``: [n, nsb, 64] -> [n, nsb, 4, 16, 4]."""
    n, nsb = b.shape[:2]
    sh = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1, 1)
    return (b.reshape(n, nsb, 1, 16, 4) >> sh) & 3


def _pack_bits(v: np.ndarray) -> np.ndarray:
    """[n, nsb, 4, 16, 4] bits -> [n, nsb, 32]: byte 4L + t (L < 8), bit v for lane L and bit
    4 + v for lane L + 8 (the kernels widen it to 64 bytes with one shift)."""
    n, nsb = v.shape[:2]
    h = v.reshape(n, nsb, 4, 2, 8, 4) << (np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1, 1, 1)
                                          + np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1, 1))
    return np.bitwise_or.reduce(h.reshape(n, nsb, 8, 8, 4), axis=2).reshape(n, nsb, 32)


def _bits(b: np.ndarray) -> np.ndarray:
    """Inverse of ``_pack_bits``: [n, nsb, 32] -> [n, nsb, 4, 16, 4]."""
    n, nsb = b.shape[:2]
    sh = (np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1, 1, 1)
          + np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1, 1))
    return ((b.reshape(n, nsb, 1, 1, 8, 4) >> sh) & 1).reshape(n, nsb, 4, 16, 4)


def _q6bits(scales: np.ndarray):
    """The (scale, min) 6-bit pairs of Q4_K/Q5_K's 12 scale bytes [n, nsb, 12] -> [n, nsb, 16]
    (8 scales, then 8 mins)."""
    n, nsb = scales.shape[:2]
    s = scales.reshape(n, nsb, 3, 4)
    a, b, c = s[:, :, 0], s[:, :, 1], s[:, :, 2]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return np.concatenate([sc, mn], axis=-1)


def _split4(qs: np.ndarray, n: int, nsb: int) -> np.ndarray:
    """Q4_K/Q5_K qs [n, nsb, 128] -> natural low nibbles [n, nsb, 256]: weight 32 j + l is
    nibble j % 2 of qs[32 (j // 2) + l]."""
    qs = qs.reshape(n, nsb, 4, 1, 32)
    return ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15).reshape(n, nsb, QK)


def _split2(qs: np.ndarray, n: int, nsb: int) -> np.ndarray:
    """Q2_K/Q3_K qs [n, nsb, 64] -> natural 2-bit codes [n, nsb, 256]: weight 128 h + 32 s + l
    is bits 2s..2s+1 of qs[32 h + l]."""
    qs = qs.reshape(n, nsb, 2, 1, 32)
    sh = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)
    return ((qs >> sh) & 3).reshape(n, nsb, QK)


def _hbit(qh: np.ndarray, n: int, nsb: int) -> np.ndarray:
    """Q3_K hmask / Q5_K qh [n, nsb, 32] -> natural high bits [n, nsb, 256]: weight 32 j + l
    is bit j of qh[l]."""
    sh = np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    return ((qh.reshape(n, nsb, 1, 32) >> sh) & 1).reshape(n, nsb, QK)


def _packed_pair(nat: np.ndarray, qt: int, sc: np.ndarray, d: np.ndarray) -> PackedKQ:
    """``_packed`` for Q4_K / Q5_K: rows in pairs (a zero row appended to an odd count)."""
    n, nsb = nat.shape[:2]
    n2 = _array_rows(qt, n)
    d = np.ascontiguousarray(d).view(np.uint16).reshape(n, nsb, 2)
    if n2 > n:
        nat, sc, d = (np.concatenate([a_, np.zeros((1, *a_.shape[1:]), a_.dtype)])
                      for a_ in (nat, np.asarray(sc), d))
    v = _pair_order(nat)
    q = aligned_empty((n2, nsb * _QB[qt]), np.uint8)
    q3 = q.reshape(n2 // 2, nsb, 2 * _QB[qt])
    q3[:, :, :256] = ((v[:, :, :, 0] & 15) | ((v[:, :, :, 1] & 15) << 4)).reshape(n2 // 2, nsb, 256)
    if qt == Q5_K:   # byte 4 lane + t, bit 2 v + h: bit 4 of code (v, h)
        hb = ((v >> 4) & 1) << _Q5_PLANE_BIT
        q3[:, :, 256:] = np.bitwise_or.reduce(hb.reshape(n2 // 2, nsb, 8, 64), axis=2)
    scp = np.asarray(sc).reshape(n2 // 2, 2, nsb, 2, 8).transpose(0, 2, 3, 1, 4)
    dp = d.reshape(n2 // 2, 2, nsb, 2).transpose(0, 2, 3, 1)
    return PackedKQ(q, np.ascontiguousarray(scp).reshape(n2, nsb * 16),
                    np.ascontiguousarray(dp).reshape(n2, nsb * 2), n, nsb * QK, qt)


def _packed(nat: np.ndarray, qt: int, sc: np.ndarray, d: np.ndarray) -> PackedKQ:
    """natural codes [n, nsb, 256] (unsigned), sc [n, nsb, 16] bytes, d [n, nsb, ND] f16 bits ->
    PackedKQ in the layout of the module docstring."""
    if qt in _PAIR:
        return _packed_pair(nat, qt, sc, d)
    n, nsb = nat.shape[:2]
    v = _to_kernel_order(nat)
    sc = np.asarray(sc)[:, :, _LANE_GROUP]
    q = aligned_empty((n, nsb * _QB[qt]), np.uint8)
    q3 = q.reshape(n, nsb, _QB[qt])
    if qt in (Q2_K, Q3_K):
        q3[:, :, :64] = _pack_crumbs(v & 3)
        if qt == Q3_K:
            q3[:, :, 64:] = _pack_bits(v >> 2)
    else:
        q3[:, :, :128] = _nibbles(v)
        q3[:, :, 128:] = _pack_crumbs(v >> 4)
    return PackedKQ(q, np.ascontiguousarray(sc).reshape(n, nsb * 16),
                    np.ascontiguousarray(d).view(np.uint16).reshape(n, nsb * _ND[qt]),
                    n, nsb * QK, qt)


def pack_kquant(raw2d, qtype: int) -> PackedKQ:
    """GGUF rows (uint8 [n_out, nsb * block bytes]) of a Q2_K, Q3_K, Q4_K, Q5_K or Q6_K matrix
    -> PackedKQ. Each type's file layout as ggml writes it (ggml-quants.c; gguf-py's
    dequantize, which ``test_kquant_kernels`` checks bit for bit through ``dequantize``)."""
    qtype = int(qtype)
    if qtype not in _QB:
        raise ValueError(f"pack_kquant: qtype {qtype} is not a K-quant (Q2_K..Q6_K, 10..14)")
    r3 = gguf_blocks(raw2d, block_info(qtype)[1], "pack_kquant")
    n, nsb = r3.shape[:2]
    if qtype == Q2_K:     # scales[16] (scale | min << 4), qs[64], d, dmin
        return _packed(_split2(r3[:, :, 16:80], n, nsb), qtype, r3[:, :, :16], r3[:, :, 80:84])
    if qtype == Q3_K:     # hmask[32], qs[64], scales[12] (6-bit, biased by 32), d
        nat = _split2(r3[:, :, 32:96], n, nsb) | (_hbit(r3[:, :, :32], n, nsb) << 2)
        s = r3[:, :, 96:108]
        lo = np.concatenate([s[:, :, :8] & 15, s[:, :, :8] >> 4], axis=-1)
        hi = (s[:, :, 8:12].reshape(n, nsb, 1, 4)
              >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)).reshape(n, nsb, 16) & 3
        sc = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8).view(np.uint8)
        return _packed(nat, qtype, sc, r3[:, :, 108:110])
    if qtype == Q4_K:     # d, dmin, scales[12], qs[128]
        return _packed(_split4(r3[:, :, 16:], n, nsb), qtype, _q6bits(r3[:, :, 4:16]),
                       r3[:, :, 0:4])
    if qtype == Q5_K:     # d, dmin, scales[12], qh[32], qs[128]
        nat = _split4(r3[:, :, 48:], n, nsb) | (_hbit(r3[:, :, 16:48], n, nsb) << 4)
        return _packed(nat, qtype, _q6bits(r3[:, :, 4:16]), r3[:, :, 0:4])
    # Q6_K: ql[128], qh[64], scales[16] (int8), d; weight 128 h + 32 s + l: nibble s // 2 of
    # ql[64 h + 32 (s % 2) + l], bits 2s..2s+1 of qh[32 h + l]
    ql = r3[:, :, :128].reshape(n, nsb, 2, 1, 64)
    ql = ((ql >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15).reshape(n, nsb, 2, 4, 32)
    qh = r3[:, :, 128:192].reshape(n, nsb, 2, 1, 32)
    qh = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)) & 3
    nat = (ql | (qh << 4)).reshape(n, nsb, QK)
    return _packed(nat, qtype, r3[:, :, 192:208], r3[:, :, 208:210])


TQ1_0, TQ2_0 = 34, 35
TERNARY = (TQ1_0, TQ2_0)


def ternary_as_q2_k(raw2d, qtype: int) -> np.ndarray:
    """GGUF TQ1_0 / TQ2_0 rows -> the Q2_K rows of the same weights, exactly: the weight
    ``d (t - 1)`` (t = 0..2) is Q2_K's ``(d * 1) * t - d * 1`` (scale and min 1, dmin = d; both
    products exact, so the one subtraction rounds to the same float32 as the file's).
    TQ2_0's 64 code bytes are Q2_K's already (weight 128 h + 32 j + l: bits 2j of byte 32 h +
    l, in both); TQ1_0's base-3 codes are decoded (``q8.pack_exact_int8``) and written so.
    The K-quant kernels then read 84 bytes per 256 weights (the file: 54 / 66)."""
    qtype = int(qtype)
    if qtype not in TERNARY:
        raise ValueError(f"ternary_as_q2_k: type {qtype} is not TQ1_0 (34) or TQ2_0 (35)")
    _, bb, off = EXACT_INT8[qtype]                            # block bytes, offset of d
    r3 = gguf_blocks(raw2d, bb, "ternary_as_q2_k")
    n, nsb = r3.shape[:2]
    out = np.empty((n, nsb, 84), np.uint8)
    out[:, :, :16] = 0x11
    if qtype == TQ2_0:
        out[:, :, 16:80] = r3[:, :, :64]
    else:
        t = (pack_exact_int8(r3.reshape(n, -1), qtype).qs + 1).view(np.uint8)
        t = t.reshape(n, nsb, 2, 4, 32)                       # [row, sb, h, j, l]
        out[:, :, 16:80] = (t << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)).sum(
            axis=3, dtype=np.uint8).reshape(n, nsb, 64)
    out[:, :, 80:82] = r3[:, :, off:off + 2]
    out[:, :, 82:84] = r3[:, :, off:off + 2]
    return out.reshape(n, nsb * 84)


# ---------------------------------------------------------------------------------------------
# IR

_DECLS = (
    "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)",
    "declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <32 x i8>, <32 x i8>)",
    "declare <32 x i16> @llvm.x86.avx512.pmaddubs.w.512(<64 x i8>, <64 x i8>)",
    "declare <16 x i32> @llvm.x86.avx512.pmaddw.d.512(<32 x i16>, <32 x i16>)",
    "declare <32 x i16> @llvm.x86.avx512.packssdw.512(<16 x i32>, <16 x i32>)",
    "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)",
    "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)",
    "declare <16 x i16> @llvm.x86.avx2.packssdw(<8 x i32>, <8 x i32>)",
    "declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)",
    "declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)",
)


class _Emit:
    """IR text helpers for one x86 vector width (vw bytes) and dot-product flavour."""

    def __init__(self, a, vw: int, combine: str):
        self.a, self.vw, self.combine = a, vw, combine
        self.nl = vw // 4
        self.V8, self.V16 = f"<{vw} x i8>", f"<{vw // 2} x i16>"
        self.V32, self.VF = f"<{self.nl} x i32>", f"<{self.nl} x float>"
        self.fma = f"@llvm.fma.v{self.nl}f32"

    def dot(self, tag: str, W, X, init: str | None) -> str:
        """init + sum_v (per 4-byte lane) W[v] (u8 codes) . X[v] (s8 acts) -> an exact int32
        vector (X[v] are loads: the acts are the memory operand; an even number of them).

        vnni: vpdpbusd chained. maddubs: vpmaddubsw(W u8, X s8) (|pair| <= 2 * 63 * 127 = 16002),
        two of them summed in int16 (<= 32004, no wrap), vpmaddwd by 1, added in int32."""
        a, V8, V16, V32, vw = self.a, self.V8, self.V16, self.V32, self.vw
        if self.combine == "vnni":
            prev = init or "zeroinitializer"
            for v in range(len(W)):
                a(f"  %{tag}d{v} = call {V32} @llvm.x86.avx512.vpdpbusd.{8 * vw}({V32} {prev}, "
                  f"{V8} {W[v]}, {V8} {X[v]})")
                prev = f"%{tag}d{v}"
            return prev
        mad = "@llvm.x86.avx512.pmaddubs.w.512" if vw == 64 else "@llvm.x86.avx2.pmadd.ub.sw"
        madd = "@llvm.x86.avx512.pmaddw.d.512" if vw == 64 else "@llvm.x86.avx2.pmadd.wd"
        ones = _splat("i16", vw // 2, 1)
        parts = []
        for v in range(0, len(W), 2):
            for u in (v, v + 1):
                a(f"  %{tag}p{u} = call {V16} {mad}({V8} {W[u]}, {V8} {X[u]})")
            a(f"  %{tag}p{v}s = add {V16} %{tag}p{v}, %{tag}p{v + 1}")
            a(f"  %{tag}i{v} = call {V32} {madd}({V16} %{tag}p{v}s, {V16} {ones})")
            parts.append(f"%{tag}i{v}")
        if init is not None:
            parts.append(init)
        while len(parts) > 1:
            a(f"  %{tag}a{len(parts)} = add {V32} {parts[0]}, {parts[1]}")
            parts = [f"%{tag}a{len(parts)}"] + parts[2:]
        return parts[0]


def _chunk_ir(qt: int, vw: int, combine: str, nr: int, kb: int, pipe: bool) -> list[str]:
    """``@kq_<t>.r<nr>c<kb>(q, sc, d, xq, xd, xp, y, ns, nsb, ys, kp, first, pfr, nrow, skip0,
    last1)``: ``nrow`` blocks of ``nr`` consecutive units x ``kb`` act rows over ``ns``
    super-blocks. A unit is one weight row, or (Q4_K, Q5_K) a row pair.

    ``q``/``sc``/``d`` point at (first unit, first super-block of the tile); a unit is ``nsb``
    super-blocks long. ``xq``/``xd``/``xp`` point at the tile's first super-block and the
    chunk's first act row; a super-block of act data holds ``kp`` rows. ``y`` points at
    y[i0, r] (r: the first unit's first row): y[i * ys + j] = (first ? 0 : y[i * ys + j]) + the
    sum for act row i0 + i and weight row r + j; row pairs: not the first row of the first unit
    when ``skip0``, not the second row of the last one when ``last1`` (rows of another range,
    or past the matrix). ``pfr``: software prefetch of the same super-blocks ``pfr`` units
    ahead in the three weight streams (0: none). Every loaded act vector serves all ``nr``
    units. ``pipe``: the weights of super-block s + 1 are loaded and decoded in iteration s
    (shorter dependency chains inside an iteration).
    """
    L = []
    a = L.append
    E_ = _Emit(a, vw, combine)
    nl, nh = E_.nl, 64 // vw
    V8, V32, VF, fma = E_.V8, E_.V32, E_.VF, E_.fma
    QB, SCB, ND = _unit_bytes(qt)
    pair, coff = qt in _PAIR, _OFFSET[qt]
    lmin = qt == Q2_K                                               # mins per 16-group
    name = f"@kq_{_NAMES[qt]}.r{nr}c{kb}"
    ro = "ptr noalias nocapture readonly"
    a(f"define internal void {name}({ro} %q, {ro} %sc, {ro} %d, {ro} %xq, {ro} %xd, {ro} %xp, "
      "ptr noalias nocapture %y, i64 %ns, i64 %nsb, i64 %ys, i64 %kp, i64 %first, i64 %pfr, "
      "i64 %nrow, i64 %skip0, i64 %last1) noinline #0 {")
    a("entry:")
    a("  %dummy = alloca float, align 4")    # where the stores of skipped rows go
    a("  %xqs = mul i64 %kp, 256")          # act strides per super-block (elements)
    a("  %xds = mul i64 %kp, 16")
    a("  %xsn = mul i64 %nsb, %kp")          # xd[1] (dx xsum16) is nsb kp 16 floats after xd[0]
    a("  %xso = mul i64 %xsn, 16")
    if coff:
        a(f"  %xsoc = mul i64 %xsn, {48 if coff == 32 else 32}")   # xd[3] or xd[2] (int32)
    a(f"  %qrs = mul i64 %nsb, {QB}")       # unit strides (elements)
    a(f"  %scrs = mul i64 %nsb, {SCB}")
    a(f"  %drs = mul i64 %nsb, {ND}")
    a("  %pf = icmp ne i64 %pfr, 0")
    a("  %pfq = mul i64 %pfr, %qrs")
    a("  %pfs = mul i64 %pfr, %scrs")
    a("  %pfd = mul i64 %pfr, %drs")
    a("  %nsm1 = sub i64 %ns, 1")
    a("  %isfirst = icmp ne i64 %first, 0")
    a(f"  %nu = mul i64 %nrow, {nr}")
    a("  %nrm1u = sub i64 %nu, 1")               # the last unit of the call
    a("  %sk0 = icmp ne i64 %skip0, 0")
    a("  %la1 = icmp ne i64 %last1, 0")
    a("  br label %rowhead")
    a("rowhead:")                             # unit blocks: nrow of them, nr units each
    a("  %rr = phi i64 [0, %entry], [%rr.next, %rownext]")
    a(f"  %rb = mul i64 %rr, {nr}")
    a("  %rqo = mul i64 %rb, %qrs")
    a("  %qR = getelementptr i8, ptr %q, i64 %rqo")
    a("  %rso = mul i64 %rb, %scrs")
    a("  %scR = getelementptr i8, ptr %sc, i64 %rso")
    a("  %rdo = mul i64 %rb, %drs")
    a("  %dR = getelementptr i16, ptr %d, i64 %rdo")
    a(f"  %yro = mul i64 %rb, {2 if pair else 1}")
    a("  %yR = getelementptr float, ptr %y, i64 %yro")
    for j in range(nr):
        a(f"  %qro{j} = mul i64 %qrs, {j}")
        a(f"  %q{j} = getelementptr i8, ptr %qR, i64 %qro{j}")
        a(f"  %scro{j} = mul i64 %scrs, {j}")
        a(f"  %sc{j} = getelementptr i8, ptr %scR, i64 %scro{j}")
        a(f"  %dro{j} = mul i64 %drs, {j}")
        a(f"  %d{j} = getelementptr i16, ptr %dR, i64 %dro{j}")
    c15 = _splat("i8", vw, 15)

    def ptrs(sx: str, sidx: str):
        a(f"  %qo{sx} = mul i64 {sidx}, {QB}")
        a(f"  %so{sx} = mul i64 {sidx}, {SCB}")
        a(f"  %dso{sx} = mul i64 {sidx}, {ND}")
        for j in range(nr):
            a(f"  %qp{j}{sx} = getelementptr i8, ptr %q{j}, i64 %qo{sx}")
            a(f"  %scp{j}{sx} = getelementptr i8, ptr %sc{j}, i64 %so{sx}")
            a(f"  %dp{j}{sx} = getelementptr i16, ptr %d{j}, i64 %dso{sx}")

    def nibbles(t: str, base: str, e: int, n: int) -> list[str]:
        """The low and high nibbles of n 64-byte vectors at base (half e on ymm), interleaved."""
        src = []
        for c in range(n):
            a(f"  %qlp{c}.{t} = getelementptr i8, ptr {base}, i64 {64 * c + vw * e}")
            a(f"  %ql{c}.{t} = load {V8}, ptr %qlp{c}.{t}, align 1")
            a(f"  %lo{c}.{t} = and {V8} %ql{c}.{t}, {c15}")
            a(f"  %hi{c}.{t} = lshr {V8} %ql{c}.{t}, {_splat('i8', vw, 4)}")
            src += [f"%lo{c}.{t}", f"%hi{c}.{t}"]
        return src

    def merge_bits(t: str, src: list[str], hsrc: str, hpos: list[int], hmask: int) -> list[str]:
        """src[u] | (hsrc shifted left by hpos[u] (right when negative) & hmask)."""
        W = []
        for u, wv in enumerate(src):
            sh = hpos[u]
            if sh > 0:
                a(f"  %hs{u}.{t} = shl {V8} {hsrc}, {_splat('i8', vw, sh)}")
            elif sh < 0:
                a(f"  %hs{u}.{t} = lshr {V8} {hsrc}, {_splat('i8', vw, -sh)}")
            hs = f"%hs{u}.{t}" if sh else hsrc
            a(f"  %hm{u}.{t} = and {V8} {hs}, {_splat('i8', vw, hmask)}")
            a(f"  %wu{u}.{t} = or {V8} {wv}, %hm{u}.{t}")
            W.append(f"%wu{u}.{t}")
        return W

    def weights_pair(sx: str) -> dict:
        """Per unit (row pair): SC, MM (lanes 0..7 the first row's 8 blocks, 8..15 the
        second's) and the 8 code vectors (v, h) of the super-block."""
        out = {}
        for j in range(nr):
            t0 = f"{j}{sx}"
            a(f"  %sc8_{t0} = load <16 x i8>, ptr %scp{j}{sx}, align 1")
            a(f"  %mnp{t0} = getelementptr i8, ptr %scp{j}{sx}, i64 16")
            a(f"  %mn8_{t0} = load <16 x i8>, ptr %mnp{t0}, align 1")
            a(f"  %dh{t0} = load <4 x half>, ptr %dp{j}{sx}, align 2")
            a(f"  %df{t0} = fpext <4 x half> %dh{t0} to <4 x float>")
            for nm, src, lanes in (("SCF", "sc8_", [0] * 8 + [1] * 8),
                                   ("MMF", "mn8_", [2] * 8 + [3] * 8)):
                a(f"  %{nm}d{t0} = shufflevector <4 x float> %df{t0}, <4 x float> poison, "
                  f"{_mask(lanes)}")
                a(f"  %{nm}i{t0} = zext <16 x i8> %{src}{t0} to <16 x i32>")
                a(f"  %{nm}f{t0} = uitofp <16 x i32> %{nm}i{t0} to <16 x float>")
                a(f"  %{nm}{t0} = fmul <16 x float> %{nm}f{t0}, %{nm}d{t0}")   # exact
            for e in range(nh):
                t = f"{j}.{e}{sx}"
                for nm in ("SC", "MM"):
                    if nh == 1:
                        out[nm, j, e] = (VF, f"%{nm}F{t0}")
                    else:
                        a(f"  %{nm}{t} = shufflevector <16 x float> %{nm}F{t0}, <16 x float> "
                          f"poison, {_mask(range(nl * e, nl * e + nl))}")
                        out[nm, j, e] = (VF, f"%{nm}{t}")
                W = nibbles(t, f"%qp{j}{sx}", e, 4)
                if qt == Q5_K:   # bit 4: bit u = 2 v + h of the plane's byte
                    a(f"  %hbp.{t} = getelementptr i8, ptr %qp{j}{sx}, i64 {256 + vw * e}")
                    a(f"  %hb.{t} = load {V8}, ptr %hbp.{t}, align 1")
                    W = merge_bits(t, W, f"%hb.{t}", [4 - u for u in range(8)], 0x10)
                for u in range(8):
                    out["W", j, e, u] = (V8, W[u])
        return out

    def weights(sx: str) -> dict:
        """Per weight row: scales (float, exact products), codes (u8)."""
        if pair:
            return weights_pair(sx)
        out = {}
        for j in range(nr):
            t0 = f"{j}{sx}"
            a(f"  %sc8_{t0} = load <16 x i8>, ptr %scp{j}{sx}, align 1")
            if ND == 2:   # d, dmin: lanes 0..7 d, 8..15 dmin
                a(f"  %dh{t0} = load <2 x half>, ptr %dp{j}{sx}, align 2")
                a(f"  %df{t0} = fpext <2 x half> %dh{t0} to <2 x float>")
                a(f"  %DD{t0} = shufflevector <2 x float> %df{t0}, <2 x float> poison, "
                  f"{_mask([0] * 8 + [1] * 8)}")
            else:
                a(f"  %dh{t0} = load half, ptr %dp{j}{sx}, align 2")
                a(f"  %df{t0} = fpext half %dh{t0} to float")
                a(f"  %Di{t0} = insertelement {VF} poison, float %df{t0}, i32 0")
                a(f"  %D{t0} = shufflevector {VF} %Di{t0}, {VF} poison, "
                  f"<{nl} x i32> zeroinitializer")
            if qt == Q2_K:   # scale | min << 4 (4 bits each) per 16-group
                a(f"  %sc32_{t0} = zext <16 x i8> %sc8_{t0} to <16 x i32>")
                a(f"  %scl{t0} = and <16 x i32> %sc32_{t0}, {_splat('i32', 16, 15)}")
                a(f"  %sch{t0} = lshr <16 x i32> %sc32_{t0}, {_splat('i32', 16, 4)}")
                a(f"  %scf{t0} = uitofp <16 x i32> %scl{t0} to <16 x float>")
                a(f"  %mnf{t0} = uitofp <16 x i32> %sch{t0} to <16 x float>")
                a(f"  %Dd{t0} = shufflevector <16 x float> %DD{t0}, <16 x float> poison, "
                  f"<16 x i32> zeroinitializer")
                a(f"  %Dm{t0} = shufflevector <16 x float> %DD{t0}, <16 x float> poison, "
                  f"{_mask([8] * 16)}")
                a(f"  %SCL{t0} = fmul <16 x float> %scf{t0}, %Dd{t0}")
                a(f"  %MML{t0} = fmul <16 x float> %mnf{t0}, %Dm{t0}")
            else:              # int8 scales per 16-group
                a(f"  %sc32_{t0} = sext <16 x i8> %sc8_{t0} to <16 x i32>")
                a(f"  %scf{t0} = sitofp <16 x i32> %sc32_{t0} to <16 x float>")
            if qt == Q3_K:   # bit 2, 32 bytes: lanes 8..15 in the high nibble
                a(f"  %hbp{t0} = getelementptr i8, ptr %qp{j}{sx}, i64 64")
                a(f"  %hb{t0} = load <32 x i8>, ptr %hbp{t0}, align 1")
                a(f"  %hbs{t0} = lshr <32 x i8> %hb{t0}, {_splat('i8', 32, 4)}")
                if vw == 64:
                    a(f"  %hbw{t0} = shufflevector <32 x i8> %hb{t0}, <32 x i8> %hbs{t0}, "
                      f"{_mask(range(64))}")
            for e in range(nh):
                t = f"{j}.{e}{sx}"
                if qt == Q2_K:   # lane L: 16-group L
                    lanes = _mask(range(nl * e, nl * e + nl))
                    a(f"  %SC{t} = shufflevector <16 x float> %SCL{t0}, <16 x float> poison, "
                      f"{lanes}")
                    a(f"  %MM{t} = shufflevector <16 x float> %MML{t0}, <16 x float> poison, "
                      f"{lanes}")
                    out["MM", j, e] = (VF, f"%MM{t}")
                else:
                    a(f"  %scr{t} = shufflevector <16 x float> %scf{t0}, <16 x float> poison, "
                      f"{_mask(range(nl * e, nl * e + nl))}")
                    a(f"  %SC{t} = fmul {VF} %scr{t}, %D{t0}")
                out["SC", j, e] = (VF, f"%SC{t}")
                if qt in (Q2_K, Q3_K):   # 2-bit codes: bits 2v..2v+1 of byte 4L + t
                    a(f"  %qcp.{t} = getelementptr i8, ptr %qp{j}{sx}, i64 {vw * e}")
                    a(f"  %qc.{t} = load {V8}, ptr %qcp.{t}, align 1")
                    W = []
                    for v in range(4):
                        if v:
                            a(f"  %qcs{v}.{t} = lshr {V8} %qc.{t}, {_splat('i8', vw, 2 * v)}")
                        a(f"  %cr{v}.{t} = and {V8} {f'%qcs{v}.{t}' if v else f'%qc.{t}'}, "
                          f"{_splat('i8', vw, 3)}")
                        W.append(f"%cr{v}.{t}")
                else:
                    W = nibbles(t, f"%qp{j}{sx}", e, 2)
                if qt == Q6_K:   # high 2 bits of virtual vector v at bits 2v..2v+1 -> bits 4, 5
                    a(f"  %qhp.{t} = getelementptr i8, ptr %qp{j}{sx}, i64 {128 + vw * e}")
                    a(f"  %qh.{t} = load {V8}, ptr %qhp.{t}, align 1")
                    W = merge_bits(t, W, f"%qh.{t}", [4 - 2 * v for v in range(4)], 0x30)
                elif qt == Q3_K:   # bit v of the (widened) byte -> bit 2
                    hsrc = f"%hbw{t0}" if vw == 64 else f"%hb{t0}" if e == 0 else f"%hbs{t0}"
                    W = merge_bits(t, W, hsrc, [2 - v for v in range(4)], 4)
                for v in range(4):
                    out["W", j, e, v] = (V8, W[v])
        return out

    # accumulators: per (unit, act row) and ymm half e (pair: e is the row of the pair on
    # ymm), or per (unit, act row) with the halves chained (the others)
    accs = [(j, i, e) for j in range(nr) for i in range(kb) for e in range(nh if pair else 1)]
    last = (lambda j, i, e: f"%acc{j}_{i}_{e}.x") if pair else \
        (lambda j, i, e: f"%acc{j}_{i}_0.{nh - 1}")
    if pipe:
        ptrs(".w0", "0")
        w0 = weights(".w0")
    a("  br label %loop")
    a("loop:")
    a("  %s = phi i64 [0, %rowhead], [%s.next, %loop.end]")
    for j, i, e in accs:
        a(f"  %acc{j}_{i}_{e} = phi {VF} [zeroinitializer, %rowhead], [{last(j, i, e)}, "
          "%loop.end]")
    if pipe:
        cur = {}
        for key, (ty, val) in w0.items():
            nm = "%cur." + ".".join(str(x) for x in key)
            a(f"  {nm} = phi {ty} [{val}, %rowhead], [%nx.{nm[5:]}, %loop.end]")
            cur[key] = nm
    ptrs("", "%s")
    a("  br i1 %pf, label %loop.pf, label %loop.body")
    a("loop.pf:")
    for j in range(nr):
        for nm, base, nbytes, ty, off in (("q", f"%qp{j}", QB, "i8", "%pfq"),
                                          ("s", f"%scp{j}", SCB, "i8", "%pfs"),
                                          ("d", f"%dp{j}", 2 * ND, "i16", "%pfd")):
            for o in range(0, nbytes, 64):
                a(f"  %pf{nm}{j}_{o}.b = getelementptr {ty}, ptr {base}, i64 {off}")
                a(f"  %pf{nm}{j}_{o} = getelementptr i8, ptr %pf{nm}{j}_{o}.b, i64 {o}")
                codegen.emit_prefetch(a, f"%pf{nm}{j}_{o}")
    a("  br label %loop.body")
    a("loop.body:")
    a("  %xqo = mul i64 %s, %xqs")
    a("  %xqb = getelementptr i8, ptr %xq, i64 %xqo")
    a("  %xdo = mul i64 %s, %xds")
    a("  %xdb = getelementptr float, ptr %xd, i64 %xdo")
    if pair:
        a("  %xpb = getelementptr float, ptr %xp, i64 %xdo")
    if pipe:   # the next super-block's weights (the last iteration repeats its own: no overrun)
        a("  %s1a = add i64 %s, 1")
        a("  %s1 = call i64 @llvm.umin.i64(i64 %s1a, i64 %nsm1)")
        ptrs(".wn", "%s1")
        wn = weights(".wn")
        for key, (ty, val) in wn.items():
            nm = ".".join(str(x) for x in key)
            a(f"  %nx.{nm} = or {ty} {val}, zeroinitializer" if ty != VF
              else f"  %nx.{nm} = fadd {VF} {val}, {_splat('float', nl, '-0.0')}")
        wv = {key: (ty, cur[key]) for key, (ty, _) in w0.items()}
    else:
        wv = weights("")
    for i in range(kb):
        if pair:   # act vector v, half h: 32 bytes, both halves of a zmm (lane p: block p)
            X = []
            for u in range(8):
                a(f"  %xp{u}.{i} = getelementptr i8, ptr %xqb, i64 {256 * i + 32 * u}")
                a(f"  %xh{u}.{i} = load <32 x i8>, ptr %xp{u}.{i}, align 1, !invariant.load !0")
                if vw == 64:
                    a(f"  %x{u}.{i} = shufflevector <32 x i8> %xh{u}.{i}, <32 x i8> poison, "
                      f"{_mask(list(range(32)) * 2)}")
                    X.append(f"%x{u}.{i}")
                else:
                    X.append(f"%xh{u}.{i}")
        for e in range(nh):
            if not pair:
                X = []
                for v in range(4):
                    a(f"  %xp{v}.{i}.{e} = getelementptr i8, ptr %xqb, i64 "
                      f"{256 * i + 64 * v + vw * e}")
                    a(f"  %x{v}.{i}.{e} = load {V8}, ptr %xp{v}.{i}.{e}, align 1, "
                      "!invariant.load !0")
                    X.append(f"%x{v}.{i}.{e}")
            X0 = None
            if coff:   # the chain starts at -coff * xsum16 (xd[2]: -4 xsum16, xd[3]: -32)
                a(f"  %oxp.{i}.{e} = getelementptr i32, ptr %xdb, i64 {16 * i + nl * e}")
                a(f"  %oxq.{i}.{e} = getelementptr i32, ptr %oxp.{i}.{e}, i64 %xsoc")
                a(f"  %ox.{i}.{e} = load {V32}, ptr %oxq.{i}.{e}, align 4, !invariant.load !0")
                X0 = f"%ox.{i}.{e}"
            a(f"  %dxp.{i}.{e} = getelementptr float, ptr %xdb, i64 {16 * i + nl * e}")
            a(f"  %DX.{i}.{e} = load {VF}, ptr %dxp.{i}.{e}, align 4, !invariant.load !0")
            if pair or lmin:   # float32(dx xsum): per block (xp, pair), per 16-group (xd[1])
                if pair:
                    a(f"  %dsp.{i}.{e} = getelementptr float, ptr %xpb, i64 {16 * i + nl * e}")
                else:
                    a(f"  %dsp.{i}.{e} = getelementptr float, ptr %dxp.{i}.{e}, i64 %xso")
                a(f"  %DS.{i}.{e} = load {VF}, ptr %dsp.{i}.{e}, align 4, !invariant.load !0")
            for j in range(nr):
                u = f"{j}_{i}.{e}"
                Wv = [wv["W", j, e, v][1] for v in range(8 if pair else 4)]
                isum = E_.dot(f"I{u}.", Wv, X, X0)
                a(f"  %F.{u} = sitofp {V32} {isum} to {VF}")
                a(f"  %T.{u} = fmul {VF} %F.{u}, %DX.{i}.{e}")
                prev = f"%acc{j}_{i}_{e}" if pair or e == 0 else f"%acc{j}_{i}_0.{e - 1}"
                if pair or lmin:   # - dmin m * float32(dx xsum)
                    a(f"  %mn.{u} = fneg {VF} {wv['MM', j, e][1]}")
                    a(f"  %m.{u} = call {VF} {fma}({VF} %mn.{u}, {VF} %DS.{i}.{e}, {VF} {prev})")
                    prev = f"%m.{u}"
                dst = f"%acc{j}_{i}_{e}.x" if pair else f"%acc{j}_{i}_0.{e}"
                a(f"  {dst} = call {VF} {fma}({VF} %T.{u}, {VF} {wv['SC', j, e][1]}, {VF} {prev})")
    a("  br label %loop.end")
    a("loop.end:")
    a("  %s.next = add i64 %s, 1")
    a("  %done = icmp eq i64 %s.next, %ns")
    a("  br i1 %done, label %rowend, label %loop")
    a("rowend:")
    outs = []   # (act row i, column j from yR, float sum)
    for j in range(nr):
        if vw == 64 and (kb > 1 or pair):   # all at once (transposed): fewer ops
            seg0 = 8 if pair else 16
            for g, val in _reduce_accs(a, [last(j, i, 0) for i in range(kb)], seg0, f"rd{j}_"):
                outs.append((g // 2, 2 * j + g % 2, val) if pair else (g, j, val))
            continue
        for i in range(kb):
            for e in range(nh if pair else 1):
                codegen.emit_hsum(a, last(j, i, e), nl, f"%o{j}_{i}_{e}")
                outs.append((i, 2 * j + e if pair else j, f"%o{j}_{i}_{e}"))
    for i, col, _ in outs:
        a(f"  %yo{col}_{i} = mul i64 %ys, {i}")
        a(f"  %yo{col}_{i}b = add i64 %yo{col}_{i}, {col}")
        a(f"  %yq{col}_{i} = getelementptr float, ptr %yR, i64 %yo{col}_{i}b")
        if pair:   # rows outside the range: the store goes to %dummy
            j, row = divmod(col, 2)
            a(f"  %u{col}_{i} = add i64 %rb, {j}")
            if row == 0:
                a(f"  %e{col}_{i} = icmp eq i64 %u{col}_{i}, 0")
                a(f"  %bad{col}_{i} = and i1 %e{col}_{i}, %sk0")
            else:
                a(f"  %e{col}_{i} = icmp eq i64 %u{col}_{i}, %nrm1u")
                a(f"  %bad{col}_{i} = and i1 %e{col}_{i}, %la1")
            a(f"  %yp{col}_{i} = select i1 %bad{col}_{i}, ptr %dummy, ptr %yq{col}_{i}")
    yp = (lambda col, i: f"%yp{col}_{i}") if pair else (lambda col, i: f"%yq{col}_{i}")
    a("  br i1 %isfirst, label %yset, label %yadd")
    a("yset:")   # the first tile: y = the sums
    for i, col, val in outs:
        a(f"  store float {val}, ptr {yp(col, i)}, align 4")
    a("  br label %rownext")
    a("yadd:")   # later tiles: y += the sums
    for i, col, val in outs:
        a(f"  %yl{col}_{i} = load float, ptr {yp(col, i)}, align 4")
        a(f"  %ya{col}_{i} = fadd float %yl{col}_{i}, {val}")
        a(f"  store float %ya{col}_{i}, ptr {yp(col, i)}, align 4")
    a("  br label %rownext")
    a("rownext:")
    a("  %rr.next = add i64 %rr, 1")
    a("  %rdone = icmp eq i64 %rr.next, %nrow")
    a("  br i1 %rdone, label %exit, label %rowhead")
    a("exit:")
    a("  ret void")
    a("}")
    return L


def _fn_ir(qt: int, nr: int, kbs: list[int], tile_bytes: int, prefetch: int,
           group: int = 32) -> list[str]:
    """``@kq_<t>(q, sc, d, xq, xd, xp, y, nsb, r0, r1, k, ys)``: y[i * ys + r] for
    r0 <= r < r1 and every act row i < k.

    Super-blocks go in tiles of ``ns = max(1, tile_bytes / (min(kp, kb) * 384))`` (the act
    data a chunk call streams over a tile stays in L1); per tile, rows in groups of ``group``;
    per group, act rows in chunks of ``kbs[0]``, then one chunk of each smaller size for the
    rest; each chunk call runs over the group's rows (in blocks of ``nr``, then single rows):
    a group's weights are read from memory once and re-read from cache by its later chunks."""
    kb = kbs[0]
    nm = _NAMES[qt]
    QB, SCB, ND = _unit_bytes(qt)
    pair = qt in _PAIR
    group = max(group // (2 * nr if pair else nr), 1) * nr     # units (32 weight rows)
    L = []
    a = L.append
    ro = "ptr noalias nocapture readonly"
    a(f"define void @kq_{nm}({ro} %q, {ro} %sc, {ro} %d, {ro} %xq, {ro} %xd, {ro} %xp, "
      "ptr noalias nocapture %y, i64 %nsb, i64 %r0, i64 %r1, i64 %k, i64 %ys) #0 {")
    a("entry:")
    a("  %e1 = icmp sge i64 %r0, %r1")
    a("  %e2 = icmp sle i64 %nsb, 0")
    a("  %e3 = icmp sle i64 %k, 0")
    a("  %e12 = or i1 %e1, %e2")
    a("  %skip = or i1 %e12, %e3")
    a("  br i1 %skip, label %exit, label %pre")
    a("pre:")
    if pair:   # units: row pairs; a half pair at either end is computed, not stored
        a("  %u0 = lshr i64 %r0, 1")
        a("  %r1p = add i64 %r1, 1")
        a("  %u1 = lshr i64 %r1p, 1")
        a("  %r0odd = and i64 %r0, 1")
        a("  %r1odd = and i64 %r1, 1")
    else:
        a("  %u0 = add i64 %r0, 0")
        a("  %u1 = add i64 %r1, 0")
    a("  %kodd = and i64 %k, 1")
    a("  %kp = add i64 %k, %kodd")
    a(f"  %nfull = udiv i64 %k, {kb}")
    a(f"  %rem = urem i64 %k, {kb}")
    # the act data a chunk call streams per super-block: min(kp, kb) rows (a call only reads
    # its own rows; sizing by all kp rows made tiles of 1 super-block at large k: per (row,
    # chunk, super-block) a reduction, y update and decode prologue, 2x slower at k = 256)
    a(f"  %kpc = call i64 @llvm.umin.i64(i64 %kp, i64 {kb})")
    a("  %tb = mul i64 %kpc, 384")
    a(f"  %tsb0 = udiv i64 {tile_bytes}, %tb")
    a("  %tsb1 = call i64 @llvm.umax.i64(i64 %tsb0, i64 1)")
    a("  %tsb = call i64 @llvm.umin.i64(i64 %tsb1, i64 %nsb)")
    a("  br label %tile")
    a("tile:")
    a("  %s0 = phi i64 [0, %pre], [%s0.next, %tile.end]")
    a("  %s0e = add i64 %s0, %tsb")
    a("  %s1 = call i64 @llvm.umin.i64(i64 %s0e, i64 %nsb)")
    a("  %ns = sub i64 %s1, %s0")
    a("  %isf = icmp eq i64 %s0, 0")
    a("  %first = zext i1 %isf to i64")
    if prefetch:   # software prefetch: the same tile of a later row, >= prefetch bytes ahead
        a(f"  %segb = mul i64 %ns, {QB}")
        a(f"  %pfr0 = add i64 %segb, {prefetch - 1}")
        a("  %pfr = udiv i64 %pfr0, %segb")
    else:
        a("  %pfr = add i64 0, 0")
    a("  %xqt.o = mul i64 %s0, %kp")
    a("  %xqt.o2 = mul i64 %xqt.o, 256")
    a("  %xqt = getelementptr i8, ptr %xq, i64 %xqt.o2")
    a("  %xdt.o2 = mul i64 %xqt.o, 16")
    a("  %xdt = getelementptr float, ptr %xd, i64 %xdt.o2")
    a("  %xpt = getelementptr float, ptr %xp, i64 %xdt.o2")
    a("  br label %grp")
    a("grp:")
    a("  %rg = phi i64 [%u0, %tile], [%rg.next, %grp.end]")
    a(f"  %rge = add i64 %rg, {group}")
    a("  %rg1 = call i64 @llvm.umin.i64(i64 %rge, i64 %u1)")
    a("  %gn = sub i64 %rg1, %rg")
    a(f"  %gnb = udiv i64 %gn, {nr}")
    a(f"  %gnr = urem i64 %gn, {nr}")
    a(f"  %gr2 = mul i64 %gnb, {nr}")
    a("  %rgs = add i64 %rg, %gr2")

    def body(tag, rows, r, nrow, nxt):
        """The chunks of one group's rows (``nrow`` blocks of ``rows`` from ``r``), then ``nxt``."""
        a(f"  %rs{tag} = mul i64 {r}, %nsb")
        a(f"  %rs2{tag} = add i64 %rs{tag}, %s0")
        a(f"  %qo{tag} = mul i64 %rs2{tag}, {QB}")
        a(f"  %qr{tag} = getelementptr i8, ptr %q, i64 %qo{tag}")
        a(f"  %so{tag} = mul i64 %rs2{tag}, {SCB}")
        a(f"  %scr{tag} = getelementptr i8, ptr %sc, i64 %so{tag}")
        a(f"  %do{tag} = mul i64 %rs2{tag}, {ND}")
        a(f"  %dr{tag} = getelementptr i16, ptr %d, i64 %do{tag}")
        if pair:   # skip0: r is the range's first unit and r0 odd; last1: its last and r1 odd
            a(f"  %isu0{tag} = icmp eq i64 {r}, %u0")
            a(f"  %sk{tag} = select i1 %isu0{tag}, i64 %r0odd, i64 0")
            a(f"  %nru{tag} = mul i64 {nrow}, {rows}")
            a(f"  %ru{tag} = add i64 {r}, %nru{tag}")
            a(f"  %isu1{tag} = icmp eq i64 %ru{tag}, %u1")
            a(f"  %la{tag} = select i1 %isu1{tag}, i64 %r1odd, i64 0")
            flags = f"i64 %sk{tag}, i64 %la{tag}"
        else:
            flags = "i64 0, i64 0"
        a(f"  %hasfull{tag} = icmp ugt i64 %nfull, 0")
        a(f"  br i1 %hasfull{tag}, label %full{tag}, label %tail{tag}")

        def call(ksz, i0, sfx):
            a(f"  %xqo{sfx} = mul i64 {i0}, 256")
            a(f"  %xqp{sfx} = getelementptr i8, ptr %xqt, i64 %xqo{sfx}")
            a(f"  %xdo{sfx} = mul i64 {i0}, 16")   # 16 floats per act row (xd), 32 per pair (xp)
            a(f"  %xdp{sfx} = getelementptr float, ptr %xdt, i64 %xdo{sfx}")
            a(f"  %xpp{sfx} = getelementptr float, ptr %xpt, i64 %xdo{sfx}")
            a(f"  %yo{sfx} = mul i64 {i0}, %ys")
            a(f"  %yr{sfx} = mul i64 {r}, {2 if pair else 1}")
            a(f"  %yo2{sfx} = add i64 %yo{sfx}, %yr{sfx}")
            a(f"  %yp{sfx} = getelementptr float, ptr %y, i64 %yo2{sfx}")
            a(f"  call void @kq_{nm}.r{rows}c{ksz}(ptr %qr{tag}, ptr %scr{tag}, ptr %dr{tag}, "
              f"ptr %xqp{sfx}, ptr %xdp{sfx}, ptr %xpp{sfx}, ptr %yp{sfx}, i64 %ns, i64 %nsb, "
              f"i64 %ys, i64 %kp, i64 %first, i64 %pfr, i64 {nrow}, {flags})")

        a(f"full{tag}:")
        a(f"  %c{tag} = phi i64 [0, %{tag}], [%c.next{tag}, %full{tag}]")
        a(f"  %i0f{tag} = mul i64 %c{tag}, {kb}")
        call(kb, f"%i0f{tag}", f"f{tag}")
        a(f"  %c.next{tag} = add i64 %c{tag}, 1")
        a(f"  %cdone{tag} = icmp eq i64 %c.next{tag}, %nfull")
        a(f"  br i1 %cdone{tag}, label %tail{tag}, label %full{tag}")
        a(f"tail{tag}:")       # the remainder, one chunk per bit of rem (largest first)
        a(f"  %ti0{tag} = mul i64 %nfull, {kb}")
        prev = f"%ti0{tag}"
        for j, ksz in enumerate(kbs[1:]):
            a(f"  %tb{j}{tag} = and i64 %rem, {ksz}")
            a(f"  %th{j}{tag} = icmp ne i64 %tb{j}{tag}, 0")
            a(f"  br i1 %th{j}{tag}, label %tdo{j}{tag}, label %tnext{j}{tag}")
            a(f"tdo{j}{tag}:")
            call(ksz, prev, f"t{j}{tag}")
            a(f"  br label %tnext{j}{tag}")
            a(f"tnext{j}{tag}:")
            a(f"  %tia{j}{tag} = add i64 {prev}, {ksz}")
            a(f"  %ti{j + 1}{tag} = select i1 %th{j}{tag}, i64 %tia{j}{tag}, i64 {prev}")
            prev = f"%ti{j + 1}{tag}"
        a(f"  br label %{nxt}")

    a("  %hasb = icmp ugt i64 %gnb, 0")
    a("  br i1 %hasb, label %B, label %Bend")
    a("B:")
    body("B", nr, "%rg", "%gnb", "Bend")
    a("Bend:")
    if nr > 1:
        a("  %hass = icmp ugt i64 %gnr, 0")
        a("  br i1 %hass, label %S, label %grp.end")
        a("S:")
        body("S", 1, "%rgs", "%gnr", "grp.end")
    else:
        a("  br label %grp.end")
    a("grp.end:")
    a("  %rg.next = add i64 %rg, %gn")
    a("  %gdone = icmp uge i64 %rg.next, %u1")
    a("  br i1 %gdone, label %tile.end, label %grp")
    a("tile.end:")
    a("  %s0.next = add i64 %s0, %tsb")
    a("  %tdone = icmp uge i64 %s0.next, %nsb")
    a("  br i1 %tdone, label %exit, label %tile")
    a("exit:")
    a("  ret void")
    a("}")
    return L


_SPECS = {"avx512": (64, "vnni"), "avx512-novnni": (64, "maddubs"), "avx2": (32, "maddubs")}


def _kbs(kb: int) -> list[int]:
    if kb < 2 or kb & (kb - 1):
        raise ValueError("kb must be a power of two >= 2")
    out = [kb]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _reduce_accs(a, accs: list[str], seg0: int, tag: str) -> list[tuple[int, str]]:
    """[(segment g, its float sum)] of a chunk's 16-lane accumulators, each 16 / seg0 segments
    of seg0 lanes in order: one per act row (seg0 = 16), or (row pairs, seg0 = 8) one per (act
    row i, row j of the pair), g = 2 i + j.

    Neighbouring accumulators are folded into one vector level by level (each level adds the
    two halves of every segment: 3 ops per pair of vectors), then the rest of each segment is
    summed in place. At kb = 8: 23 ops for the 8 sums, where one tree per sum took 64."""
    V = "<16 x float>"
    level, seg = _fold(a, accs, "float", tag, lambda x, y, o: f"  {o} = fadd {V} {x}, {y}",
                       seg0=seg0)
    tag = "%" + tag
    nseg = len(accs) * (16 // seg0)
    out = []
    for vi, v in enumerate(level):
        h = seg // 2
        while h >= 1:   # lanes j and j + h of every segment (garbage lanes are never read)
            a(f"  {tag}v{vi}_{h} = shufflevector {V} {v}, {V} poison, "
              f"{_mask([(j + h) % 16 for j in range(16)])}")
            a(f"  {tag}w{vi}_{h} = fadd {V} {v}, {tag}v{vi}_{h}")
            v, h = f"{tag}w{vi}_{h}", h // 2
        per = 16 // seg
        for t in range(per):
            g = vi * per + t
            if g < nseg:
                a(f"  {tag}o{g} = extractelement {V} {v}, i32 {t * seg}")
                out.append((g, f"{tag}o{g}"))
    return out


def _fold(a, vecs: list[str], elem: str, tag: str, op, min_seg: int = 1, seg0: int = 16):
    """Fold n (a power of two, <= 16) 16-lane vectors of segments of seg0 lanes pairwise with
    ``op`` (emits ``o = x op y``) while segments are longer than ``min_seg`` lanes: each level
    pairs neighbours and combines the two halves of every segment (n - 1 ops in all instead of
    n reductions). Returns (vectors, seg): vector j holds the input segments j * (16 / seg) ..
    in order (vector-major), seg lanes each, whose lanes are still to be combined when seg > 1."""
    V = f"<16 x {elem}>"
    level, seg = list(vecs), seg0
    k = 0
    while len(level) > 1 and seg > min_seg:
        half = seg // 2
        lo = [s0 * seg + t for s0 in range(16 // seg) for t in range(half)]
        nxt = []
        for i in range(0, len(level), 2):
            x, y = level[i], level[i + 1]
            a(f"  %{tag}{k}l = shufflevector {V} {x}, {V} {y}, "
              f"{_mask(lo + [16 + j for j in lo])}")
            a(f"  %{tag}{k}h = shufflevector {V} {x}, {V} {y}, "
              f"{_mask([j + half for j in lo] + [16 + j + half for j in lo])}")
            a(op(f"%{tag}{k}l", f"%{tag}{k}h", f"%{tag}{k}"))
            nxt.append(f"%{tag}{k}")
            k += 1
        level, seg = nxt, half
    return level, seg


def _transpose_reduce(a, vecs: list[str], elem: str, tag: str, op) -> str:
    """``_fold`` to one 16-lane vector: vector i's result in lanes i * (16 / n) .. (the lanes
    of one input are still to be combined when n < 16)."""
    return _fold(a, vecs, elem, tag, op)[0][0]


def _quant_ir() -> list[str]:
    """``@kq_quant(x, xq, xd, xp, nsb, k, kp, xs)``: the act format of x float32 [k, xs >= n_in]
    (row stride ``xs`` floats), the same float32 operations as ``quantize_x_nb`` (x finite)."""
    L = []
    a = L.append
    V, VI = "<16 x float>", "<16 x i32>"
    a("define void @kq_quant(ptr noalias nocapture readonly %x, ptr noalias nocapture %xq, "
      "ptr noalias nocapture %xd, ptr noalias nocapture %xp, i64 %nsb, i64 %k, i64 %kp, "
      "i64 %xs) #0 {")
    a("entry:")
    a("  %e1 = icmp sle i64 %nsb, 0")
    a("  %e2 = icmp sle i64 %kp, 0")
    a("  %skip = or i1 %e1, %e2")
    a("  %xsn = mul i64 %nsb, %kp")               # xd[1] starts nsb kp 16 floats after xd[0]
    a("  %xso = mul i64 %xsn, 16")
    a("  br i1 %skip, label %exit, label %row")
    a("row:")
    a("  %i = phi i64 [0, %entry], [%i.next, %row.end]")
    a("  %real = icmp slt i64 %i, %k")
    a("  %xro = mul i64 %i, %xs")
    a("  %xr = getelementptr float, ptr %x, i64 %xro")
    a("  br label %sb")
    a("sb:")
    a("  %s = phi i64 [0, %row], [%s.next, %sb.end]")
    a("  %sk = mul i64 %s, %kp")
    a("  %sko = add i64 %sk, %i")
    a("  %qo = mul i64 %sko, 256")
    a("  %qp = getelementptr i8, ptr %xq, i64 %qo")
    a("  %dxo = mul i64 %sko, 16")
    a("  %dxp = getelementptr float, ptr %xd, i64 %dxo")
    a("  %pp = getelementptr float, ptr %xp, i64 %dxo")
    a("  br i1 %real, label %q, label %pad")
    a("q:")
    a("  %xbo = mul i64 %s, 256")
    a("  %xb = getelementptr float, ptr %xr, i64 %xbo")
    dw = []
    for b in range(8):
        for h in range(2):
            a(f"  %xp{b}{h} = getelementptr float, ptr %xb, i64 {32 * b + 16 * h}")
            a(f"  %v{b}{h} = load {V}, ptr %xp{b}{h}, align 4")
            a(f"  %a{b}{h} = call {V} @llvm.fabs.v16f32({V} %v{b}{h})")
        a(f"  %m{b} = call nnan {V} @llvm.maxnum.v16f32({V} %a{b}0, {V} %a{b}1)")
    # the 8 blocks' amax, dx and 1/dx at once (a transposed reduction, vector divisions)
    am = _transpose_reduce(a, [f"%m{b}" for b in range(8)], "float", "am",
                           lambda x, y, o: f"  {o} = call nnan {V} @llvm.maxnum.v16f32({V} {x}, {V} {y})")
    a(f"  %am8a = shufflevector {V} {am}, {V} poison, {_mask(range(0, 16, 2))}")
    a(f"  %am8b = shufflevector {V} {am}, {V} poison, {_mask(range(1, 16, 2))}")
    a("  %AM = call nnan <8 x float> @llvm.maxnum.v8f32(<8 x float> %am8a, <8 x float> %am8b)")
    a("  %POS = fcmp ogt <8 x float> %AM, zeroinitializer")
    a(f"  %INVd = fdiv <8 x float> {_splat('float', 8, _flt(127.0))}, %AM")
    a("  %INV8 = select <8 x i1> %POS, <8 x float> %INVd, <8 x float> zeroinitializer")
    a(f"  %DXd = fdiv <8 x float> %AM, {_splat('float', 8, _flt(127.0))}")
    a("  %DX8 = select <8 x i1> %POS, <8 x float> %DXd, <8 x float> zeroinitializer")
    for b in range(8):
        a(f"  %INV{b} = shufflevector <8 x float> %INV8, <8 x float> poison, {_mask([b] * 16)}")
        for h in range(2):
            a(f"  %p{b}{h} = fmul {V} %v{b}{h}, %INV{b}")
            a(f"  %r{b}{h} = call {V} @llvm.roundeven.v16f32({V} %p{b}{h})")
            a(f"  %qi{b}{h} = fptosi {V} %r{b}{h} to {VI}")
            a(f"  %qb{b}{h} = trunc {VI} %qi{b}{h} to <16 x i8>")
        a(f"  %nat{b} = shufflevector <16 x i8> %qb{b}0, <16 x i8> %qb{b}1, {_mask(range(32))}")
        a(f"  %natd{b} = bitcast <32 x i8> %nat{b} to <8 x i32>")
        dw.append(f"%natd{b}")
    # per 16-group (lane g = 2 b + h) sums of xq, then per 32-block; dx and dx * xsum
    xs = _transpose_reduce(a, [f"%qi{g // 2}{g % 2}" for g in range(16)], "i32", "xs",
                           lambda x, y, o: f"  {o} = add {VI} {x}, {y}")
    # in the lane order: lane L holds 16-group _LANE_GROUP[L] (of 32-block L % 8)
    a(f"  %DX16 = shufflevector <8 x float> %DX8, <8 x float> poison, "
      f"{_mask([L % 8 for L in range(16)])}")
    a(f"  store {V} %DX16, ptr %dxp, align 4")
    a(f"  %XSL = shufflevector {VI} {xs}, {VI} poison, {_mask(_LANE_GROUP.tolist())}")
    a(f"  %XS16f = sitofp {VI} %XSL to {V}")
    a(f"  %DS16 = fmul {V} %DX16, %XS16f")
    a("  %xdsp = getelementptr float, ptr %dxp, i64 %xso")
    a(f"  store {V} %DS16, ptr %xdsp, align 4")
    a(f"  %XS4n = mul {VI} %XSL, {_splat('i32', 16, -4)}")
    a("  %xdip = getelementptr float, ptr %xdsp, i64 %xso")
    a(f"  store {VI} %XS4n, ptr %xdip, align 4")
    a(f"  %XS32n = mul {VI} %XSL, {_splat('i32', 16, -32)}")
    a("  %xdip3 = getelementptr float, ptr %xdip, i64 %xso")
    a(f"  store {VI} %XS32n, ptr %xdip3, align 4")
    a(f"  %xs8a = shufflevector {VI} {xs}, {VI} poison, {_mask(range(0, 16, 2))}")
    a(f"  %xs8b = shufflevector {VI} {xs}, {VI} poison, {_mask(range(1, 16, 2))}")
    a("  %XS8 = add <8 x i32> %xs8a, %xs8b")
    a("  %XS8f = sitofp <8 x i32> %XS8 to <8 x float>")
    a("  %DXS8 = fmul <8 x float> %DX8, %XS8f")
    # xp: lane L holds float32(dx xsum32) of block L % 8
    a(f"  %XPS = shufflevector <8 x float> %DXS8, <8 x float> poison, "
      f"{_mask([L % 8 for L in range(16)])}")
    a(f"  store {V} %XPS, ptr %pp, align 4")
    # natural dword 4 g + v (g: 16-group, v: 0..3) -> position 16 v + L (g = _LANE_GROUP[L])
    a(f"  %n01 = shufflevector <8 x i32> {dw[0]}, <8 x i32> {dw[1]}, {_mask(range(16))}")
    a(f"  %n23 = shufflevector <8 x i32> {dw[2]}, <8 x i32> {dw[3]}, {_mask(range(16))}")
    a(f"  %n45 = shufflevector <8 x i32> {dw[4]}, <8 x i32> {dw[5]}, {_mask(range(16))}")
    a(f"  %n67 = shufflevector <8 x i32> {dw[6]}, <8 x i32> {dw[7]}, {_mask(range(16))}")
    a(f"  %n03 = shufflevector {VI} %n01, {VI} %n23, {_mask(range(32))}")
    a(f"  %n47 = shufflevector {VI} %n45, {VI} %n67, {_mask(range(32))}")
    a(f"  %n07 = shufflevector <32 x i32> %n03, <32 x i32> %n47, {_mask(range(64))}")
    for v in range(4):
        a(f"  %o{v} = shufflevector <64 x i32> %n07, <64 x i32> poison, "
          f"{_mask([4 * int(g) + v for g in _LANE_GROUP])}")
        a(f"  %op{v} = getelementptr i8, ptr %qp, i64 {64 * v}")
        a(f"  store {VI} %o{v}, ptr %op{v}, align 4")
    a("  br label %sb.end")
    a("pad:")                                      # the padding row: x = 0
    for v in range(4):
        a(f"  %pq{v} = getelementptr i8, ptr %qp, i64 {64 * v}")
        a(f"  store <64 x i8> zeroinitializer, ptr %pq{v}, align 1")
    a(f"  store {V} zeroinitializer, ptr %dxp, align 4")
    a("  %dxp16 = getelementptr float, ptr %dxp, i64 %xso")
    a(f"  store {V} zeroinitializer, ptr %dxp16, align 4")
    a("  %dxp32 = getelementptr float, ptr %dxp16, i64 %xso")
    a(f"  store {V} zeroinitializer, ptr %dxp32, align 4")
    a("  %dxp48 = getelementptr float, ptr %dxp32, i64 %xso")
    a(f"  store {V} zeroinitializer, ptr %dxp48, align 4")
    a(f"  store {V} zeroinitializer, ptr %pp, align 4")
    a("  br label %sb.end")
    a("sb.end:")
    a("  %s.next = add i64 %s, 1")
    a("  %sdone = icmp eq i64 %s.next, %nsb")
    a("  br i1 %sdone, label %row.end, label %sb")
    a("row.end:")
    a("  %i.next = add i64 %i, 1")
    a("  %idone = icmp eq i64 %i.next, %kp")
    a("  br i1 %idone, label %exit, label %row")
    a("exit:")
    a("  ret void")
    a("}")
    return L


def kernel_ir(isa: str, cpu: str = "", features: str = "", *, what=Q4_K, kb: int | None = None,
              nr: int | None = None, prefetch: int = DEFAULT_PREFETCH,
              tile_bytes: int = DEFAULT_TILE_BYTES, pipe: bool | None = None,
              group: int = DEFAULT_GROUP, width: int | None = None) -> str:
    """The IR module text for an x86 path (an ``_SPECS`` name): ``kq_<type>`` for ``what`` a
    qtype, or ``kq_quant`` for ``what="quant"`` (a module each, so a process parses only the
    ones its model uses). ``width``: the vector bytes of the chunks of 2+ act rows, when not
    the path's own (32 on avx512: ymm ``vpdpbusd``, AVX-512VL; not pipelined)."""
    L = list(_DECLS) + ["declare i64 @llvm.umax.i64(i64, i64)",
                        "declare i64 @llvm.umin.i64(i64, i64)"]
    if what == "quant":
        L += ["declare <16 x float> @llvm.fabs.v16f32(<16 x float>)",
              "declare <16 x float> @llvm.maxnum.v16f32(<16 x float>, <16 x float>)",
              "declare float @llvm.vector.reduce.fmax.v16f32(<16 x float>)",
              "declare <16 x float> @llvm.roundeven.v16f32(<16 x float>)",
              "declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)",
              "declare <8 x float> @llvm.maxnum.v8f32(<8 x float>, <8 x float>)"]
        L += _quant_ir()
        return codegen.finish_module(L, cpu, features)
    vw, combine = _SPECS[isa]
    if width is not None and (width not in (32, 64) or (width == 64 and vw == 32)):
        raise ValueError(f"kernel_ir: width {width} on the {isa} path")
    kbs = _kbs(kb or _default_kb(isa, what))
    nr = nr or DEFAULT_NR[isa]
    pipe = DEFAULT_PIPE[isa] if pipe is None else pipe
    for ksz in kbs:
        w = vw if ksz == 1 else width or vw
        for rows in sorted({1, nr}):
            L += _chunk_ir(what, w, combine, rows, ksz, pipe and w == vw)
    L += _fn_ir(what, nr, kbs, tile_bytes, prefetch, group)
    return codegen.finish_module(L, cpu, features)


def tile_bytes() -> int:
    """The act bytes per tile on this host: 3/4 of its L1D (``DEFAULT_TILE_BYTES`` at 48 KB).
    AMD EPYC Zen 4 (32 KB L1D), 1 thread, hot, min of 5 calls, median of 3 rounds, 36864 ->
    24576 bytes: Q6_K 1536x8960 k = 8 1416 -> 1009 us, k = 16 2747 -> 2099; 8960x1536 k = 16
    2716 -> 1970; 151936x1536 k = 16 48.0 -> 34.1 ms; Q4_K within 3 %; 16384 and 12288 no
    better."""
    return DEFAULT_TILE_BYTES * codegen.l1d_bytes() // (48 << 10)


def _host_opts(isa: str, what) -> dict:
    """The kernel options a K-quant module is compiled with on this host."""
    o = {"kb": _default_kb(isa, what), "nr": DEFAULT_NR[isa], "pipe": DEFAULT_PIPE[isa],
         "prefetch": codegen.prefetch_bytes(DEFAULT_PREFETCH), "tile_bytes": tile_bytes()}
    if what in _PAIR and codegen.resolve_isa(isa) == "avx512" and codegen.is_zen() \
            and codegen._host_features().get("avx512vl"):   # ZEN_YMM
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
        if isa not in codegen.host_isas() or isa not in _SPECS:
            raise ValueError(f"isa {isa!r} cannot be compiled for execution on this host")
        spec = codegen.resolve_isa(isa)
        if what != "quant":
            opts = {**_host_opts(isa, what), **opts}
        ee, owners, secs = codegen.jit(
            lambda cpu, feat: kernel_ir(spec, cpu, feat, what=what, **opts), isa)
        name = "kq_quant" if what == "quant" else f"kq_{_NAMES[what]}"
        k = _cache[key] = (ee.get_function_address(name), owners, secs)
        return k


def kernel_asm(isa: str = "avx512", what=Q4_K, **opts) -> str:
    """The host assembly of a module (for inspection; runs nothing)."""
    spec = codegen.resolve_isa(isa)
    opts = {**_host_opts(isa, what), **opts}
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
        r = _compile(name, "quant")[0] if name in _SPECS else 0
        _choice[key] = r
    return r


def fn_address(qtype: int, kernel: str | None = None, **opts) -> int:
    """Address of ``kq_<type>`` (Q2_K..Q6_K) for a kernel path (0: portable). ``opts`` (kb, nr,
    prefetch, tile_bytes) are for experiments; the defaults are the measured best."""
    key = (qtype, kernel, tuple(sorted(opts.items())))
    r = _choice.get(key)
    if r is None:
        if qtype not in _NAMES:
            raise ValueError(f"qtype {qtype} is not a K-quant (Q2_K..Q6_K, 10..14)")
        name = codegen.select_kernel(kernel)
        if name not in _SPECS:   # portable (neon is never executed here)
            r = 0
        else:
            r = _compile(name, qtype, **opts)[0]
        _choice[key] = r
    return r


# ---------------------------------------------------------------------------------------------
# numba


def _check(tys, specs):
    for t, sp in zip(tys, specs, strict=True):
        if sp is None:
            if not isinstance(t, types.Integer):
                raise errors.TypingError(f"expected an integer, got {t}")
        elif not (isinstance(t, types.Array) and t.layout == "C" and t.dtype in sp):
            raise errors.TypingError(f"expected a C-contiguous {sp} array, got {t}")


@intrinsic
def _call_kq(typingctx, fn, q, sc, d, xq, xd, xp, y, nsb, r0, r1, k, ys):
    """kq_<t>(q, sc, d, xq, xd, xp, y, nsb, r0, r1, k, ys) through a runtime address."""
    args = (fn, q, sc, d, xq, xd, xp, y, nsb, r0, r1, k, ys)
    _check(args, (None, (types.uint8,), (types.uint8,), (types.uint16,),
                  (types.int8,), (types.float32,), (types.float32,), (types.float32,),
                  None, None, None, None, None))
    return types.void(*args), _emit_call


@intrinsic
def _call_quant(typingctx, fq, x, xq, xd, xp, nsb, k, kp, xs):
    """kq_quant(x, xq, xd, xp, nsb, k, kp, xs) through a runtime address."""
    args = (fq, x, xq, xd, xp, nsb, k, kp, xs)
    _check(args, (None, (types.float32,), (types.int8,), (types.float32,), (types.float32,),
                  None, None, None, None))
    return types.void(*args), _emit_call


@njit(cache=True, nogil=True, inline="always")
def _h2f(h):
    """IEEE half bits -> float32, exactly (NaN stays NaN)."""
    h = np.int32(h)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    elif e == 0:
        v = np.float32(m) * np.float32(2.0 ** -24)
    else:
        v = (np.float32(m | 0x400) * np.float32(np.int32(1) << (e - 1))) * np.float32(2.0 ** -24)
    return -v if h & 0x8000 else v


@njit(cache=True, nogil=True)
def quantize_x_nb(x, xq, xd, xp):
    """x float32 [k, n_in] -> the act format (module docstring): xq int8 [nsb, kp, 256],
    xd float32 [4, nsb, kp, 16], xp float32 [nsb, kp, 16]; kp = k rounded up to even (the
    padding row is x = 0)."""
    k, n = x.shape
    nsb = n // 256
    kp = xq.shape[1]
    xi = xd.view(np.int32)
    q127 = np.float32(127.0)
    for s in range(nsb):
        for i in range(kp):
            for b in range(8):
                o = 256 * s + 32 * b
                amax = np.float32(0.0)
                if i < k:
                    for j in range(32):
                        v = abs(x[i, o + j])
                        amax = v if v > amax else amax
                if amax > 0:
                    inv = q127 / amax
                    dx = amax / q127
                else:
                    inv = np.float32(0.0)
                    dx = np.float32(0.0)
                xs = 0
                for h in range(2):
                    g = 8 * h + b                      # lane of 16-group 2 b + h
                    xs16 = 0
                    for v in range(4):
                        for t in range(4):
                            val = 0
                            if i < k:
                                val = np.int32(np.rint(x[i, o + 16 * h + 4 * v + t] * inv))
                            xs16 += val
                            xq[s, i, 64 * v + 4 * g + t] = np.int8(val)
                    xs += xs16
                    xd[0, s, i, g] = dx
                    xd[1, s, i, g] = dx * np.float32(xs16)
                    xi[2, s, i, g] = -4 * xs16
                    xi[3, s, i, g] = -32 * xs16
                for h in range(2):
                    xp[s, i, 8 * h + b] = dx * np.float32(xs)


@njit(cache=True, nogil=True)
def _rows_portable(q, sc, d, xq, xd, xp, y, r0, r1):
    """Plain numba: each super-block of a row is decoded to float32 weights once (``SC q - MM``
    or ``SC (q - offset)``, kernel lane order; the type from the shapes), then 256 float32
    lanes per act row accumulate ``w * xhat`` with ``xhat = xq dx`` (exact products of
    the same quantized values: differs from the integer kernels by float32 rounding only), a
    tree sum at the end. The lanes are the vector: LLVM vectorizes without fastmath."""
    nsb, k = xq.shape[0], y.shape[0]
    qb = q.shape[1] // nsb
    pair = qb == 128 or qb == 160                  # Q4_K, Q5_K: row pairs, per 32-block
    crumbs = qb == 64 or qb == 96                  # Q2_K, Q3_K: 2-bit low codes
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
            if pair:   # the pair's super-block: code vector (v, h) lane 8 jr + p, byte t
                base = 2 * m * nsb * qb + 2 * qb * s
                for v in range(4):
                    for j in range(64):      # act lane L = j >> 2 = 8 h + p, byte t = j & 3
                        h, pl = j >> 5, (j >> 2) & 7
                        o = base + 64 * v + 4 * (8 * jr + pl) + (j & 3)
                        c = (np.int32(qf[o]) >> (4 * h)) & 15
                        if qb == 160:        # Q5_K: bit 2 v + h of the plane byte
                            c |= ((np.int32(qf[o - 64 * v + 256]) >> (2 * v + h)) & 1) << 4
                        qi[64 * v + j] = c
                sb, db = 2 * m * nsb * 16 + 32 * s, 2 * m * nsb * 2 + 4 * s
                dd = _h2f(df[db + jr])
                dm = _h2f(df[db + 2 + jr])
                for j in range(64):          # lane j >> 2: block (j >> 2) & 7
                    scv[j] = dd * np.float32(scf[sb + 8 * jr + ((j >> 2) & 7)])
                    mmv[j] = dm * np.float32(scf[sb + 16 + 8 * jr + ((j >> 2) & 7)])
            elif crumbs:                              # byte j, bits 2v..2v+1: code (v, j)
                for v in range(4):
                    for j in range(64):
                        qi[64 * v + j] = (np.int32(qrow[qo + j]) >> (2 * v)) & 3
            else:                                   # nibbles: byte 64 c + j = v 2c | 2c+1 << 4
                for c in range(2):
                    for j in range(64):
                        byte = np.int32(qrow[qo + 64 * c + j])
                        qi[128 * c + j] = byte & 15
                        qi[128 * c + 64 + j] = byte >> 4
            if qb == 192:                           # Q6_K: 2 high bits at bits 2v..2v+1
                for v in range(4):
                    for j in range(64):
                        qi[64 * v + j] |= ((np.int32(qrow[qo + 128 + j]) >> (2 * v)) & 3) << 4
            elif qb == 96:                          # Q3_K: a 32-byte bit plane
                for v in range(4):
                    for j in range(64):
                        byte = np.int32(qrow[qo + 64 + (j & 31)])
                        qi[64 * v + j] |= ((byte >> (v + 4 * (j >> 5))) & 1) << 2
            if qb == 64:                   # Q2_K: scale | min << 4 per 16-group j >> 2
                dd = _h2f(d[r, 2 * s])
                dm = _h2f(d[r, 2 * s + 1])
                for j in range(64):
                    b = np.int32(sc[r, 16 * s + (j >> 2)])
                    scv[j] = dd * np.float32(b & 15)
                    mmv[j] = dm * np.float32(b >> 4)
            elif not pair:                   # int8 scales per 16-group j >> 2
                dd = _h2f(d[r, s])
                for j in range(64):
                    scv[j] = dd * np.float32((np.int32(sc[r, 16 * s + (j >> 2)]) ^ 0x80) - 0x80)
            for v in range(4):
                wv = w[64 * v:64 * v + 64]
                qv = qi[64 * v:64 * v + 64]
                for j in range(64):
                    wv[j] = scv[j] * np.float32(qv[j] - off) - mmv[j]
            for i in range(k):
                a = acc[i]
                x = xf[s, i]
                for o in range(256):
                    a[o] += w[o] * x[o]
        for i in range(k):
            y[i, r] = tree_sum(acc[i])


@njit(cache=True, nogil=True, inline="always")
def rows_nb(fn, q, sc, d, xq, xd, xp, y, r0, r1):
    """y[i, r] for r0 <= r < r1 and every act row i < y.shape[0] (y float32 [k, >= r1],
    C-contiguous); ``fn`` from ``fn_address`` (0: portable). No shape checks: see ``_prep``."""
    if fn != 0:
        _call_kq(fn, q, sc, d, xq, xd, xp, y, xq.shape[0], r0, r1, y.shape[0], y.shape[1])
    else:
        _rows_portable(q, sc, d, xq, xd, xp, y, r0, r1)


@njit(cache=True, nogil=True)
def act_buffers(nsb, kp):
    """Empty (xq, xd, xp) for kp (even) act rows of nsb super-blocks, in one 64-byte aligned
    block (act loads that split cache lines slowed the compute-bound k-row kernels)."""
    nq, nd, npp = nsb * kp * 256, nsb * kp * 256, nsb * kp * 64   # bytes of xq, xd, xp
    buf = np.empty(nq + nd + npp + 64, np.uint8)
    o = (-buf.ctypes.data) % 64
    xq = buf[o:o + nq].view(np.int8).reshape((nsb, kp, 256))
    xd = buf[o + nq:o + nq + nd].view(np.float32).reshape((4, nsb, kp, 16))
    xp = buf[o + nq + nd:o + nq + nd + npp].view(np.float32).reshape((nsb, kp, 16))
    return xq, xd, xp


@njit(cache=True, nogil=True)
def quantize_x_alloc(x, fq=0):
    """(xq, xd, xp) = the act format of x float32 [k, n_in] (n_in a multiple of 256, x
    C-contiguous); ``fq`` from ``quant_address`` (the vectorized IR routine; 0: numba)."""
    k, n = x.shape
    nsb = n // 256
    kp = k + (k & 1)
    xq, xd, xp = act_buffers(nsb, kp)
    if fq != 0:
        _call_quant(fq, x, xq, xd, xp, nsb, k, kp, n)
    else:
        quantize_x_nb(x, xq, xd, xp)
    return xq, xd, xp


@njit(cache=True, nogil=True, inline="always")
def _prep(fq, x, q, sc, d, out):
    k, n = x.shape
    nsb = n // 256
    qb, nd = q.shape[1] // max(nsb, 1), d.shape[1] // max(nsb, 1)
    ok = n % 256 == 0 and nsb > 0 and k > 0 and sc.shape[1] == 16 * nsb \
        and q.shape[0] == sc.shape[0] and q.shape[0] == d.shape[0] \
        and q.shape[1] == qb * nsb and d.shape[1] == nd * nsb \
        and ((qb == 128 and nd == 2) or (qb == 160 and nd == 2) or (qb == 192 and nd == 1)
             or (qb == 64 and nd == 2) or (qb == 96 and nd == 1)) \
        and out.shape[0] == k and (out.shape[1] == q.shape[0] or (
            (qb == 128 or qb == 160) and q.shape[0] % 2 == 0 and out.shape[1] == q.shape[0] - 1))
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


def kq_matvec(x, p: PackedKQ, out: np.ndarray | None = None, threads: int = 1,
              kernel: str | None = None) -> np.ndarray:
    """y = W @ x for a packed K-quant matrix (float32 [n_out]); ``out`` may be given."""
    if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 1 \
            or not x.flags.c_contiguous:
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


def kq_matmul(X, p: PackedKQ, out: np.ndarray | None = None, kernel: str | None = None,
              threads: int = 1) -> np.ndarray:
    """Y = X @ W.T for X float32 [k, n_in] (one pass over the weights for all k rows):
    float32 [k, n_out]; ``out`` may be given."""
    if type(X) is not np.ndarray or X.dtype is not _F32 or X.ndim != 2 \
            or not X.flags.c_contiguous:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError("kq_matmul: X must be [k, n_in]")
    if out is None:
        out = np.empty((X.shape[0], p.n_out), np.float32)
    elif out.ndim != 2 or out.shape[1] != p.n_out or out.dtype != _F32 \
            or not out.flags.c_contiguous:
        raise ValueError("kq_matmul: out must be a C-contiguous float32 [k, n_out] array")
    fn, fq = _addresses(p.qtype, kernel)
    if threads > 1 and X.shape[0] >= MIN_ROWS:
        # a batch: quantized once, rows shared out on split's threads (the batch path's one
        # pool; numba's OpenMP workers would spin beside it); smaller ones: prange
        xq, xd, xp = _prep(fq, X, p.q, p.sc, p.d, out)
        split(p.n_out, threads,
              lambda r0, r1: rows_nb(fn, p.q, p.sc, p.d, xq, xd, xp, out, r0, r1))
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


# ---------------------------------------------------------------------------------------------
# NumPy oracle


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
    o = _OFFSET[p.qtype]
    codes = p.codes().astype(np.float64) - o
    SC, MM = p.scales()
    gw = 32 if p.qtype in _PAIR else 16                          # weights per scale
    ng = n // gw
    ig = np.einsum("rgj,igj->irg", codes.reshape(p.n_out, ng, gw),
                   xq.reshape(k, ng, gw).astype(np.float64))      # exact (< 2^53)
    dxg = np.repeat(dx, 32 // gw, axis=1)
    t1 = ig * dxg.astype(np.float64)[:, None, :] * SC.astype(np.float64)[None]
    y, absum = t1.sum(axis=2), np.abs(t1).sum(axis=2)
    if MM is not None:
        if o:
            MM = MM - np.float32(o) * SC                          # float32, one rounding
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
    w = np.abs(p.dequantize().astype(np.float64))                        # [n_out, n]
    step = (np.repeat(dx, 32, axis=1).astype(np.float64)
            * (0.5 + 2.0 ** -22 * np.abs(xq.astype(np.float64))))         # [k, n]
    bound = step @ w.T + 2.0 ** -23 * (np.abs(X.astype(np.float64)) @ w.T)
    return y, absum, bound


# ---------------------------------------------------------------------------------------------
# random GGUF blocks, benchmark: python -m ember.lut_kernels.kquant


_F16_FIELDS = {Q2_K: (80, 82), Q3_K: (108,), Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208,)}


def random_kquant(rng, qtype: int, n_out: int, n_in: int) -> np.ndarray:
    """Random GGUF rows of a K-quant type: uint8 [n_out, n_in / 256 * block bytes]; random
    code and scale bytes, f16 d ~ 1e-3 (and dmin ~ 3e-4) of random sign."""
    nsb = n_in // 256
    bb = block_info(qtype)[1]
    raw = rng.integers(0, 256, (n_out, nsb, bb), dtype=np.uint8)
    for off, mag in zip(_F16_FIELDS[qtype], (1e-3, 3e-4), strict=False):
        v = rng.uniform(0.5, 1.5, (n_out, nsb)) * rng.choice([-1.0, 1.0], (n_out, nsb)) * mag
        raw[:, :, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_out, nsb, 2)
    return raw.reshape(n_out, nsb * bb)


def _copy(p: PackedKQ) -> PackedKQ:
    return PackedKQ(aligned(p.q.copy()), p.sc.copy(), p.d.copy(), p.n_out, p.n_in, p.qtype)


SHAPES = ((Q4_K, 1536, 1536), (Q4_K, 8960, 1536), (Q6_K, 1536, 8960), (Q6_K, 151936, 1536))


def benchmark(shapes=SHAPES, rounds: int = 5, kernels=None, ks=(1, 2, 4, 8, 16),
              cold_bytes: int = 512 << 20, portable_max_bytes: int = 4 << 20,
              out=print) -> dict:
    """Median times, one thread unless said, whole Python calls (``kq_matvec`` for k = 1,
    ``kq_matmul`` above). hot = the same matrix again; cold = rotating over ``cold_bytes`` of
    copies (a matrix larger than the L3 is cold either way). GB/s = packed bytes / time."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    kernels = kernels or [k for k in codegen.host_isas() if k != "neon"]
    results = {}
    with threadpool_limits(1):
        for qt, n_out, n_in in shapes:
            results[(qt, n_out, n_in)] = _bench_shape(rng, qt, n_out, n_in, rounds, kernels, ks,
                                                      cold_bytes, portable_max_bytes, out)
    return results


def _bench_shape(rng, qt, n_out, n_in, rounds, kernels, ks, cold_bytes, portable_max_bytes,
                 out) -> dict:
    best = kernels[0]
    p = pack_kquant(random_kquant(rng, qt, n_out, n_in), qt)
    ncold = max(2, cold_bytes // p.nbytes)
    cps = [p] + [_copy(p) for _ in range(ncold - 1)]
    X = rng.standard_normal((max(ks), n_in)).astype(np.float32)
    xs = {k: np.ascontiguousarray(X[:k]) for k in ks}
    w = p.dequantize()
    nw = max(1, min(4, cold_bytes // w.nbytes))
    ws = [w] + [w.copy() for _ in range(nw - 1)]

    def mv(ker, threads=1):
        return lambda i: kq_matvec(X[0], cps[i % ncold], kernel=ker, threads=threads)

    def mm(k):
        return lambda i: kq_matmul(xs[k], cps[i % ncold], kernel=best)

    variants = {}
    for ker in kernels:
        if ker != "portable" or p.nbytes <= portable_max_bytes:
            variants[f"{ker} k=1"] = (mv(ker), 1, ncold)
    for k in ks:
        if k > 1:
            variants[f"{best} k={k}"] = (mm(k), k, ncold)
    variants[f"{best} k=1 2thr"] = (mv(best, 2), 1, ncold)
    variants["f32 numpy k=1"] = ((lambda i: ws[i % nw] @ X[0]), 1, nw)
    if 8 in xs:
        variants["f32 numpy k=8"] = ((lambda i: xs[8] @ ws[i % nw].T), 8, nw)
    res = {nm: ([], []) for nm in variants}
    for f, _, _ in variants.values():
        f(0)
        f(1)
    for _ in range(rounds):
        for nm, (f, _, nrot) in variants.items():
            f(0)
            t0 = time.perf_counter()
            f(0)
            res[nm][0].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(1, 1 + nrot):
                f(i)
            res[nm][1].append((time.perf_counter() - t0) / nrot)
    name = _NAMES[qt].upper()
    out(f"{n_out}x{n_in} {name}: packed {p.nbytes / 1e6:.2f} MB (GGUF {p.gguf_nbytes / 1e6:.2f}"
        f" MB, f32 {w.nbytes / 1e6:.1f} MB); median us (GB/s) hot | cold; x: / k=1")
    rows = {}
    for nm, (_, k, _) in variants.items():
        h, c = float(np.median(res[nm][0])), float(np.median(res[nm][1]))
        rows[nm] = (h, c)
        f32 = nm.startswith("f32")
        nbytes = w.nbytes if f32 else p.nbytes
        base = rows.get("f32 numpy k=1" if f32 else f"{best} k=1")
        rel = f"  x{h / base[0]:4.2f} | x{c / base[1]:4.2f}" if base and k > 1 else ""
        out(f"  {nm:18s} {h * 1e6:9.0f} ({nbytes / h / 1e9:5.1f}) | {c * 1e6:9.0f} "
            f"({nbytes / c / 1e9:5.1f}){rel}")
    return rows


if __name__ == "__main__":
    import subprocess
    import sys
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    print("host:", codegen.host_isas())
    rng = np.random.default_rng(1)
    import timeit
    for qt, shape in ((Q4_K, (8960, 1536)), (Q6_K, (1536, 8960))):
        raw = random_kquant(rng, qt, *shape)
        t = np.median(timeit.repeat(lambda: pack_kquant(raw, qt), number=1, repeat=6)[1:])
        print(f"pack {_NAMES[qt]} {shape[0]}x{shape[1]}: {t * 1e3:.1f} ms")
    for nm, xk in (("k=1 x 1536", 1), ("k=16 x 8960", 16)):
        X = rng.standard_normal((xk, 1536 if xk == 1 else 8960)).astype(np.float32)
        for ker in ("avx512", "portable"):
            if ker not in codegen.host_isas():
                continue
            fq = quant_address(ker)
            quantize_x_alloc(X, fq)
            t0 = time.perf_counter()
            for _ in range(100):
                quantize_x_alloc(X, fq)
            print(f"quantize {nm} ({ker}): {(time.perf_counter() - t0) / 100 * 1e6:.1f} us")
    shapes = SHAPES[:1] if "--quick" in sys.argv else SHAPES
    benchmark(shapes, rounds=3 if "--quick" in sys.argv else 5)
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
