"""One measurement in this process, printed on stdout as one line of JSON; the driver (run.py)
starts each in a fresh process, with its arguments as one JSON object:

    python -m ember.bench.workers ember '{"model": PATH, "test": "tg128", "threads": 2}'
    python -m ember.bench.workers llama '{"model": PATH, "test": "tg32@4096", "threads": 2}'
    python -m ember.bench.workers ember '{"model": PATH, "test": "tg16@2048", "threads": 2, "device": "opencl"}'
    python -m ember.bench.workers bandwidth '{"threads": 2}'
    python -m ember.bench.workers offload '{"model": PATH, "budget": 600000000, "threads": 2, "tokens": 24}'
    python -m ember.bench.workers moe_budget '{"model": PATH, "budget": 1200000000, "threads": 2, "tokens": 48,
                                               "prompt": 32, "predict": true}'
    python -m ember.bench.workers speculative '{"model": PATH, "draft": "lookup", "threads": 2, "tokens": 128}'
    python -m ember.bench.workers llama_speculative '{"model": PATH, "lookup": true, "threads": 2, "tokens": 128}'

Each test first runs untimed in its process (compiles, loads); peak RSS is the process's.
An EmberError prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from .scenarios import K_CONTEXT, K_REPS, parse_test, prompt_ids, replay_ids, rewrite_prompt, test_context


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _k_interleaved(timed, k: int) -> dict:
    """kN's result from ``timed(n)`` (seconds of one forward over n new tokens after the
    context): one untimed call of each size, then K_REPS of each, 1 and k alternating so
    that drift in the machine's speed hits both sizes alike; medians."""
    timed(1)
    timed(k)
    t1, tk = [], []
    for _ in range(K_REPS):
        t1.append(timed(1))
        tk.append(timed(k))
    dt1, dtk = statistics.median(t1), statistics.median(tk)
    return {"tokens_per_s": k / dtk, "k_cost_ratio": dtk / dt1, "one_token_s": dt1, "peak_rss_bytes": _peak_rss()}


def _n_ctx(test: str) -> int | None:
    """The context a tgN@CTX test allocates (both engines alike); None: the engine's default."""
    if "@" not in test:
        return None
    return max(2048, test_context(test) + parse_test(test)[1] + 16)


def worker_ember(model: str, test: str, threads: int, device: str = "cpu", kv_cache: str = "auto") -> dict:
    import psutil

    import ember

    kind, n = parse_test(test)
    m = ember.load(model, threads=threads, n_ctx=_n_ctx(test), device=device, kv_cache=kv_cache)
    tok = lambda t: m.tokenize(t, special=False)  # noqa: E731
    if kind == "pp":
        ids = prompt_ids(n, tok)
        m.session().feed_last(ids[:64])  # warm-up: compile (the path n tokens take) and load
        s = m.session()
        t = time.perf_counter()
        s.feed_last(ids)
        dt = time.perf_counter() - t
        return {"tokens_per_s": n / dt, "peak_rss_bytes": _peak_rss()}
    if kind == "k":
        ids = prompt_ids(K_CONTEXT + n, tok)
        s = m.session()
        s.feed_last(ids[:K_CONTEXT])

        def timed(k):
            t = time.perf_counter()
            s.feed(ids[K_CONTEXT : K_CONTEXT + k])
            dt = time.perf_counter() - t
            s.truncate(K_CONTEXT)
            return dt

        return _k_interleaved(timed, n)
    ids = prompt_ids(test_context(test), tok)
    for _ in m.generate(ids[:16], max_tokens=2, ignore_eos=True):  # warm-up
        pass
    # a device that times its own work (OpenCL), whole or the attention beside the CPU (`gpu`)
    kernels = getattr(getattr(m.device, "gpu", m.device), "kernels", None)
    for i, _ in enumerate(m.generate(ids, max_tokens=n, ignore_eos=True)):
        if i == 0 and kernels is not None:  # the decodes' device time, from the first token on
            kernels.profile, kernels.times = True, {}
    mem = psutil.Process().memory_info()
    device_s = {k: v / (n - 1) for k, v in kernels.times.items()} if kernels is not None else None
    return {
        "device_s_per_token": device_s,
        "tokens_per_s": m.stats["decode_tokens_per_s"],
        "prefill_tokens_per_s": m.stats.get("prefill_tokens_per_s"),
        "peak_rss_bytes": _peak_rss(),
        "rss_file_bytes": getattr(mem, "shared", None),
        "weight_bytes_per_token": m.transformer.weight_bytes_per_token(),
    }


