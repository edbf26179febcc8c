"""Per-layer key/value cache with truncate (speculative decoding rolls back rejected tokens).

Storage grows by doubling up to the context length, so a 32k-token context costs nothing until used.
"""

from __future__ import annotations

import numpy as np

from ..errors import EmberError


class ContextFullError(EmberError):
    """More tokens than the context window holds."""


class KVCache:
    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int, max_len: int):
        self.n_layer, self.n_head_kv, self.head_dim, self.head_dim_v = n_layer, n_head_kv, head_dim, head_dim_v
        self.max_len = max_len
        self.length = 0
        self._cap = 0
        self.k: list[np.ndarray] = []  # per layer, views of k_all / v_all
        self.v: list[np.ndarray] = []
        self.k_all = np.zeros((n_layer, n_head_kv, 0, head_dim), np.float32)  # [layer, head, pos, d]
        self.v_all = np.zeros((n_layer, n_head_kv, 0, head_dim_v), np.float32)

    def __len__(self) -> int:
        return self.length

    def _reserve(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = min(self.max_len, max(n, 2 * self._cap, 256))
        k_all = np.zeros((self.n_layer, self.n_head_kv, cap, self.head_dim), np.float32)
        v_all = np.zeros((self.n_layer, self.n_head_kv, cap, self.head_dim_v), np.float32)
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
        """Write k, v ([n, n_head_kv, d]) after the committed positions; return all keys and values
        up to and including them ([n_head_kv, length + n, d])."""
        n = k.shape[0]
        self.check_room(n)
        self._reserve(self.length + n)
        end = self.length + n
        self.k[il][:, self.length : end] = k.transpose(1, 0, 2)
        self.v[il][:, self.length : end] = v.transpose(1, 0, 2)
        return self.k[il][:, :end], self.v[il][:, :end]

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
