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
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def __len__(self) -> int:
        return self.length

    def _reserve(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = min(self.max_len, max(n, 2 * self._cap, 256))
        shape_k = (self.n_head_kv, cap, self.head_dim)
        shape_v = (self.n_head_kv, cap, self.head_dim_v)
        new_k = [np.zeros(shape_k, np.float32) for _ in range(self.n_layer)]
        new_v = [np.zeros(shape_v, np.float32) for _ in range(self.n_layer)]
        for il in range(len(self.k)):
            new_k[il][:, : self.length] = self.k[il][:, : self.length]
            new_v[il][:, : self.length] = self.v[il][:, : self.length]
        self.k, self.v, self._cap = new_k, new_v, cap

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
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)