def _llama(model: str, n_ctx: int, threads: int, repack: bool = True, **kw):
    """A llama_cpp.Llama of `model` (more Llama arguments in kw); repack=False: its weights stay
    in the file's mapping."""
    import llama_cpp

    import ember

    if not repack:
        import llama_cpp.llama_cpp as low

        defaults = low.llama_model_default_params

        def no_repack():
            p = defaults()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = no_repack  # what Llama() builds its params from
    return llama_cpp.Llama(
        model_path=str(ember.hub.resolve(model)),
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        **kw,
    )


def worker_llama_probe(model: str, threads: int, repack: bool) -> dict:
    """A load of `model` by llama.cpp and a short prompt: whether it runs here at all."""
    llm = _llama(model, 256, threads, repack)
    llm.eval(llm.tokenize(b"def add(a, b):"))
    return {"ok": True}


def worker_llama(model: str, test: str, threads: int, repack: bool = True, kv_cache: str = "f16") -> dict:
    """llama-cpp-python on a test; repack=False keeps its weights in the file's mapping (no
    repacked copies in anonymous memory: what lets it run under a memory limit below the file);
    kv_cache="q8_0": its 8-bit cache for keys and values (which needs its flash attention)."""
    kind, n = parse_test(test)
    from gguf import GGMLQuantizationType as Q

    kw = {"type_k": int(Q.Q8_0), "type_v": int(Q.Q8_0), "flash_attn": True} if kv_cache == "q8_0" else {}
    llm = _llama(model, _n_ctx(test) or 2048, threads, repack, **kw)
    tok = lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)  # noqa: E731
    if kind == "k":
        ids = prompt_ids(K_CONTEXT + n, tok)
        llm.eval(ids[:K_CONTEXT])

        def timed(k):
            llm.n_tokens = K_CONTEXT  # eval() drops the cache after n_tokens
            t = time.perf_counter()
            llm.eval(ids[K_CONTEXT : K_CONTEXT + k])
            return time.perf_counter() - t

        return _k_interleaved(timed, n)
    if kind == "pp":
        ids = prompt_ids(n, tok)
        llm.eval(ids[:8])
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        dt = time.perf_counter() - t
        return {"tokens_per_s": n / dt, "peak_rss_bytes": _peak_rss()}
    ids = prompt_ids(test_context(test), tok)
    llm.reset()
    t_first, done = None, 0
    for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        done += 1
        if t_first is None:
            t_first = time.perf_counter()
        if done == n:
            break
    dt = time.perf_counter() - t_first
    return {"tokens_per_s": (n - 1) / dt if n > 1 else float("nan"), "peak_rss_bytes": _peak_rss()}


