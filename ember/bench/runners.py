"""The benchmark's scenarios: what each runs (workers in fresh processes, through `Bench`) and the
raw records it keeps. A scenario that needs what is absent (the peer, a memory cgroup, a GPU, a
feature ember lacks) raises `Skip` with the reason before it measures anything.

dense         ppN / tgN / kN per engine and thread count (--tests), plus the DRAM bandwidth
ttft          `ember run`'s process start to first token, warm and cold (empty caches)
memory        peak RSS of a 512-token prompt and 64 decodes, per engine
long-context  decode tokens/s after prompts of CONTEXTS tokens, per engine
offload       decode under memory budgets (BUDGETS x the weight bytes), the page cache dropped
              first, against the resident run's tokens, the disk's roofline, plain mmap under a
              memory cgroup of the same size, and llama.cpp under that cgroup
speculative   plain decoding against prompt lookup and a draft model (in turns, concurrently) on
              two rewrite requests, the same tokens required; llama.cpp plain and with its
              prompt-lookup decoding
moe           a prompt and decode of a synthetic Qwen3-MoE (`synth_moe`: Qwen3-30B-A3B's layer
              shape, 12 layers, ~5 GB; --quick: a tiny one) per engine and thread count
moe-budget    decode of that model under a budget of MOE_BUDGET_SHARE of its routed experts'
              bytes, the page cache dropped first: the expert cache with and without read-ahead
              on guesses, against the resident run's argmax, the disk's roofline for the bytes
              read, and llama.cpp under a memory cgroup of the same size
devices       decode tokens/s after prompts of DEVICE_CONTEXTS tokens on each device here (the CPU,
              every OpenCL device), with the OpenCL device's own time per token by kind
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import cgroup
from .environment import disk_bandwidth
from .scenarios import (
    BUDGETS,
    CONTEXT_DECODE,
    CONTEXTS,
    DEVICE_CONTEXTS,
    DEVICE_DECODE,
    DRAFTS,
    MOE_BUDGET_SHARE,
    MOE_DECODE,
    MOE_PROMPT,
    OFFLOAD_DECODE,
    QUICK_CONTEXT_DECODE,
    QUICK_CONTEXTS,
    QUICK_DEVICE_CONTEXTS,
    QUICK_DEVICE_DECODE,
    QUICK_MOE_DECODE,
    QUICK_OFFLOAD_DECODE,
    QUICK_SPEC_DECODE,
    SPEC_DECODE,
    BenchError,
)

TTFT_PROMPT = "The river runs through the old town, past the mill and under the stone bridge"
MEMORY_TEST = "tg64@512"
SLOW_RUN_S = 180  # a run under a memory cgroup that thrashes is stopped after this long
QUICK_STREAM_SHARE = 0.5


class Skip(Exception):
    """This scenario cannot run here; the message says why."""


def dense(b) -> dict:
    return _speeds(b, b.model_path, b.tests)


def dense_steps(b) -> int:
    return _speed_steps(b, len(b.tests))


def _speeds(b, model: str, tests: list[str], label: str = "") -> dict:
    """The DRAM bandwidth per thread count, then each test at each thread count for each engine,
    engines alternating run by run (`label` names the model in the notes)."""
    threads = b.threads
    out: dict = {"tests": list(tests), "threads": threads, "bandwidth_bytes_per_s": {}, "runs": []}
    for t in threads:
        r = b.worker("bandwidth", f"bandwidth t={t}", threads=t)
        out["bandwidth_bytes_per_s"][str(t)] = r["bytes_per_s"]
        b.note(f"bandwidth t={t}: {r['bytes_per_s'] / 1e9:.1f} GB/s")
    for test in tests:
        if not b.quick:
            # An untimed first process per test fills the numba and pack caches, so each timed
            # one is warm (its peak RSS without the JIT's).
            b.worker("ember", f"warm-up {label}{test}", model=model, test=test, threads=threads[0])
        for t in threads:
            for rep in range(b.reps):
                for engine in b.engines:  # alternate engines, run by run
                    r = b.worker(_kind(engine), f"{engine} {label}{test} t={t}", model=model, test=test, threads=t)
                    out["runs"].append(dict(r, engine=engine, test=test, threads=t, rep=rep))
                    b.note(f"{engine:>9} {label}{test} t={t} rep {rep + 1}: {r['tokens_per_s']:.1f} tok/s")
    return out


def _speed_steps(b, n_tests: int) -> int:
    warm = 0 if b.quick else n_tests
    return len(b.threads) + warm + n_tests * len(b.threads) * b.reps * len(b.engines)


def ttft(b) -> dict:
    if b.script is None:
        raise Skip("no `ember` console script next to this Python: pip install the package to measure start-up")
    out: dict = {"warm_s": [], "cold_s": None, "bytecode": _bytecode()}
    for _ in range(1 if b.quick else 3):
        out["warm_s"].append(_time_first_token(b, cold=False))
    b.note(f"ember run, start to first token (warm): {statistics.median(out['warm_s']):.2f} s")
    if not b.quick:
        out["cold_s"] = _time_first_token(b, cold=True)
        b.note(f"ember run, start to first token (cold): {out['cold_s']:.2f} s")
    return out


def ttft_steps(b) -> int:
    return 1 if b.quick else 4


def _time_first_token(b, cold: bool) -> float:
    """Wall time of `ember run MODEL PROMPT --raw -n 1` (start, load, 16-token prompt, one token,
    exit) through the installed console script, from an empty folder; cold: with empty numba
    and pack caches (everything compiles and packs again)."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="ember-ttft-") as tmp:
        if cold:
            env["NUMBA_CACHE_DIR"] = os.path.join(tmp, "numba")
            env["EMBER_CACHE_DIR"] = os.path.join(tmp, "cache")
        cmd = [str(b.script), "run", b.model_path, TTFT_PROMPT, "--raw", "-n", "1"]
        return b.command(cmd, f"ember run ({'cold' if cold else 'warm'})", env=env, cwd=tmp)["wall_s"]


