"""The benchmark's results, read: medians (with min and max) per scenario (`summarize`, kept in
results.json), the tables built from them, shown as Markdown (report.md) or on the terminal, and
the PNG plots (matplotlib, the `bench` extra) the report embeds."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from .scenarios import parse_test


def _spread(values) -> dict:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def _group(runs, *keys) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def summarize(results: dict) -> None:
    """Adds "summary" to every scenario that ran."""
    for name, sec in results["scenarios"].items():
        if sec.get("status") == "ok" and name in _SUMMARIES:
            sec["summary"] = _SUMMARIES[name](sec)


def _dense(sec: dict) -> dict:
    out = {}
    for (test, t), runs in _group(sec["runs"], "test", "threads").items():
        row: dict = {"busy": any(r.get("busy") for r in runs)}
        for (engine,), er in _group(runs, "engine").items():
            e = dict(_spread(r["tokens_per_s"] for r in er), peak_rss_bytes=max(r["peak_rss_bytes"] for r in er))
            if parse_test(test)[0] == "k":
                e["k_cost_ratio"] = statistics.median(r["k_cost_ratio"] for r in er)
            bpt = er[0].get("weight_bytes_per_token")
            if bpt and parse_test(test)[0] == "tg":
                e["weight_bytes_per_token"] = bpt
                bw = sec["bandwidth_bytes_per_s"].get(str(t))
                if bw:
                    e["roofline_tokens_per_s"] = bw / bpt
                    e["roofline_share"] = bpt * e["median"] / bw
            row[engine] = e
        if "llama.cpp" in row and "ember" in row:
            row["ratio"] = row["ember"]["median"] / row["llama.cpp"]["median"]
        out[f"{test}|{t}"] = row
    return out


def _ttft(sec: dict) -> dict:
    return {"warm_s": statistics.median(sec["warm_s"]) if sec["warm_s"] else None, "cold_s": sec["cold_s"]}


def _memory(sec: dict) -> dict:
    return {r["engine"]: {"peak_rss_bytes": r["peak_rss_bytes"], "busy": r.get("busy", False)} for r in sec["runs"]}


def _lc_threads(sec: dict) -> list[int]:
    """The thread counts of a long-context section (one int in reports before 2026-12-06)."""
    t = sec["threads"]
    return [t] if isinstance(t, int) else list(t)


def _long_context(sec: dict) -> dict:
    """Per "context|threads": each engine's spread and ember/llama.cpp; per "kept|engine|threads":
    the engine's speed at the longest context over its speed at the shortest."""
    out = {}
    only = _lc_threads(sec)[0]
    for (ctx, t), runs in _group(
        [dict(r, threads=r.get("threads", only)) for r in sec["runs"]], "context", "threads"
    ).items():
        row: dict = {"busy": any(r.get("busy") for r in runs)}
        for (engine,), er in _group(runs, "engine").items():
            row[engine] = _spread(r["tokens_per_s"] for r in er)
        if "llama.cpp" in row:
            row["ratio"] = row["ember"]["median"] / row["llama.cpp"]["median"]
        out[f"{ctx}|{t}"] = row
    for t in _lc_threads(sec):
        ctxs = sorted(int(k.split("|")[0]) for k in out if k.endswith(f"|{t}"))
        if len(ctxs) > 1:
            first, last = out[f"{ctxs[0]}|{t}"], out[f"{ctxs[-1]}|{t}"]
            for engine in ("ember", "llama.cpp"):
                if engine in first and engine in last:
                    out[f"kept|{engine}|{t}"] = last[engine]["median"] / first[engine]["median"]
    return out


