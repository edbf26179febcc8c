"""Per-layer key/value cache with truncate (speculative decoding rolls back rejected tokens).

Keys and values are stored in half precision by default (as llama.cpp's default cache), as
their uint16 bits (numba has no float16 type; its kernels convert with `devices.cpu.kv_rows`), in
float32 (`kv_cache="f32"`: the reference path's, and exact comparisons'), or in 8 bits
(`kv_cache="q8_0"`, as llama.cpp's `-ctk q8_0 -ctv q8_0`): a row of d values is d int8 codes, a
block of 32 sharing a scale, followed by the blocks' float32 scales (d / 8 more bytes, read as
int8), value ~ scale * code. As llama.cpp does for a quantized cache, an 8-bit cache stores a
key rotated by the orthonormal Hadamard matrix H (`hadamard`; d a power of two), and the
attention rotates the queries the same way: q.k = Hq.Hk, and H spreads the few huge channels
of keys such as Qwen2's (from its k bias) over the whole row, so that they no longer set the
step of their blocks (the perplexity it saves: docs/kernels.md). Storage grows by doubling up
to the context length, so a 32k-token context costs nothing until used.
"""

from __future__ import annotations

import numpy as np

from ..errors import EmberError

HALF = np.uint16  # the storage of "f16": IEEE half bits
KV_TYPES = {"f16": HALF, "f32": np.float32, "q8_0": np.int8}
Q8_BLOCK = 32  # values sharing a scale in a "q8_0" row


