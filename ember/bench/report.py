"""The benchmark's results: medians per engine, test and thread count, ratios, and the Markdown
report printed at the end of a run."""

from __future__ import annotations

import statistics

from .scenarios import parse_test


def summarize(results: dict, engines, tests, threads) -> dict:
    """``{"TEST|THREADS": {ENGINE: {...medians...}, "ratio": ember/llama.cpp}}`` of results["runs"]."""
    summary = {}
    for test in tests:
        kind, _ = parse_test(test)
        for t in threads:
            row: dict = {}
            for engine in engines:
                runs = results["runs"][f"{engine}|{test}|{t}"]
                row[engine] = {
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                    "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                }
                if kind == "k":
                    row[engine]["k_cost_ratio"] = statistics.median(r["k_cost_ratio"] for r in runs)
                if engine == "ember" and kind == "tg":
                    bpt = runs[0]["weight_bytes_per_token"]
                    row[engine]["weight_bytes_per_token"] = bpt
                    bw = results["bandwidth_bytes_per_s"].get(t)
                    if bw:
                        row[engine]["roofline_share"] = bpt * row[engine]["tokens_per_s"] / bw
            if "llama.cpp" in row:
                row["ratio"] = row["ember"]["tokens_per_s"] / row["llama.cpp"]["tokens_per_s"]
            summary[f"{test}|{t}"] = row
    return summary


def markdown(results: dict, engines, tests, threads) -> str:
    """The report: a table of tokens/s per test and thread count, then one line per finding."""
    title = f"## ember benchmark: {results['model']}" + (" (--quick)" if results.get("quick") else "")
    lines = [title, ""]
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
    kinds = {test: parse_test(test) for test in tests}
    for test in tests:
        if kinds[test][0] != "tg":
            continue
        for t in threads:
            e = results["summary"][f"{test}|{t}"]["ember"]
            line = (
                f"- decode ({test}) at {t} thread(s): {e['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token"
            )
            if "roofline_share" in e:
                bw = results["bandwidth_bytes_per_s"][t]
                line += f", {100 * e['roofline_share']:.0f}% of the measured {bw / 1e9:.1f} GB/s"
            lines.append(line)
    for test in tests:
        kind, k = kinds[test]
        if kind != "k":
            continue
        for t in threads:
            row = results["summary"][f"{test}|{t}"]
            costs = ", ".join(f"{e} {row[e]['k_cost_ratio']:.2f}x" for e in engines)
            lines.append(f"- {k} new tokens cost (vs 1 new token) at {t} thread(s): {costs}")
    for e in engines:
        rss = max(v[e]["peak_rss_bytes"] for v in results["summary"].values())
        gen = [v[e]["peak_rss_bytes"] for key, v in results["summary"].items() if kinds[key.split("|")[0]][0] == "tg"]
        gen_s = f"; generation (tg) {max(gen) / 1e6:.0f} MB" if gen else ""
        lines.append(f"- peak RSS {e}: {rss / 1e6:.0f} MB over all tests{gen_s}")
    warm, cold = results.get("ttft_warm_s"), results.get("ttft_cold_s")
    if warm is not None or cold is not None:
        parts = []
        if warm is not None:
            parts.append(f"warm {warm:.2f} s")
        if cold is not None:
            parts.append(f"cold {cold:.2f} s")
        source = (
            ""
            if results.get("ttft_bytecode", True)
            else (
                " (ember's sources compiled at every start: an editable install and PYTHONDONTWRITEBYTECODE;"
                " `pip install .` installs the bytecode)"
            )
        )
        lines.append(f"- ember run, process start to first token: {', '.join(parts)}{source}")
    lines.append(f"- other processes at start: {results['load_cores_at_start']:.1f} cores")
    for w in results.get("warnings", []):
        lines.append(f"- warning: {w}")
    return "\n".join(lines) + "\n"