def _bytecode() -> bool:
    """Whether a start of the installed ember loads its modules from bytecode. Not when Python may
    not write it (PYTHONDONTWRITEBYTECODE) and the install has none (an editable one): then every
    start compiles ember's sources first (0.2-0.3 s). `pip install .` writes the bytecode."""
    import importlib.util
    import sys

    cli = importlib.util.find_spec("ember.cli").origin  # found, not imported: cli imports the bench
    return not sys.dont_write_bytecode or os.path.exists(importlib.util.cache_from_source(cli))


def memory(b) -> dict:
    t = b.threads[-1]
    out: dict = {"test": MEMORY_TEST, "threads": t, "model_bytes": os.path.getsize(b.model_path), "runs": []}
    for engine in b.engines:
        r = b.worker(_kind(engine), f"{engine} memory", model=b.model_path, test=MEMORY_TEST, threads=t)
        out["runs"].append(dict(r, engine=engine))
        b.note(f"{engine:>9} peak RSS ({MEMORY_TEST}): {r['peak_rss_bytes'] / 1e6:.0f} MB")
    return out


def memory_steps(b) -> int:
    return len(b.engines)


def long_context(b) -> dict:
    contexts = _contexts(b)
    if not contexts:
        raise Skip(f"the model's context ({b.n_ctx_train} tokens) is shorter than {min(CONTEXTS)} + the decodes")
    n = QUICK_CONTEXT_DECODE if b.quick else CONTEXT_DECODE
    out: dict = {"contexts": contexts, "decode": n, "threads": list(b.threads), "runs": []}
    for t in b.threads:
        for ctx in contexts:
            test = f"tg{n}@{ctx}"
            for rep in range(b.reps):
                for engine in b.engines:
                    r = b.worker(_kind(engine), f"{engine} {test}", model=b.model_path, test=test, threads=t)
                    out["runs"].append(dict(r, engine=engine, context=ctx, threads=t, rep=rep))
                    b.note(f"{engine:>9} {test} t={t} rep {rep + 1}: {r['tokens_per_s']:.1f} tok/s")
    return out


