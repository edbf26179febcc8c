"""The K-quant (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) weight layout of the int8-activation kernels, and
packing into it.

``pack_kquant(raw2d, qtype) -> PackedKQ``: GGUF rows (uint8 [n_out, nsb * block bytes], nsb =
n_in / 256) -> the kernel layout below. ``PackedKQ``: ``.q .sc .d .n_out .n_in .qtype .nsb
.nbytes .gguf_nbytes``, ``arrays()`` / ``PackedKQ.from_arrays(a)`` (``np.savez`` / ``np.load``;
ValueError on any inconsistency), ``codes()`` (natural-order unsigned codes), ``scales()``
(float32 per-block scales and mins), ``dequantize()`` (float32 [n_out, n_in], bit for bit
``ember.formats.quants.dequantize``). ``ternary_as_q2_k`` rewrites TQ1_0 / TQ2_0 rows as the
Q2_K rows of the same weights. Packing is vectorized NumPy.

Packed layout (all plain C-contiguous numpy arrays, ``q`` 64-byte aligned)
---------------------------------------------------------------------------
Within a super-block of 256 weights, 16-group ``g`` (weights 16 g .. 16 g + 15) is lane
``L`` with ``g = 2 (L % 8) + L // 8`` (``LANE_GROUP``: lanes p and p + 8 hold the two halves
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
or ``SC * (code - o)`` (Q3_K o = 4, Q6_K o = 32; ``OFFSET``), every product exact in float32.
Bytes per super-block against the file's: Q2_K 84 (84), Q3_K 114 (110: the 12 packed scale
bytes become 16), Q4_K 148 (144), Q5_K 180 (176), Q6_K 210 (210).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats.quants import block_info
from .pack import aligned, aligned_empty, gguf_blocks, stored_arrays, stored_meta
from .q8 import EXACT_INT8, pack_exact_int8

__all__ = [
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "QTYPES",
    "QK",
    "NAMES",
    "PAIR_TYPES",
    "OFFSET",
    "LANE_GROUP",
    "GROUP_LANE",
    "unit_bytes",
    "PackedKQ",
    "pack_kquant",
    "TQ1_0",
    "TQ2_0",
    "TERNARY",
    "ternary_as_q2_k",
]

Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14  # GGMLQuantizationType values
QTYPES = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
QK = 256  # weights per super-block
_QB = {Q2_K: 64, Q3_K: 96, Q4_K: 128, Q5_K: 160, Q6_K: 192}  # bytes of codes, packed layout
_ND = {Q2_K: 2, Q3_K: 1, Q4_K: 2, Q5_K: 2, Q6_K: 1}  # f16 values per super-block (d[, dmin])
NAMES = {Q2_K: "q2_k", Q3_K: "q3_k", Q4_K: "q4_k", Q5_K: "q5_k", Q6_K: "q6_k"}
PAIR_TYPES = (Q4_K, Q5_K)  # scales and mins per 32-block, rows in pairs; others per 16-group
OFFSET = {Q2_K: 0, Q3_K: 4, Q4_K: 0, Q5_K: 0, Q6_K: 32}  # the integer dots are of code - offset
# act lane L holds 16-group LANE_GROUP[L] = 2 (L % 8) + L // 8: lanes p and p + 8 hold the two
# halves of 32-block p (what a row pair's kernel adds up in one lane)
LANE_GROUP = np.array([2 * (L % 8) + L // 8 for L in range(16)])
GROUP_LANE = np.argsort(LANE_GROUP)


# Q5_K row pairs: bit 2 v + h of a plane byte is bit 4 of code vector (v, h); shaped to
# broadcast against [pair, sb, v, h, lane, t]
_Q5_PLANE_BIT = (2 * np.arange(4, dtype=np.uint8).reshape(4, 1) + np.arange(2, dtype=np.uint8)).reshape(
    1, 1, 4, 2, 1, 1
)


def unit_bytes(qt: int) -> tuple[int, int, int]:
    """(code bytes, scale bytes, f16 values) per super-block of a kernel unit: one weight row,
    or a row pair for Q4_K / Q5_K."""
    if qt in PAIR_TYPES:
        return 2 * _QB[qt], 32, 2 * _ND[qt]
    return _QB[qt], 16, _ND[qt]


@dataclass
class PackedKQ:
    """A K-quant matrix [n_out, n_in] (Q2_K..Q6_K) in the kernel layout (module docstring)."""

    q: np.ndarray  # uint8 [n_out, nsb * QB]  codes
    sc: np.ndarray  # uint8 [n_out, nsb * 16]  scales (and mins), per type
    d: np.ndarray  # uint16 [n_out, nsb * ND]  IEEE half bits (d[, dmin])
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
        return {
            "q": self.q,
            "sc": self.sc,
            "d": self.d,
            "meta": np.array([self.n_out, self.n_in, self.qtype], np.int64),
        }

    @classmethod
    def from_arrays(cls, a) -> PackedKQ:
        n_out, n_in, qtype = stored_meta(a, "PackedKQ", 3)
        if qtype not in _QB or n_out < 0 or n_in <= 0 or n_in % QK:
            raise ValueError(f"PackedKQ.from_arrays: bad meta {[n_out, n_in, qtype]}")
        nsb = n_in // QK
        nr = _array_rows(qtype, n_out)
        q, sc, d = stored_arrays(
            a,
            "PackedKQ",
            ("q", "sc", "d"),
            {
                "q": ((nr, nsb * _QB[qtype]), np.uint8),
                "sc": ((nr, nsb * 16), np.uint8),
                "d": ((nr, nsb * _ND[qtype]), np.uint16),
            },
        )
        return cls(
            aligned(np.ascontiguousarray(q)), np.ascontiguousarray(sc), np.ascontiguousarray(d), n_out, n_in, qtype
        )

    def codes(self) -> np.ndarray:
        """The unsigned integer codes in natural order, uint8 [n_out, n_in] (Q2_K 0..3, Q3_K
        0..7, Q4_K 0..15, Q5_K 0..31, Q6_K 0..63)."""
        n, nsb, qt = self.n_out, self.nsb, self.qtype
        if qt in PAIR_TYPES:
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
            v = (ql >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1, 1)) & 15
            v = v.reshape(n, nsb, 4, 16, 4)
        if qt == Q6_K:
            v = v | (_crumbs(b[:, :, 128:]) << 4)
        elif qt == Q3_K:
            v = v | (_bits(b[:, :, 64:]) << 2)
        v = v.transpose(0, 1, 3, 2, 4)[:, :, GROUP_LANE]
        return np.ascontiguousarray(v).reshape(n, self.n_in)

    def scales(self):
        """(SC, MM): float32 [n_out, nsb * 8] per 32-block (Q4_K, Q5_K) or [n_out, nsb * 16] per
        16-group (the others): the weight is ``SC * code - MM`` (MM None for Q3_K/Q6_K, whose
        weight is ``SC * (code - offset)``), each product exact in float32."""
        n, nsb, qt = self.n_out, self.nsb, self.qtype
        if qt in PAIR_TYPES:  # [pair, sb, kind, row, 8] -> [row, sb, kind, 8]
            m = self.q.shape[0] // 2
            s = self.sc.reshape(m, nsb, 2, 2, 8).transpose(0, 3, 1, 2, 4).reshape(2 * m, nsb, 2, 8)
            dd = self.d.view(np.float16).astype(np.float32).reshape(m, nsb, 2, 2)
            dd = dd.transpose(0, 3, 1, 2).reshape(2 * m, nsb, 2)[:n]
            s = s[:n].astype(np.float32)
            return ((dd[:, :, 0:1] * s[:, :, 0]).reshape(n, -1), (dd[:, :, 1:2] * s[:, :, 1]).reshape(n, -1))
        dd = self.d.view(np.float16).astype(np.float32).reshape(n, nsb, _ND[qt])
        if qt == Q2_K:
            s = self.sc.reshape(n, nsb, 16)[:, :, GROUP_LANE]
            return (
                (dd[:, :, 0:1] * (s & 15).astype(np.float32)).reshape(n, -1),
                (dd[:, :, 1:2] * (s >> 4).astype(np.float32)).reshape(n, -1),
            )
        s = self.sc.view(np.int8).reshape(n, nsb, 16)[:, :, GROUP_LANE].astype(np.float32)
        return (dd[:, :, 0:1] * s).reshape(n, -1), None

    def dequantize(self) -> np.ndarray:
        """float32 [n_out, n_in], bit-identical to ``ember.formats.quants.dequantize``."""
        n = self.n_out
        SC, MM = self.scales()
        g = SC.shape[1]
        q = self.codes().reshape(n, g, -1).astype(np.float32)
        if MM is None:
            w = SC[:, :, None] * (q - np.float32(OFFSET[self.qtype]))
        else:
            w = SC[:, :, None] * q - MM[:, :, None]
        return w.reshape(n, self.n_in)


def _array_rows(qt: int, n_out: int) -> int:
    """Rows of a PackedKQ's arrays: n_out, rounded up to even for the row-pair types."""
    return n_out + (n_out & 1) if qt in PAIR_TYPES else n_out


