"""Timing of the Q8_0 int8-activation kernel (``ember.lut_kernels.q8``): packing, and matvec per
kernel path, hot and cold, against float32 numpy.

Run: ``python -m bench.experiments.bench_q8 [--quick]``. Results so far: docs/kernels.md.
"""

from __future__ import annotations

import time

import numpy as np

from ember.lut_kernels import codegen
from ember.lut_kernels.q8 import PackedQ8, pack_q8_0, q8_matvec


def random_q8_0(rng, n_out: int, n_in: int) -> np.ndarray:
    """Random GGUF Q8_0 rows: uint8 [n_out, n_in / 32 * 34], f16 scales ~ 0.01, qs uniform."""
    nb = n_in // 32
    raw = rng.integers(0, 256, (n_out, nb, 34), dtype=np.uint8)
    dd = (np.abs(rng.standard_normal((n_out, nb))) * 0.01 + 1e-4).astype(np.float16)
    raw[:, :, 0:2] = dd.view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * 34)


def benchmark(
    n_out: int = 49152, n_in: int = 576, rounds: int = 9, kernels=None, cold_bytes: int = 512 << 20, out=print
) -> dict:
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    kernels = kernels or [k for k in codegen.host_isas() if k != "neon"]
    p = pack_q8_0(random_q8_0(rng, n_out, n_in))
    ncold = max(2, cold_bytes // p.nbytes)
    cps = [p] + [PackedQ8(p.qs.copy(), p.d.copy(), n_out, n_in) for _ in range(ncold - 1)]
    x = rng.standard_normal(n_in).astype(np.float32)
    y = np.empty(n_out, np.float32)
    w = p.dequantize()
    nw = max(2, cold_bytes // w.nbytes)
    ws = [w] + [w.copy() for _ in range(nw - 1)]
    variants = {}
    for k in kernels:
        variants[k] = ((lambda i, k=k: q8_matvec(x, cps[i % ncold], out=y, kernel=k)), p.nbytes)
    variants[f"{kernels[0]} 2thr"] = (
        (lambda i: q8_matvec(x, cps[i % ncold], out=y, kernel=kernels[0], threads=2)),
        p.nbytes,
    )
    variants["f32 numpy"] = ((lambda i: ws[i % nw] @ x), w.nbytes)
    res = {nm: ([], []) for nm in variants}
    with threadpool_limits(1):
        for f, _ in variants.values():
            f(0)
            f(1)
        for _ in range(rounds):
            for nm, (f, _nbytes) in variants.items():
                reps = 3 if nm != "portable" else 1
                f(0)
                f(0)
                t0 = time.perf_counter()
                for _ in range(reps):
                    f(0)
                res[nm][0].append((time.perf_counter() - t0) / reps)
                t0 = time.perf_counter()
                for i in range(1, 1 + ncold):
                    f(i)
                res[nm][1].append((time.perf_counter() - t0) / ncold)
    out(
        f"{n_out}x{n_in} Q8_0 packed {p.nbytes / 1e6:.1f} MB (f32 {w.nbytes / 1e6:.1f} MB): "
        "median hot us (GB/s) | cold us (GB/s)"
    )
    rows = {}
    for nm, (_f, nbytes) in variants.items():
        h, c = np.median(res[nm][0]), np.median(res[nm][1])
        rows[nm] = (h, c)
        out(f"  {nm:16s} {h * 1e6:9.0f} ({nbytes / h / 1e9:5.1f}) | {c * 1e6:9.0f} ({nbytes / c / 1e9:5.1f})")
    return rows


if __name__ == "__main__":
    import subprocess
    import sys

    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print("host:", codegen.host_isas())
    rng = np.random.default_rng(1)
    raw = random_q8_0(rng, 49152, 576)
    pack_q8_0(raw)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        pack_q8_0(raw)
        ts.append(time.perf_counter() - t0)
    print(f"pack_q8_0 49152x576: {np.median(ts) * 1e3:.1f} ms")
    benchmark(rounds=3 if "--quick" in sys.argv else 9)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