def _contexts(b) -> list[int]:
    n = QUICK_CONTEXT_DECODE if b.quick else CONTEXT_DECODE
    return [c for c in (QUICK_CONTEXTS if b.quick else CONTEXTS) if c + n + 16 <= b.n_ctx_train]


def long_context_steps(b) -> int:
    return len(b.threads) * len(_contexts(b)) * b.reps * len(b.engines)


def _drop_model_pages(b) -> None:
    """Drop the model file's and its pack cache's pages from the page cache before a run: its
    reads then come from the disk, and under a memory cgroup the pages it faults in are charged
    to that cgroup (a page stays charged to whoever first read it, so pages left cached by an
    earlier run would not count against the limit)."""
    _drop_pages(b.model_path)


def _drop_pages(model) -> None:
    from ember import hub
    from ember.home import uncache
    from ember.lut_kernels import pack_cache

    uncache(model)
    uncache(pack_cache.cache_path(hub.resolve(model)))


DISK_PROBE = 512 << 20  # bytes read to measure the disk right before and after a budgeted run


def offload(b) -> dict:
    budgets: list[float] = list(BUDGETS)
    n, t = (QUICK_OFFLOAD_DECODE if b.quick else OFFLOAD_DECODE), b.threads[-1]
    size = os.path.getsize(b.model_path)
    no_cgroup = cgroup.unavailable()
    out: dict = {
        "threads": t,
        "decode": n,
        "weight_bytes": size,
        "cgroup": no_cgroup or "available",
        "disk_bytes_per_s": disk_bandwidth(b.model_path),
        "runs": [],
    }
    b.note(f"disk sequential read: {out['disk_bytes_per_s'] / 1e9:.2f} GB/s")
    b.step()
    _drop_model_pages(b)
    ref = b.worker("offload", "ember resident", model=b.model_path, budget=None, threads=t, tokens=n)
    out["runs"].append(dict(ref, engine="ember", variant="resident", fraction=None, budget=None, same_tokens=True))
    b.note(f"ember resident: {ref['tokens_per_s']:.2f} tok/s")
    if b.quick:  # a small model's fixed needs (the process, the KV cache) dwarf its weights:
        budgets = [QUICK_STREAM_SHARE]  # stream about half its layers' bytes instead
    for frac in budgets:
        budget = None if b.quick else int(frac * size)
        label = f"{frac:.0%} ({budget / 1e6:.0f} MB)" if budget else f"{frac:.0%} of the layers streamed"
        how = {"stream_share": frac} if b.quick else {"budget": budget}
        try:
            before = disk_bandwidth(b.model_path, DISK_PROBE)  # the disk's rate varies by 4x from minute to minute
            _drop_model_pages(b)
            r = b.worker("offload", f"ember budget {label}", model=b.model_path, threads=t, tokens=n, **how)
            disk = (before + disk_bandwidth(b.model_path, DISK_PROBE)) / 2
            r = dict(r, same_tokens=r["tokens"] == ref["tokens"], disk_bytes_per_s=disk)
            b.note(f"ember budget {label}: {r['tokens_per_s']:.2f} tok/s, same tokens {r['same_tokens']}")
            budget, frac = r["budget"], r["budget"] / size
            label = f"{frac:.0%} ({budget / 1e6:.0f} MB)"
        except BenchError as e:  # an infeasible budget is a result: the BudgetError's minimum
            r = {"error": str(e)}
            b.note(f"ember budget {label}: {e}")
        out["runs"].append(dict(r, engine="ember", variant="budget", fraction=frac, budget=budget))
        if budget is None or no_cgroup:
            b.step(len(b.engines))
            continue
        variants = [("ember", "mmap"), *((e, "mmap") for e in b.engines if e != "ember")]
        for engine, variant in variants:
            what = f"{engine} plain mmap under a {label} cgroup"
            _drop_model_pages(b)
            try:
                if engine == "ember":
                    r = b.worker(
                        "offload",
                        what,
                        model=b.model_path,
                        budget=None,
                        threads=t,
                        tokens=n,
                        memory_limit=budget,
                        timeout=SLOW_RUN_S,
                    )
                    r = dict(r, same_tokens=r["tokens"] == ref["tokens"])
                else:
                    test = f"tg{n}"
                    r = b.worker(
                        "llama", what, model=b.model_path, test=test, threads=t, repack=False,
                        memory_limit=budget, timeout=SLOW_RUN_S,
                    )  # fmt: skip
                b.note(f"{what}: {r['tokens_per_s']:.2f} tok/s")
            except BenchError as e:  # killed by the limit, or too slow to wait for: also a result
                r = {"error": str(e)}
                b.note(f"{what}: {e}")
            out["runs"].append(dict(r, engine=engine, variant=variant, fraction=frac, budget=budget))
    if no_cgroup:
        b.warn(f"offload: plain mmap and llama.cpp under a memory limit not measured: {no_cgroup}")
    return out


