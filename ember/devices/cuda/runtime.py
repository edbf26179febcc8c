"""CUDA plumbing: finding a GPU (`find`, `describe_devices`) through numba-cuda, and ember's
kernels' launches over device arrays (`Kernels`). Buffers are flat float32 device arrays, viewed
in the shapes a kernel takes; the KV cache's are float16 [n_kv, cap, d]. Launches go to the
default stream one after another; nothing waits until a read (`get`).
"""

from __future__ import annotations

import numpy as np

from ...errors import DeviceError


def _cuda():
    try:
        from numba import cuda
    except ImportError as e:
        raise DeviceError(f"device 'cuda' needs numba-cuda: pip install 'ember[cuda]' ({e})") from None
    return cuda


def why_missing() -> str | None:
    """Why no CUDA GPU can be used here (a driver, or a GPU, missing), or None."""
    try:
        cuda = _cuda()
    except DeviceError as e:
        return str(e)
    try:
        if cuda.is_available() and len(cuda.gpus):
            return None
        list(cuda.gpus)  # raises numba's reason: no driver library, no device, ...
    except Exception as e:  # numba's CudaSupportError and the driver's errors
        why = " ".join(str(e).split()).removeprefix("Error at driver init:").strip(" :")
        return f"no usable CUDA GPU ({why})"
    return "no usable CUDA GPU (numba-cuda found none)"


def _name(gpu) -> str:
    name = getattr(gpu, "name", None) or getattr(getattr(gpu, "_device", None), "name", None) or "CUDA GPU"
    return name.decode() if isinstance(name, bytes) else str(name)


def describe_devices() -> list[dict]:
    """The CUDA GPUs as `devices.available()` lists them (name: the `device=` value); [] when
    there is none."""
    if why_missing():
        return []
    cuda = _cuda()
    out = []
    for i, g in enumerate(cuda.gpus):
        with g:
            free, total = cuda.current_context().get_memory_info()
        mem = int(total) if np.isfinite(total) else None
        out.append({"name": f"cuda:{i}", "what": _name(g), "type": "GPU", "memory_bytes": mem})
    return out


def find(spec: str = "cuda"):
    """The GPU `spec` names: "cuda" (the first) or "cuda:N" (numba's N-th). DeviceError naming
    what was looked for when it is missing."""
    head, _, tail = spec.partition(":")
    if head != "cuda" or (tail and not tail.isdigit()):
        raise DeviceError(f"a CUDA device is 'cuda' or 'cuda:N', got {spec!r}")
    why = why_missing()
    if why:
        raise DeviceError(f"{spec}: {why}")
    cuda = _cuda()
    index = int(tail or 0)
    if index >= len(cuda.gpus):
        names = ", ".join(f"cuda:{i} {_name(g)}" for i, g in enumerate(cuda.gpus))
        raise DeviceError(f"{spec}: no such device; the CUDA devices here are {names}")
    return cuda.gpus[index]


def flat(buf, count: int):
    """The first `count` elements of a device array, as a flat view."""
    return buf.reshape(-1)[:count]


def view(buf, *shape: int):
    """The start of a flat device array viewed as `shape`."""
    return flat(buf, int(np.prod(shape))).reshape(shape)


class Kernels:
    """ember's CUDA kernels on one GPU (`gpu`, numba's context manager of the device: allocations
    activate it; launches run in the caller's, `CudaDevice.forward`)."""

    def __init__(self, gpu):
        from . import kernels as K

        self.cuda = _cuda()
        self.K = K
        self.gpu = gpu
        self.profile = False  # when set, every launch's and copy's GPU time is summed (`times`)
        self.times: dict[str, float] = {}  # seconds by kind: attention, matmul, other kernels, transfers
        self._events: list = []
        with gpu:
            self.dummy = self.buffer(4)  # the argument of an absent bias

    def buffer(self, nbytes: int):
        with self.gpu:
            return self.cuda.device_array(max(int(nbytes) // 4, 1), np.float32)

    def halves(self, *shape: int):
        with self.gpu:
            return self.cuda.device_array(shape, np.float16)

    def region(self, buf, offset: int, nbytes: int):
        size = buf.dtype.itemsize
        return buf.reshape(-1)[offset // size : (offset + nbytes) // size]

    def upload(self, host: np.ndarray):
        with self.gpu:
            return self.cuda.to_device(np.ascontiguousarray(host))

    def launch(self, kind: str, kernel, grid, block, *args) -> None:
        """kernel[grid, block](*args), its GPU time counted as `kind` when profiling."""
        self._timed(kind, lambda: kernel[grid, block](*args))

    def _timed(self, kind: str, work):
        """work(), its GPU time recorded as `kind` when profiling; its result."""
        if not self.profile:
            return work()
        a, b = self.cuda.event(), self.cuda.event()
        a.record()
        out = work()
        b.record()
        self._events.append((kind, a, b))
        return out

    def _tally(self) -> None:
        """Add the recorded launches' and copies' GPU times to `times` (after a read)."""
        for kind, a, b in self._events:
            b.synchronize()
            self.times[kind] = self.times.get(kind, 0.0) + a.elapsed_time(b) * 1e-3
        self._events.clear()

    def put(self, buf, host: np.ndarray, offset: int = 0) -> None:
        host = np.ascontiguousarray(host).reshape(-1)
        dst = self.region(buf, offset, host.nbytes)
        self._timed("transfers", lambda: dst.copy_to_device(host))

    def get(self, buf, shape, dtype=np.float32, offset: int = 0) -> np.ndarray:
        src = self.region(buf, offset, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        host = self._timed("transfers", src.copy_to_host)
        self._tally()
        return host.view(dtype).reshape(shape)

    def copy(self, dst, src, nbytes: int, dst_offset: int = 0, src_offset: int = 0) -> None:
        part = self.region(src, src_offset, nbytes)
        self._timed("transfers", lambda: self.region(dst, dst_offset, nbytes).copy_to_device(part))

    def matmul(self, w, x, n: int, y, bias=None) -> None:
        """y [n, w.n_out] = x [n, w.n_in] @ w.T (+ bias), all device arrays."""
        self._timed("matmul", lambda: self._matmul(w, x, n, y, bias))

    def _matmul(self, w, x, n: int, y, bias) -> None:
        self.K.matmul(
            w.kind,
            w.buf,
            w.row_bytes,
            w.n_in,
            view(x, n, w.n_in),
            n,
            view(y, n, w.n_out),
            w.n_out,
            self.dummy if bias is None else bias,
            bias is not None,
        )

    def kv_store(self, k, v, kc, vc, n: int, cache) -> None:
        """Keys and values [n, n_kv, d] (float32) into a layer's cache (kc, vc) at its length."""
        c, K = cache, self.K
        threads = n * c.n_head_kv * max(c.head_dim, c.head_dim_v)
        k3, v3 = view(k, n, c.n_head_kv, c.head_dim), view(v, n, c.n_head_kv, c.head_dim_v)
        self.launch("attention", K.kv_store, -(-threads // K.WG), K.WG, k3, v3, kc, vc, c.length)
