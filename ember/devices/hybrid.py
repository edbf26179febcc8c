"""The CPU's quantized matmuls with the attention and the KV cache on a GPU-style device
(`device="cpu+opencl"`, `"cpu+cuda:1"`, ...): the split ktransformers made popular. The weights
stay where ember's CPU kernels are fastest; what grows with the context (the cache, and the
attention that reads it every token) goes to the device.

A batch of up to MAX_ROWS rows runs as pieces of the fused CPU step (`FusedDecoder.step_rows`)
that meet at each attention: a piece runs layer l's output projection, residual and FFN, then
layer l + 1's norm and q/k/v projections (biases, q/k norms and RoPE done) and returns them
(`attn_out`); the device writes the keys and values into its cache and runs the attention
(`GpuDevice.attend_rows`), whose output starts the next piece (`attn_in`). One CPU call and one
device call a layer; the hand-off is the q, k and v rows up and the attention's output down (a
few KB a layer and row). A model or batch without the fused step runs the op-by-op forward with
the CPU's matmuls and the device's attention (`HybridOps`).
"""

from __future__ import annotations

import numpy as np

from ..errors import DeviceError
from ..runtime.kv_cache import KV_TYPES
from . import gpu_device
from .cpu import N_FUSED_STEPS, OPS, CpuDevice, blas_threads
from .cpu.step import MAX_ROWS


class HybridOps:
    """A Transformer's math with the CPU's matmuls and the device's attention (host arrays in
    and out: the op-by-op path)."""

    def __init__(self, gpu):
        self.gpu = gpu

    def matmul(self, x: np.ndarray, w, threads: int = 1) -> np.ndarray:
        return OPS.matmul(x, w, threads)

    def attention(self, q, cache, il: int, pos: np.ndarray, scale: float, window: int, threads: int = 1):
        return self.gpu.ops.attention(q, cache, il, pos, scale, window)


class _Positions:
    """What the fused step reads of a cache whose attention runs elsewhere: its length (the
    rows' positions); its arrays are empty, never read."""

    def __init__(self, model, cache):
        c = model.cfg
        dtype = KV_TYPES[model.kv_type]
        self.cache = cache
        self.k_all = np.zeros((c.n_layer, c.n_head_kv, 0, c.head_dim), dtype)
        self.v_all = np.zeros((c.n_layer, c.n_head_kv, 0, c.head_dim_v), dtype)

    @property
    def length(self) -> int:
        return self.cache.length

    def reserve(self, n: int) -> None:
        pass


class HybridDevice:
    """`spec`: "cpu+" and a GPU device ("cpu+opencl", "cpu+cuda:1"); `threads`: the CPU's."""

    def __init__(self, spec: str, threads: int | None = None, *, cpu: CpuDevice | None = None, gpu=None):
        head, plus, rest = spec.partition("+")
        if head != "cpu" or not plus:
            raise DeviceError(f"a hybrid device is 'cpu+' and a GPU device ('cpu+opencl', 'cpu+cuda:1'), got {spec!r}")
        self.name = spec
        self.cpu = cpu or CpuDevice(threads)
        self.gpu = gpu or gpu_device(rest, self.cpu.threads)
        self.threads = self.cpu.threads
        self.placement = self.cpu.placement
        self.ops = HybridOps(self.gpu)
        self._siblings: dict[int, HybridDevice] = {self.threads: self}

    def describe(self) -> str:
        return f"{self.name}: matmuls on {self.cpu.describe()}, attention on {self.gpu.describe()}"

    def with_threads(self, threads: int, model=None) -> HybridDevice:
        """This device with `threads` CPU threads (the same device, placement and caches)."""
        sib = self._siblings.get(threads)
        if sib is None:
            sib = HybridDevice(self.name, cpu=self.cpu.with_threads(threads, model), gpu=self.gpu)
            sib._siblings = self._siblings
            self._siblings[threads] = sib
        return sib

    def new_cache(self, model, n_ctx: int | None = None):
        return self.gpu.new_cache(model, n_ctx)

    def forward(self, model, ids, cache, *, all_logits: bool = True, layers: range | None = None) -> np.ndarray:
        layers = model.check_layers(layers)
        last = layers.stop == model.cfg.n_layer
        dec = self.cpu.decoder(model)
        n = len(ids)
        if dec is None or not (dec.multi_row or n <= N_FUSED_STEPS) or (not last and n > MAX_ROWS):
            with blas_threads(1):  # ops.matmul splits a batch between ember's threads
                return model.forward(ids, cache, all_logits=all_logits, threads=self.threads, layers=layers)
        parts = [
            self._rows(dec, model, ids[i : i + MAX_ROWS], cache, all_logits, layers) for i in range(0, n, MAX_ROWS)
        ]
        if not last:
            return parts[0]
        return np.concatenate(parts) if all_logits and len(parts) > 1 else parts[-1]

    def _rows(self, dec, model, rows, cache, all_logits: bool, layers: range) -> np.ndarray:
        """Up to MAX_ROWS rows through `layers`, a fused piece and a device attention a layer."""
        n = len(rows)
        cache.check_room(n)
        cache.reserve(n)
        at = _Positions(model, cache)
        l0, l1 = layers.start, layers.stop
        x = dec.step_rows(rows, at, layers=range(l0, l0 + 1), attn_out=True)
        for il in range(l0, l1):
            a = self.gpu.attend_rows(model, cache, il, dec.handoff_flat, dec.handoff_offsets, n)
            more = il + 1 < l1
            x = dec.step_rows(
                x, at, all_logits, range(il, il + 2 if more else il + 1), commit=False, attn_in=a, attn_out=more
            )
        if l1 == model.cfg.n_layer:
            cache.commit(n)
        return x
