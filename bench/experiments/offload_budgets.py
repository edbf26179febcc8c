"""A model under memory budgets, each run a fresh process: greedy output against the resident
run, decode tok/s, memory sampled during decode (RSS without the model files' mapped pages, plus
those files' pages in the page cache), bytes streamed, the disk's sequential bandwidth measured
right after. Budget 0 is the resident run; it writes the reference tokens, so it comes first.

    for b in 0 0.8 0.6; do python bench/experiments/offload_budgets.py qwen2.5-coder-1.5b $b; done
"""

import ctypes
import json
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

import ember
from ember.lut_kernels import pack_cache

NAME = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b"
FRACTION = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
PROMPT = "Write a Python function that checks whether a number is prime, and explain it."
REFERENCE = Path("/tmp/ember-offload-reference.json")
path = ember.hub.pull(NAME, progress=False)
pack = pack_cache.cache_path(path)
size = os.path.getsize(path)


def cached_bytes(f) -> int:
    """Bytes of file f in the page cache (mincore over a fresh mapping)."""
    fd = os.open(f, os.O_RDONLY)
    try:
        n = os.fstat(fd).st_size
        mm = mmap.mmap(fd, n, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    pages = -(-n // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    arr = np.frombuffer(mm, np.uint8)
    ctypes.CDLL(None).mincore(ctypes.c_void_p(arr.ctypes.data), ctypes.c_size_t(n), vec)
    del arr
    mm.close()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def disk_bandwidth(f) -> float:
    """Sequential read of f, its cache dropped before and after, in bytes/s."""
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf, n, t = bytearray(16 << 20), 0, time.perf_counter()
    while (k := os.readv(fd, [buf])) > 0:
        n += k
    dt = time.perf_counter() - t
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return n / dt


def memory_now(proc, files) -> int:
    mapped = sum(x.rss for x in proc.memory_maps(grouped=True) if os.path.realpath(x.path) in files)
    return proc.memory_info().rss - mapped + sum(cached_bytes(f) for f in files)


def run(budget):
    m = ember.load(path, threads=2, n_ctx=1024, memory_budget=budget)
    m.prepare()
    files = {os.path.realpath(pack), os.path.realpath(path)}
    peak, stop = [0], threading.Event()

    def sample():
        proc = psutil.Process()
        while not stop.is_set():
            peak[0] = max(peak[0], memory_now(proc, files))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    ids = [i for c in m.chat([{"role": "user", "content": PROMPT}], max_tokens=48) for i in c.token_ids]
    stop.set()
    th.join()
    return m, ids, dict(m.stats), peak[0]


if FRACTION == 0:
    print(f"{NAME}: file {size / 1e6:.0f} MB; disk sequential read {disk_bandwidth(pack) / 1e9:.2f} GB/s")
    m, ids, st, peak = run(None)
    REFERENCE.write_text(json.dumps(ids))
    print(f"resident: {st['decode_tokens_per_s']:.1f} tok/s, memory peak {peak / 1e6:.0f} MB")
    sys.exit()
budget = int(FRACTION * size)
try:
    m, ids, st, peak = run(budget)
except ember.EmberError as e:
    sys.exit(f"budget {FRACTION:.0%} ({budget / 1e6:.0f} MB): {e}")
bw = disk_bandwidth(pack)
per_token = m.plan.streamed_bytes
read_rate = st.get("stream_bytes", 0) / max(st.get("stream_read_s", 0), 1e-9)
print(
    f"budget {FRACTION:.0%} ({budget / 1e6:.0f} MB): {m.plan.describe()}; "
    f"same tokens {ids == json.loads(REFERENCE.read_text())}; decode {st['decode_tokens_per_s']:.2f} tok/s "
    f"(disk roofline {bw / per_token if per_token else float('inf'):.2f} at {bw / 1e9:.2f} GB/s); "
    f"memory peak {peak / 1e6:.0f} MB = {peak / budget:.2f}x budget; read {read_rate / 1e9:.2f} GB/s, "
    f"compute waited {st.get('stream_stall_s', 0):.2f} s"
)