def _to_kernel_order(codes: np.ndarray) -> np.ndarray:
    """natural codes [n, nsb, 256] -> [n, nsb, 4 (v), 16 (L), 4 (t)] (virtual vectors; lane L
    holds 16-group LANE_GROUP[L])."""
    n, nsb = codes.shape[:2]
    return codes.reshape(n, nsb, 16, 4, 4)[:, :, LANE_GROUP].transpose(0, 1, 3, 2, 4)


def _pair_order(codes: np.ndarray) -> np.ndarray:
    """natural codes [n2, nsb, 256] (n2 even) -> [n2 / 2, nsb, 4 (v), 2 (h), 16 (lane), 4 (t)]:
    code vector (v, h) of a row pair, lane 8 j + p = row j of the pair, byte t = weight
    32 p + 16 h + 4 v + t (block p)."""
    n2, nsb = codes.shape[:2]
    return codes.reshape(n2 // 2, 2, nsb, 8, 2, 4, 4).transpose(0, 2, 5, 4, 1, 3, 6).reshape(n2 // 2, nsb, 4, 2, 16, 4)


def _nibbles(v: np.ndarray) -> np.ndarray:
    """[n, nsb, 4, 16, 4] codes -> [n, nsb, 128]: byte c*64 + 4L + t = v[2c] | v[2c+1] << 4
    (low 4 bits of each code)."""
    n, nsb = v.shape[:2]
    return ((v[:, :, 0::2] & 15) | ((v[:, :, 1::2] & 15) << 4)).reshape(n, nsb, 128)


def _pack_crumbs(v: np.ndarray) -> np.ndarray:
    """[n, nsb, 4, 16, 4] 2-bit values -> [n, nsb, 64]: byte 4L + t, bits 2v..2v+1."""
    n, nsb = v.shape[:2]
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(n, nsb, 64)


def _crumbs(b: np.ndarray) -> np.ndarray:
    """Inverse of ``_pack_crumbs``: [n, nsb, 64] -> [n, nsb, 4, 16, 4]."""
    n, nsb = b.shape[:2]
    sh = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1, 1)
    return (b.reshape(n, nsb, 1, 16, 4) >> sh) & 3