def _offload(sec: dict) -> dict:
    rows = []
    for r in sec["runs"]:
        row = {k: r.get(k) for k in ("engine", "variant", "fraction", "budget", "error", "busy", "same_tokens")}
        disk = r.get("disk_bytes_per_s") or sec["disk_bytes_per_s"]  # measured around the run, if it was
        if "error" not in r:
            row["tokens_per_s"] = r["tokens_per_s"]
            row["prefill_tokens_per_s"] = r.get("prefill_tokens_per_s")
            peak = r.get("cgroup_peak_bytes") or r.get("memory_peak_bytes")
            row["memory_peak_bytes"] = peak
            if r.get("budget") and peak:
                row["peak_over_budget"] = peak / r["budget"]
            per_token = r.get("streamed_bytes_per_token") or 0
            row["streamed_bytes_per_token"] = per_token
            if per_token:
                row["disk_bytes_per_s"] = disk
                row["disk_roofline_tokens_per_s"] = disk / per_token
                row["roofline_share"] = r["tokens_per_s"] * per_token / disk
                row["read_bytes_per_s"] = r["stream_bytes"] / r["stream_read_s"] if r.get("stream_read_s") else None
                row["stall_s"] = r.get("stream_stall_s")
                row["plan"] = r.get("plan")
        rows.append(row)
    return {"rows": rows}


def _speculative(sec: dict) -> dict:
    """Per engine, request and drafter: tok/s, speedup over that request's plain run, the
    speculative figures and the cost model's terms (a drafted token and a verify step of 8 rows,
    in one-row target steps)."""
    out = {}
    runs = [dict(r, request=r.get("request", "type hints")) for r in sec["runs"]]
    for (engine, request, drafter), rs in _group(runs, "engine", "request", "drafter").items():
        e = dict(_spread(r["tokens_per_s"] for r in rs), busy=any(r.get("busy") for r in rs))
        if "same_tokens" in rs[0]:
            e["same_tokens"] = all(r["same_tokens"] for r in rs)
        for k in ("acceptance_rate", "mean_accepted_length", "draft_k_mean"):
            if k in rs[0]:
                e[k] = statistics.median(r[k] for r in rs)
        one = [r["verify_s"]["1"] for r in rs if "1" in r.get("verify_s", {})]
        if one and "8" in rs[0].get("verify_s", {}):
            e["verify8_cost"] = statistics.median(r["verify_s"]["8"] / r["verify_s"]["1"] for r in rs)
        if one and rs[0].get("draft_s_per_token"):
            e["draft_cost"] = statistics.median(r["draft_s_per_token"] / r["verify_s"]["1"] for r in rs)
        if "steps_by_schedule" in rs[0]:
            steps = rs[0]["steps_by_schedule"]
            e["concurrent_share"] = statistics.median(
                r["steps_by_schedule"].get("concurrent", 0) / max(sum(r["steps_by_schedule"].values()), 1) for r in rs
            ) if "concurrent" in steps else 0.0  # fmt: skip
        out[f"{engine}|{request}|{drafter}"] = e
    for key, e in out.items():
        plain = out.get(key.rsplit("|", 1)[0] + "|plain")
        if plain:
            e["speedup"] = e["median"] / plain["median"]
    return out


def _devices(sec: dict) -> dict:
    """Per "context|device": tok/s and the device's own seconds a token by kind (where it times
    its work); "attention_ms_per_1k": per device, attention ms a token per 1,000 tokens of
    context at each context (flat when the attention's time grows linearly)."""
    out: dict = {}
    for (ctx, dev), runs in _group(sec["runs"], "context", "device").items():
        row: dict = {"tok_s": _spread(r["tokens_per_s"] for r in runs)}
        times = [r["device_s_per_token"] for r in runs if r.get("device_s_per_token")]
        if times:
            row["device_s"] = {k: statistics.median(t.get(k, 0.0) for t in times) for k in times[0]}
            out.setdefault(f"attention_ms_per_1k|{dev}", {})[str(ctx)] = (
                1e3 * row["device_s"].get("attention", 0.0) / (ctx / 1000)
            )
        out[f"{ctx}|{dev}"] = row
    return out


