"""The CUDA device: a whole dense model on an NVIDIA GPU through numba-cuda, its KV cache there in
half precision.

The forward is `gpu.GpuDevice`'s; this module supplies its primitives as the numba.cuda kernels
of `kernels.py` (the same math and launch shapes as the OpenCL device's group-per-row kernels).
Without a GPU they run under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which the tests use.
"""

from __future__ import annotations

import numpy as np

from ..gpu import GpuDevice, GpuKVCache
from .runtime import Kernels, find, flat, view

SPLIT = 256  # keys per attention block: a decode step at 4096 keys runs 16 splits a head


class CudaDevice(GpuDevice):
    """One CUDA GPU (`spec`: "cuda" or "cuda:N", see `runtime.find`). `split`: keys per
    attention block."""

    kind = "CUDA"

    def __init__(self, spec: str = "cuda", threads: int | None = None, split: int = SPLIT):
        self.gpu = find(spec)
        kernels = Kernels(self.gpu)
        super().__init__(spec, threads, kernels, split)
        K = kernels.K
        self.max_group, self.max_head_dim = K.MAXG, min(K.MAXD, K.MAXDPT * K.WG)

    def describe(self) -> str:
        from .runtime import _name

        return f"{self.name}: {_name(self.gpu)} (CUDA)"

    def new_cache(self, model, n_ctx: int | None = None) -> GpuKVCache:
        with self.gpu:
            return super().new_cache(model, n_ctx)

    def attend_rows(self, model, cache: GpuKVCache, il: int, flat: np.ndarray, offsets, n: int) -> np.ndarray:
        with self.gpu:
            return super().attend_rows(model, cache, il, flat, offsets, n)

    def forward(self, model, ids, cache, *, all_logits: bool = True, layers: range | None = None):
        with self.gpu:  # numba's contexts are per thread: a generation may run on another
            return super().forward(model, ids, cache, all_logits=all_logits, layers=layers)

    def norm(self, buf, w, rows: int, width: int, eps: float, out=None) -> None:
        kn = self.kernels
        y = view(buf if out is None else out, rows, width)
        kn.launch("other", kn.K.rms_norm, rows, kn.K.WG, view(buf, rows, width), w, y, np.float32(eps))

    def rope(self, buf, cos, sin, n: int, heads: int, head_dim: int, half: int, neox: bool) -> None:
        kn = self.kernels
        blocks = -(-n * heads * half // kn.K.WG)
        kn.launch("other", kn.K.rope, blocks, kn.K.WG, view(buf, n, heads, head_dim), cos, sin, neox)

    def add(self, x, y, count: int) -> None:
        kn = self.kernels
        kn.launch("other", kn.K.add, -(-count // kn.K.WG), kn.K.WG, flat(x, count), flat(y, count))

    def glu(self, g, u, count: int, gelu: bool) -> None:
        kn = self.kernels
        kn.launch("other", kn.K.glu, -(-count // kn.K.WG), kn.K.WG, flat(g, count), flat(u, count), gelu)

    def attention(self, q, cache: GpuKVCache, il: int, n: int, n_head: int, pos0: int, scale: float, window: int, out):
        """Split-K over `split` keys a block, then a merge."""
        kn, c = self.kernels, cache
        K = kn.K
        with self.gpu:
            n_split, parts, ml = self.split_sums(cache, n, n_head, pos0)
            op, mls = view(parts, n, n_head, n_split, c.head_dim_v), view(ml, n, n_head, n_split, 2)
            q3 = view(q, n, n_head, c.head_dim)
            args = (q3, c.kc[il], c.vc[il], pos0, window, np.float32(scale), self.split, op, mls)
            kn.launch("attention", K.attn_split, (n * c.n_head_kv, n_split), K.WG, *args)
            o = view(out, n, n_head, c.head_dim_v)
            kn.launch("attention", K.attn_merge, -(-n * n_head * c.head_dim_v // K.WG), K.WG, op, mls, o)
