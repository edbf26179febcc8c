"""One measurement in this process, printed on stdout as one line of JSON; the driver (run.py)
starts each in a fresh process:

    python -m ember.bench.workers ember MODEL TEST THREADS
    python -m ember.bench.workers llama MODEL TEST THREADS
    python -m ember.bench.workers bandwidth THREADS

Each test first runs untimed in its process (compiles, loads); peak RSS is the process's.
An EmberError prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from .scenarios import K_CONTEXT, K_REPS, PROMPT_TG, parse_test, prompt_ids


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _k_interleaved(timed, k: int) -> dict:
    """kN's result from ``timed(n)`` (seconds of one forward over n new tokens after the
    context): one untimed call of each size, then K_REPS of each, 1 and k alternating so
    that drift in the machine's speed hits both sizes alike; medians."""
    timed(1)
    timed(k)
    t1, tk = [], []
    for _ in range(K_REPS):
        t1.append(timed(1))
        tk.append(timed(k))
    dt1, dtk = statistics.median(t1), statistics.median(tk)
    return {"tokens_per_s": k / dtk, "k_cost_ratio": dtk / dt1, "one_token_s": dt1, "peak_rss_bytes": _peak_rss()}


def worker_ember(model: str, test: str, threads: int) -> dict:
    import ember

    kind, n = parse_test(test)
    m = ember.load(model, threads=threads)
    tok = lambda t: m.tokenize(t, special=False)  # noqa: E731
    if kind == "pp":
        ids = prompt_ids(n, tok)
        m.session().feed_last(ids[:64])  # warm-up: compile (the path n tokens take) and load
        s = m.session()
        t = time.perf_counter()
        s.feed_last(ids)
        dt = time.perf_counter() - t
        return {"tokens_per_s": n / dt, "peak_rss_bytes": _peak_rss()}
    if kind == "k":
        ids = prompt_ids(K_CONTEXT + n, tok)
        s = m.session()
        s.feed_last(ids[:K_CONTEXT])

        def timed(k):
            t = time.perf_counter()
            s.feed(ids[K_CONTEXT : K_CONTEXT + k])
            dt = time.perf_counter() - t
            s.truncate(K_CONTEXT)
            return dt

        return _k_interleaved(timed, n)
    ids = prompt_ids(PROMPT_TG, tok)
    for _ in m.generate(ids, max_tokens=2, ignore_eos=True):  # warm-up
        pass
    for _ in m.generate(ids, max_tokens=n, ignore_eos=True):
        pass
    return {
        "tokens_per_s": m.stats["decode_tokens_per_s"],
        "peak_rss_bytes": _peak_rss(),
        "weight_bytes_per_token": m.transformer.weight_bytes_per_token(),
    }


def worker_llama(model: str, test: str, threads: int) -> dict:
    import llama_cpp

    import ember

    kind, n = parse_test(test)
    path = str(ember.hub.resolve(model))
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=2048,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    tok = lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)  # noqa: E731
    if kind == "k":
        ids = prompt_ids(K_CONTEXT + n, tok)
        llm.eval(ids[:K_CONTEXT])

        def timed(k):
            llm.n_tokens = K_CONTEXT  # eval() drops the cache after n_tokens
            t = time.perf_counter()
            llm.eval(ids[K_CONTEXT : K_CONTEXT + k])
            return time.perf_counter() - t

        return _k_interleaved(timed, n)
    if kind == "pp":
        ids = prompt_ids(n, tok)
        llm.eval(ids[:8])
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        dt = time.perf_counter() - t
        return {"tokens_per_s": n / dt, "peak_rss_bytes": _peak_rss()}
    ids = prompt_ids(PROMPT_TG, tok)
    llm.reset()
    t_first, done = None, 0
    for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        done += 1
        if t_first is None:
            t_first = time.perf_counter()
        if done == n:
            break
    dt = time.perf_counter() - t_first
    return {"tokens_per_s": (n - 1) / dt if n > 1 else float("nan"), "peak_rss_bytes": _peak_rss()}


def worker_bandwidth(threads: int) -> dict:
    """DRAM read bandwidth: vectorized sums of a 1 GiB array, split over `threads` threads; each
    thread reads its part as 1 stream and as 8 interleaved streams (more reads in flight, as a
    kernel with software prefetch has: 10.4 vs 14.4 GB/s on one thread here); the best counts."""
    import threading

    import numpy as np
    from numba import njit

    @njit(nogil=True, fastmath=True)
    def total1(a):
        s = np.float32(0.0)
        for i in range(a.shape[0]):
            s += a[i]
        return s

    @njit(nogil=True, fastmath=True)
    def total8(a):
        n = a.shape[0] // 8
        s = np.float32(0.0)
        for i in range(n):
            s += (
                a[i]
                + a[n + i]
                + a[2 * n + i]
                + a[3 * n + i]
                + a[4 * n + i]
                + a[5 * n + i]
                + a[6 * n + i]
                + a[7 * n + i]
            )
        return s

    a = np.ones(1 << 28, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for total in (total1, total8):
        total(parts[0][:1024])
        for _ in range(4):
            ths = [threading.Thread(target=total, args=(p,)) for p in parts]
            t = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return {"bytes_per_s": best}


def main(argv: list[str] | None = None) -> int:
    from ..errors import EmberError

    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 2 and args[0] == "bandwidth":
            out = worker_bandwidth(int(args[1]))
        elif len(args) == 4 and args[0] in ("ember", "llama"):
            engine, model, test, threads = args
            out = (worker_ember if engine == "ember" else worker_llama)(model, test, int(threads))
        else:
            print(
                "usage: python -m ember.bench.workers {ember|llama} MODEL TEST THREADS | bandwidth THREADS",
                file=sys.stderr,
            )
            return 2
    except EmberError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