def _moe_budget(sec: dict) -> dict:
    """Per run: tok/s, the identity check, and for the expert cache its hit rate, the guesses'
    precision and recall, bytes read and stall a token, and the disk's roofline for those bytes."""
    from ..offload.predict import precision_recall

    rows = []
    for r in sec["runs"]:
        row = {k: r.get(k) for k in ("engine", "variant", "error", "busy", "same_tokens", "plan", "decoded")}
        if "error" not in r:
            row["tokens_per_s"] = r["tokens_per_s"]
            c, n = r.get("cache") or {}, sec["decode"]
            used = c.get("expert_hits", 0) + c.get("expert_misses", 0)
            if used:
                per_token = c["expert_bytes"] / n
                disk = r.get("disk_bytes_per_s") or sec["disk_bytes_per_s"]
                row |= {
                    "hit_rate": c["expert_hits"] / used,
                    "bytes_per_token": per_token,
                    "stall_s_per_token": c["expert_stall_s"] / n,
                    "disk_bytes_per_s": disk,
                    "roofline_tokens_per_s": disk / per_token if per_token else None,
                    "roofline_share": r["tokens_per_s"] * per_token / disk,
                }
                row["precision"], row["recall"] = precision_recall(c)
            peak = r.get("cgroup_peak_bytes") or r.get("memory_peak_bytes")
            if peak and r.get("budget", sec.get("budget")) and r["variant"] != "resident":
                row["peak_over_budget"] = peak / r.get("budget", sec["budget"])
        rows.append(row)
    return {"rows": rows}


_SUMMARIES: dict[str, Callable[[dict], dict]] = {
    "dense": _dense,
    "moe": _dense,
    "moe-budget": _moe_budget,
    "ttft": _ttft,
    "memory": _memory,
    "long-context": _long_context,
    "offload": _offload,
    "speculative": _speculative,
    "devices": _devices,
}


# tables: {"title", "header", "rows", "notes"}, one or more per scenario
def _tok(e: dict | None) -> str:
    if not e:
        return "-"
    return f"{e['median']:.1f}" + (f" ({e['min']:.1f}-{e['max']:.1f})" if e["n"] > 1 else "")


def _mb(n) -> str:
    return f"{n / 1e6:.0f} MB" if n else "-"


