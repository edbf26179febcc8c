"""Where the math runs, behind one small protocol (`base.Device`): the CPU (`cpu`), a whole dense
model on an OpenCL device (`opencl`) or a CUDA GPU (`cuda`), both through `gpu.GpuDevice`; GPU
attention beside the CPU's matmuls to come. A
device runs a model's layers over a KV cache it owns; the model's definition (`runtime.model`)
stays device-independent. `available()` lists what this machine offers."""

from __future__ import annotations

from ..errors import DeviceError


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


def auto_choice(found: list[dict] | None = None) -> tuple[str, str]:
    """What device="auto" runs a model on here, and why (`found`: `available()`'s list): the
    CPU, so far; with a GPU here the reason says so and names the device options that use it."""
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
