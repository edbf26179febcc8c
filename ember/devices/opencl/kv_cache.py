"""The KV cache on an OpenCL device: per layer, keys [n_kv, cap, head_dim] and values
[n_kv, cap, head_dim_v] in half precision, grown by doubling up to the context length (a grown
cache copies each head's positions); `truncate` rolls back by moving the length, as on the CPU."""

from __future__ import annotations

import numpy as np

from ...runtime.kv_cache import KVCache, from_half


class ClKVCache(KVCache):
    """KVCache's length, room and rollback; its storage on the device (`kernels`' buffers)."""

    def __init__(self, kernels, n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int, max_len: int):
        super().__init__(n_layer, n_head_kv, head_dim, head_dim_v, max_len)
        self.kernels = kernels
        self.cap = 0
        self.kc: list = []  # per layer, device buffers
        self.vc: list = []

    def _reserve(self, n: int) -> None:
        if n <= self.cap:
            return
        cap = min(self.max_len, max(n, 2 * self.cap, 256))
        kn = self.kernels
        new = []
        for bufs, dim in ((self.kc, self.head_dim), (self.vc, self.head_dim_v)):
            grown = [kn.buffer(self.n_head_kv * cap * dim * 2) for _ in range(self.n_layer)]
            if self.cap:  # every position, committed or not: a batch run layer by layer commits last
                for old, buf in zip(bufs, grown):
                    for h in range(self.n_head_kv):
                        kn.copy(buf, old, self.cap * dim * 2, h * cap * dim * 2, h * self.cap * dim * 2)
            new.append(grown)
        self.kc, self.vc = new
        self.cap = cap

    def write(self, il: int, k, v, n: int) -> None:
        """Keys and values of n new positions (device buffers [n, n_kv, d], float32) after the
        committed ones, rounded to halves."""
        self.check_room(n)
        self._reserve(self.length + n)
        c = self
        self.kernels.run(
            "kv_store",
            (n * c.n_head_kv * max(c.head_dim, c.head_dim_v),),
            None,
            k,
            v,
            self.kc[il],
            self.vc[il],
            *(np.int32(a) for a in (c.n_head_kv, c.head_dim, c.head_dim_v, self.cap, self.length)),
        )

    def store(self, il: int, k: np.ndarray, v: np.ndarray) -> None:
        """KVCache.store from the host (the op-by-op path): k, v [n, n_head_kv, d], float32."""
        kn = self.kernels
        self.write(il, kn.upload(np.asarray(k, np.float32)), kn.upload(np.asarray(v, np.float32)), k.shape[0])

    def floats(self, il: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer il's keys and values of positions < end as float32 ([n_head_kv, end, d]), read back."""
        kn = self.kernels
        k = kn.get(self.kc[il], (self.n_head_kv, self.cap, self.head_dim), np.uint16)[:, :end]
        v = kn.get(self.vc[il], (self.n_head_kv, self.cap, self.head_dim_v), np.uint16)[:, :end]
        return from_half(k), from_half(v)

    def nbytes(self) -> int:
        return 2 * self.n_layer * self.n_head_kv * self.cap * (self.head_dim + self.head_dim_v)