def row_width(kv_type: str, d: int) -> int:
    """Elements of a cache row holding d values: d, or d codes and their scales' bytes (q8_0)."""
    if kv_type != "q8_0":
        return d
    if d % Q8_BLOCK:
        raise EmberError(f"kv_cache='q8_0' needs head sizes that are multiples of {Q8_BLOCK}, got {d}")
    return d + 4 * (d // Q8_BLOCK)


def to_q8(x: np.ndarray) -> np.ndarray:
    """float32 rows [..., d] -> q8_0 rows [..., d + d / 8] (int8): per block of 32 values the
    scale s = max |x| / 127 and codes rint(x / s) (rint(x * (1 / s)), as the kernels write them)."""
    x = np.asarray(x, np.float32)
    d = x.shape[-1]
    row_width("q8_0", d)
    b = x.reshape(*x.shape[:-1], d // Q8_BLOCK, Q8_BLOCK)
    s = np.abs(b).max(axis=-1) * np.float32(1 / 127)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
    codes = np.rint(b * inv[..., None]).astype(np.int8).reshape(x.shape)
    scales = np.ascontiguousarray(s, np.float32).view(np.int8).reshape(*x.shape[:-1], 4 * (d // Q8_BLOCK))
    return np.concatenate([codes, scales], axis=-1)


def from_q8(rows: np.ndarray) -> np.ndarray:
    """q8_0 rows [..., d + d / 8] (int8) -> float32 [..., d]."""
    rows = np.ascontiguousarray(rows)
    d = rows.shape[-1] * Q8_BLOCK // (Q8_BLOCK + 4)
    codes = rows[..., :d].astype(np.float32).reshape(*rows.shape[:-1], d // Q8_BLOCK, Q8_BLOCK)
    s = np.ascontiguousarray(rows[..., d:]).view(np.float32)
    return (codes * s[..., None]).reshape(*rows.shape[:-1], d)


def rotates(kv_type: str, d: int) -> bool:
    """Whether a cache of this type stores keys of d values rotated (`hadamard`)."""
    return kv_type == "q8_0" and d >= 2 and d & (d - 1) == 0


def hadamard(x: np.ndarray) -> np.ndarray:
    """x [..., d] times the orthonormal Hadamard matrix of order d (a power of two; symmetric,
    its own inverse), in float32: butterflies of strides 1, 2, 4, ... then times 1 / sqrt(d), as
    `devices.cpu.kv_rows.hadamard_row` computes it, bit for bit."""
    x = np.array(x, np.float32)
    d, h = x.shape[-1], 1
    while h < d:
        y = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :].copy(), y[..., 1, :].copy()
        y[..., 0, :], y[..., 1, :] = a + b, a - b
        h *= 2
    return x * np.float32(1 / np.sqrt(d))


def narrow(x: np.ndarray, kv_type: str, key: bool = False) -> np.ndarray:
    """float32 values (keys: key=True) in a cache's storage: halves' bits, q8_0 rows (keys
    rotated first, `rotates`), or float32."""
    if kv_type == "f32":
        return np.asarray(x, np.float32)
    if key and rotates(kv_type, x.shape[-1]):
        x = hadamard(x)
    return {"f16": to_half, "q8_0": to_q8}[kv_type](x)


def widen(rows: np.ndarray, kv_type: str, key: bool = False) -> np.ndarray:
    """A cache's stored rows (keys: key=True) as float32, keys rotated back."""
    if kv_type == "f32":
        return rows
    x = {"f16": from_half, "q8_0": from_q8}[kv_type](rows)
    return hadamard(x) if key and rotates(kv_type, x.shape[-1]) else x


def to_half(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bits of its nearest halves (ties to even)."""
    return np.asarray(x, np.float32).astype(np.float16).view(HALF)


def from_half(bits: np.ndarray) -> np.ndarray:
    """uint16 half bits -> float32, exactly."""
    return bits.view(np.float16).astype(np.float32)


class ContextFullError(EmberError):
    """More tokens than the context window holds."""


class KVCache:
    def __init__(
        self, n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int, max_len: int, kv_type: str = "f16"
    ):
        self.n_layer, self.n_head_kv, self.head_dim, self.head_dim_v = n_layer, n_head_kv, head_dim, head_dim_v
        self.max_len = max_len
        self.kv_type = kv_type
        self.dtype = KV_TYPES[kv_type]
        self.k_width, self.v_width = row_width(kv_type, head_dim), row_width(kv_type, head_dim_v)
        self.length = 0
        self._cap = 0
        self.k: list[np.ndarray] = []  # per layer, views of k_all / v_all
        self.v: list[np.ndarray] = []
        self.k_all = np.zeros((n_layer, n_head_kv, 0, self.k_width), self.dtype)  # [layer, head, pos, d]
        self.v_all = np.zeros((n_layer, n_head_kv, 0, self.v_width), self.dtype)

    def __len__(self) -> int:
        return self.length

    def _reserve(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = min(self.max_len, max(n, 2 * self._cap, 256))
        k_all = np.zeros((self.n_layer, self.n_head_kv, cap, self.k_width), self.dtype)
        v_all = np.zeros((self.n_layer, self.n_head_kv, cap, self.v_width), self.dtype)
        if self._cap:  # every position, committed or not: a batch run layer by layer commits last
            k_all[:, :, : self._cap] = self.k_all
            v_all[:, :, : self._cap] = self.v_all
        self.k_all, self.v_all, self._cap = k_all, v_all, cap
        self.k = list(k_all)
        self.v = list(v_all)

    def reserve(self, n: int) -> None:
        """Make room for n more positions (the fused decode step writes into k_all / v_all)."""
        self.check_room(n)
        self._reserve(self.length + n)

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ContextFullError(
                f"{self.length} tokens in the cache + {n} new ones exceed the context window of {self.max_len} tokens"
            )

    def store(self, il: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v ([n, n_head_kv, d], float32) after the committed positions (rounded to
        the cache's type: `narrow`); return all keys and values up to and including them
        ([n_head_kv, length + n, d], in the cache's type)."""
        n = k.shape[0]
        self.check_room(n)
        self._reserve(self.length + n)
        end = self.length + n
        self.k[il][:, self.length : end] = narrow(k.transpose(1, 0, 2), self.kv_type, key=True)
        self.v[il][:, self.length : end] = narrow(v.transpose(1, 0, 2), self.kv_type)
        return self.k[il][:, :end], self.v[il][:, :end]

    def floats(self, il: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer il's keys and values of positions < end as float32 ([n_head_kv, end, d])."""
        k, v = self.k[il][:, :end], self.v[il][:, :end]
        return widen(k, self.kv_type, key=True), widen(v, self.kv_type)

    def commit(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return self.k_all.nbytes + self.v_all.nbytes
