"""On-device benchmark: ember (and, with --peer, llama.cpp on the same model in the same run).

Measures, per engine and thread count, medians of --reps runs, each run in a fresh process:
  pp128, pp512  one batch of N prompt tokens from an empty cache, tokens/s
  tg128         128 greedy single-token decodes after a 16-token prompt, tokens/s
  k8            a forward over 8 new tokens after a 64-token context (speculative
                verification's shape), tokens/s, and its cost relative to one new token
                (forwards of 1 and of 8 tokens alternating, medians of 11 each)
  peak RSS      of the process that ran the test (each test first runs once untimed, so the
                numba and pack caches are warm, as on every run after a model's first)
Plus, for ember: time from process start to the first generated token of `ember run` (warm, and
cold with empty numba/pack caches), bytes of weights read per decoded token, the measured memory
bandwidth and the share of that roofline the decode reaches.

Engines alternate run by run so drift on a shared machine hits both alike; compare ratios.
It warns when another process is loading the machine.

    python bench/run.py [--model smollm2-135m] [--threads 1,2] [--tests pp128,pp512,tg128]
                        [--reps 3] [--peer] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

TESTS = ("pp128", "pp512", "tg128", "k8")
K_SMALL, K_CONTEXT, K_REPS = 8, 64, 11
PROMPT_TG = 16
N_TG = 128


# ---- workers: one measurement in this process, printed as JSON -----------------------------------
def _prompt_ids(n: int, vocab_ids) -> list[int]:
    text = (Path(__file__).resolve().parent.parent / "tests" / "data" / "ppl_public.txt").read_text(encoding="utf-8")
    ids = vocab_ids(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _k_interleaved(timed) -> dict:
    """k8's result from ``timed(n)`` (seconds of one forward over n new tokens after the
    context): one untimed call of each size, then K_REPS of each, 1 and K_SMALL alternating so
    that drift in the machine's speed hits both sizes alike; medians."""
    timed(1)
    timed(K_SMALL)
    t1, tk = [], []
    for _ in range(K_REPS):
        t1.append(timed(1))
        tk.append(timed(K_SMALL))
    dt1, dtk = statistics.median(t1), statistics.median(tk)
    return {"tokens_per_s": K_SMALL / dtk, "k_cost_ratio": dtk / dt1, "one_token_s": dt1,
            "peak_rss_bytes": _peak_rss()}


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_ember(model: str, test: str, threads: int) -> dict:
    import ember

    m = ember.load(model, threads=threads)
    if test.startswith("pp"):
        n = int(test[2:])
        ids = _prompt_ids(n, lambda t: m.tokenize(t, special=False))
        m.session().feed_last(ids[:64])  # warm-up: compile (the path n tokens take) and load
        s = m.session()
        t = time.perf_counter()
        s.feed_last(ids)
        dt = time.perf_counter() - t
        return {"tokens_per_s": n / dt, "peak_rss_bytes": _peak_rss()}
    if test == "k8":
        ids = _prompt_ids(K_CONTEXT + K_SMALL, lambda t: m.tokenize(t, special=False))
        s = m.session()
        s.feed_last(ids[:K_CONTEXT])

        def timed(n):
            t = time.perf_counter()
            s.feed(ids[K_CONTEXT:K_CONTEXT + n])
            dt = time.perf_counter() - t
            s.truncate(K_CONTEXT)
            return dt

        return _k_interleaved(timed)
    ids = _prompt_ids(PROMPT_TG, lambda t: m.tokenize(t, special=False))
    for _ in m.generate(ids, max_tokens=2, ignore_eos=True):  # warm-up
        pass
    for _ in m.generate(ids, max_tokens=N_TG, ignore_eos=True):
        pass
    st = m.stats
    out = {"tokens_per_s": st["decode_tokens_per_s"], "peak_rss_bytes": _peak_rss()}
    out["weight_bytes_per_token"] = m.transformer.weight_bytes_per_token()
    return out


