"""Run one job on several threads: `Team(n)` is n daemon worker threads that each run one call
of a job when released; `split(n, threads, fn)` calls fn(start, stop) on contiguous shares of
range(n) at once, the first on the calling thread, the others on a process-wide team.

The batch path (prefill, long verification) parallelizes with `split` alone: dequantized tiles
and their BLAS calls (BLAS itself single-threaded), the K-quant k-row kernels and the batch
attention; the fused decode step runs on a `Team` of its own. The workers sleep when idle
(numba's OpenMP workers and OpenBLAS's threads spin after each region, and on a 2-core machine a
spinning pool takes the core the other one needs), and they are daemon threads, so a finished
program exits whatever they were waiting for. A job must release the GIL for its calls to
overlap (numba ``nogil`` code, BLAS).
"""

from __future__ import annotations

import threading

MIN_ROWS = 64  # batches smaller than this run on one thread: a 2-thread split costs ~30 us a
# call, and on a 2-core machine with another busy process it stalls for milliseconds


class Team:
    """`n` daemon worker threads (tids 1..n) that each run one call of a job when released; the
    calling thread is tid 0. One job at a time: `busy()` says whether one is running."""

    def __init__(self, n: int, name: str = "ember-worker"):
        self.n = n
        self._go = [threading.Semaphore(0) for _ in range(n)]
        self._done = threading.Semaphore(0)
        self._running = threading.Lock()
        self._job = None
        self._results: list = [None] * n
        self._stop = False
        for i in range(n):
            threading.Thread(target=self._work, args=(i,), daemon=True, name=f"{name}-{i + 1}").start()

    def _work(self, i: int) -> None:
        while True:
            self._go[i].acquire()
            if self._stop:
                return
            fn, args, on_error = self._job
            try:
                self._results[i] = fn(i + 1, *args)
            except BaseException as e:  # reported by run() on the calling thread
                if on_error is not None:
                    on_error()
                self._results[i] = e
            self._done.release()

    def busy(self) -> bool:
        return self._running.locked()

    def run(self, fn, args=(), on_error=None) -> list:
        """fn(0, *args) here and fn(i, *args) on worker i; all results in tid order (a worker's
        exception is its result). Returns only when every worker has finished its call, even
        when this thread is interrupted (Ctrl-C): the interrupt is raised after that, so the
        team stays usable."""
        with self._running:
            self._job = (fn, args, on_error)
            for g in self._go:
                g.release()
            interrupted = None
            try:
                r0 = fn(0, *args)
            except BaseException:
                if on_error is not None:
                    on_error()
                raise
            finally:
                left = self.n
                while left:
                    try:
                        self._done.acquire()
                        left -= 1
                    except KeyboardInterrupt as e:
                        interrupted = e
                if interrupted is not None:
                    raise interrupted
            return [r0] + self._results

    def close(self) -> None:
        self._stop = True
        for g in self._go:
            g.release()


_team: Team | None = None
_lock = threading.Lock()


def _shared_team(workers: int) -> Team:
    global _team
    with _lock:
        if _team is None or _team.n < workers:
            if _team is not None:
                _team.close()
            _team = Team(workers, "ember-split")
        return _team


def split(n: int, threads: int, fn) -> None:
    """fn(start, stop) for `threads` contiguous shares of range(n), concurrently; re-raises the
    first error once every share has finished. When the shared team is already running a job
    (another Python thread's, or this one's from inside fn), the shares run here one by one."""
    threads = max(1, min(int(threads), n))
    team = _shared_team(threads - 1) if threads > 1 else None
    if team is None or team.busy():
        fn(0, n)
        return
    cut = [n * i // threads for i in range(threads + 1)]

    def share(tid: int) -> None:
        if tid < threads:
            fn(cut[tid], cut[tid + 1])

    for r in team.run(share):
        if isinstance(r, BaseException):
            raise r
