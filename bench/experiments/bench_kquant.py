"""Timing of the K-quant kernels (``ember.lut_kernels.kquant``): packing, activation
quantization, and matvec / k-row matmul per kernel path, hot and cold.

Run: ``python -m bench.experiments.bench_kquant [--quick]``. Results so far: docs/kernels.md.
"""

from __future__ import annotations

import time

import numpy as np

from ember.lut_kernels import codegen
from ember.lut_kernels.kquant import (
    Q4_K,
    Q6_K,
    PackedKQ,
    kq_matmul,
    kq_matvec,
    pack_kquant,
    quant_address,
    quantize_x_alloc,
    random_kquant,
)
from ember.lut_kernels.kquant_layout import NAMES
from ember.lut_kernels.pack import aligned


def _copy(p: PackedKQ) -> PackedKQ:
    return PackedKQ(aligned(p.q.copy()), p.sc.copy(), p.d.copy(), p.n_out, p.n_in, p.qtype)


SHAPES = ((Q4_K, 1536, 1536), (Q4_K, 8960, 1536), (Q6_K, 1536, 8960), (Q6_K, 151936, 1536))


def benchmark(
    shapes=SHAPES,
    rounds: int = 5,
    kernels=None,
    ks=(1, 2, 4, 8, 16),
    cold_bytes: int = 512 << 20,
    portable_max_bytes: int = 4 << 20,
    out=print,
) -> dict:
    """Median times, one thread unless said, whole Python calls (``kq_matvec`` for k = 1,
    ``kq_matmul`` above). hot = the same matrix again; cold = rotating over ``cold_bytes`` of
    copies (a matrix larger than the L3 is cold either way). GB/s = packed bytes / time."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    kernels = kernels or [k for k in codegen.host_isas() if k != "neon"]
    results = {}
    with threadpool_limits(1):
        for qt, n_out, n_in in shapes:
            results[(qt, n_out, n_in)] = _bench_shape(
                rng, qt, n_out, n_in, rounds, kernels, ks, cold_bytes, portable_max_bytes, out
            )
    return results


def _bench_shape(rng, qt, n_out, n_in, rounds, kernels, ks, cold_bytes, portable_max_bytes, out) -> dict:
    best = kernels[0]
    p = pack_kquant(random_kquant(rng, qt, n_out, n_in), qt)
    ncold = max(2, cold_bytes // p.nbytes)
    cps = [p] + [_copy(p) for _ in range(ncold - 1)]
    X = rng.standard_normal((max(ks), n_in)).astype(np.float32)
    xs = {k: np.ascontiguousarray(X[:k]) for k in ks}
    w = p.dequantize()
    nw = max(1, min(4, cold_bytes // w.nbytes))
    ws = [w] + [w.copy() for _ in range(nw - 1)]

    def mv(ker, threads=1):
        return lambda i: kq_matvec(X[0], cps[i % ncold], kernel=ker, threads=threads)

    def mm(k):
        return lambda i: kq_matmul(xs[k], cps[i % ncold], kernel=best)

    variants = {}
    for ker in kernels:
        if ker != "portable" or p.nbytes <= portable_max_bytes:
            variants[f"{ker} k=1"] = (mv(ker), 1, ncold)
    for k in ks:
        if k > 1:
            variants[f"{best} k={k}"] = (mm(k), k, ncold)
    variants[f"{best} k=1 2thr"] = (mv(best, 2), 1, ncold)
    variants["f32 numpy k=1"] = ((lambda i: ws[i % nw] @ X[0]), 1, nw)
    if 8 in xs:
        variants["f32 numpy k=8"] = ((lambda i: xs[8] @ ws[i % nw].T), 8, nw)
    res = {nm: ([], []) for nm in variants}
    for f, _, _ in variants.values():
        f(0)
        f(1)
    for _ in range(rounds):
        for nm, (f, _, nrot) in variants.items():
            f(0)
            t0 = time.perf_counter()
            f(0)
            res[nm][0].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(1, 1 + nrot):
                f(i)
            res[nm][1].append((time.perf_counter() - t0) / nrot)
    name = NAMES[qt].upper()
    out(
        f"{n_out}x{n_in} {name}: packed {p.nbytes / 1e6:.2f} MB (GGUF {p.gguf_nbytes / 1e6:.2f}"
        f" MB, f32 {w.nbytes / 1e6:.1f} MB); median us (GB/s) hot | cold; x: / k=1"
    )
    rows = {}
    for nm, (_, k, _) in variants.items():
        h, c = float(np.median(res[nm][0])), float(np.median(res[nm][1]))
        rows[nm] = (h, c)
        f32 = nm.startswith("f32")
        nbytes = w.nbytes if f32 else p.nbytes
        base = rows.get("f32 numpy k=1" if f32 else f"{best} k=1")
        rel = f"  x{h / base[0]:4.2f} | x{c / base[1]:4.2f}" if base and k > 1 else ""
        out(f"  {nm:18s} {h * 1e6:9.0f} ({nbytes / h / 1e9:5.1f}) | {c * 1e6:9.0f} ({nbytes / c / 1e9:5.1f}){rel}")
    return rows


if __name__ == "__main__":
    import subprocess
    import sys

    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    print("host:", codegen.host_isas())
    rng = np.random.default_rng(1)
    import timeit

    for qt, shape in ((Q4_K, (8960, 1536)), (Q6_K, (1536, 8960))):
        raw = random_kquant(rng, qt, *shape)
        t = np.median(timeit.repeat(lambda: pack_kquant(raw, qt), number=1, repeat=6)[1:])
        print(f"pack {NAMES[qt]} {shape[0]}x{shape[1]}: {t * 1e3:.1f} ms")
    for nm, xk in (("k=1 x 1536", 1), ("k=16 x 8960", 16)):
        X = rng.standard_normal((xk, 1536 if xk == 1 else 8960)).astype(np.float32)
        for ker in ("avx512", "portable"):
            if ker not in codegen.host_isas():
                continue
            fq = quant_address(ker)
            quantize_x_alloc(X, fq)
            t0 = time.perf_counter()
            for _ in range(100):
                quantize_x_alloc(X, fq)
            print(f"quantize {nm} ({ker}): {(time.perf_counter() - t0) / 100 * 1e6:.1f} us")
    shapes = SHAPES[:1] if "--quick" in sys.argv else SHAPES
    benchmark(shapes, rounds=3 if "--quick" in sys.argv else 5)
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
