"""OpenCL plumbing: finding a device (`find`), building ember's kernels for it (`Kernels`), and
the kernels' launches over its buffers. Matrices go to the device as their GGUF rows, unchanged
(`gpu.GpuPlacement`): the kernels decode the blocks as they multiply (`kernels.cl`).
"""

from __future__ import annotations

import os
import re
from importlib import resources

import numpy as np

from ...errors import DeviceError
from ..gpu import GpuMatrix

WG = 64  # work-group size of every kernel
RWG = 8  # work-group size of the work-item-per-head attention (its items' private vectors share a stack)
ROWS = 8  # activation rows one matmul work-group multiplies
MAXG = 16  # query heads per key/value head, at most
MAXDPT = 4  # value dims per attention work-item, at most: head_dim_v <= MAXDPT * WG
KEY_TILE = 16  # keys the work-item-per-head attention scores before it rescales
MAX_HEAD_DIM = 256  # the attention keeps one query row of each head in local memory

# what a kernel's time counts as (`Kernels.times`), by its name's first word
_KIND = {"matmul": "matmul", "matrows": "matmul", "attn": "attention", "kv": "attention"}


class CompilerTargetError(DeviceError):
    """The OpenCL platform's compiler cannot target this machine's CPU: PoCL 3.0's LLVM 14
    (pyopencl's wheel) knows no CPU newer than Zen 3 / Sapphire Rapids and gives up on a Zen 5
    ("unknown target CPU 'generic'"). The device is listed but cannot run ember's kernels."""


def usable(spec: str = "opencl") -> str | None:
    """Why ember's kernels cannot run on the OpenCL device `spec` (the DeviceError's message),
    or None when they build there."""
    try:
        Kernels(find(spec))
    except DeviceError as e:
        return str(e)
    return None


def _cl():
    try:
        import pyopencl as cl
    except ImportError as e:
        raise DeviceError(f"device 'opencl' needs pyopencl: pip install 'ember[opencl]' ({e})") from None
    return cl


def list_devices() -> list:
    """Every OpenCL device of every platform, GPUs first (pyopencl.Device objects); [] when
    there is no platform."""
    cl = _cl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # "platform not found": no ICD is installed
        return []
    found = [d for p in platforms for d in p.get_devices()]
    return sorted(found, key=lambda d: not d.type & cl.device_type.GPU)


def describe_devices() -> list[dict]:
    """`list_devices()` as `devices.available()` lists them: name (the `device=` value), what it
    is, its platform, type, compute units and memory."""
    cl = _cl()
    return [
        {
            "name": f"opencl:{i}",
            "what": d.name.strip(),
            "platform": d.platform.name.strip(),
            "type": "GPU" if d.type & cl.device_type.GPU else "CPU" if d.type & cl.device_type.CPU else "other",
            "compute_units": d.max_compute_units,
            "memory_bytes": d.global_mem_size,
        }
        for i, d in enumerate(list_devices())
    ]


def find(spec: str = "opencl"):
    """The device `spec` names: "opencl" (the first GPU, else the first device) or "opencl:N"
    (the N-th of `list_devices()`). DeviceError naming what was looked for when it is missing."""
    index = 0
    if spec != "opencl":
        head, _, tail = spec.partition(":")
        if head != "opencl" or not tail.isdigit():
            raise DeviceError(f"an OpenCL device is 'opencl' or 'opencl:N', got {spec!r}")
        index = int(tail)
    devices = list_devices()
    if not devices:
        vendors = os.environ.get("OCL_ICD_VENDORS", "/etc/OpenCL/vendors")
        raise DeviceError(
            f"no OpenCL platform found (ICDs looked for in {vendors}); a GPU driver's OpenCL, or "
            "`pip install pocl-binary-distribution` for the CPU, provides one"
        )
    if index >= len(devices):
        names = ", ".join(f"opencl:{i} {d.name.strip()}" for i, d in enumerate(devices))
        raise DeviceError(f"{spec}: no such device; the OpenCL devices here are {names}")
    return devices[index]


_SCALARS = {"int": np.int32, "uint": np.uint32, "float": np.float32}


def _declare_scalars(cl, k) -> None:
    """Tell pyopencl the dtypes of kernel k's scalar arguments (from the build's argument
    info): it then packs them itself, ~0.7 us a launch's arguments instead of ~50 (PoCL,
    attn_rows' 15). Where the platform gives no argument info, launches take the slow path."""
    try:
        n = k.get_info(cl.kernel_info.NUM_ARGS)
        types = [k.get_arg_info(i, cl.kernel_arg_info.TYPE_NAME).strip() for i in range(n)]
    except cl.Error:
        return
    if any(t not in _SCALARS and not t.endswith("*") for t in types):
        return  # a type this table does not know: leave pyopencl to work it out
    k.set_scalar_arg_dtypes([_SCALARS.get(t) for t in types])


