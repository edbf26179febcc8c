"""Start-up costs per catalog model: import, GGUF open (first and warm), tokenizer build, and
encoding ember/bench/ppl_public.txt (median of 20).

    python bench/startup.py [--models smollm2-135m,...] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

t_start = time.perf_counter()
import ember  # noqa: E402
from ember.bench.scenarios import english_text  # noqa: E402
from ember.formats.gguf import GGUFFile  # noqa: E402

IMPORT_S = time.perf_counter() - t_start
TEXT = english_text()


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def measure(name: str) -> dict:
    path = ember.hub.resolve(name)
    first = timed(lambda: GGUFFile(path))
    warm = statistics.median(timed(lambda: GGUFFile(path)) for _ in range(5))
    m = ember.load(path)
    build = timed(lambda: m.tokenize("x"))
    encode = statistics.median(timed(lambda: m.tokenize(TEXT, special=False)) for _ in range(20))
    return {
        "model": name,
        "open_first_s": first,
        "open_warm_s": warm,
        "tokenizer_build_s": build,
        "encode_ppl_text_s": encode,
        "ppl_text_chars": len(TEXT),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,gemma3-270m")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(n) for n in args.models.split(",")]
    if args.json:
        print(json.dumps({"import_ember_s": IMPORT_S, "models": rows}, indent=2))
        return 0
    print(f"import ember: {IMPORT_S:.2f} s\n")
    print("| model | open (first) | open (warm) | tokenizer build | encode ppl text |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {1e3 * r['open_first_s']:.0f} ms | {1e3 * r['open_warm_s']:.0f} ms | "
            f"{1e3 * r['tokenizer_build_s']:.0f} ms | {1e3 * r['encode_ppl_text_s']:.1f} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
