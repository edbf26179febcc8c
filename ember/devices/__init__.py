"""Where the math runs, behind one small protocol (`base.Device`): the CPU (`cpu`), a whole dense
model on an OpenCL device (`opencl`) or a CUDA GPU (`cuda`), both through `gpu.GpuDevice`; the
CPU's matmuls with the attention on one of those (`hybrid`, "cpu+opencl"). A
device runs a model's layers over a KV cache it owns; the model's definition (`runtime.model`)
stays device-independent. `available()` lists what this machine offers."""

from __future__ import annotations

import glob

from ..errors import DeviceError

# device nodes a GPU driver creates (NVIDIA; AMD's ROCm; DRM render nodes: any GPU with a Linux
# driver; WSL's GPU): with none of them, no OpenCL or CUDA GPU can be here
GPU_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dri/renderD*", "/dev/dxg")


def gpu_device(spec: str, threads: int | None = None):
    """The whole-model device `spec` names ("opencl", "opencl:N", "cuda", "cuda:N")."""
    kind = spec.split(":")[0]
    if kind == "opencl":
        from .opencl import OpenCLDevice

        return OpenCLDevice(spec, threads)
    if kind == "cuda":
        from .cuda import CudaDevice

        return CudaDevice(spec, threads)
    raise DeviceError(f"{spec!r} is not a GPU device; use 'opencl', 'opencl:N', 'cuda' or 'cuda:N'")


def available(check: bool = False) -> list[dict]:
    """The devices ember can run on here (name, what it is, its figures), and for each kind it
    cannot use, why (`missing`); with `check`, an OpenCL device whose build of ember's kernels
    fails is `missing` too, with the reason."""
    from ..lut_kernels.codegen import select_kernel
    from ..runtime.threads import cpu_model, default_threads

    out: list[dict] = [{"name": "cpu", "what": cpu_model(), "threads": default_threads(), "kernels": select_kernel()}]
    try:
        from .opencl.runtime import describe_devices, usable

        found = describe_devices()
        for d in found if check else ():
            why = usable(d["name"])
            if why:
                d["missing"] = why
        out += found or [{"name": "opencl", "missing": "no OpenCL platform is installed"}]
    except DeviceError as e:
        out.append({"name": "opencl", "missing": str(e)})
    from .cuda.runtime import describe_devices as cuda_devices
    from .cuda.runtime import why_missing

    try:
        out += cuda_devices() or [{"name": "cuda", "missing": why_missing() or "no CUDA GPU found"}]
    except Exception as e:  # a driver that fails while it is asked: listed with the reason, not raised
        out.append({"name": "cuda", "missing": f"the CUDA driver failed: {e}"})
    return out


def gpu_nodes() -> list[str]:
    """The GPU device nodes here (`GPU_NODES`): a look that costs nothing, where listing the
    OpenCL and CUDA devices loads their drivers and compilers (0.3 s and ~160 MB of memory with
    PoCL and numba.cuda, measured on a 2-core EPYC)."""
    return [p for pattern in GPU_NODES for p in sorted(glob.glob(pattern))]


def auto_choice(found: list[dict] | None = None) -> tuple[str, str]:
    """What device="auto" runs a model on here, and why (`found`: `available()`'s list; without
    it, the devices are listed only where a GPU's device node exists): the CPU, so far; with a
    GPU here the reason says so and names the device options that use it."""
    if found is None and not gpu_nodes():
        return "cpu", "no GPU here (no GPU device node: " + ", ".join(GPU_NODES) + ")"
    found = available() if found is None else found
    gpus = [d for d in found if "missing" not in d and d.get("type") == "GPU"]
    if gpus:
        g = gpus[0]["name"]
        names = ", ".join(f"{d['name']} ({d['what']})" for d in gpus)
        return "cpu", (
            f"a GPU is here ({names}), but auto does not measure yet whether it pays: --device cpu+{g} puts "
            f"the attention and KV cache there, --device {g} the whole model"
        )
    others = [
        f"{d['name']}: {d['missing'].split(' (')[0]}" if "missing" in d else f"{d['name']} is a {d['type']} device"
        for d in found
        if d["name"] != "cpu"
    ]
    return "cpu", "no GPU here" + (f" ({'; '.join(others)})" if others else "")
