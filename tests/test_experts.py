"""Mixture-of-experts models under a memory budget: the expert cache (reads, eviction, read-ahead,
faults), the routing guesses, and output identical to the resident model's."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tiny_gguf as tg

import ember
from ember.devices.cpu import experts
from ember.errors import BudgetError, EmberError
from ember.home import uncache
from ember.lut_kernels import pack_cache
from ember.offload import experts as xc
from ember.offload.memory import cached_bytes
from ember.offload.plan import WORK_SHARE, Needs
from ember.offload.predict import Predictor, precision_recall
from ember.offload.stream import IN_FLIGHT

FAMILIES = ["qwen3moe", "qwen2moe", "mixtral", "olmoe"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Pack caches of these tests' files in a folder of their own (one gets truncated)."""
    monkeypatch.setattr(pack_cache, "cache_dir", lambda kind: tmp_path / "cache" / kind)


def _moe(tmp_path, family="qwen3moe", n_layer=3, **kw):
    path = tg.write_family(
        tmp_path / f"{family}.gguf",
        family,
        qtype="Q8_0",
        embd_qtype="Q8_0",
        n_ctx=128,
        n_expert=8,
        n_layer=n_layer,
        **kw,
    )
    m = ember.load(path, threads=2)
    if m.device.decoder(m.transformer) is None:
        pytest.skip("no fused step on this host")
    return m


