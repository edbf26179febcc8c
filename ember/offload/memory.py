"""Memory as an offload budget counts it: the process's own memory without the model files' mapped
pages (`process_bytes`), and how much of a file sits in the page cache (`cached_bytes`, mincore
over a fresh read-only mapping), the part of a budget that reading the weights leaves behind."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import psutil

_libc = None


def cached_bytes(path) -> int | None:
    """Bytes of the file at `path` resident in the page cache; None where mincore is missing
    (not Linux or BSD) or the file cannot be mapped; 0 for an empty file."""
    global _libc
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
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