def worker_llama(model: str, test: str, threads: int) -> dict:
    import llama_cpp
    import ember

    path = str(ember.hub.resolve(model))
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    tok = lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
    if test == "k8":
        ids = _prompt_ids(K_CONTEXT + K_SMALL, tok)
        llm.eval(ids[:K_CONTEXT])

        def timed(n):
            llm.n_tokens = K_CONTEXT  # eval() drops the cache after n_tokens
            t = time.perf_counter()
            llm.eval(ids[K_CONTEXT:K_CONTEXT + n])
            return time.perf_counter() - t

        return _k_interleaved(timed)
    if test.startswith("pp"):
        n = int(test[2:])
        ids = _prompt_ids(n, tok)
        llm.eval(ids[:8])
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        dt = time.perf_counter() - t
        return {"tokens_per_s": n / dt, "peak_rss_bytes": _peak_rss()}
    ids = _prompt_ids(PROMPT_TG, tok)
    llm.reset()
    t_first, n = None, 0
    for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if n == N_TG:
            break
    dt = time.perf_counter() - t_first
    return {"tokens_per_s": (N_TG - 1) / dt, "peak_rss_bytes": _peak_rss()}


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
            s += (a[i] + a[n + i] + a[2 * n + i] + a[3 * n + i] + a[4 * n + i] + a[5 * n + i]
                  + a[6 * n + i] + a[7 * n + i])
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