def _cached(m, slots: int, rows: int, predict: bool = True, policy: str = "score") -> experts.ExpertModel:
    dec = m.device.decoder(m.transformer)
    return experts.ExpertModel(
        dec, dataclasses.replace(experts.minimal_plan(dec), slots=slots, rows=rows), predict, policy
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_from_the_cache_give_the_resident_logits(tmp_path, family):
    """Bit for bit, whatever the slots (down to one token's experts), the rows a call takes, the
    eviction and the read-ahead; the shared expert (qwen2moe) and every family's routing."""
    m = _moe(tmp_path, family)
    tr, dev = m.transformer, m.device
    n_used = m.config.n_expert_used
    ids = np.random.default_rng(3).integers(0, m.config.n_vocab, 37).tolist()
    want_cache = dev.new_cache(tr, 128)
    want = np.concatenate([dev.forward(tr, ids[:30], want_cache), dev.forward(tr, ids[30:], want_cache)])
    for slots, rows, predict, policy in [(n_used, 1, False, "lru"), (5, 2, True, "score"), (24, 16, True, "lru")]:
        em = _cached(m, slots, rows, predict, policy)
        try:
            cache = dev.new_cache(tr, 128)
            got = np.concatenate([em.forward(ids[:30], cache, True), em.forward(ids[30:], cache, True)])
            assert cache.length == 37
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(em.forward(ids[:5], dev.new_cache(tr, 128), False)[-1], want[4])
            st = em.stats_dict()
            if rows == 1:  # each of the 42 rows' choices in each of 3 layers
                assert st["expert_hits"] + st["expert_misses"] == 42 * 3 * n_used
            assert st["expert_bytes"] > 0 and st["expert_misses"] > 0
            if slots < 24:
                assert em.cache.stats.evictions > 0
        finally:
            em.close()


def test_generation_under_a_budget_reads_experts_and_is_the_resident_one(tmp_path):
    m = _moe(tmp_path, n_embd=768, n_ff_exp=2048)  # experts of 5 MB: more than the process's noise
    prompt = [1, 5, 9, 2, 7] * 5
    want = [c.token_ids for c in m.generate(prompt, max_tokens=16)]
    probe = ember.load(m.path, threads=2, memory_budget="1TB", n_ctx=128)
    probe.prepare()
    assert probe.plan.all_resident and probe.device.streamed(probe.transformer) is None
    p = probe.plan
    base = p.needs.total - int(p.budget * WORK_SHARE)
    budget = int((base + xc.READS * IN_FLIGHT + 6 * p.expert_bytes) / (1 - WORK_SHARE)) + 4096
    b = ember.load(m.path, threads=2, memory_budget=budget, n_ctx=128)
    b.prepare()
    assert not b.plan.all_resident and 2 <= b.plan.slots <= 12
    assert "of 24 experts in memory" in b.plan.describe()
    assert [c.token_ids for c in b.generate(prompt, max_tokens=16)] == want
    st = b.stats
    assert st["expert_misses"] > 0 and st["expert_bytes"] > 0 and st["expert_stall_s"] >= 0
    precision, recall = precision_recall(st)
    assert 0 <= precision <= 1 and 0 <= recall <= 1


def test_an_moe_budget_below_one_tokens_experts_is_a_budget_error(tmp_path):
    m = _moe(tmp_path)
    with pytest.raises(BudgetError, match=r"at least .* the 2 experts a token uses and"):
        ember.load(m.path, memory_budget="1MB").prepare()
    needs, eb = Needs(process=100, fixed=10, kv_cache=5, work=5), 10**7
    p = xc.plan(10**10, needs, eb, n_layer=4, n_expert=8, n_used=2, max_rows=16)
    assert p.all_resident and p.slots == 32
    p = xc.plan(120 + xc.READS * IN_FLIGHT + 5 * eb, needs, eb, n_layer=4, n_expert=8, n_used=2, max_rows=16)
    assert p.slots == 5 and p.rows == 2  # a call's rows choose at most 2 x 2 experts
    p = xc.plan(120 + xc.READS * IN_FLIGHT + 9 * eb, needs, eb, n_layer=4, n_expert=8, n_used=2, max_rows=16)
    assert p.slots == 9 and p.rows == 16  # a whole layer's experts fit
    with pytest.raises(BudgetError, match="at least"):
        xc.plan(120 + xc.READS * IN_FLIGHT + eb, needs, eb, n_layer=4, n_expert=8, n_used=2, max_rows=16)


# ---- the cache on a plain file -------------------------------------------------------------


def _blob(f, n: int, seed: int = 1) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    with open(f, "wb") as h:
        h.write(data.tobytes())
        os.fsync(h.fileno())
    return data


def _file_cache(tmp_path, slots: int, policy: str = "lru", n_layer=2, n_expert=4, size=10_240):
    f = tmp_path / "experts.bin"
    data = _blob(f, n_layer * n_expert * size)
    ranges = {
        (il, e): [((il * n_expert + e) * size, 3000), ((il * n_expert + e) * size + 3008, size - 3008)]
        for il in range(n_layer)
        for e in range(n_expert)
    }
    return f, data, ranges, xc.ExpertCache(f, ranges, slots, n_layer, n_expert, policy)


def _holds(c, data, key, ranges) -> bool:
    s = c.where(key)
    if s is None:
        return False
    v = c.view(s)
    return all(np.array_equal(v[at : at + n], data[off : off + n]) for off, n, at in c.placed(key))


def test_cache_reads_experts_into_slots_and_evicts_lru(tmp_path):
    f, data, ranges, c = _file_cache(tmp_path, slots=3)
    try:
        c.ensure(0, [1, 2])
        assert _holds(c, data, (0, 1), ranges) and _holds(c, data, (0, 2), ranges)
        assert c.stats.misses == 2 and c.stats.bytes_read == 2 * 10_240
        c.ensure(1, [3])
        c.ensure(0, [2])  # (0, 1) is now the least recently used
        assert c.stats.hits == 1
        c.ensure(1, [0])
        assert c.where((0, 1)) is None and c.take_evicted() == [(0, 1)]
        assert all(_holds(c, data, k, ranges) for k in [(0, 2), (1, 3), (1, 0)])
    finally:
        c.close()


def test_score_eviction_keeps_the_experts_routing_favours(tmp_path):
    f, data, ranges, c = _file_cache(tmp_path, slots=3, policy="score")
    try:
        for _ in range(3):
            c.observe(0, [[0, 1]], [[0.9, 0.1]])
            c.ensure(0, [0, 1])
        c.observe(0, [[2, 3]], [[0.5, 0.5]])
        c.ensure(0, [2, 3])  # one of (0, 0), (0, 1) must go: the one with the lower score
        assert c.where((0, 0)) is not None and c.where((0, 1)) is None
        c2 = xc.ExpertCache(f, ranges, 3, 2, 4, "lru")
        try:
            for _ in range(3):
                c2.ensure(0, [0, 1])
            c2.ensure(0, [1])
            c2.ensure(0, [2, 3])  # lru: (0, 0), used longest ago, goes
            assert c2.where((0, 0)) is None and c2.where((0, 1)) is not None
        finally:
            c2.close()
    finally:
        c.close()


def test_pinned_experts_are_never_evicted_and_one_call_cannot_overflow(tmp_path):
    f, data, ranges, c = _file_cache(tmp_path, slots=2)
    try:
        c.ensure(0, [0, 1])
        c.prefetch(1, [2, 3])  # every slot is in use by the call under way: nothing to take
        assert c.stats.prefetched == 0 and c.where((0, 0)) is not None and c.where((0, 1)) is not None
        with pytest.raises(EmberError, match="all in use"):
            c.ensure(0, [0, 1, 2])
    finally:
        c.close()


def test_prefetch_reads_ahead_and_drops_wrong_guesses(tmp_path, monkeypatch):
    f, data, ranges, c = _file_cache(tmp_path, slots=6)
    try:
        c.ensure(0, [0])
        c.prefetch(1, [1, 2, 3])
        c.ensure(1, [1, 3])  # the guess 2 was wrong: dropped if not read yet, never used
        assert _holds(c, data, (1, 1), ranges) and _holds(c, data, (1, 3), ranges)
        assert c.stats.prefetched == 3 and c.stats.prefetch_used == 2 and c.stats.hits + c.stats.misses == 3
        assert c.stats.bytes_read in (3 * 10_240, 4 * 10_240)
        c.ensure(1, [2])  # read now if the guess was dropped, a hit if it had been read
        assert _holds(c, data, (1, 2), ranges)
    finally:
        c.close()


def test_a_guess_not_started_is_read_when_chosen_as_a_miss(tmp_path, monkeypatch):
    monkeypatch.setattr(xc, "READERS", 0)  # no reader: guesses stay queued
    f, data, ranges, c = _file_cache(tmp_path, slots=4)
    try:
        c.prefetch(1, [1, 2])
        c.ensure(1, [1])
        assert (c.stats.hits, c.stats.misses, c.stats.prefetch_used) == (0, 1, 1)
        assert _holds(c, data, (1, 1), ranges) and c.where((1, 2)) is None  # the wrong guess: never read
        assert c.stats.bytes_read == 10_240
    finally:
        c.close()


def test_cache_reads_leave_little_of_the_file_in_the_page_cache(tmp_path):
    """Experts read here and there: no readahead past each stays behind (a sequential read's
    would, into the experts after it that are not read)."""
    f, data, ranges, c = _file_cache(tmp_path, slots=4, n_expert=8, size=49 << 16)  # reads that cross pieces
    uncache(f)
    if cached_bytes(f) != 0:
        c.close()
        pytest.skip("the page cache cannot be dropped here (tmpfs?)")
    try:
        for il in range(2):
            c.ensure(il, [0, 2, 4, 6])
        assert _holds(c, data, (1, 6), ranges)
        assert cached_bytes(f) <= 4 << 20, f"{cached_bytes(f) / 2**20:.1f} MiB of the file stayed in the page cache"
    finally:
        c.close()


def test_a_truncated_or_replaced_expert_file_is_an_error(tmp_path):
    f, data, ranges, c = _file_cache(tmp_path, slots=4)
    try:
        c.ensure(0, [0])
        os.truncate(f, 5000)
        with pytest.raises(EmberError, match="changed|shorter"):
            c.ensure(0, [1])
        c.prefetch(1, [2])  # the reader thread's failure, raised when the expert is chosen
        with pytest.raises(EmberError, match="changed|shorter"):
            c.ensure(1, [2])
        assert c.where((0, 0)) is not None  # what was read before stays usable
    finally:
        c.close()
    f.write_bytes(data.tobytes())
    c = xc.ExpertCache(f, ranges, 2, 2, 4)
    try:
        tmp = f.with_suffix(".new")
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, f)
        with pytest.raises(EmberError, match="replaced"):
            c.ensure(0, [0])
    finally:
        c.close()