def _table(scenario: str, title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> dict:
    return {"scenario": scenario, "title": title, "header": header, "rows": rows, "notes": notes}


def _speed_table(sec: dict, name: str, title: str, engines, peer: bool, notes: list[str]) -> dict:
    """A table of tok/s per test and thread count for each engine (the dense and moe scenarios),
    with the roofline and k-token cost notes."""
    s = sec["summary"]
    header = ["test", "threads", *(f"{e} tok/s" for e in engines)] + (["ember/llama.cpp"] if peer else [])
    rows, notes = [], list(notes)
    for test in sec["tests"]:
        for t in sec["threads"]:
            row = s[f"{test}|{t}"]
            cells = [test + (" (busy)" if row["busy"] else ""), str(t), *(_tok(row.get(e)) for e in engines)]
            rows.append(cells + ([f"{row['ratio']:.2f}x"] if peer else []))
            e = row["ember"]
            if "roofline_share" in e:
                bw = sec["bandwidth_bytes_per_s"][str(t)]
                notes.append(
                    f"decode ({test}) at {t} thread(s): {e['weight_bytes_per_token'] / 1e6:.1f} MB of weights "
                    f"a token, {100 * e['roofline_share']:.0f}% of the measured {bw / 1e9:.1f} GB/s"
                )
            if "k_cost_ratio" in e:
                costs = ", ".join(f"{x} {row[x]['k_cost_ratio']:.2f}x" for x in engines)
                notes.append(f"{parse_test(test)[1]} new tokens cost (vs 1) at {t} thread(s): {costs}")
    return _table(name, title, header, rows, notes)


def tables(results: dict) -> list[dict]:
    engines = results["options"]["engines"]
    peer = len(engines) > 1
    out = []
    sc = results["scenarios"]
    if sc.get("dense", {}).get("status") == "ok":
        out.append(_speed_table(sc["dense"], "dense", "Prompt and decode speed", engines, peer, []))
    if sc.get("ttft", {}).get("status") == "ok":
        s = sc["ttft"]["summary"]
        rows = [["warm", f"{s['warm_s']:.2f} s"]] + (
            [["cold (empty caches)", f"{s['cold_s']:.2f} s"]] if s["cold_s"] else []
        )
        notes = []
        if not sc["ttft"].get("bytecode", True):
            notes.append("ember's sources compiled at every start (editable install, no bytecode)")
        out.append(_table("ttft", "`ember run`: process start to first token", ["start", "time"], rows, notes))
    if sc.get("memory", {}).get("status") == "ok":
        sec, s = sc["memory"], sc["memory"]["summary"]
        rows = [[e, _mb(s[e]["peak_rss_bytes"])] for e in engines if e in s]
        note = f"{sec['test']} at {sec['threads']} thread(s); model file {_mb(sec['model_bytes'])}"
        out.append(_table("memory", "Peak memory (RSS)", ["engine", "peak RSS"], rows, [note]))
    if sc.get("long-context", {}).get("status") == "ok":
        sec, s = sc["long-context"], sc["long-context"]["summary"]
        header = ["prompt tokens", "threads", *(f"{e} tok/s" for e in engines)] + (["ember/llama.cpp"] if peer else [])
        rows = []
        for t in _lc_threads(sec):
            for ctx in sec["contexts"]:
                row = s[f"{ctx}|{t}"]
                rows.append(
                    [str(ctx) + (" (busy)" if row["busy"] else ""), str(t), *(_tok(row.get(e)) for e in engines)]
                    + ([f"{row['ratio']:.2f}x"] if peer else [])
                )
        notes = [f"tg{sec['decode']} after each prompt"]
        for t in _lc_threads(sec):
            kept = [f"{e} keeps {100 * s[f'kept|{e}|{t}']:.0f}%" for e in engines if f"kept|{e}|{t}" in s]
            if kept:
                span = f"from {sec['contexts'][0]} to {sec['contexts'][-1]} tokens of context at {t} thread(s): "
                notes.append(span + ", ".join(kept))
        out.append(_table("long-context", "Decode speed against context length", header, rows, notes))
    if sc.get("devices", {}).get("status") == "ok":
        sec, s = sc["devices"], sc["devices"]["summary"]
        kinds = ("attention", "matmul", "other", "transfers")
        header = ["prompt tokens", "device", "tok/s", *(f"{k} ms/token" for k in kinds)]
        rows = []
        for ctx in sec["contexts"]:
            for dev in sec["devices"]:
                row = s.get(f"{ctx}|{dev}")
                if row:
                    t = row.get("device_s")
                    rows.append(
                        [
                            str(ctx),
                            dev,
                            _tok(row["tok_s"]),
                            *((f"{1e3 * t.get(k, 0):.2f}" if t else "-") for k in kinds),
                        ]
                    )
        notes = [
            f"tg{sec['decode']} after each prompt, one run each, {sec['threads']} thread(s) on the host; "
            "ms/token: the device's own time"
        ]
        for key, per in s.items():
            if key.startswith("attention_ms_per_1k|"):
                notes.append(
                    f"{key.split('|')[1]} attention ms a token per 1,000 tokens of context: "
                    + ", ".join(f"{v:.2f} at {c}" for c, v in per.items())
                )
        out.append(_table("devices", "Decode against context length, per device", header, rows, notes))
    if sc.get("offload", {}).get("status") == "ok":
        sec, s = sc["offload"], sc["offload"]["summary"]
        header = ["run", "budget", "tok/s", "disk roofline", "prompt tok/s", "memory peak", "same tokens"]
        rows = []
        for r in s["rows"]:
            what = {"resident": "ember resident", "budget": "ember budget"}.get(
                r["variant"], f"{r['engine']} mmap, cgroup"
            )
            budget = f"{r['fraction']:.0%} {_mb(r['budget'])}" if r["fraction"] else "none"
            if r.get("error"):
                why = r["error"].split(" failed: ", 1)[-1]
                rows.append([what, budget, "-", "-", "-", "-", why if len(why) <= 100 else why[:99] + "…"])
                continue
            roof = (
                f"{r['disk_roofline_tokens_per_s']:.2f} ({100 * r['roofline_share']:.0f}% at "
                f"{r['disk_bytes_per_s'] / 1e9:.2f} GB/s)"
                if r.get("disk_roofline_tokens_per_s")
                else "-"
            )
            prompt = f"{r['prefill_tokens_per_s']:.1f}" if r.get("prefill_tokens_per_s") else "-"
            peak = _mb(r["memory_peak_bytes"]) + (
                f" ({r['peak_over_budget']:.2f}x)" if r.get("peak_over_budget") else ""
            )
            same = {True: "yes", False: "NO", None: "-"}[r.get("same_tokens")]
            rows.append(
                [
                    what + (" (busy)" if r.get("busy") else ""),
                    budget,
                    f"{r['tokens_per_s']:.2f}",
                    roof,
                    prompt,
                    peak,
                    same,
                ]
            )
        notes = [
            f"{sec['decode']} greedy tokens of a rewrite request at {sec['threads']} thread(s), the model files' page "
            f"cache dropped before each run; disk sequential read {sec['disk_bytes_per_s'] / 1e9:.2f} GB/s at the "
            "start; a budgeted run's roofline uses the disk's rate measured right before and after it",
            "prompt tok/s: the request's prompt; under a budget each streamed layer is read once per prompt",
            "llama.cpp under a cgroup runs with its weight repacking off (`use_extra_bufts=False`): repacked "
            "weights are anonymous memory, which a limit below the file size kills",
            "memory peak: ember's runs count process memory without the model's mapped pages plus the model files' "
            "pages in the page cache, sampled every 50 ms from the load on; cgroup runs, the cgroup's peak (page "
            "cache charged)",
        ]
        if sec["cgroup"] != "available":
            notes.append(f"no cgroup runs: {sec['cgroup']}")
        out.append(_table("offload", "Offload: decode under a memory budget", header, rows, notes))
    if sc.get("moe", {}).get("status") == "ok":
        sec = sc["moe"]
        sh = sec["model"]["shape"]
        notes = [
            f"a synthetic Qwen3-MoE ({_mb(sec['model']['bytes'])}; ember.bench.synth_moe): {sh['n_layer']} layers of "
            f"{sh['n_expert']} experts, {sh['n_expert_used']} used a token, d_model {sh['n_embd']}, expert FFN "
            f"{sh['n_ff_exp']}; random weights, skewed expert popularity"
        ]
        out.append(_speed_table(sec, "moe", "Mixture-of-experts prompt and decode", engines, peer, notes))
    if sc.get("moe-budget", {}).get("status") == "ok":
        out.append(_moe_budget_table(sc["moe-budget"]))
    if sc.get("speculative", {}).get("status") == "ok":
        sec, s = sc["speculative"], sc["speculative"]["summary"]
        header = ["engine", "request", "drafter", "tok/s", "speedup", "mean k", "acceptance", "accepted/step"]
        header += ["concurrent steps", "same tokens"]
        rows, costs = [], []
        for key, e in s.items():
            engine, request, drafter = key.split("|")
            acc = f"{100 * e['acceptance_rate']:.0f}%" if "acceptance_rate" in e else "-"
            mal = f"{e['mean_accepted_length']:.2f}" if "mean_accepted_length" in e else "-"
            same = {True: "yes", False: "NO"}.get(e.get("same_tokens"), "-")
            conc = f"{100 * e['concurrent_share']:.0f}%" if "concurrent_share" in e else "-"
            rows.append(
                [
                    engine,
                    request,
                    drafter + (" (busy)" if e["busy"] else ""),
                    _tok(e),
                    f"{e.get('speedup', 1):.2f}x",
                    f"{e['draft_k_mean']:.1f}" if "draft_k_mean" in e else "-",
                    acc,
                    mal,
                    conc,
                    same,
                ]
            )
            if "draft_cost" in e and "verify8_cost" in e and not costs:
                costs.append(
                    f"cost model ({drafter}, medians): a drafted token costs {e['draft_cost']:.2f} of a one-row target "
                    f"step, a verify step of 8 rows {e['verify8_cost']:.2f}x one row (all threads, measured in the run)"
                )
        notes = [
            f"{sec['decode']} greedy tokens of a rewrite request of a 60-line module at {sec['threads']} thread(s): "
            "'type hints' changes most lines a little, 'rename' a few words",
            "concurrent: the draft drafts the next block on its own threads while the target verifies; "
            "'concurrent steps' is the share of verify steps run so",
            *costs,
        ]
        out.append(_table("speculative", "Speculative decoding", header, rows, notes))
    return out


def _moe_budget_table(sec: dict) -> dict:
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    header = ["run", "tok/s", "hit rate", "precision / recall", "MB read a token", "stall a token", "disk roofline"]
    header += ["memory peak", "same tokens"]
    rows = []
    for r in sec["summary"]["rows"]:
        what = f"{r['engine']} {r['variant']}" + (" (busy)" if r.get("busy") else "")
        if r.get("error"):
            why = r["error"].split(" failed: ", 1)[-1]
            rows.append([what, "-", "-", "-", "-", "-", "-", "-", why if len(why) <= 100 else why[:99] + "…"])
            continue
        tok = f"{r['tokens_per_s']:.2f}" + (f" ({r['decoded']} tokens)" if r.get("decoded") else "")
        cache = r.get("hit_rate") is not None
        roof = (
            f"{r['roofline_tokens_per_s']:.2f} ({pct(r['roofline_share'])} at {r['disk_bytes_per_s'] / 1e9:.2f} GB/s)"
            if r.get("roofline_tokens_per_s")
            else "-"
        )
        rows.append(
            [
                what,
                tok,
                pct(r.get("hit_rate")) if cache else "-",
                f"{pct(r['precision'])} / {pct(r['recall'])}" if r.get("precision") is not None else "-",
                _mb(r["bytes_per_token"]) if cache else "-",
                f"{1e3 * r['stall_s_per_token']:.0f} ms" if cache else "-",
                roof,
                f"{r['peak_over_budget']:.2f}x the budget" if r.get("peak_over_budget") else "-",
                {True: "yes", False: "NO", None: "-"}[r.get("same_tokens")],
            ]
        )
    sh, m = sec["model"]["shape"], sec["model"]
    notes = [
        f"a synthetic Qwen3-MoE ({_mb(m['bytes'])}, {_mb(m['expert_bytes'])} of routed experts: {sh['n_layer']} "
        f"layers of {sh['n_expert']} experts, {sh['n_expert_used']} used a token; ember.bench.synth_moe) "
        + (f"under a budget of {_mb(sec['budget'])}" if sec["budget"] else "with a quarter of its experts in a cache")
        + f" at {sec['threads']} thread(s); {sec['prompt']} random token ids fed as a "
        f"prompt, then {sec['decode']} fed one at a time (a decode's work each; greedy output of random weights "
        "repeats one token), the model files' page cache dropped first",
        "hit rate: chosen experts found in a slot (kept, or read ahead on a guess); precision / recall: guessed "
        "experts that were chosen / chosen experts that were guessed; same tokens: each step's argmax equals "
        "the resident run's",
        "disk roofline: the disk's sequential rate (measured right before and after the run) over the bytes "
        "the run read a token",
        "llama.cpp: weight repacking off, mmap, in a memory cgroup of the budget's size (page cache charged), "
        "stopped after half the slow-run limit",
    ]
    if sec["cgroup"] != "available":
        notes.append(f"no cgroup run: {sec['cgroup']}")
    return _table("moe-budget", "Mixture-of-experts decode under a memory budget", header, rows, notes)


def _md_table(t: dict) -> list[str]:
    lines = ["| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
    lines += ["| " + " | ".join(r) + " |" for r in t["rows"]]
    return lines + [""] + [f"- {n}" for n in t["notes"]]


def _environment_lines(results: dict) -> list[str]:
    env = results["environment"]
    cpu, v = env["machine"]["cpu"], env["versions"]
    caches = ", ".join(
        f"{k[:-6].upper()} {cpu[k] // 1024} KiB" for k in ("l1d_bytes", "l2_bytes", "l3_bytes") if cpu.get(k)
    )
    model = results["model"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("numba", "llvmlite", "numpy", "llama-cpp-python") if v.get(k))
    return [
        f"- CPU: {cpu['model']}, {env['machine']['cores']} cores ({' '.join(cpu['flags'])}; {caches})",
        f"- memory {env['machine']['memory_bytes'] / 2**30:.1f} GiB; {env['machine']['os']}; Python {v['python']}",
        f"- ember {v.get('ember')}" + (f" at {v['ember_commit']}" if v.get("ember_commit") else "") + f"; {libs}",
        f"- model: {model['name']} ({model['architecture']}, {_mb(model['bytes'])}, sha256 {model['sha256'][:16]}...)",
        f"- threads {results['options']['threads']}, {results['options']['reps']} rep(s); other processes at start: "
        f"{env['load_cores_at_start']:.1f} cores",
    ]


def markdown(results: dict) -> str:
    quick = " (--quick)" if results["options"]["quick"] else ""
    lines = [
        f"# ember benchmark: {results['model']['name']}{quick}",
        "",
        f"{results['created']}, `{results['command']}`",
        "",
    ]
    lines += _environment_lines(results) + [""]
    plots = {p["scenario"]: p["file"] for p in results.get("plots", [])}
    for t in tables(results):
        lines += [f"## {t['title']}", ""] + _md_table(t) + [""]
        if t["scenario"] in plots:
            lines += [f"![{t['scenario']}]({plots.pop(t['scenario'])})", ""]
    others = [(n, s) for n, s in results["scenarios"].items() if s["status"] != "ok"]
    if others:
        lines += ["## Not measured", ""] + [f"- {n}: {s['status']}: {s['reason']}" for n, s in others] + [""]
    if results["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]] + [""]
    return "\n".join(lines)


def print_summary(results: dict, file=None) -> None:
    """The tables on the terminal (rich) when stdout is one, else the Markdown report."""
    file = file or sys.stdout
    if not file.isatty():
        print(markdown(results), file=file, flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console(file=file)
    for t in tables(results):
        con.print(t["title"], style="bold", markup=False, highlight=False)  # unwrapped, unlike a title
        table = Table(*t["header"])
        for r in t["rows"]:
            table.add_row(*r)
        con.print(table)
        for n in t["notes"]:
            con.print(f"  {n}", markup=False, highlight=False)
    for n, s in results["scenarios"].items():
        if s["status"] != "ok":
            con.print(f"{n}: {s['status']}: {s['reason']}", markup=False, highlight=False)
    for w in results["warnings"]:
        con.print(f"warning: {w}", markup=False, highlight=False)


def plots(results: dict, out: Path, warn: Callable[[str], None]) -> list[dict]:
    """PNG plots of the scenarios that ran, written into `out`; [] with a warning without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("no plots: matplotlib is missing (pip install 'ember[bench]')")
        return []
    made = []
    for name, draw in _PLOTS.items():
        sec = results["scenarios"].get(name, {})
        if sec.get("status") != "ok":
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        try:
            draw(ax, sec, results["options"]["engines"])
            ax.grid(alpha=0.3)
            ax.set_title(f"{results['model']['name']}: {name}", loc="left", fontsize=10)
            fig.tight_layout()
            file = f"{name}.png"
            fig.savefig(out / file)
            made.append({"scenario": name, "file": file})
        finally:
            plt.close(fig)
    return made


def _plot_dense(ax, sec, engines):
    s = sec["summary"]
    keys = [f"{test}|{t}" for test in sec["tests"] for t in sec["threads"]]
    width = 0.8 / len(engines)
    for j, e in enumerate(engines):
        xs = [i + j * width for i in range(len(keys))]
        ax.bar(xs, [s[k][e]["median"] for k in keys], width, label=e)
    for i, k in enumerate(keys):
        roof = s[k]["ember"].get("roofline_tokens_per_s")
        if roof:
            ax.plot([i - width / 2, i + 0.8 - width / 2], [roof, roof], "k--", lw=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [k.replace("|", "\nt=") for k in keys], fontsize=8)
    ax.set_ylabel("tokens/s (dashed: ember's decode roofline)")
    ax.legend()


def _plot_long_context(ax, sec, engines):
    s, top = sec["summary"], 0.0
    for t in _lc_threads(sec):
        for e in engines:
            pts = [s[f"{c}|{t}"][e] for c in sec["contexts"]]
            ax.plot(sec["contexts"], [p["median"] for p in pts], "o-", label=f"{e}, {t} thread(s)")
            top = max([top] + [p["max"] for p in pts])
    ax.set_xlabel("prompt tokens before decoding")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(0, 1.1 * top)
    ax.legend()


def _plot_devices(ax, sec, engines):
    s = sec["summary"]
    for dev in sec["devices"]:
        ctx = [c for c in sec["contexts"] if f"{c}|{dev}" in s]
        ax.plot(ctx, [s[f"{c}|{dev}"]["tok_s"]["median"] for c in ctx], "o-", label=dev)
    ax.set_xlabel("prompt tokens before decoding")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend()


def _plot_offload(ax, sec, engines):
    rows = [r for r in sec["summary"]["rows"] if r["fraction"] and r.get("tokens_per_s")]
    for (engine, variant), label in (
        (("ember", "budget"), "ember, budget"),
        (("ember", "mmap"), "ember, plain mmap in a cgroup"),
        (("llama.cpp", "mmap"), "llama.cpp in a cgroup"),
    ):
        pts = sorted(
            (r["fraction"], r["tokens_per_s"]) for r in rows if (r["engine"], r["variant"]) == (engine, variant)
        )
        if pts:
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    roof = sorted((r["fraction"], r["disk_roofline_tokens_per_s"]) for r in rows if r.get("disk_roofline_tokens_per_s"))
    if roof:
        ax.plot([100 * p[0] for p in roof], [p[1] for p in roof], "kx--", lw=1, label="disk roofline (ember's plan)")
    res = [r for r in sec["summary"]["rows"] if r["variant"] == "resident"]
    if res and res[0].get("tokens_per_s"):
        ax.axhline(res[0]["tokens_per_s"], color="grey", lw=1, label="resident")
    ax.set_xlabel("memory budget, % of the weight bytes")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def _plot_speculative(ax, sec, engines):
    s = sec["summary"]
    keys = list(s)
    ax.bar(
        range(len(keys)), [s[k]["median"] for k in keys], color=["C0" if k.startswith("ember") else "C1" for k in keys]
    )
    for i, k in enumerate(keys):
        if "acceptance_rate" in s[k]:
            ax.annotate(
                f"{100 * s[k]['acceptance_rate']:.0f}% accepted",
                (i, s[k]["median"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(keys)), [k.replace("|", "\n").replace(" k=", "\nk=") for k in keys], fontsize=7)
    ax.set_ylabel("decode tokens/s")


_PLOTS = {
    "dense": _plot_dense,
    "long-context": _plot_long_context,
    "offload": _plot_offload,
    "speculative": _plot_speculative,
    "devices": _plot_devices,
}