# ---- driver -----------------------------------------------------------------------------------
def _run_worker(args: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine_load() -> float:
    """CPU used by other processes over half a second, in cores."""
    me = os.getpid()
    procs = [p for p in psutil.process_iter() if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = 0.0
    for p in procs:
        try:
            busy += p.cpu_percent(None)
        except psutil.Error:
            pass
    return busy / 100


def time_to_first_token(model: str, cold: bool) -> float:
    """Wall time of `ember run MODEL PROMPT -n 1` (start, load, 16-token prompt, one token, exit),
    run from a neutral folder so that it is the installed ember (``-m`` puts the working folder
    first on sys.path: from a checkout's root it would be the checkout's sources)."""
    env = dict(os.environ)
    prompt = "The river runs through the old town, past the mill and under the stone bridge"
    with tempfile.TemporaryDirectory(prefix="ember-ttft-") as tmp:
        if cold:
            env["NUMBA_CACHE_DIR"] = os.path.join(tmp, "numba")
            env["EMBER_CACHE_DIR"] = os.path.join(tmp, "cache")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ember.cli", "run", model, prompt, "--raw", "-n", "1"],
                       capture_output=True, env=env, check=True, cwd=tmp)
        return time.perf_counter() - t


def ember_bytecode() -> bool:
    """Whether a start of the installed ember loads its modules from bytecode. Not when Python may
    not write it (PYTHONDONTWRITEBYTECODE) and the install has none (an editable one): then every
    start compiles ember's sources first (0.2-0.3 s). `pip install .` writes the bytecode."""
    import importlib.util

    import ember.cli

    return not sys.dont_write_bytecode or os.path.exists(importlib.util.cache_from_source(ember.cli.__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description="ember on-device benchmark")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tests", default=",".join(TESTS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peer", action="store_true", help="also run llama.cpp (llama-cpp-python)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="folder for results.json and results.md")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "bandwidth":
            out = worker_bandwidth(int(rest[0]))
        else:
            model, test, threads = rest
            out = (worker_ember if kind == "ember" else worker_llama)(model, test, int(threads))
        print(json.dumps(out))
        return 0

    threads = [int(t) for t in args.threads.split(",")]
    tests = args.tests.split(",")
    engines = ["ember"] + (["llama.cpp"] if args.peer else [])
    if args.peer:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("--peer needs llama-cpp-python: pip install -e '.[peer]' (builds llama.cpp, ~7 min)", file=sys.stderr)
            return 2
    load = machine_load()
    warnings = []
    if load > 0.3:
        warnings.append(f"other processes used {load:.1f} cores while starting: numbers will be noisy")
        print("warning: " + warnings[-1], file=sys.stderr)

    results: dict = {"model": args.model, "machine": _machine(), "load_cores_at_start": load, "warnings": warnings,
                     "bandwidth_bytes_per_s": {}, "runs": {}}
    for t in threads:
        results["bandwidth_bytes_per_s"][t] = _run_worker(["bandwidth", str(t)])["bytes_per_s"]
    for test in tests:
        # An untimed first process per test fills the numba and pack caches, so each timed one is
        # warm (its peak RSS without the JIT's); TTFT cold has its own empty caches.
        _run_worker(["ember", args.model, test, str(threads[0])])
        for t in threads:
            for rep in range(args.reps):
                for engine in engines:  # alternate engines, run by run
                    r = _run_worker(["ember" if engine == "ember" else "llama", args.model, test, str(t)])
                    results["runs"].setdefault(f"{engine}|{test}|{t}", []).append(r)
                    print(f"{engine:>9} {test} t={t} rep {rep + 1}: {r['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    results["ttft_warm_s"] = statistics.median(time_to_first_token(args.model, cold=False) for _ in range(3))
    results["ttft_cold_s"] = time_to_first_token(args.model, cold=True)
    results["ttft_bytecode"] = ember_bytecode()
    results["summary"] = _summarize(results, engines, tests, threads)
    md = _markdown(results, engines, tests, threads)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(md)
    print(json.dumps(results, indent=2) if args.json else md)
    return 0


def _machine() -> dict:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(logical=False),
            "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version()}


def _summarize(results: dict, engines, tests, threads) -> dict:
    summary = {}
    for test in tests:
        for t in threads:
            row = {}
            for engine in engines:
                runs = results["runs"][f"{engine}|{test}|{t}"]
                row[engine] = {
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                    "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                }
                if test == "k8":
                    row[engine]["k_cost_ratio"] = statistics.median(r["k_cost_ratio"] for r in runs)
                if engine == "ember" and test == "tg128":
                    bpt = runs[0]["weight_bytes_per_token"]
                    bw = results["bandwidth_bytes_per_s"][t]
                    row[engine]["weight_bytes_per_token"] = bpt
                    row[engine]["roofline_share"] = bpt * row[engine]["tokens_per_s"] / bw
            if "llama.cpp" in row:
                row["ratio"] = row["ember"]["tokens_per_s"] / row["llama.cpp"]["tokens_per_s"]
            summary[f"{test}|{t}"] = row
    return summary


def _markdown(results: dict, engines, tests, threads) -> str:
    lines = [f"## ember benchmark: {results['model']}", ""]
    head = "| test | threads | " + " | ".join(f"{e} tok/s" for e in engines)
    head += " | ember/llama.cpp |" if len(engines) > 1 else " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for test in tests:
        for t in threads:
            row = results["summary"][f"{test}|{t}"]
            cells = [f"{row[e]['tokens_per_s']:.1f}" for e in engines]
            line = f"| {test} | {t} | " + " | ".join(cells)
            line += f" | {row['ratio']:.2f}x |" if "ratio" in row else " |"
            lines.append(line)
    lines.append("")
    for t in threads:
        key = f"tg128|{t}"
        if key in results["summary"]:
            e = results["summary"][key]["ember"]
            lines.append(f"- decode at {t} thread(s): {e['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token, "
                         f"{100 * e['roofline_share']:.0f}% of the measured {results['bandwidth_bytes_per_s'][t] / 1e9:.1f} GB/s")
    for t in threads:
        key = f"k8|{t}"
        if key in results["summary"]:
            row = results["summary"][key]
            costs = ", ".join(f"{e} {row[e]['k_cost_ratio']:.2f}x" for e in engines)
            lines.append(f"- {K_SMALL} new tokens cost (vs 1 new token) at {t} thread(s): {costs}")
    for e in engines:
        rss = max(v[e]["peak_rss_bytes"] for v in results["summary"].values())
        gen = [v[e]["peak_rss_bytes"] for k, v in results["summary"].items() if k.startswith("tg128|")]
        gen_s = f"; generation (tg128) {max(gen) / 1e6:.0f} MB" if gen else ""
        lines.append(f"- peak RSS {e}: {rss / 1e6:.0f} MB over all tests{gen_s}")
    source = "" if results["ttft_bytecode"] else (
        " (ember's sources compiled at every start: an editable install and PYTHONDONTWRITEBYTECODE;"
        " `pip install .` installs the bytecode)")
    lines.append(f"- ember run, process start to first token: warm {results['ttft_warm_s']:.2f} s, "
                 f"cold {results['ttft_cold_s']:.2f} s{source}")
    lines.append(f"- other processes at start: {results['load_cores_at_start']:.1f} cores")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