class Kernels:
    """ember's kernels built for one device, with an in-order queue. `run(name, global, *args)`
    enqueues a kernel (work-groups of WG along the first axis where `local` is true); nothing
    waits until a read (`get`)."""

    def __init__(self, device):
        cl = self.cl = _cl()
        self.device = device
        self.ctx = cl.Context([device])
        self.queue = cl.CommandQueue(self.ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self.profile = False  # when set, every kernel's and transfer's device time is summed (`times`)
        self.times: dict[str, float] = {}  # seconds by kind: attention, matmul, other kernels, transfers
        self._events: list = []
        src = resources.files(__package__).joinpath("kernels.cl").read_text()
        options = [
            "-cl-kernel-arg-info",  # the scalar arguments' types (`_declare_scalars`)
            f"-DWG={WG}",
            f"-DROWS={ROWS}",
            f"-DMAXG={MAXG}",
            f"-DMAXDPT={MAXDPT}",
            f"-DMAXD={MAX_HEAD_DIM}",
            f"-DKT={KEY_TILE}",
        ]
        try:  # pyopencl's binary cache off: PoCL keeps its own, and one reload of pyopencl's had no kernels
            self.program = cl.Program(self.ctx, src).build(options=options, cache_dir=False)
        except cl.Error as e:
            errors = "; ".join(dict.fromkeys(ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()))
            ver = device.platform.version
            llvm = re.search(r"LLVM [\d.]+", ver)
            where = f"{device.name.strip()} ({' '.join(ver.split()[:4])}{', ' + llvm.group(0) if llvm else ''})"
            if "unknown target CPU" in errors:
                raise CompilerTargetError(
                    f"the OpenCL kernels do not build on {where}: its compiler does not know this CPU ({errors})"
                ) from None
            raise DeviceError(f"the OpenCL kernels do not build on {where}: {errors or e}") from None
        if "attn_merge" not in {k.function_name for k in self.program.all_kernels()}:
            raise DeviceError(
                f"the OpenCL kernels built on {device.name.strip()} came back without their kernels (a broken "
                "kernel cache? PoCL keeps one in ~/.cache/pocl: remove it and retry)"
            )
        self._kernels: dict[str, object] = {}
        # a work-group per output row (per row and key/value head in the attention) suits a GPU; a
        # work-item per row (per row and head) suits a CPU device
        self.by_rows = not device.type & cl.device_type.GPU
        self.dummy = self.buffer(4)  # the argument of an absent bias

    def kernel(self, name: str):
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = self.cl.Kernel(self.program, name)
            _declare_scalars(self.cl, k)
        return k

    def run(self, name: str, global_size: tuple[int, ...], local_size: tuple[int, ...] | None, *args) -> None:
        k = self.kernel(name)
        k.set_args(*args)
        ev = self.cl.enqueue_nd_range_kernel(self.queue, k, global_size, local_size)
        if self.profile:
            self._events.append((_KIND.get(name.split("_")[0], "other"), ev))

    def buffer(self, nbytes: int):
        return self.cl.Buffer(self.ctx, self.cl.mem_flags.READ_WRITE, max(int(nbytes), 4))

    def region(self, buf, offset: int, nbytes: int):
        return buf.get_sub_region(offset, nbytes)

    def halves(self, *shape: int):
        return self.buffer(2 * int(np.prod(shape)))

    def upload(self, host: np.ndarray):
        host = np.ascontiguousarray(host)
        flags = self.cl.mem_flags.READ_ONLY | self.cl.mem_flags.COPY_HOST_PTR
        return self.cl.Buffer(self.ctx, flags, hostbuf=host if host.nbytes else np.zeros(1, np.uint8))

    def put(self, buf, host: np.ndarray, offset: int = 0) -> None:
        self._transfer(
            self.cl.enqueue_copy(self.queue, buf, np.ascontiguousarray(host), dst_offset=offset, is_blocking=False)
        )

    def get(self, buf, shape, dtype=np.float32, offset: int = 0) -> np.ndarray:
        out = np.empty(shape, dtype)
        self._transfer(self.cl.enqueue_copy(self.queue, out, buf, src_offset=offset, is_blocking=True))
        self._tally()
        return out

    def copy(self, dst, src, nbytes: int, dst_offset: int = 0, src_offset: int = 0) -> None:
        ev = self.cl.enqueue_copy(self.queue, dst, src, byte_count=nbytes, dst_offset=dst_offset, src_offset=src_offset)
        self._transfer(ev)

    def _transfer(self, ev) -> None:
        if self.profile:
            self._events.append(("transfers", ev))

    def _tally(self) -> None:
        """Add the finished commands' device times to `times` (a blocking read has finished
        everything before it on the in-order queue)."""
        for kind, ev in self._events:
            self.times[kind] = self.times.get(kind, 0.0) + (ev.profile.end - ev.profile.start) * 1e-9
        self._events.clear()

    def matmul(self, w: GpuMatrix, x, n: int, y, bias=None) -> None:
        """y [n, w.n_out] = x [n, w.n_in] @ w.T (+ bias), all device buffers."""
        by_rows = self.by_rows
        self.run(
            ("matrows_" if by_rows else "matmul_") + w.kind,
            (-(-w.n_out // WG) * WG if by_rows else w.n_out * WG, -(-n // ROWS)),
            (WG, 1),
            w.buf,
            np.int32(w.row_bytes),
            np.int32(w.n_in),
            x,
            np.int32(n),
            y,
            np.int32(w.n_out),
            self.dummy if bias is None else bias,
            np.int32(bias is not None),
        )

    def kv_store(self, k, v, kc, vc, n: int, cache) -> None:
        """Keys and values [n, n_kv, d] (float32 buffers) into a layer's cache (kc, vc) at its length."""
        c = cache
        self.run(
            "kv_store",
            (n * c.n_head_kv * max(c.head_dim, c.head_dim_v),),
            None,
            k,
            v,
            kc,
            vc,
            *(np.int32(a) for a in (c.n_head_kv, c.head_dim, c.head_dim_v, c.cap, c.length)),
        )
