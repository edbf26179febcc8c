"""Decode cost: one fused call over the whole model vs one call per layer (the streamer's
seam), 2 threads, median of 64 tokens, 3 runs.

    python bench/experiments/layer_calls.py [MODEL]
"""

import sys
import time

import numpy as np

import ember

name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
m = ember.load(name, threads=2)
tr, dev = m.transformer, m.device
dec = dev.decoder(tr)
nl = m.config.n_layer
ids = m.tokenize("The quick brown fox jumps over the lazy dog. " * 4)


def run(per_layer, n=64):
    cache = dev.new_cache(tr, 512)
    dev.forward(tr, ids, cache, all_logits=False)
    tok = 1
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        if per_layer:
            h = [tok]
            for l in range(nl):
                h = dec.step_rows(h, cache, layers=range(l, l + 1))
        else:
            h = dec.step_rows([tok], cache)
        ts.append(time.perf_counter() - t)
    return np.median(ts) * 1000


for _ in range(3):
    a = run(False)
    b = run(True)
    print(f"{name}: whole-model call {a:.2f} ms/token, one call per layer ({nl}) {b:.2f} ms/token: {b / a:.3f}x")
