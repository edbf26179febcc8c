"""Memory as an offload budget counts it: the process's own memory without the model files' mapped
pages (`process_bytes`; `trim_heap` first gives back what the heap holds free,
`page_out_compilers` LLVM's code pages), how much of a
file sits in the page cache (`cached_bytes`: cachestat, or mincore over a fresh read-only
mapping: the part of a budget that reading the weights leaves behind), and the memory available to this process
(`available_bytes`: the machine's, or less under a memory cgroup's limit, as in a container)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np
import psutil

_libc = None


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


_CACHESTAT = 451  # Linux >= 6.5, the same number on x86-64 and arm64
_has_cachestat = os.uname().sysname == "Linux" and os.uname().machine in ("x86_64", "aarch64")


def _cachestat(fd: int) -> int | None:
    """Pages of open file `fd` in the page cache by cachestat(2) (it walks the cached pages only;
    mincore, every page of the file), None where the kernel lacks it."""
    global _libc, _has_cachestat
    if not _has_cachestat:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    st = _CacheStat()
    if _libc.syscall(_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(st), 0) != 0:
        _has_cachestat = False
        return None
    return int(st.cache)


def cached_bytes(path) -> int | None:
    """Bytes of the file at `path` resident in the page cache; None where neither cachestat nor
    mincore is there (not Linux or BSD) or the file cannot be mapped; 0 for an empty file."""
    global _libc
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    pages = _cachestat(fd)
    if pages is not None:
        os.close(fd)
        return pages * mmap.PAGESIZE
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except (OSError, ValueError, AttributeError):
        return None
    finally:
        os.close(fd)
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        pages = -(-size // mmap.PAGESIZE)
        vec = np.zeros(pages, np.uint8)
        arr = np.frombuffer(mm, np.uint8)
        rc = _libc.mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(size), ctypes.c_void_p(vec.ctypes.data))
        del arr
        if rc != 0:
            return None
        return int(np.count_nonzero(vec & 1)) * mmap.PAGESIZE
    except (AttributeError, OSError):
        return None
    finally:
        mm.close()


def trim_heap() -> None:
    """Give the heap's free memory back to the OS where the C library can (glibc's
    malloc_trim), so the process's resident memory is what it uses: building a 150k-token
    tokenizer leaves ~25 MB freed but held."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


COMPILERS = ("libllvmlite", "libLLVM")  # LLVM, as numba and llvmlite load it: used to compile only
_MADV_PAGEOUT = 21  # Linux >= 5.4
_MADV_DONTNEED = 4


def page_out_compilers() -> int:
    """Give back the compiler's code pages once the machine code is loaded (numba's and ember's
    kernels run without LLVM): its shared libraries' read-only mappings are reclaimed and
    unmapped (madvise; clean pages of a file, they fault back in if a later compile needs
    them). Qwen2.5-1.5B's load touches ~75 MB of libllvmlite. Returns the bytes of the
    mappings asked; 0 where the kernel or the C library cannot."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except (AttributeError, OSError):
        return 0
    asked, maps = 0, []  # [(lo, hi, its private copies' kB)] of the compilers' read-only mappings
    for line in lines:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
            lib = len(fields) >= 6 and "w" not in fields[1] and any(n in os.path.basename(fields[5]) for n in COMPILERS)
            maps.append([*(int(x, 16) for x in fields[0].split("-")), 0] if lib else None)
        elif fields and fields[0] == "Anonymous:" and maps and maps[-1] is not None:
            maps[-1][2] = int(fields[1])
    for m in maps:
        if m is None:
            continue
        lo, hi, copied = m
        # PAGEOUT frees the pages no other process maps; DONTNEED drops this process's mapping
        # of the others (another numba process shares them; they stay in the page cache), only
        # where the mapping holds no private copy (relocated data: dropping it would undo them)
        ok = _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT) == 0
        if not copied:
            ok = _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0 or ok
        asked += (hi - lo) if ok else 0
    return asked


def process_bytes(model_files) -> int:
    """The process's resident memory without the pages it maps of the model's files (those are
    the weights a plan counts): the interpreter, the libraries, the machine code, the heap."""
    proc = psutil.Process()
    rss = proc.memory_info().rss
    try:
        files = {os.path.realpath(f) for f in model_files}
        mapped = sum(m.rss for m in proc.memory_maps(grouped=True) if os.path.realpath(m.path) in files)
    except (psutil.Error, OSError, AttributeError):  # no per-mapping figures here: count it all
        mapped = 0
    return rss - mapped


CGROUP_ROOT = Path("/sys/fs/cgroup")


def own_cgroups() -> tuple[Path | None, Path | None]:
    """(this process's cgroup v2 folder, its v1 memory-controller folder), each None when absent."""
    v2 = v1 = None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "" and (CGROUP_ROOT / "cgroup.controllers").exists():
            v2 = CGROUP_ROOT / rel
        elif "memory" in controllers.split(","):
            v1 = CGROUP_ROOT / "memory" / rel
    return v2, v1


def _number(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2's no limit) is None


def available_bytes() -> int:
    """Memory this process can still use: the machine's available memory (psutil), or what its
    memory cgroup's limit leaves (limit - usage, page cache included), whichever is less."""
    avail = psutil.virtual_memory().available
    v2, v1 = own_cgroups()
    files = ((v2, "memory.max", "memory.current"), (v1, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    for folder, limit, usage in files:
        if folder is None:
            continue
        lim, use = _number(folder / limit), _number(folder / usage)
        if lim is not None and use is not None and lim < 1 << 60:
            avail = min(avail, max(0, lim - use))
    return avail