def _pack_bits(v: np.ndarray) -> np.ndarray:
    """[n, nsb, 4, 16, 4] bits -> [n, nsb, 32]: byte 4L + t (L < 8), bit v for lane L and bit
    4 + v for lane L + 8 (the kernels widen it to 64 bytes with one shift)."""
    n, nsb = v.shape[:2]
    h = v.reshape(n, nsb, 4, 2, 8, 4) << (
        np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1, 1, 1) + np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1, 1)
    )
    return np.bitwise_or.reduce(h.reshape(n, nsb, 8, 8, 4), axis=2).reshape(n, nsb, 32)


def _bits(b: np.ndarray) -> np.ndarray:
    """Inverse of ``_pack_bits``: [n, nsb, 32] -> [n, nsb, 4, 16, 4]."""
    n, nsb = b.shape[:2]
    sh = np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1, 1, 1) + np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1, 1)
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
        nat, sc, d = (np.concatenate([a_, np.zeros((1, *a_.shape[1:]), a_.dtype)]) for a_ in (nat, np.asarray(sc), d))
    v = _pair_order(nat)
    q = aligned_empty((n2, nsb * _QB[qt]), np.uint8)
    q3 = q.reshape(n2 // 2, nsb, 2 * _QB[qt])
    q3[:, :, :256] = ((v[:, :, :, 0] & 15) | ((v[:, :, :, 1] & 15) << 4)).reshape(n2 // 2, nsb, 256)
    if qt == Q5_K:  # byte 4 lane + t, bit 2 v + h: bit 4 of code (v, h)
        hb = ((v >> 4) & 1) << _Q5_PLANE_BIT
        q3[:, :, 256:] = np.bitwise_or.reduce(hb.reshape(n2 // 2, nsb, 8, 64), axis=2)
    scp = np.asarray(sc).reshape(n2 // 2, 2, nsb, 2, 8).transpose(0, 2, 3, 1, 4)
    dp = d.reshape(n2 // 2, 2, nsb, 2).transpose(0, 2, 3, 1)
    return PackedKQ(
        q,
        np.ascontiguousarray(scp).reshape(n2, nsb * 16),
        np.ascontiguousarray(dp).reshape(n2, nsb * 2),
        n,
        nsb * QK,
        qt,
    )


def _packed(nat: np.ndarray, qt: int, sc: np.ndarray, d: np.ndarray) -> PackedKQ:
    """natural codes [n, nsb, 256] (unsigned), sc [n, nsb, 16] bytes, d [n, nsb, ND] f16 bits ->
    PackedKQ in the layout of the module docstring."""
    if qt in PAIR_TYPES:
        return _packed_pair(nat, qt, sc, d)
    n, nsb = nat.shape[:2]
    v = _to_kernel_order(nat)
    sc = np.asarray(sc)[:, :, LANE_GROUP]
    q = aligned_empty((n, nsb * _QB[qt]), np.uint8)
    q3 = q.reshape(n, nsb, _QB[qt])
    if qt in (Q2_K, Q3_K):
        q3[:, :, :64] = _pack_crumbs(v & 3)
        if qt == Q3_K:
            q3[:, :, 64:] = _pack_bits(v >> 2)
    else:
        q3[:, :, :128] = _nibbles(v)
        q3[:, :, 128:] = _pack_crumbs(v >> 4)
    return PackedKQ(
        q,
        np.ascontiguousarray(sc).reshape(n, nsb * 16),
        np.ascontiguousarray(d).view(np.uint16).reshape(n, nsb * _ND[qt]),
        n,
        nsb * QK,
        qt,
    )


PACK_ROWS = 4096  # rows packed at once: the vectorized packing's temporaries are several times
#   a piece's bytes (Qwen2.5-1.5B's 151936-row output matrix packed whole: ~1.5 GB of them)


def pack_kquant(raw2d, qtype: int) -> PackedKQ:
    """GGUF rows (uint8 [n_out, nsb * block bytes]) of a Q2_K, Q3_K, Q4_K, Q5_K or Q6_K matrix
    -> PackedKQ. Each type's file layout as ggml writes it (ggml-quants.c; gguf-py's
    dequantize, which ``test_kquant_kernels`` checks bit for bit through ``dequantize``).
    Packed PACK_ROWS rows at a time (rows are independent; pairs stay whole)."""
    qtype = int(qtype)
    if qtype not in _QB:
        raise ValueError(f"pack_kquant: qtype {qtype} is not a K-quant (Q2_K..Q6_K, 10..14)")
    n_out = raw2d.shape[0]
    if n_out <= PACK_ROWS:
        return _pack_rows(raw2d, qtype)
    first = _pack_rows(raw2d[:PACK_ROWS], qtype)
    n2 = _array_rows(qtype, n_out)
    out = [aligned_empty((n2, a.shape[1]), a.dtype) for a in (first.q, first.sc, first.d)]
    for r0 in range(0, n_out, PACK_ROWS):
        part = first if r0 == 0 else _pack_rows(raw2d[r0 : r0 + PACK_ROWS], qtype)
        for a, b in zip(out, (part.q, part.sc, part.d), strict=True):
            a[r0 : r0 + b.shape[0]] = b
    return PackedKQ(*out, n_out, first.n_in, qtype)


def _pack_rows(raw2d, qtype: int) -> PackedKQ:
    """`pack_kquant` of all of raw2d's rows at once."""
    r3 = gguf_blocks(raw2d, block_info(qtype)[1], "pack_kquant")
    n, nsb = r3.shape[:2]
    if qtype == Q2_K:  # scales[16] (scale | min << 4), qs[64], d, dmin
        return _packed(_split2(r3[:, :, 16:80], n, nsb), qtype, r3[:, :, :16], r3[:, :, 80:84])
    if qtype == Q3_K:  # hmask[32], qs[64], scales[12] (6-bit, biased by 32), d
        nat = _split2(r3[:, :, 32:96], n, nsb) | (_hbit(r3[:, :, :32], n, nsb) << 2)
        s = r3[:, :, 96:108]
        lo = np.concatenate([s[:, :, :8] & 15, s[:, :, :8] >> 4], axis=-1)
        hi = (s[:, :, 8:12].reshape(n, nsb, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)).reshape(
            n, nsb, 16
        ) & 3
        sc = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8).view(np.uint8)
        return _packed(nat, qtype, sc, r3[:, :, 108:110])
    if qtype == Q4_K:  # d, dmin, scales[12], qs[128]
        return _packed(_split4(r3[:, :, 16:], n, nsb), qtype, _q6bits(r3[:, :, 4:16]), r3[:, :, 0:4])
    if qtype == Q5_K:  # d, dmin, scales[12], qh[32], qs[128]
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
    _, bb, off = EXACT_INT8[qtype]  # block bytes, offset of d
    r3 = gguf_blocks(raw2d, bb, "ternary_as_q2_k")
    n, nsb = r3.shape[:2]
    out = np.empty((n, nsb, 84), np.uint8)
    out[:, :, :16] = 0x11
    if qtype == TQ2_0:
        out[:, :, 16:80] = r3[:, :, :64]
    else:
        t = (pack_exact_int8(r3.reshape(n, -1), qtype).qs + 1).view(np.uint8)
        t = t.reshape(n, nsb, 2, 4, 32)  # [row, sb, h, j, l]
        out[:, :, 16:80] = (
            (t << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1))
            .sum(axis=3, dtype=np.uint8)
            .reshape(n, nsb, 64)
        )
    out[:, :, 80:82] = r3[:, :, off : off + 2]
    out[:, :, 82:84] = r3[:, :, off : off + 2]
    return out.reshape(n, nsb * 84)
