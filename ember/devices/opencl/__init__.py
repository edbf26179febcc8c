"""The OpenCL device: a whole dense model on an OpenCL device (a GPU, or the CPU through PoCL),
its KV cache there in half precision.

The forward is `gpu.GpuDevice`'s; this module supplies its primitives as OpenCL kernels
(`kernels.cl`), enqueued one after another on one in-order queue (`runtime.Kernels`): nothing
waits until the logits (or a layer range's hidden state) are read back.
"""

from __future__ import annotations

import numpy as np

from ..gpu import GpuDevice, GpuKVCache
from .runtime import MAX_HEAD_DIM, MAXDPT, MAXG, RWG, WG, Kernels, find

SPLIT = 256  # keys per attention work-group: a decode step at 4096 keys runs 16 splits a head


class OpenCLDevice(GpuDevice):
    """One OpenCL device (`spec`: "opencl" or "opencl:N", see `runtime.find`). `split`: keys per
    attention work-group."""

    kind = "OpenCL"
    max_group = MAXG
    max_head_dim = min(MAX_HEAD_DIM, MAXDPT * WG)

    def __init__(self, spec: str = "opencl", threads: int | None = None, split: int = SPLIT):
        self.cl_device = find(spec)
        super().__init__(spec, threads, Kernels(self.cl_device), split)

    def describe(self) -> str:
        d = self.cl_device
        return f"{self.name}: {d.name.strip()} ({d.platform.name.strip()})"

    def norm(self, buf, w, rows: int, width: int, eps: float, out=None) -> None:
        self.kernels.run(
            "rms_norm", (rows * WG,), (WG,), buf, w, buf if out is None else out, np.int32(width), np.float32(eps)
        )

    def rope(self, buf, cos, sin, n: int, heads: int, head_dim: int, half: int, neox: bool) -> None:
        args = (np.int32(heads), np.int32(head_dim), np.int32(half), np.int32(neox))
        self.kernels.run("rope", (n * heads * half,), None, buf, cos, sin, *args)

    def add(self, x, y, count: int) -> None:
        self.kernels.run("add", (count,), None, x, y)

    def glu(self, g, u, count: int, gelu: bool) -> None:
        self.kernels.run("glu", (count,), None, g, u, np.int32(gelu))

    def attention(self, q, cache: GpuKVCache, il: int, n: int, n_head: int, pos0: int, scale: float, window: int, out):
        """Split-K over `split` keys a work-group (a work-item on a CPU device), then a merge."""
        kn, c = self.kernels, cache
        n_split, parts, ml = self.split_sums(cache, n, n_head, pos0)
        if kn.by_rows:
            shape, local, extra = (-(-n * n_head // RWG) * RWG, n_split), (RWG, 1), (np.int32(n * n_head),)
        else:
            shape, local, extra = (WG, n * c.n_head_kv, n_split), (WG, 1, 1), ()
        kn.run(
            "attn_rows" if kn.by_rows else "attn_split",
            shape,
            local,
            q,
            c.kc[il],
            c.vc[il],
            *(np.int32(a) for a in (n_head, c.n_head_kv, c.head_dim, c.head_dim_v, c.cap, pos0, window)),
            np.float32(scale),
            np.int32(self.split),
            parts,
            ml,
            *extra,
        )
        kn.run(
            "attn_merge", (c.head_dim_v, n * n_head), None, parts, ml, np.int32(n_split), np.int32(c.head_dim_v), out
        )