def offload_steps(b) -> int:
    return 2 + (1 if b.quick else len(BUDGETS)) * (1 + len(b.engines))


def speculative(b) -> dict:
    n, t = (QUICK_SPEC_DECODE if b.quick else SPEC_DECODE), b.threads[-1]
    variants = _variants(b)
    requests = list(dict.fromkeys(v[4] for v in variants))
    out: dict = {"threads": t, "decode": n, "requests": requests, "drafts": [v[0] for v in variants], "runs": []}
    if b.draft is None and not b.quick and b.model_name not in DRAFTS:
        b.warn(f"speculative: no catalog draft model for {b.model_name}: prompt lookup only (--draft to add one)")
    for rep in range(b.reps):
        plain: dict[str, list[int]] = {}
        for name, draft, k, schedule, request, quant in variants:
            label = f"ember {name} ({request})"
            r = b.worker(
                "speculative", label, model=b.model_path, draft=draft, k=k, schedule=schedule,
                threads=t, tokens=n, request=request, quant=quant,
            )  # fmt: skip
            if draft is None:
                plain[request] = r["tokens"]
            same = r["tokens"] == plain.get(request)
            out["runs"].append(dict(r, engine="ember", drafter=name, request=request, rep=rep, same_tokens=same))
            b.note(f"    {label}: {r['tokens_per_s']:.1f} tok/s, same tokens {same}")
        for engine in b.engines[1:]:
            for request in requests:
                for lookup in (False, True):
                    name = "lookup" if lookup else "plain"
                    try:
                        r = b.worker(
                            "llama_speculative", f"{engine} {name} ({request})", model=b.model_path, lookup=lookup,
                            threads=t, tokens=n, request=request,
                        )  # fmt: skip
                    except BenchError as e:  # the peer's failure leaves ember's figures standing
                        b.warn(f"speculative: {e}")
                        continue
                    out["runs"].append(dict(r, engine=engine, drafter=name, request=request, rep=rep))
                    b.note(f"{engine:>9} {name} ({request}): {r['tokens_per_s']:.1f} tok/s")
    return out


def _variants(b) -> list[tuple[str, str | None, int | None, str, str, str]]:
    """(name, draft, k, schedule, request, draft_quant) of ember's runs, each request's plain run
    first (the others' tokens are checked against it). --quick: plain and prompt lookup on the
    type-hints request. Else also lookup at k = 10, and the draft model (its 4-bit copy) with the
    schedule and k chosen per step, in turns and concurrently (k per step and k = 4), and from
    its file as it is; on the rename request (a few words change), plain, lookup and the draft
    model both ways."""
    model = b.draft or (None if b.quick else DRAFTS.get(b.model_name))
    hints, rename = "type hints", "rename"
    out: list[tuple[str, str | None, int | None, str, str, str]] = [
        ("plain", None, None, "auto", hints, "q4_0"),
        ("lookup", "lookup", None, "auto", hints, "q4_0"),
    ]
    if b.quick:
        return out
    out.append(("lookup k=10", "lookup", 10, "auto", hints, "q4_0"))
    name = None
    if model:
        name = Path(model).stem if model.endswith(".gguf") else model
        for k in (None, 4):
            for schedule in ("auto", "turns", "concurrent"):
                if k is None or schedule != "auto":
                    label = name + ("" if schedule == "auto" else f" {schedule}") + (f" k={k}" if k else "")
                    out.append((label, model, k, schedule, hints, "q4_0"))
        out.append((f"{name} file", model, None, "auto", hints, "file"))
    out += [("plain", None, None, "auto", rename, "q4_0"), ("lookup", "lookup", None, "auto", rename, "q4_0")]
    if name:
        out += [(name, model, None, "auto", rename, "q4_0"), (f"{name} file", model, None, "auto", rename, "file")]
    return out


