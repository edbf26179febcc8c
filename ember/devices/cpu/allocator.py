"""glibc malloc settings for the batch path: large activation arrays reused from the heap.

A 512-token batch allocates and frees arrays of 1-20 MB in every layer. glibc serves blocks
above its mmap threshold with a fresh mmap each time and returns freed heap tops to the kernel,
so every layer paid page faults on fresh zeroed pages again (Qwen2.5-1.5B pp512, 2 threads:
150,000 faults and 1.7 s of kernel time a batch, which also serialized the threads). Raising the
mmap threshold to its maximum (32 MiB) and the trim threshold keeps those pages in the heap
between calls. Applied by the session before its first batch (forward over many positions), not
at load: a decode-only process keeps glibc's defaults (its peak RSS was ~7 MB higher with them
raised). No-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 128 << 20

_done = False


def keep_large_blocks() -> bool:
    """Apply the settings once per process; True where they took effect."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
