"""Decode speed per device against context length, on a machine with a GPU: the one prepared
script of the devices issue (docs/devices.md), for a session that is lent a GPU machine.

It writes a model of qwen2.5-coder-0.5b's shape with random Q8_0 weights (the catalog file is
too big to carry to such a machine, and speed does not depend on the weights' values), then for
each device (cpu, cuda, cpu+cuda, opencl, cpu+opencl: those that load) and each context reads a
prompt of that many random ids and times `--decode` tokens one at a time. Results go to
OUT/gpu_devices.json after every run (a run that dies leaves the others) and as a table to
stdout.

    python bench/experiments/gpu_devices.py --out DIR [--contexts 512,4096,16384]
        [--devices cpu,cuda,cpu+cuda,opencl,cpu+opencl] [--decode 16] [--shape qwen0.5b|tiny]

On the lent machine (no network; numba, numba-cuda, numpy, tokenizers, jinja2, psutil are in its
image, gguf is not: carry its wheel, and pyopencl's with its needs for the opencl rows; see
the device tool's notes on carrying wheels):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/experiments/gpu_devices.py --out $OUT

`--shape tiny --devices cpu,cpu+opencl,opencl` runs it here in seconds (a check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {  # qwen2.5-coder-0.5b's: 24 layers, 896 wide, 14 query and 2 kv heads of 64, FFN 4864
    "qwen0.5b": dict(n_layer=24, n_embd=896, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=151936),
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, n_vocab=512),
}


def write_model(path: Path, shape: str, n_ctx: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_gguf as tg  # the tests' GGUF writer: random weights, a small BPE tokenizer

    return tg.write_model(tg.build_tiny_model(arch="qwen2", qtype="Q8_0", n_ctx=n_ctx, **SHAPES[shape]), path)


def one_run(ember, path: Path, device: str, ctx: int, decode: int, threads: int | None) -> dict:
    m = ember.load(path, device=device, n_ctx=ctx + decode + 8, threads=threads)
    rng = np.random.default_rng(ctx)
    ids = rng.integers(0, m.config.n_vocab, ctx + decode).tolist()
    s = m.session()
    t = time.perf_counter()
    s.feed_last(ids[:ctx])
    prefill = time.perf_counter() - t
    s.feed([ids[ctx]])  # the first decode (a grown cache, a first launch shape) is not timed
    t = time.perf_counter()
    for i in ids[ctx + 1 :]:
        s.feed([i])
    dt = time.perf_counter() - t
    return {
        "device": device,
        "what": m.device.describe(),
        "context": ctx,
        "prefill_s": prefill,
        "prefill_tokens_per_s": ctx / prefill,
        "decode_tokens_per_s": (decode - 1) / dt,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--contexts", default="512,4096,16384")
    ap.add_argument("--devices", default="cpu,cuda,cpu+cuda,opencl,cpu+opencl")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    sys.path.insert(0, str(ROOT))
    import ember

    args.out.mkdir(parents=True, exist_ok=True)
    out = {"shape": args.shape, "decode": args.decode, "devices_here": ember.list_devices(), "runs": []}
    t = time.perf_counter()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ember-{args.shape}.gguf"
    path = write_model(path, args.shape, max(contexts) + 64)
    out["model_bytes"], out["write_s"] = path.stat().st_size, time.perf_counter() - t
    print(f"model: {path} ({path.stat().st_size / 1e6:.0f} MB, {out['write_s']:.0f} s)", flush=True)
    for device in args.devices.split(","):
        for ctx in contexts:
            t = time.perf_counter()
            try:
                r = one_run(ember, path, device, ctx, args.decode, args.threads)
            except Exception as e:  # a missing device, a kernel that fails: recorded, the others run
                r = {"device": device, "context": ctx, "error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            r["wall_s"] = time.perf_counter() - t
            out["runs"].append(r)
            (args.out / "gpu_devices.json").write_text(json.dumps(out, indent=1, default=str))
            msg = r.get("error") or (
                f"decode {r['decode_tokens_per_s']:.1f} tok/s, prefill {r['prefill_tokens_per_s']:.0f} tok/s"
            )
            print(f"{device:>11} @ {ctx:>6}: {msg} ({r['wall_s']:.0f} s)", flush=True)
            if "error" in r:
                break  # the next context fails the same way
    print("\n| device | context | decode tok/s | prefill tok/s |\n|---|---|---|---|")
    for r in out["runs"]:
        if "error" not in r:
            tg, pp = r["decode_tokens_per_s"], r["prefill_tokens_per_s"]
            print(f"| {r['device']} | {r['context']} | {tg:.1f} | {pp:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