def test_a_model_file_truncated_while_experts_stream_is_an_error(tmp_path):
    m = _moe(tmp_path)
    tr, dev = m.transformer, m.device
    em = _cached(m, 2, 1, predict=False)
    path = pack_cache.cache_path(tr.store.gguf.path)
    data = path.read_bytes()
    try:
        cache = dev.new_cache(tr, 128)
        em.forward([1, 2, 3], cache, False)
        os.truncate(path, len(data) // 2)
        with pytest.raises(EmberError, match="changed|shorter"):
            for t in range(4, 20):  # until a token chooses an expert not in the two slots
                em.forward([t], cache, False)
    finally:
        em.close()
        path.write_bytes(data)


# ---- guesses ---------------------------------------------------------------------------------


def test_predictor_guesses_from_the_next_router_and_scores_itself():
    rng = np.random.default_rng(5)
    d, n_exp = 64, 16
    routers = [rng.standard_normal((n_exp, d)).astype(np.float32) for _ in range(3)]
    norms = [np.ones(d, np.float32) for _ in range(3)]
    p = Predictor(routers, norms, 1e-6, n_used=2, margin=1)
    x = (3 * routers[1][7] + routers[1][4]).reshape(1, d)  # layer 1's router favours 7, then 4
    guess = p.predict(1, x)
    assert len(guess) == 3 and guess[:2] == [7, 4]
    p.check(1, [[7, 11]])
    assert p.stats.as_dict() == {"predict_guessed": 3, "predict_chosen": 2, "predict_right": 1}
    assert precision_recall(p.stats.as_dict()) == (1 / 3, 1 / 2)
    p.check(2, [[1, 2]])  # no guess was made for layer 2: nothing scored
    assert p.stats.chosen == 2
    two = p.predict(2, np.stack([routers[2][3], routers[2][9]]))
    assert two[:2] == [3, 9]  # every row's best guess before any row's second
    assert precision_recall({}) == (None, None)


def test_only_moe_layers_split_at_their_routing(tmp_path):
    path = tg.write_family(tmp_path / "d.gguf", "llama", qtype="Q8_0", n_ctx=64)
    m = ember.load(path, threads=1)
    dec = m.device.decoder(m.transformer)
    if dec is None:
        pytest.skip("no fused step on this host")
    with pytest.raises(ValueError, match="MoE"):
        dec.step_rows([1], m.transformer.new_cache(8), route_last=True)


def test_experts_read_in_place_from_the_model_file_are_not_cached_yet(tmp_path):
    from ember.errors import UnsupportedError

    path = tg.write_family(tmp_path / "f16.gguf", "qwen3moe", qtype="F16", n_ctx=128, n_expert=8)
    with pytest.raises(UnsupportedError, match="read in place"):
        ember.load(path, memory_budget="250MB", n_ctx=128).prepare()
