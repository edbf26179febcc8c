"""Per-layer key/value cache with truncate (speculative decoding rolls back rejected tokens).

Keys and values are stored in half precision by default (as llama.cpp's default cache), as
their uint16 bits (numba has no float16 type; its kernels convert with `devices.cpu.half`), or
in float32 (`kv_cache="f32"`: the reference path's, and exact comparisons'). Storage grows by
doubling up to the context length, so a 32k-token context costs nothing until used.
"""

from __future__ import annotations

import numpy as np

from ..errors import EmberError

HALF = np.uint16  # the storage of "f16": IEEE half bits
KV_TYPES = {"f16": HALF, "f32": np.float32}


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
        self.dtype = KV_TYPES[kv_type]
        self.length = 0
        self._cap = 0
        self.k: list[np.ndarray] = []  # per layer, views of k_all / v_all
        self.v: list[np.ndarray] = []
        self.k_all = np.zeros((n_layer, n_head_kv, 0, head_dim), self.dtype)  # [layer, head, pos, d]
        self.v_all = np.zeros((n_layer, n_head_kv, 0, head_dim_v), self.dtype)

    def __len__(self) -> int:
        return self.length

    def _reserve(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = min(self.max_len, max(n, 2 * self._cap, 256))
        k_all = np.zeros((self.n_layer, self.n_head_kv, cap, self.head_dim), self.dtype)
        v_all = np.zeros((self.n_layer, self.n_head_kv, cap, self.head_dim_v), self.dtype)
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
        halves in an f16 cache); return all keys and values up to and including them
        ([n_head_kv, length + n, d], in the cache's type)."""
        n = k.shape[0]
        self.check_room(n)
        self._reserve(self.length + n)
        end = self.length + n
        narrow = to_half if self.dtype == HALF else np.asarray
        self.k[il][:, self.length : end] = narrow(k.transpose(1, 0, 2))
        self.v[il][:, self.length : end] = narrow(v.transpose(1, 0, 2))
        return self.k[il][:, :end], self.v[il][:, :end]

    def floats(self, il: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer il's keys and values of positions < end as float32 ([n_head_kv, end, d])."""
        k, v = self.k[il][:, :end], self.v[il][:, :end]
        return (from_half(k), from_half(v)) if self.dtype == HALF else (k, v)

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
