"""`ember bench`: the on-device benchmark of ember (and, with --peer, llama.cpp on the same model
in the same run).

Measures, per engine and thread count, medians of --reps runs, each run in a fresh process
(ember.bench.workers):
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

--quick is a smoke run (well under a minute on 2 cores with warm caches): one rep at the default
thread count, pp128 and tg32, warm TTFT only, no untimed first process per test.

Engines alternate run by run so drift on a shared machine hits both alike; compare ratios.
It warns when another process is loading the machine.

    ember bench [--model smollm2-135m] [--threads 1,2] [--tests pp128,pp512,tg128,k8]
                [--reps 3] [--quick] [--peer] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from ..errors import EmberError
from .report import markdown, summarize
from .scenarios import QUICK_TESTS, TESTS, BenchError, parse_tests, parse_threads

DEFAULT_THREADS = "1,2"
DEFAULT_REPS = 3
TTFT_PROMPT = "The river runs through the old town, past the mill and under the stone bridge"


def _package_root() -> str:
    """The folder that holds the ember package this process runs (site-packages, or a checkout)."""
    import ember

    return str(Path(ember.__file__).resolve().parent.parent)


def run_worker(args: list[str], debug: bool = False) -> dict:
    """One measurement in a fresh process: ``python -m ember.bench.workers ARGS``, run from the
    folder that holds this process's ember package, so the worker imports the same ember (``-m``
    puts the working folder first on sys.path) whether that is an install or a checkout."""
    cmd = [sys.executable, "-m", "ember.bench.workers", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=_package_root())
    if res.returncode != 0:
        err = res.stderr.strip()
        if res.returncode < 0:
            try:
                how = f"killed by {signal.Signals(-res.returncode).name}"
            except ValueError:
                how = f"killed by signal {-res.returncode}"
        else:
            how = f"exit status {res.returncode}"
        last = err.splitlines()[-1] if err else f"{how}, no message"
        detail = f"\n{err[-4000:]}" if debug and err else ""
        raise BenchError(f"worker `{' '.join(args)}` failed: {last}{detail}")
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(f"worker `{' '.join(args)}` printed no result: {res.stdout[-500:]!r}") from None


def machine_load() -> float:
    """CPU used by other processes over half a second, in cores."""
    import psutil

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


def ember_script() -> Path | None:
    """The installed `ember` console script of this Python (its scripts folder, or the folder of
    sys.executable), or None when there is none."""
    names = ("ember.exe", "ember") if os.name == "nt" else ("ember",)
    folders = []
    for scheme in (None, f"{os.name}_user"):
        try:
            folders.append(sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts"))
        except KeyError:
            pass
    folders.append(os.path.dirname(sys.executable))
    for folder in folders:
        for name in names:
            p = Path(folder) / name
            if p.is_file() and os.access(p, os.X_OK):
                return p
    return None


def time_to_first_token(script: Path, model: str, cold: bool) -> float:
    """Wall time of `ember run MODEL PROMPT --raw -n 1` (start, load, 16-token prompt, one token,
    exit) through the installed console script, run from an empty folder; cold: with empty
    numba and pack caches (everything compiles and packs again)."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="ember-ttft-") as tmp:
        if cold:
            env["NUMBA_CACHE_DIR"] = os.path.join(tmp, "numba")
            env["EMBER_CACHE_DIR"] = os.path.join(tmp, "cache")
        t = time.perf_counter()
        res = subprocess.run(
            [str(script), "run", model, TTFT_PROMPT, "--raw", "-n", "1"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
        dt = time.perf_counter() - t
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()
        raise BenchError(f"`{script} run` failed: {err[-1] if err else f'exit status {res.returncode}'}")
    return dt


def ember_bytecode() -> bool:
    """Whether a start of the installed ember loads its modules from bytecode. Not when Python may
    not write it (PYTHONDONTWRITEBYTECODE) and the install has none (an editable one): then every
    start compiles ember's sources first (0.2-0.3 s). `pip install .` writes the bytecode."""
    import importlib.util

    cli = importlib.util.find_spec("ember.cli").origin  # found, not imported: cli imports this module
    return not sys.dont_write_bytecode or os.path.exists(importlib.util.cache_from_source(cli))


def machine() -> dict:
    import platform

    import psutil

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ember bench",
        description="On-device benchmark: prompt (ppN) and decode (tgN) tokens/s, the cost of N new "
        "tokens after a context (kN), peak RSS and `ember run` start-up time; with --peer "
        "also llama.cpp on the same model. Each measurement runs in a fresh process.",
    )
    ap.add_argument("--model", default="smollm2-135m", help="catalog name or path to a .gguf (default: %(default)s)")
    ap.add_argument(
        "--threads",
        help=f"comma-separated thread counts (default: {DEFAULT_THREADS}; "
        "--quick: ember's default, EMBER_THREADS or the physical cores)",
    )
    ap.add_argument(
        "--tests",
        help=f"comma-separated tests: ppN, tgN, kN (default: {','.join(TESTS)}; --quick: {','.join(QUICK_TESTS)})",
    )
    ap.add_argument(
        "--reps",
        type=int,
        help=f"timed runs per test, engine and thread count; the median counts (default: {DEFAULT_REPS}; --quick: 1)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one rep, one thread count, small tests, no cold start-up time",
    )
    ap.add_argument("--peer", action="store_true", help="also run llama.cpp (needs llama-cpp-python: the peer extra)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--out", help="folder to write results.json and results.md into")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and workers' full error output")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`ember bench ARGS`: run the benchmark, print the report (or JSON with --json); 0 on
    success, 2 with one line on stderr on an error, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return _bench(args)
    except EmberError as e:
        if args.debug:
            raise
        print(f"ember bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ember bench: interrupted", file=sys.stderr)
        return 130


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bench(args: argparse.Namespace) -> int:
    import ember
    from ember.runtime.threads import default_threads

    if args.threads is not None:
        threads = parse_threads(args.threads)
    else:
        threads = [default_threads()] if args.quick else parse_threads(DEFAULT_THREADS)
    tests = parse_tests(args.tests) if args.tests is not None else list(QUICK_TESTS if args.quick else TESTS)
    reps = args.reps if args.reps is not None else (1 if args.quick else DEFAULT_REPS)
    if reps < 1:
        raise BenchError(f"--reps {reps}: give at least 1")
    if args.peer:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise BenchError(
                "--peer needs llama-cpp-python: pip install 'ember[peer]' (builds llama.cpp, ~7 min)"
            ) from None
    engines = ["ember"] + (["llama.cpp"] if args.peer else [])
    # A name not in the catalog fails here, in one line; a catalog model is pulled once, here.
    # Workers get the file's absolute path: they run from another folder.
    model_path = str(ember.hub.resolve(args.model).resolve())

    warnings: list[str] = []
    load = machine_load()
    if load > 0.3:
        warnings.append(f"other processes used {load:.1f} cores while starting: numbers will be noisy")
        _note("warning: " + warnings[-1])
    script = ember_script()
    if script is None:
        warnings.append(
            "no `ember` console script next to this Python: start-up time (TTFT) skipped; "
            "pip install the package to measure it"
        )
        _note("warning: " + warnings[-1])

    results: dict = {
        "model": args.model,
        "model_path": model_path,
        "quick": args.quick,
        "machine": machine(),
        "load_cores_at_start": load,
        "warnings": warnings,
        "threads": threads,
        "tests": tests,
        "reps": reps,
        "bandwidth_bytes_per_s": {},
        "runs": {},
    }
    for t in threads:
        bw = run_worker(["bandwidth", str(t)], args.debug)["bytes_per_s"]
        results["bandwidth_bytes_per_s"][t] = bw
        _note(f"bandwidth t={t}: {bw / 1e9:.1f} GB/s")
    for test in tests:
        if not args.quick:
            # An untimed first process per test fills the numba and pack caches, so each timed one
            # is warm (its peak RSS without the JIT's); TTFT cold has its own empty caches.
            run_worker(["ember", model_path, test, str(threads[0])], args.debug)
        for t in threads:
            for rep in range(reps):
                for engine in engines:  # alternate engines, run by run
                    r = run_worker(["ember" if engine == "ember" else "llama", model_path, test, str(t)], args.debug)
                    results["runs"].setdefault(f"{engine}|{test}|{t}", []).append(r)
                    _note(f"{engine:>9} {test} t={t} rep {rep + 1}: {r['tokens_per_s']:.1f} tok/s")
    results["ttft_warm_s"] = results["ttft_cold_s"] = None
    if script is not None:
        try:
            n_warm = 1 if args.quick else 3
            results["ttft_warm_s"] = statistics.median(
                time_to_first_token(script, model_path, cold=False) for _ in range(n_warm)
            )
            _note(f"ember run, start to first token (warm): {results['ttft_warm_s']:.2f} s")
            if not args.quick:
                results["ttft_cold_s"] = time_to_first_token(script, model_path, cold=True)
                _note(f"ember run, start to first token (cold): {results['ttft_cold_s']:.2f} s")
        except BenchError as e:  # the speeds measured so far still get reported
            warnings.append(f"start-up time (TTFT) not measured: {e}")
            _note("warning: " + warnings[-1])
    results["ttft_bytecode"] = ember_bytecode()
    results["summary"] = summarize(results, engines, tests, threads)
    md = markdown(results, engines, tests, threads)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(md)
    print(json.dumps(results, indent=2) if args.json else md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
