"""`ember bench`: the on-device benchmark of ember (and, with --peer, llama.cpp on the same model
in the same run), as scenarios (ember.bench.runners):

  dense         pp128, pp512, tg128, k8 (--tests) per engine and thread count; DRAM bandwidth
  ttft          `ember run`'s process start to first token, warm and cold
  memory        peak RSS of a 512-token prompt and 64 decodes
  long-context  decode tokens/s after prompts of 128, 512, 2048 and 4096 tokens, per thread count
  offload       decode under memory budgets, against plain mmap and llama.cpp under a memory cgroup
  speculative   prompt lookup and a draft model against plain decoding, the same tokens required
  moe           a synthetic Qwen3-MoE's prompt and decode speed
  moe-budget    that model under a budget of a quarter of its experts: the expert cache with and
                without prediction, against the disk's roofline and llama.cpp under a memory cgroup
  devices       decode tokens/s against context on the CPU and each OpenCL device, the device's time by kind

Every measurement runs in a fresh process (ember.bench.workers). Engines alternate run by run so
drift on a shared machine hits both alike; medians (with min and max) of --reps runs count;
compare ratios. Other processes' CPU use is measured before the run and during each measurement
(a result taken while they used more than 0.3 cores is marked busy).

Writes results.json (schema SCHEMA), report.md and, with matplotlib (the `bench` extra), PNG plots
into --out (default: $EMBER_HOME/bench/MODEL-DATE); prints a summary.

--quick is a smoke run (under 2 minutes on smollm2-135m with warm caches): one rep, one thread
count, small sizes, no cold start-up, no peer unless --peer.

    ember bench [--model smollm2-135m] [--scenario all] [--threads 1,2] [--tests pp128,pp512,tg128,k8]
                [--reps 3] [--quick] [--peer] [--draft MODEL] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from ..errors import EmberError
from . import report
from .environment import BUSY_CORES, LoadMeter, machine, machine_load, sha256, versions
from .runners import RUNNERS, Skip
from .scenarios import QUICK_TESTS, SCENARIOS, TESTS, BenchError, parse_scenarios, parse_tests, parse_threads

SCHEMA = "ember-bench/2"
DEFAULT_THREADS = "1,2"
DEFAULT_REPS = 3


def _package_root() -> str:
    """The folder that holds the ember package this process runs (site-packages, or a checkout)."""
    import ember

    return str(Path(ember.__file__).resolve().parent.parent)


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


def _failure(res: subprocess.CompletedProcess, what: str, debug: bool, memory_limit: int | None) -> BenchError:
    err = res.stderr.strip()
    if res.returncode < 0:
        try:
            how = f"killed by {signal.Signals(-res.returncode).name}"
        except ValueError:
            how = f"killed by signal {-res.returncode}"
        if memory_limit and res.returncode == -signal.SIGKILL:
            how += f" (out of memory under the {memory_limit / 1e6:.0f} MB limit)"
        last = how
    else:
        last = err.splitlines()[-1] if err else f"exit status {res.returncode}, no message"
    detail = f"\n{err[-4000:]}" if debug and err else ""
    return BenchError(f"{what} failed: {last}{detail}")


class Bench:
    """One benchmark run: its options, the progress display, and the runs of workers and commands
    in fresh processes, each with the other processes' CPU use during it."""

    def __init__(self, args: argparse.Namespace, model_path: str, model_name: str, n_ctx_train: int):
        from ember.runtime.threads import default_threads

        self.quick, self.debug, self.draft = args.quick, args.debug, args.draft
        self.kv_cache = args.kv_cache
        if args.threads is not None:
            self.threads = parse_threads(args.threads)
        else:
            self.threads = [default_threads()] if args.quick else parse_threads(DEFAULT_THREADS)
        self.tests = parse_tests(args.tests) if args.tests is not None else list(QUICK_TESTS if args.quick else TESTS)
        self.reps = args.reps if args.reps is not None else (1 if args.quick else DEFAULT_REPS)
        if self.reps < 1:
            raise BenchError(f"--reps {self.reps}: give at least 1")
        self.engines = ["ember"] + (["llama.cpp"] if args.peer else [])
        self.model_path, self.model_name, self.n_ctx_train = model_path, model_name, n_ctx_train
        self.script = ember_script()
        self.warnings: list[str] = []
        self._progress = self._task = None
        self._repack: bool | None = None  # llama.cpp's weight repacking works here (None: not checked)

    # progress and messages
    def start_progress(self, total: int) -> None:
        if not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task("starting", total=total)
        self._progress.start()

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def note(self, msg: str) -> None:
        if self._progress is not None:
            self._progress.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self.note("warning: " + msg)

    def step(self, n: int = 1, what: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **({"description": what} if what else {}))

    def _describe(self, what: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=what)

    # runs
    def command(self, cmd: list[str], what: str, memory_limit: int | None = None, timeout: float | None = None, **kw):
        """Run cmd to its end in a fresh process (under a memory cgroup of memory_limit bytes);
        {"wall_s", "load_cores", "busy", "stdout", ("cgroup_peak_bytes")}; a failure, a kill or
        a timeout is a BenchError."""
        from .cgroup import MemoryCgroup

        self._describe(what)
        with MemoryCgroup(memory_limit) if memory_limit else contextlib.nullcontext() as cg:
            if cg is not None:
                kw["preexec_fn"] = cg.enter
            meter, t = LoadMeter(), time.perf_counter()
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
            except subprocess.TimeoutExpired:
                self.step()
                raise BenchError(f"{what}: stopped after {timeout:.0f} s") from None
            wall, load = time.perf_counter() - t, meter.others()
            peak = cg.peak_bytes() if cg is not None else None
        self.step()
        if res.returncode != 0:
            raise _failure(res, what, self.debug, memory_limit)
        out = {"wall_s": wall, "load_cores": round(load, 2), "busy": load > BUSY_CORES, "stdout": res.stdout}
        if peak is not None:
            out["cgroup_peak_bytes"] = peak
        if out["busy"]:
            self.note(f"warning: other processes used {load:.1f} cores during {what}: marked busy")
        return out

    def llama_repack(self) -> bool:
        """Whether llama.cpp's runs repack their weights (its default, its fastest): not where a
        load with repacking dies here (its AMX repack: SIGSEGV on a Xeon VM, llama.cpp issue
        #20824); checked once, by a load and a short prompt."""
        if self._repack is None:
            try:
                self.worker("llama_probe", "llama.cpp repacking check", model=self.model_path, threads=1, repack=True)
                self._repack = True
            except BenchError as e:
                self._repack = False
                self.warn(f"llama.cpp runs with its weight repacking off: a load with it failed here ({e})")
        return self._repack

    def worker(self, kind: str, what: str, memory_limit: int | None = None, timeout: float | None = None, **args):
        """One measurement: ``python -m ember.bench.workers KIND JSON`` from the folder that holds
        this process's ember package (so the worker imports the same ember); its JSON result with
        the run's wall time, load and busy mark added."""
        if kind in ("llama", "llama_speculative") and "repack" not in args:  # (llama_replay never repacks)
            args["repack"] = self.llama_repack()
        if kind in ("ember", "llama") and self.kv_cache != "f16":
            args["kv_cache"] = self.kv_cache
        cmd = [sys.executable, "-m", "ember.bench.workers", kind, json.dumps(args)]
        r = self.command(cmd, what, memory_limit, timeout, cwd=_package_root())
        try:
            result = json.loads(r.pop("stdout").strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise BenchError(f"{what}: the worker printed no result") from None
        return dict(result, **r)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ember bench",
        description="On-device benchmark, by scenario: dense prompt and decode speed, start-up, "
        "memory, long context, offload under a memory budget, speculative decoding; with --peer "
        "also llama.cpp on the same model. Each measurement runs in a fresh process. Writes "
        "results.json, report.md and plots into --out.",
    )
    ap.add_argument("--model", default="smollm2-135m", help="catalog name or path to a .gguf (default: %(default)s)")
    ap.add_argument(
        "--scenario",
        default="all",
        help=f"comma-separated scenarios, or all (default): {','.join(SCENARIOS)}",
    )
    ap.add_argument(
        "--threads",
        help=f"comma-separated thread counts (default: {DEFAULT_THREADS}; "
        "--quick: ember's default, EMBER_THREADS or the physical cores); scenarios other than "
        "dense and long-context use the last",
    )
    ap.add_argument(
        "--tests",
        help=f"the dense scenario's tests, comma-separated: ppN, tgN, tgN@CTX, kN "
        f"(default: {','.join(TESTS)}; --quick: {','.join(QUICK_TESTS)})",
    )
    ap.add_argument(
        "--reps",
        type=int,
        help=f"timed runs per test, engine and thread count; the median counts (default: {DEFAULT_REPS}; --quick: 1)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one rep, one thread count, small sizes, no cold start-up time",
    )
    ap.add_argument("--peer", action="store_true", help="also run llama.cpp (needs llama-cpp-python: the peer extra)")
    ap.add_argument(
        "--draft",
        help="the speculative scenario's draft model (catalog name or .gguf; default: the catalog's "
        "draft for the model, e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)",
    )
    ap.add_argument(
        "--kv-cache",
        default="f16",
        choices=["f16", "q8_0"],
        help="the KV cache's type in the dense and long-context runs, both engines' "
        "(llama.cpp's q8_0 cache runs with its flash attention); default: %(default)s",
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument(
        "--out", help="folder for results.json, report.md and the plots (default: $EMBER_HOME/bench/MODEL-DATE)"
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks and workers' full error output")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`ember bench ARGS`: run the benchmark, write its files, print the summary (or JSON with
    --json); 0 on success, 2 with one line on stderr on an error, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return _bench(args, sys.argv[1:] if argv is None else argv)
    except EmberError as e:
        if args.debug:
            raise
        print(f"ember bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ember bench: interrupted", file=sys.stderr)
        return 130


def _model(name: str) -> tuple[str, int, str]:
    """(absolute path, trained context length, architecture) of a catalog name or .gguf path; a
    name not in the catalog fails here in one line, a catalog model is pulled once, here."""
    import ember
    from ember.formats.gguf import open_gguf

    path = str(ember.hub.resolve(name).resolve())
    g = open_gguf(path)
    return path, int(g.arch_get("context_length", 2048) or 2048), g.architecture


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    scenarios = parse_scenarios(args.scenario)
    if args.tests is not None:
        parse_tests(args.tests)
    if args.peer:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise BenchError(
                "--peer needs llama-cpp-python: pip install 'ember[peer]' (builds llama.cpp, ~7 min)"
            ) from None
    if args.threads is not None:
        parse_threads(args.threads)
    if args.reps is not None and args.reps < 1:
        raise BenchError(f"--reps {args.reps}: give at least 1")
    model_path, n_ctx_train, arch = _model(args.model)
    b = Bench(args, model_path, args.model, n_ctx_train)
    if b.draft is not None:
        b.draft = _model(b.draft)[0]
    started = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out) if args.out else _default_out(args.model, started)

    load = machine_load()
    if load > BUSY_CORES:
        b.warn(f"other processes used {load:.1f} cores while starting: numbers will be noisy")
    results: dict = {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "command": "ember bench " + " ".join(argv),
        "options": {
            "scenarios": scenarios,
            "threads": b.threads,
            "tests": b.tests,
            "reps": b.reps,
            "quick": b.quick,
            "engines": b.engines,
            "draft": b.draft,
        },
        "model": {
            "name": args.model,
            "path": model_path,
            "architecture": arch,
            "bytes": os.path.getsize(model_path),
            "sha256": sha256(model_path),
            "context_length": n_ctx_train,
        },
        "environment": {"machine": machine(), "versions": versions(), "load_cores_at_start": round(load, 2)},
        "warnings": b.warnings,
        "scenarios": {},
    }
    b.start_progress(sum(RUNNERS[name][1](b) for name in scenarios))
    try:
        for name in scenarios:
            run, steps = RUNNERS[name]
            expected, t = steps(b), time.perf_counter()
            try:
                section = dict(run(b), status="ok")
            except Skip as e:
                section = {"status": "skipped", "reason": str(e)}
                b.note(f"{name}: skipped: {e}")
                b.step(expected)
            except BenchError as e:  # the other scenarios still run and get reported
                section = {"status": "failed", "reason": str(e)}
                b.warn(f"{name}: failed: {e}")
            section["elapsed_s"] = round(time.perf_counter() - t, 1)
            results["scenarios"][name] = section
    finally:
        b.stop_progress()
    report.summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = report.plots(results, out, b.warn)
    md = report.markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(md)
    if args.json:
        print(json.dumps(results, indent=2), flush=True)
    else:
        report.print_summary(results)
    print(f"report: {out / 'report.md'}", file=sys.stderr, flush=True)
    return 0


def _default_out(model: str, when: datetime.datetime) -> Path:
    from ember.home import ember_home

    stem = Path(model).stem if model.endswith(".gguf") else model
    return ember_home() / "bench" / f"{stem}-{when.strftime('%Y%m%d-%H%M%S')}"


if __name__ == "__main__":
    sys.exit(main())
