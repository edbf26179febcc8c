"""Repack GGUF Q4_0 / Q4_1 matrices into the bit-plane layout of the table-lookup kernels.

Layout of ``PackedQ4`` (``tile`` rows per tile, default 64; ``nb = n_in // 32`` blocks per row;
``n_tiles = ceil(n_out / tile)``; padding rows have zero codes, scales and mins):

``codes``  uint8   [n_tiles, nb, 4, tile, 4]  indexed [t, b, gp, r, p]
    Bit-plane ``p`` (0..3) of the 4-bit codes of row ``t * tile + r``, block ``b``, for the
    group pair ``gp`` (0..3). Low nibble bit ``j`` = bit ``p`` of weight ``4 gp + j``, high
    nibble bit ``j`` = bit ``p`` of weight ``16 + 4 gp + j`` (so group ``gp`` indexes a table
    with the low nibble and group ``gp + 4`` with the high nibble). This is the GGUF byte
    order turned on its side: GGUF keeps weight ``j`` in the low nibble of ``qs[j]`` and weight
    ``j + 16`` in its high nibble, hence ``byte(gp, p) = sum_j ((qs[4 gp + j] >> p) & 0x11) << j``.
    The 4 planes of one row sit in 4 neighbouring bytes, 16 rows fill 64 bytes (one zmm), and
    one (block, group pair) of a tile is ``4 * tile`` contiguous bytes.
``dm``     uint16 [n_tiles, nb, S, tile]  S = 1 (Q4_0): the block scales ``d``; S = 2 (Q4_1):
    ``d`` then the block mins ``m``, as the file's IEEE half bits (the kernels widen 16 of them
    with one ``vcvtph2ps``). ``p.d`` / ``p.m`` are their float32 values, [n_tiles, nb, tile]
    (``p.m`` is None for Q4_0, whose zero-point is the implicit 8: value
    ``(q - 8) * d``; Q4_1: ``q * d + m``). One (tile, block) step of the kernel reads
    ``16 * tile`` bytes of codes and ``2 * S * tile`` bytes of ``dm``, both sequential.

Both arrays are plain C-contiguous numpy arrays, allocated 64-byte aligned (a zmm load of codes
never straddles two cache lines; unaligned copies measured 10-20 % slower in cache).
``np.savez(path, **p.arrays())`` / ``PackedQ4.from_arrays(np.load(path))`` store and restore
it (``from_arrays`` re-aligns). Bytes a matvec streams per weight: 0.5 (codes) + 2/32 (``d``)
(+ 2/32 ``m``) = 0.5625 B for Q4_0, 0.625 B for Q4_1: exactly GGUF's. (float32 scales cost
11 % / 20 % more traffic; SmolLM2's decode read 112 MB per token with them, 97 MB without.)

Repacking is one numba pass (a 256-entry table spreads each qs byte's 4 planes into a word),
single-threaded, median of 7, dev box (2 vCPUs, load 0.6-1.0): 1536x576 0.33-0.38 ms,
49152x576 (the size of SmolLM2's output matrix) 13-23 ms, Q4_0 and Q4_1 alike (~1 GB/s of
GGUF input). ``unpack_q4`` inverts it to the original GGUF bytes, bit for bit (tested; only a
NaN scale would come back as a NaN with another payload).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = [
    "PackedQ4",
    "half_to_f32",
    "pack_q4",
    "unpack_q4",
    "aligned",
    "aligned_empty",
    "Q4_0",
    "Q4_1",
    "DEFAULT_TILE",
    "gguf_blocks",
    "tree_sum",
    "stored_arrays",
    "stored_meta",
]

Q4_0 = 2  # GGMLQuantizationType values
Q4_1 = 3
DEFAULT_TILE = 64
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20}


def gguf_blocks(raw2d, block_bytes: int, name: str) -> np.ndarray:
    """A matrix's GGUF rows (uint8 [n_out, nb * block_bytes], or any dtype viewed as bytes) as
    uint8 [n_out, nb, block_bytes]; ValueError naming ``name`` for any other shape."""
    raw = np.asarray(raw2d)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    if raw.ndim != 2 or raw.shape[1] % block_bytes or raw.shape[1] == 0:
        raise ValueError(f"{name}: expected uint8 [n_out, n_blocks * {block_bytes}], got {raw.dtype} {raw.shape}")
    return raw.reshape(raw.shape[0], raw.shape[1] // block_bytes, block_bytes)


def stored_arrays(a, what: str, names: tuple, shapes: dict) -> list:
    """The arrays ``names`` of a stored layout (an ``np.load`` result or a dict) after checking
    each against ``shapes[name] = (shape, dtype)``; ValueError naming ``what`` otherwise."""
    out = []
    for nm in names:
        try:
            arr = np.asarray(a[nm])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{what}.from_arrays: missing or malformed arrays ({e})") from None
        shape, dt = shapes[nm]
        if arr.shape != tuple(shape) or arr.dtype != dt:
            raise ValueError(
                f"{what}.from_arrays: {nm} is {arr.dtype} {arr.shape}, expected {np.dtype(dt)} {tuple(shape)}"
            )
        out.append(arr)
    return out


def stored_meta(a, what: str, n: int) -> tuple:
    """The ``n`` integers of a stored layout's ``meta`` array; ValueError naming ``what``."""
    try:
        meta = tuple(int(v) for v in np.asarray(a["meta"]).reshape(-1))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{what}.from_arrays: missing or malformed arrays ({e})") from None
    if len(meta) != n:
        raise ValueError(f"{what}.from_arrays: bad meta {list(meta)}")
    return meta


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an ``align``-byte boundary
    (full-width vector loads of the codes then never straddle two cache lines)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start : start + n].view(dtype).reshape(shape)


def aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """``a`` itself when it is C-contiguous and aligned, else an aligned copy."""
    if a.flags.c_contiguous and a.ctypes.data % align == 0:
        return a
    out = aligned_empty(a.shape, a.dtype, align)
    out[...] = a
    return out


@dataclass
class PackedQ4:
    """A Q4_0/Q4_1 matrix [n_out, n_in] in the kernel layout (see the module docstring)."""

    codes: np.ndarray
    dm: np.ndarray
    n_out: int
    n_in: int
    qtype: int
    tile: int = DEFAULT_TILE

    @property
    def n_tiles(self) -> int:
        return self.codes.shape[0]

    @property
    def d(self) -> np.ndarray:
        return self.dm[:, :, 0, :].view(np.float16).astype(np.float32)

    @property
    def m(self):
        return self.dm[:, :, 1, :].view(np.float16).astype(np.float32) if self.dm.shape[2] > 1 else None

    @property
    def n_blocks(self) -> int:
        return self.n_in // 32

    @property
    def nbytes(self) -> int:
        """Bytes a matvec streams: codes + scales (+ mins)."""
        return self.codes.nbytes + self.dm.nbytes

    def arrays(self) -> dict:
        """Everything as numpy arrays, for ``np.savez``."""
        return {
            "codes": self.codes,
            "dm": self.dm,
            "meta": np.array([self.n_out, self.n_in, self.qtype, self.tile], np.int64),
        }

    @classmethod
    def from_arrays(cls, arrs) -> PackedQ4:
        n_out, n_in, qtype, tile = (int(v) for v in arrs["meta"])
        codes, dm = np.asarray(arrs["codes"]), np.asarray(arrs["dm"])
        nb, S = n_in // 32, 2 if qtype == Q4_1 else 1
        n_tiles = -(-n_out // tile) if tile > 0 else -1
        if (
            codes.dtype != np.uint8
            or dm.dtype != np.uint16
            or n_in % 32
            or n_tiles < 0
            or codes.shape != (n_tiles, nb, 4, tile, 4)
            or dm.shape != (n_tiles, nb, S, tile)
        ):
            raise ValueError("PackedQ4: inconsistent codes / dm arrays")
        return cls(aligned(codes), aligned(dm), n_out, n_in, qtype, tile)


# _SPREAD[q]: the 4 bit-planes of one qs byte q, plane p in byte p of the word, as 2 bits:
# bit 0 = bit p of q's low nibble, bit 4 = bit p of its high nibble.
_SPREAD = np.array([sum(((q >> p) & 0x11) << (8 * p) for p in range(4)) for q in range(256)], np.uint32)


@njit(cache=True, nogil=True, inline="always")
def half_to_f32(h):
    """The IEEE half with bits h -> float32, exactly (NaN stays NaN)."""
    h = np.int32(h)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    elif e == 0:
        v = np.float32(m) * np.float32(2.0**-24)
    else:
        v = (np.float32(m | 0x400) * np.float32(np.int32(1) << (e - 1))) * np.float32(2.0**-24)
    return -v if h & 0x8000 else v


@njit(cache=True, nogil=True, inline="always")
def tree_sum(acc):
    """The sum of acc (a power-of-two number of float32 lanes) as a tree of halves, in place:
    the portable kernels' fixed rounding order."""
    n = acc.size
    while n > 1:
        n //= 2
        for j in range(n):
            acc[j] = acc[j] + acc[j + n]
    return acc[0]


@njit(cache=True, nogil=True, inline="always")
def absmax_scale(x, o, n, qmax):
    """(qmax / amax, amax / qmax) of x[o : o + n], both 0 when every value is 0: the factor
    that maps a block of activations onto +-qmax, and the block's scale."""
    amax = np.float32(0.0)
    for j in range(n):
        v = abs(x[o + j])
        amax = v if v > amax else amax
    if amax > 0:
        return qmax / amax, amax / qmax
    return np.float32(0.0), np.float32(0.0)


@njit(cache=True, nogil=True)
def _pack(blk, qoff, codes32, dm):
    """blk: uint8 [n_out, nb, block_bytes] -> codes32: uint32 [t, b, gp, r], dm [t, b, S, r].

    Word (t, b, gp, r) holds the 4 plane bytes of one row and group pair:
    ``spread(qs[4 gp]) | spread(qs[4 gp + 1]) << 1 | ... << 3``.
    """
    n_out, nb = blk.shape[0], blk.shape[1]
    tile = codes32.shape[3]
    S = dm.shape[2]
    spread = _SPREAD
    for row in range(n_out):
        t = row // tile
        r = row - t * tile
        src = blk[row]
        for b in range(nb):
            dm[t, b, 0, r] = np.uint16(src[b, 0]) | (np.uint16(src[b, 1]) << np.uint16(8))
            if S == 2:
                dm[t, b, 1, r] = np.uint16(src[b, 2]) | (np.uint16(src[b, 3]) << np.uint16(8))
            for gp in range(4):
                o = qoff + 4 * gp
                codes32[t, b, gp, r] = (
                    spread[src[b, o]]
                    | (spread[src[b, o + 1]] << 1)
                    | (spread[src[b, o + 2]] << 2)
                    | (spread[src[b, o + 3]] << 3)
                )


@njit(cache=True, nogil=True)
def _unpack_codes(codes, n_out, qoff, blk):
    tile = codes.shape[3]
    nb = codes.shape[1]
    one = np.uint8(0x11)
    for row in range(n_out):
        t = row // tile
        r = row - t * tile
        for b in range(nb):
            for gp in range(4):
                for j in range(4):
                    q = np.uint8(0)
                    for p in range(4):
                        q |= ((codes[t, b, gp, r, p] >> j) & one) << p
                    blk[row, b, qoff + 4 * gp + j] = q


def pack_q4(raw2d: np.ndarray, qtype: int, tile: int = DEFAULT_TILE) -> PackedQ4:
    """GGUF rows (uint8 [n_out, row_bytes]) of a Q4_0 (2) or Q4_1 (3) matrix -> ``PackedQ4``."""
    qtype = int(qtype)
    if qtype not in _BLOCK_BYTES:
        raise ValueError(f"pack_q4 handles Q4_0 (2) and Q4_1 (3), not type {qtype}")
    if tile % 16 or tile <= 0:
        raise ValueError("tile must be a positive multiple of 16")
    raw2d = np.asarray(raw2d)
    if raw2d.dtype != np.uint8:
        raw2d = raw2d.view(np.uint8)
    bb = _BLOCK_BYTES[qtype]
    if raw2d.ndim != 2 or raw2d.shape[1] % bb or raw2d.shape[1] == 0:
        raise ValueError(f"expected uint8 [n_out, nb * {bb}], got {raw2d.shape}")
    n_out, nb = raw2d.shape[0], raw2d.shape[1] // bb
    n_tiles = -(-n_out // tile)
    blk = np.ascontiguousarray(raw2d).reshape(n_out, nb, bb)
    S = 2 if qtype == Q4_1 else 1
    codes = aligned_empty((n_tiles, nb, 4, tile, 4), np.uint8)
    dm = aligned_empty((n_tiles, nb, S, tile), np.uint16)
    if n_out % tile:
        codes[-1] = 0
        dm[-1] = 0
    _pack(blk, bb - 16, codes.view(np.uint32).reshape(codes.shape[:4]), dm)
    return PackedQ4(codes, dm, n_out, nb * 32, qtype, tile)


def unpack_q4(p: PackedQ4) -> np.ndarray:
    """Inverse of ``pack_q4``: the GGUF rows, uint8 [n_out, row_bytes] (bit-identical)."""
    bb = _BLOCK_BYTES[p.qtype]
    nb = p.n_blocks
    blk = np.empty((p.n_out, nb, bb), np.uint8)
    _unpack_codes(p.codes, p.n_out, bb - 16, blk)

    f = p.dm.transpose(0, 3, 1, 2).reshape(-1, nb, p.dm.shape[2])[: p.n_out]
    blk[:, :, 0 : 2 * f.shape[2]] = np.ascontiguousarray(f).view(np.uint8).reshape(p.n_out, nb, -1)
    return blk.reshape(p.n_out, nb * bb)
