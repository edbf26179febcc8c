"""What the benchmark records about where it ran: the CPU (model, vector flags, cache sizes), the
memory, the versions of ember and its kernels' libraries, the model file's sha256, and how busy
the machine was (other processes' CPU use before a run and during it)."""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path

from ..runtime.threads import cpu_model

# The CPU flags that decide ember's kernel forms (docs/kernels.md) and llama.cpp's.
CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_vbmi",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "neon",
    "asimd",
    "asimddp",
)
BUSY_CORES = 0.3  # other processes' CPU use, in cores, above which a result is marked busy


def cpu() -> dict:
    """Model name, the flags of CPU_FLAGS it has, and L1d / L2 / L3 sizes in bytes (Linux; what
    cannot be read is None)."""
    info: dict = {"model": cpu_model(), "arch": platform.machine()}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    info["flags"] = [f for f in CPU_FLAGS if f in flags]
    for level, name in (("1", "l1d"), ("2", "l2"), ("3", "l3")):
        info[f"{name}_bytes"] = _cache_size(level)
    return info


def _cache_size(level: str) -> int | None:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            if (idx / "level").read_text().strip() != level or (idx / "type").read_text().strip() == "Instruction":
                continue
            size = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        return int(size.rstrip("KMG")) * mult
    return None


def versions() -> dict:
    """ember (and its git commit when it runs from a checkout), Python and the libraries whose
    versions change the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("ember", "numpy", "numba", "llvmlite", "gguf", "llama-cpp-python"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["ember_commit"] = _git_commit()
    return out


def _git_commit() -> str | None:
    import ember

    root = Path(ember.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        res = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def machine() -> dict:
    import psutil

    return {
        "cpu": cpu(),
        "cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "available_bytes": psutil.virtual_memory().available,
        "os": f"{platform.system()} {platform.release()}",
    }


def machine_load(seconds: float = 0.5) -> float:
    """CPU used by other processes over `seconds`, in cores."""
    meter = LoadMeter()
    time.sleep(seconds)
    return meter.others()


class LoadMeter:
    """Other processes' CPU use since it was made, in cores: the machine's busy CPU time minus
    this process's and its finished children's (the benchmark's workers), over the wall time.
    Children must be waited for before `others()` for their time to count as ours."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.busy0 = _busy_seconds()
        self.ours0 = _our_seconds()

    def others(self) -> float:
        wall = time.perf_counter() - self.t0
        if wall <= 0:
            return 0.0
        return max(0.0, (_busy_seconds() - self.busy0) - (_our_seconds() - self.ours0)) / wall


def _busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
    return sum(t) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _our_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def disk_bandwidth(path: str, limit: int = 1 << 30) -> float:
    """Sequential read bandwidth of the disk under `path`, bytes/s: the better of up to `limit`
    bytes read in 16 MiB blocks with O_DIRECT (the page cache bypassed, where the filesystem
    allows) and read as the streamer reads (`offload.stream.FileReader`: pieces through the page
    cache, each dropped once read; the kernel's readahead keeps several requests in flight,
    which can beat one O_DIRECT stream: docs/offload.md)."""
    rates = [_streamer_rate(path, limit)]
    if getattr(os, "O_DIRECT", 0):
        try:
            rates.append(_direct_rate(path, limit))
        except OSError:  # O_DIRECT refused (tmpfs, some overlays)
            pass
    return max(rates)


def _streamer_rate(path: str, limit: int) -> float:
    import numpy as np

    from ..home import uncache
    from ..offload.stream import PIECE, FileReader

    uncache(path)
    reader = FileReader(path, "the disk probe")
    try:
        n = min(limit, os.fstat(reader.fd).st_size)
        buf = np.empty(PIECE, np.uint8)
        pieces = [(off, min(PIECE, n - off), 0) for off in range(0, n, PIECE)]
        seconds = sum(reader.read([piece], buf, "the disk probe") for piece in pieces)
    finally:
        reader.close()
    return n / seconds if seconds > 0 else float("nan")


def _direct_rate(path: str, limit: int) -> float:
    import mmap

    block = 16 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n, t = 0, time.perf_counter()
        while n < limit:
            k = os.preadv(fd, [buf], n)
            if k <= 0:
                break
            n += k
        dt = time.perf_counter() - t
    finally:
        os.close(fd)
        buf.close()
    return n / dt if dt > 0 else float("nan")