def speculative_steps(b) -> int:
    requests = len({v[4] for v in _variants(b)})
    return b.reps * (len(_variants(b)) + 2 * requests * (len(b.engines) - 1))


MOE_TESTS = ("pp64", "tg32")  # a prompt: each chosen expert read once for the rows that chose it
MOE_LAYERS, QUICK_MOE = 12, dict(n_layer=2, n_expert=8, n_expert_used=2, n_embd=256, n_ff_exp=256, n_head=4,
                                 n_head_kv=2, head_dim=64)  # fmt: skip


def _synthetic_moe(b) -> tuple[Path, dict]:
    """The synthetic Qwen3-MoE (`synth_moe`; --quick: a tiny one), written once into the cache
    folder with the tokenizer of the bench's model, and reused; and its shape."""
    from ember.home import cache_dir

    from . import synth_moe

    shape = QUICK_MOE if b.quick else dict(synth_moe.QWEN3_30B_A3B, n_layer=MOE_LAYERS)
    tag = "-".join(f"{v}" for v in shape.values())
    path = cache_dir("synthetic") / f"qwen3moe-v{synth_moe.VERSION}-{tag}-{Path(b.model_path).stem}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        b.note(f"writing the synthetic MoE model {path.name}")
        synth_moe.write(path, b.model_path, **shape)
    return path, shape


def moe(b) -> dict:
    path, shape = _synthetic_moe(b)
    out = _speeds(b, str(path), list(MOE_TESTS), "MoE ")
    out["model"] = {"file": path.name, "bytes": path.stat().st_size, "shape": shape}
    return out


def moe_steps(b) -> int:
    return _speed_steps(b, len(MOE_TESTS))


MOE_VARIANTS = (  # (name, read ahead on guesses, eviction)
    ("cache, prediction", True, "score"),
    ("cache, no prediction", False, "score"),
    ("cache (lru), prediction", True, "lru"),
)


def _routed_expert_bytes(path: Path) -> int:
    from ember.formats.gguf import GGUFFile

    g = GGUFFile(path)
    return sum(t.nbytes for n, t in g.tensors.items() if "_exps." in n)


def moe_budget(b) -> dict:
    path, shape = _synthetic_moe(b)
    n, t = (QUICK_MOE_DECODE if b.quick else MOE_DECODE), b.threads[-1]
    experts = _routed_expert_bytes(path)
    budget = None if b.quick else int(experts * MOE_BUDGET_SHARE)
    no_cgroup = cgroup.unavailable()
    out: dict = {
        "threads": t,
        "prompt": MOE_PROMPT,
        "decode": n,
        "model": {"file": path.name, "bytes": path.stat().st_size, "shape": shape, "expert_bytes": experts},
        "budget": budget,
        "cgroup": no_cgroup or "available",
        "disk_bytes_per_s": disk_bandwidth(str(path)),
        "runs": [],
    }
    b.note(f"disk sequential read: {out['disk_bytes_per_s'] / 1e9:.2f} GB/s")
    args = dict(model=str(path), threads=t, tokens=n, prompt=MOE_PROMPT)
    ref = b.worker("moe_budget", "ember resident", budget=None, **args)
    out["runs"].append(dict(ref, engine="ember", variant="resident", same_tokens=True))
    b.note(f"ember resident: {ref['tokens_per_s']:.2f} tok/s")
    how = {"expert_share": MOE_BUDGET_SHARE} if b.quick else {"budget": budget}
    for name, predict, policy in MOE_VARIANTS:
        before = disk_bandwidth(str(path), DISK_PROBE)
        _drop_pages(path)
        r = b.worker("moe_budget", f"ember {name}", predict=predict, policy=policy, **args, **how)
        disk = (before + disk_bandwidth(str(path), DISK_PROBE)) / 2
        out["runs"].append(
            dict(r, engine="ember", variant=name, same_tokens=r["argmax"] == ref["argmax"], disk_bytes_per_s=disk)
        )
        out["budget"] = r["budget"]
        b.note(f"ember {name}: {r['tokens_per_s']:.2f} tok/s, same tokens {r['argmax'] == ref['argmax']}")
    for engine in b.engines[1:]:
        if no_cgroup or out["budget"] is None:  # --quick: a cache of a share of the experts, no budget
            b.step()
            continue
        what = f"{engine} mmap under a {out['budget'] / 1e6:.0f} MB cgroup"
        _drop_pages(path)
        try:
            r = b.worker(
                "llama_replay", what, memory_limit=out["budget"], timeout=SLOW_RUN_S, max_s=SLOW_RUN_S / 2, **args
            )
            b.note(f"{what}: {r['tokens_per_s']:.2f} tok/s ({r['decoded']} tokens)")
        except BenchError as e:
            r = {"error": str(e)}
            b.note(f"{what}: {e}")
        out["runs"].append(dict(r, engine=engine, variant="mmap, cgroup"))
    if no_cgroup and len(b.engines) > 1:
        b.warn(f"moe-budget: llama.cpp under a memory limit not measured: {no_cgroup}")
    return out


