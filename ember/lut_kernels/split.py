"""Run one job on several threads: `split(n, threads, fn)` calls fn(start, stop) on contiguous
shares of range(n) at once, the first on the calling thread, the others on a process-wide pool.

The batch path (prefill, long verification) parallelizes with this alone: dequantized tiles and
their BLAS calls (BLAS itself single-threaded), the K-quant k-row kernels and the batch attention.
One pool of threads that sleep when idle: numba's OpenMP workers and OpenBLAS's threads spin
after each region, and on a 2-core machine a spinning pool takes the core the other one needs.
`fn` must release the GIL for the shares to overlap (numba ``nogil`` code, BLAS).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

MIN_ROWS = 64  # batches smaller than this run on one thread: a 2-thread split costs ~30 us a
# call, and on a 2-core machine with another busy process it stalls for milliseconds
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def split(n: int, threads: int, fn) -> None:
    """fn(start, stop) for `threads` contiguous shares of range(n), concurrently; re-raises the
    first error once every share has finished."""
    global _pool, _pool_size
    threads = max(1, min(int(threads), n))
    if threads == 1:
        fn(0, n)
        return
    with _lock:
        if _pool_size < threads - 1:
            _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="ember-split")
            _pool_size = threads - 1
        pool = _pool
    cut = [n * i // threads for i in range(threads + 1)]
    futures = [pool.submit(fn, cut[i], cut[i + 1]) for i in range(1, threads)]
    try:
        fn(cut[0], cut[1])
    finally:
        for f in futures:
            f.result()
