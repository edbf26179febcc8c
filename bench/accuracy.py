"""Agreement of ember with llama.cpp on the catalog models, from the reference outputs in tests/data.

For each model: top-5 sets at the last prompt position, per-position argmax, greedy continuations
up to llama.cpp's first close call (margin < 0.5), and perplexity on ember/bench/ppl_public.txt.

    python bench/accuracy.py [--models smollm2-135m,...] [--kernels auto|numpy] [--json]

``--kernels numpy`` measures the float32 reference path; the default, the fast kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import ember
from ember.bench.scenarios import english_text

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
REFERENCES = {
    "smollm2-135m": "reference_smollm2",
    "qwen2.5-coder-0.5b": "reference_qwen2.5-coder-0.5b",
    "gemma3-270m": "reference_gemma3-270m",
}
MARGIN = 0.5


def measure(name: str, kernels: str = "auto") -> dict:
    ref = json.loads((DATA / f"{REFERENCES[name]}.json").read_text(encoding="utf-8"))
    m = ember.load(name, kernels=kernels)
    top5_exact = top5_overlap = argmax_agree = argmax_total = greedy_agree = greedy_total = 0
    for p in ref["prompts"]:
        logits = m.logits(p["prompt_token_ids"])
        ours = set(np.argsort(-logits[-1], kind="stable")[:5].tolist())
        overlap = len(ours & set(p["last_position_top5"]["ids"]))
        top5_overlap += overlap
        top5_exact += overlap == 5
        am = logits.argmax(axis=1)
        argmax_agree += int((am == np.asarray(p["per_position_argmax"])).sum())
        argmax_total += len(am)
        margins = p["greedy"]["top1_minus_top2_margin"]
        n_sure = next((i for i, mg in enumerate(margins) if mg < MARGIN), len(margins))
        s = m.session()
        last = s.feed(p["prompt_token_ids"])[-1]
        for i in range(n_sure):
            tok = int(np.argmax(last))
            if tok != p["greedy"]["token_ids"][i]:
                break
            greedy_agree += 1
            last = s.feed([tok])[-1]
        greedy_total += n_sure
    t = time.perf_counter()
    ppl = m.perplexity(english_text())
    ppl_s = time.perf_counter() - t
    ref_ppl = ref["perplexity"]["full_context"]["ppl"]
    n = len(ref["prompts"])
    return {
        "model": name,
        "kernels": kernels,
        "prompts": n,
        "top5_set_equal": top5_exact,
        "top5_mean_overlap": top5_overlap / n,
        "argmax_agreement": argmax_agree / argmax_total,
        "greedy_tokens_agreeing_before_first_close_call": f"{greedy_agree}/{greedy_total}",
        "perplexity": ppl,
        "perplexity_llama_cpp": ref_ppl,
        "perplexity_rel_diff": ppl / ref_ppl - 1,
        "perplexity_seconds": ppl_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(REFERENCES))
    ap.add_argument("--kernels", default="auto", choices=("auto", "numpy"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(name, args.kernels) for name in args.models.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        "| model | top-5 set equal | top-5 overlap | argmax agree | greedy (sure steps) "
        "| ppl ember | ppl llama.cpp | diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['top5_set_equal']}/{r['prompts']} | {r['top5_mean_overlap']:.1f}/5 | "
            f"{100 * r['argmax_agreement']:.1f}% | {r['greedy_tokens_agreeing_before_first_close_call']} | "
            f"{r['perplexity']:.3f} | {r['perplexity_llama_cpp']:.3f} | {100 * r['perplexity_rel_diff']:+.2f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