def moe_budget_steps(b) -> int:
    return 1 + len(MOE_VARIANTS) + len(b.engines) - 1


def _device_contexts(b) -> list[int]:
    """DEVICE_CONTEXTS (--quick: QUICK_DEVICE_CONTEXTS), the longest cut to what the model's
    context holds with the decodes."""
    n = QUICK_DEVICE_DECODE if b.quick else DEVICE_DECODE
    room = b.n_ctx_train - n - 16
    return sorted({min(c, room) for c in (QUICK_DEVICE_CONTEXTS if b.quick else DEVICE_CONTEXTS) if c // 2 <= room})


def _devices_here() -> list[str]:
    from ember.api import list_devices

    return [d["name"] for d in list_devices() if "missing" not in d]


def devices(b) -> dict:
    from ember.api import list_devices

    n, t = (QUICK_DEVICE_DECODE if b.quick else DEVICE_DECODE), b.threads[-1]
    names = _devices_here()
    if len(names) < 2:
        raise Skip("only the CPU is here (no OpenCL device: `pip install pocl-binary-distribution` adds one)")
    broken = {d["name"]: d["missing"] for d in list_devices(check=True) if d["name"] in names and "missing" in d}
    for dev, why in broken.items():
        b.note(f"{dev} left out: {why}")
    names = [dev for dev in names if dev not in broken]
    if len(names) < 2:
        raise Skip("no OpenCL device here runs ember's kernels: " + "; ".join(f"{d}: {w}" for d, w in broken.items()))
    names += [f"cpu+{dev}" for dev in names if dev != "cpu"]  # the attention alone on the device
    out: dict = {"contexts": _device_contexts(b), "decode": n, "threads": t, "devices": names, "runs": []}
    for ctx in out["contexts"]:
        for dev in names:
            test = f"tg{n}@{ctx}"
            r = b.worker("ember", f"{dev} {test}", model=b.model_path, test=test, threads=t, device=dev)
            out["runs"].append(dict(r, device=dev, context=ctx))
            b.note(f"{dev:>9} {test}: {r['tokens_per_s']:.1f} tok/s")
    return out


def devices_steps(b) -> int:
    return len(_device_contexts(b)) * (2 * len(_devices_here()) - 1)


def _kind(engine: str) -> str:
    return "ember" if engine == "ember" else "llama"


RUNNERS: dict[str, tuple[Callable, Callable]] = {
    "dense": (dense, dense_steps),
    "ttft": (ttft, ttft_steps),
    "memory": (memory, memory_steps),
    "long-context": (long_context, long_context_steps),
    "offload": (offload, offload_steps),
    "moe": (moe, moe_steps),
    "moe-budget": (moe_budget, moe_budget_steps),
    "speculative": (speculative, speculative_steps),
    "devices": (devices, devices_steps),
}