def worker_bandwidth(threads: int) -> dict:
    """DRAM read bandwidth: vectorized sums of a 1 GiB array, split over `threads` threads; each
    thread reads its part as 1 stream and as 8 interleaved streams (more reads in flight, as a
    kernel with software prefetch has: 10.4 vs 14.4 GB/s on one thread here); the best counts."""
    import threading

    import numpy as np
    from numba import njit

    @njit(nogil=True, fastmath=True)
    def total1(a):
        s = np.float32(0.0)
        for i in range(a.shape[0]):
            s += a[i]
        return s

    @njit(nogil=True, fastmath=True)
    def total8(a):
        n = a.shape[0] // 8
        s = np.float32(0.0)
        for i in range(n):
            s += (
                a[i]
                + a[n + i]
                + a[2 * n + i]
                + a[3 * n + i]
                + a[4 * n + i]
                + a[5 * n + i]
                + a[6 * n + i]
                + a[7 * n + i]
            )
        return s

    a = np.ones(1 << 28, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for total in (total1, total8):
        total(parts[0][:1024])
        for _ in range(4):
            ths = [threading.Thread(target=total, args=(p,)) for p in parts]
            t = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return {"bytes_per_s": best}


class _MemorySampler:
    """Peak memory of this process as an offload budget counts it, sampled on a thread every
    50 ms, or 20 times the time a sample takes if longer (it holds the GIL in part, which the
    per-layer calls of a model under a budget wait for: sampling back to back halved an MoE's
    decode): resident memory without the model files' mapped pages, plus those files' pages in
    the page cache (whoever maps them)."""

    def __init__(self, files):
        import threading

        self.files, self.peak = [str(f) for f in files], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        from ..offload.memory import cached_bytes, process_bytes

        return process_bytes(self.files) + sum(cached_bytes(f) or 0 for f in self.files)

    def _run(self):
        while not self._stop.is_set():
            t = time.perf_counter()
            self.peak = max(self.peak, self.now())
            self._stop.wait(max(0.05, 20 * (time.perf_counter() - t)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _budget_streaming(model: str, threads: int, share: float) -> int:
    """The budget under which about `share` of the layers' bytes stream (the plan's fixed needs
    plus the rest of the layers): a small model's fixed needs are several times its weights, so a
    fraction of the weight bytes says little there."""
    from ember.offload.plan import WORK_SHARE, in_flight

    probe = 1 << 40
    m = ember_load(model, threads, probe)
    m.prepare()
    p = m.plan
    base = p.needs.total - probe * WORK_SHARE
    layers = sum(p.layer_bytes)
    return int((base + in_flight(p.layer_bytes) + (1 - share) * layers) / (1 - WORK_SHARE))


def ember_load(model: str, threads: int, budget: int | None):
    import ember

    return ember.load(model, threads=threads, n_ctx=1024, memory_budget=budget)


def worker_offload(
    model: str, budget: int | None, threads: int, tokens: int, stream_share: float | None = None
) -> dict:
    """Greedy generation of `tokens` tokens on the rewrite prompt under memory_budget=budget (None:
    resident, as plain mmap; with stream_share, the budget that streams that share of the layers),
    the model files' page cache dropped first; the tokens (for the identity check), decode tok/s,
    the plan, the streaming figures and the memory peak from the load on (and the load's own)."""
    import os

    import ember
    from ember.home import uncache
    from ember.lut_kernels import pack_cache

    files = [os.path.realpath(model)]
    pack = pack_cache.cache_path(ember.hub.resolve(model))
    if pack.exists():
        files.append(os.path.realpath(pack))
    if stream_share is not None:
        budget = _budget_streaming(model, threads, stream_share)
    messages = [{"role": "user", "content": rewrite_prompt()}]
    with _MemorySampler(files) as mem:  # from the load on: the budget is the whole run's
        m = ember_load(model, threads, budget)
        m.prepare()
        load_peak = mem.peak
        for f in files:
            uncache(f)
        ids = [i for c in m.chat(messages, max_tokens=tokens, temperature=0.0) for i in c.token_ids]
    st = m.stats
    plan = getattr(m, "plan", None)
    return {
        "budget": budget,
        "tokens_per_s": st["decode_tokens_per_s"],
        "prefill_tokens_per_s": st.get("prefill_tokens_per_s"),
        "tokens": ids,
        "memory_peak_bytes": mem.peak,
        "load_peak_bytes": load_peak,
        "peak_rss_bytes": _peak_rss(),
        "plan": plan.describe() if plan is not None else "resident",
        "streamed_bytes_per_token": plan.streamed_bytes if plan is not None else 0,
        "stream_bytes": st.get("stream_bytes", 0),
        "stream_read_s": st.get("stream_read_s", 0.0),
        "stream_stall_s": st.get("stream_stall_s", 0.0),
        "decode_s": st.get("decode_s"),
    }


def worker_speculative(
    model: str,
    draft: str | None,
    threads: int,
    tokens: int,
    k: int | None = None,
    schedule: str = "auto",
    request: str = "type hints",
    quant: str = "q4_0",
) -> dict:
    """Greedy generation of `tokens` tokens on a rewrite request, plain (draft None) or with a
    drafter ("lookup" or a draft model, from its 4-bit copy or, quant="file", its file as it is)
    drafting k tokens a step (None: chosen per step) under a schedule; the tokens (for the
    identity check), tok/s and the speculative stats."""
    import ember

    m = ember.load(
        model, threads=threads, n_ctx=2048, draft=draft, draft_k=k, draft_schedule=schedule, draft_quant=quant
    )
    m.prepare()
    messages = [{"role": "user", "content": rewrite_prompt(request)}]
    for _ in m.chat(messages, max_tokens=4, temperature=0.0):  # warm-up: the k-row paths compile
        pass
    ids = [i for c in m.chat(messages, max_tokens=tokens, temperature=0.0) for i in c.token_ids]
    st = dict(m.stats)
    keys = ("drafter", "draft_k", "draft_k_mean", "plain_steps", "verify_steps", "drafted_tokens", "accepted_tokens")
    more = ("acceptance_rate", "mean_accepted_length", "k_reason", "verify_s", "draft_s_per_token", "schedule")
    more += ("steps_by_schedule", "ahead_drafts", "ahead_hits", "ahead_wasted_tokens", "verify_s_concurrent")
    more += ("draft_s_per_token_concurrent",)
    out = {k: st[k] for k in (*keys, *more) if k in st}
    out.update(tokens_per_s=st["decode_tokens_per_s"], tokens=ids, peak_rss_bytes=_peak_rss())
    return out


def worker_llama_speculative(
    model: str, lookup: bool, threads: int, tokens: int, request: str = "type hints", repack: bool = True
) -> dict:
    """llama-cpp-python on the same request, plain or with its prompt-lookup decoding."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    llm = _llama(
        model,
        2048,
        threads,
        repack,
        draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None,
        logits_all=lookup,  # its verification reads every drafted row's logits
    )
    messages = [{"role": "user", "content": rewrite_prompt(request)}]
    llm.create_chat_completion(messages, max_tokens=4, temperature=0.0)  # warm-up
    t_first, done = None, 0
    for _ in llm.create_chat_completion(messages, max_tokens=tokens, temperature=0.0, top_k=1, stream=True):
        done += 1
        if done == 2:  # the first chunk carries the role only, the second the first token
            t_first = time.perf_counter()
    dt = time.perf_counter() - t_first if t_first else float("nan")
    return {"tokens_per_s": (done - 2) / dt if done > 2 else float("nan"), "peak_rss_bytes": _peak_rss()}


def worker_moe_budget(
    model: str,
    budget: int | None,
    threads: int,
    tokens: int,
    prompt: int,
    predict: bool = True,
    policy: str = "score",
    expert_share: float | None = None,
) -> dict:
    """An MoE model's decode under memory_budget=budget (None: resident; with expert_share, no
    budget but an expert cache of that share of the experts: a tiny model's experts all fit in
    any budget its process fits in), the model files' page cache dropped first: `prompt` ids
    fed at once, then `tokens` fed one at a time (`replay_ids`), each step's argmax (the
    identity check), tok/s, the plan, the expert cache's and the guesses' figures over the
    decode, and the memory peak from the load on."""
    import os

    import numpy as np

    import ember
    from ember.home import uncache
    from ember.lut_kernels import pack_cache

    files = [os.path.realpath(model)]
    pack = pack_cache.cache_path(ember.hub.resolve(model))
    if pack.exists():
        files.append(os.path.realpath(pack))
    cached = budget is not None or expert_share is not None
    with _MemorySampler(files) as mem:  # from the load on: the budget is the whole run's
        m = ember_load(model, threads, budget)
        m.prepare()
        tr, plan = m.transformer, m.plan
        if expert_share is not None:
            c = m.config
            m.device.cache_experts(
                tr, max(c.n_expert_used, int(expert_share * c.n_layer * c.n_expert)), predict, policy
            )
        elif plan is not None and m.device.streamed(tr) is not None and (not predict or policy != "score"):
            m.device.set_budget(tr, m.memory_budget, m.n_ctx, predict=predict, policy=policy)
        sm = m.device.streamed(tr)
        ids = replay_ids(prompt + tokens, m.config.n_vocab)
        warm = replay_ids(16, m.config.n_vocab, seed=1) if cached else ids  # a resident run's pages in
        s = m.session()
        for t in warm:
            s.feed([t])
        if cached:
            for f in files:
                uncache(f)
        s = m.session()
        s.feed(ids[:prompt])
        before = sm.stats_dict() if sm is not None else {}
        top, t0 = [], time.perf_counter()
        for t in ids[prompt:]:
            top.append(int(np.argmax(s.feed([t]))))
        dt = time.perf_counter() - t0
        after = sm.stats_dict() if sm is not None else {}
    return {
        "budget": budget,
        "tokens_per_s": tokens / dt,
        "decode_s": dt,
        "argmax": top,
        "plan": sm.plan.describe() if sm is not None else "resident",
        "slots": sm.plan.slots if sm is not None else None,
        "expert_slot_bytes": sm.plan.expert_bytes if sm is not None else None,
        "cache": {k: after[k] - before[k] for k in after},
        "memory_peak_bytes": mem.peak,
        "peak_rss_bytes": _peak_rss(),
    }


def worker_llama_replay(model: str, threads: int, tokens: int, prompt: int, max_s: float) -> dict:
    """llama.cpp (repacking off) fed the same ids as `worker_moe_budget`: `prompt` at once, then
    one at a time until `tokens` or `max_s` seconds (a run that thrashes under a memory limit
    reports the tokens it got through)."""
    llm = _llama(model, 512, threads, repack=False)
    ids = replay_ids(prompt + tokens, llm.n_vocab())
    llm.eval(ids[:prompt])
    done, t0 = 0, time.perf_counter()
    for t in ids[prompt:]:
        llm.eval([t])
        done += 1
        if time.perf_counter() - t0 > max_s:
            break
    dt = time.perf_counter() - t0
    return {"tokens_per_s": done / dt, "decoded": done, "decode_s": dt, "peak_rss_bytes": _peak_rss()}


WORKERS = {
    "ember": lambda a: worker_ember(a["model"], a["test"], a["threads"], a.get("device", "cpu")),
    "llama": lambda a: worker_llama(a["model"], a["test"], a["threads"], a.get("repack", True)),
    "bandwidth": lambda a: worker_bandwidth(a["threads"]),
    "offload": lambda a: worker_offload(a["model"], a.get("budget"), a["threads"], a["tokens"], a.get("stream_share")),
    "speculative": lambda a: worker_speculative(
        a["model"],
        a.get("draft"),
        a["threads"],
        a["tokens"],
        a.get("k"),
        a.get("schedule", "auto"),
        a["request"],
        a.get("quant", "q4_0"),
    ),
    "moe_budget": lambda a: worker_moe_budget(
        a["model"],
        a.get("budget"),
        a["threads"],
        a["tokens"],
        a["prompt"],
        a.get("predict", True),
        a.get("policy", "score"),
        a.get("expert_share"),
    ),  # fmt: skip
    "llama_replay": lambda a: worker_llama_replay(a["model"], a["threads"], a["tokens"], a["prompt"], a["max_s"]),
    "llama_speculative": lambda a: worker_llama_speculative(
        a["model"], a["lookup"], a["threads"], a["tokens"], a["request"], a.get("repack", True)
    ),
    "llama_probe": lambda a: worker_llama_probe(a["model"], a["threads"], a.get("repack", True)),
}


def main(argv: list[str] | None = None) -> int:
    from ..errors import EmberError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in WORKERS:
        print(f"usage: python -m ember.bench.workers {{{'|'.join(WORKERS)}}} JSON_ARGS", file=sys.stderr)
        return 2
    try:
        out = WORKERS[args[0]](json.loads(args[1]))
    except EmberError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
