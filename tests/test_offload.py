"""Layer streaming under a memory budget: the plan, the streamer's reads and faults, and output
identical to the fully resident model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tiny_gguf as tg

import ember
from ember.devices.cpu.streaming import StreamedModel
from ember.errors import BudgetError, EmberError
from ember.home import uncache
from ember.lut_kernels import pack_cache
from ember.offload import stream
from ember.offload.memory import cached_bytes
from ember.offload.plan import Needs, Plan, make_plan, parse_budget
from ember.offload.stream import IN_FLIGHT, LayerStreamer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Pack caches of these tests' files in a folder of their own (one gets truncated)."""
    monkeypatch.setattr(pack_cache, "cache_dir", lambda kind: tmp_path / "cache" / kind)


def test_parse_budget():
    assert parse_budget("600MB") == 600_000_000
    assert parse_budget("1.5 GB") == 1_500_000_000
    assert parse_budget("512MiB") == 512 << 20
    assert parse_budget(12345) == 12345
    for bad in ("lots", "-5MB", "5 parsecs", 0, True, ""):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_plan_keeps_a_prefix_resident_and_states_the_minimum():
    M = 10**6
    needs = Needs(process=100 * M, fixed=10 * M, kv_cache=20 * M, work=5 * M)
    layers = [50 * M] * 8
    assert make_plan(10_000 * M, layers, needs).resident == 8  # all fit: nothing streams
    p = make_plan(135 * M + 100 * M + IN_FLIGHT + 3 * 50 * M + 10 * M, layers, needs)
    assert p.resident == 3 and list(p.streamed) == [3, 4, 5, 6, 7] and p.streamed_bytes == 250 * M
    assert p.ring_bytes == 50 * M and "3 of 8 layers in memory" in p.describe()
    assert p.ring == 2
    # no room for two buffers: one (the reads wait for the compute)
    p = make_plan(135 * M + 100 * M + IN_FLIGHT - 1, layers, needs)
    assert p.ring == 1 and p.resident == 0 and p.output == 0 and "streamed from disk, one at a time" in p.describe()
    minimum = (135 * M + 50 * M + IN_FLIGHT) / M  # one layer in flight and its reads' pages
    with pytest.raises(BudgetError, match=rf"needs at least {minimum:.0f} MB") as e:
        make_plan(180 * M, layers, needs, n_ctx=4096)
    assert "4096 tokens" in str(e.value)
    # no room for the ring beside a 50 MB output matrix that can stream: it streams too, before
    # the ring shrinks to one buffer
    needs = Needs(process=100 * M, fixed=60 * M, kv_cache=20 * M, work=5 * M)
    ring = 100 * M + IN_FLIGHT
    assert make_plan(185 * M + ring, layers, needs, output=50 * M).output == 0  # it fits: resident
    p = make_plan(185 * M + ring - 1, layers, needs, output=50 * M)
    assert p.output == 50 * M and p.resident == 0 and p.ring == 2 and p.streamed_bytes == 450 * M
    assert "8 and the output matrix streamed" in p.describe()
    assert make_plan(185 * M + ring + 50 * M, layers, needs, output=50 * M).resident == 1
    p = make_plan(135 * M + ring - 1, layers, needs, output=50 * M)
    assert p.output == 50 * M and p.ring == 1
    one = 50 * M + IN_FLIGHT
    with pytest.raises(BudgetError, match=rf"needs at least {(135 * M + one) / M:.0f} MB"):
        make_plan(135 * M + one - 1, layers, needs, output=50 * M)
    with pytest.raises(BudgetError, match=rf"needs at least {(185 * M + one) / M:.0f} MB"):
        make_plan(185 * M + one - 1, layers, needs)  # an output matrix that cannot stream


def _model(tmp_path, n_layer=4, family="llama", qtype="Q8_0"):
    path = tg.write_family(tmp_path / "m.gguf", family, qtype=qtype, n_ctx=128, n_layer=n_layer)
    m = ember.load(path, threads=2)
    if m.device.decoder(m.transformer) is None:
        pytest.skip("no fused step on this host")
    return m


def _streamed(m, resident: int, ring: int = 2) -> StreamedModel:
    tr, dec = m.transformer, m.device.decoder(m.transformer)
    sizes = [sum(tr.store.matrix(n).nbytes for n in dec.matrix_names(range(i, i + 1))) for i in range(tr.cfg.n_layer)]
    plan = Plan(budget=1, needs=Needs(0, 0, 0, 0), layer_bytes=tuple(sizes), resident=resident, ring=ring)
    return StreamedModel(dec, plan)


@pytest.mark.parametrize("resident,ring", [(0, 2), (1, 2), (3, 2), (1, 1)])
def test_streamed_layers_give_the_resident_logits(tmp_path, resident, ring):
    m = _model(tmp_path)
    tr, dev = m.transformer, m.device
    ids = np.random.default_rng(7).integers(0, m.config.n_vocab, 37).tolist()  # 3 chunks of <= 16
    want_cache = dev.new_cache(tr, 128)
    want = np.concatenate([dev.forward(tr, ids[:30], want_cache), dev.forward(tr, ids[30:], want_cache)])
    sm = _streamed(m, resident, ring)
    try:
        assert len(sm.streamer.buffers) == min(ring, len(sm.plan.streamed))
        cache = dev.new_cache(tr, 128)
        got = np.concatenate([sm.forward(ids[:30], cache, True), sm.forward(ids[30:], cache, True)])
        assert cache.length == 37
        np.testing.assert_array_equal(got, want)
        last = sm.forward(ids[:5], dev.new_cache(tr, 128), False)
        np.testing.assert_array_equal(last[-1], dev.forward(tr, ids[:5], dev.new_cache(tr, 128))[-1])
        assert sm.streamer.stats.layers_read >= 3 * len(sm.plan.streamed)  # once per pass, from the file
    finally:
        sm.close()


@pytest.mark.parametrize("embd,n_vocab", [("Q6_K", 4000), ("Q4_K", 6001)])
def test_a_streamed_output_matrix_gives_the_resident_logits(tmp_path, embd, n_vocab):
    """The output matrix (a K-quant's) streams after the last layer in pieces of rows, each at
    most a ring buffer (several here; the last a partial block, Q4_K's an odd row of a pair):
    the logits are bit for bit the resident ones, every row's or the last one's."""
    from gguf import GGMLQuantizationType as Q

    from ember.devices.cpu.streaming import streamable_output

    path = tg.random_blocks_model(tmp_path / "kq.gguf", Q.Q4_K, Q.Q6_K, Q[embd], n_vocab=n_vocab, n_layer=3)
    m = ember.load(path, threads=2)
    tr, dev = m.transformer, m.device
    dec = dev.decoder(tr)
    if dec is None:
        pytest.skip("no fused step on this host")
    ids = np.random.default_rng(9).integers(0, n_vocab, 21).tolist()
    want_cache = dev.new_cache(tr, 64)
    want = np.concatenate([dev.forward(tr, ids[:18], want_cache), dev.forward(tr, ids[18:], want_cache)])
    sizes = [sum(tr.store.matrix(n).nbytes for n in dec.matrix_names(range(i, i + 1))) for i in range(3)]
    sizes[-1] -= tr.store.matrix(tr.output_name).nbytes
    output = streamable_output(dec)
    assert output == tr.store.matrix(tr.output_name).nbytes > 2 * max(sizes)
    for resident in (0, 3):
        plan = Plan(budget=1, needs=Needs(0, 0, 0, 0), layer_bytes=tuple(sizes), resident=resident, output=output)
        assert plan.streams and plan.streamed_bytes == sum(sizes[resident:]) + output
        sm = StreamedModel(dec, plan)
        try:
            assert len(sm.pieces) >= 3
            cache = dev.new_cache(tr, 64)
            got = np.concatenate([sm.forward(ids[:18], cache, True), sm.forward(ids[18:], cache, True)])
            np.testing.assert_array_equal(got, want)
            last = sm.forward(ids[:5], dev.new_cache(tr, 64), False)
            np.testing.assert_array_equal(last, want[4:5])
        finally:
            sm.close()


def test_a_streamed_batch_that_grows_the_cache_keeps_its_keys(tmp_path):
    """A 300-token prompt outgrows the cache's first 256 positions part way through a layer's
    chunks; the keys the chunks before wrote (not committed yet) must survive the growth."""
    m = _model(tmp_path)
    tr, dev = m.transformer, m.device
    ids = np.random.default_rng(8).integers(0, m.config.n_vocab, 300).tolist()
    want_cache = dev.new_cache(tr, 600)  # fed 16 at a time: the fused step's rows, as streaming runs
    want = np.concatenate([dev.forward(tr, ids[i : i + 16], want_cache) for i in range(0, 300, 16)])
    sm = _streamed(m, 1)
    try:
        cache = dev.new_cache(tr, 600)
        cache.reserve(10)  # a cache that already holds its first, small capacity
        np.testing.assert_array_equal(sm.forward(ids, cache, True), want)
    finally:
        sm.close()


def test_greedy_generation_under_a_budget_is_the_resident_one(tmp_path):
    path = tg.write_family(tmp_path / "m.gguf", "llama", qtype="Q8_0", n_ctx=128, n_layer=4)
    free = ember.load(path, threads=2)
    if free.device.decoder(free.transformer) is None:
        pytest.skip("no fused step on this host")
    want = [c.token_ids for c in free.generate([1, 5, 9, 2, 7] * 5, max_tokens=20)]
    m = ember.load(path, threads=2, memory_budget="100GB")
    assert m.transformer is not None and m.plan.resident == 4  # everything fits: nothing streams
    assert [c.token_ids for c in m.generate([1, 5, 9, 2, 7] * 5, max_tokens=20)] == want
    sm = _streamed(m, 1)  # the device streams three of four layers
    m.device._streamed[id(m.transformer)] = (m.transformer, sm)
    try:
        assert [c.token_ids for c in m.generate([1, 5, 9, 2, 7] * 5, max_tokens=20)] == want
        assert sm.streamer.stats.layers_read >= 3 * 20
        assert m.stats["stream_bytes"] > 0 and m.stats["stream_stall_s"] >= 0  # this call's streaming
        # auto did not list the GPUs: that loads their drivers, past the budget
        assert m.stats["device_choice"] == "cpu: under a memory budget the layers stream on the CPU"
    finally:
        sm.close()


def test_llvm_compiles_after_its_pages_are_given_back():
    """The compiler's pages given back (a budget's plan) fault back in when numba compiles again;
    its relocated data (a private copy) stays: dropped, the next compile crashed."""
    import subprocess
    import sys

    code = (
        "import numba\n@numba.njit\ndef f(x): return x + 1\nf(1)\n"
        "from ember.offload.memory import page_out_compilers\nassert page_out_compilers() > 0\n"
        "@numba.njit\ndef g(x): return x * 3\nprint(g(4))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "12", r.stderr[-2000:]


def test_a_budget_below_the_minimum_is_a_budget_error(tmp_path):
    path = tg.write_family(tmp_path / "m.gguf", "llama", qtype="Q8_0", n_ctx=128, n_layer=4)
    m = ember.load(path, memory_budget="1MB")
    with pytest.raises(BudgetError, match="at least"):
        _ = m.transformer
    with pytest.raises(BudgetError):
        ember.load(path, memory_budget="a lot")


def test_a_file_truncated_or_replaced_while_streaming_is_an_error(tmp_path):
    m = _model(tmp_path)
    tr, dev = m.transformer, m.device
    path = pack_cache.cache_path(tr.store.gguf.path)
    for damage in ("truncate", "replace"):
        sm = _streamed(m, 1)
        try:
            cache = dev.new_cache(tr, 128)
            sm.forward([1, 2, 3], cache, False)
            data = path.read_bytes()
            if damage == "truncate":  # where the streamed layers start: the resident ones stay mapped
                _, recs = pack_cache.records(tr.store.gguf.path)
                os.truncate(path, min(off for _, _, off, _ in recs["blk.1.attn_q.weight"][1].values()))
            else:
                tmp = path.with_suffix(".new")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            with pytest.raises(EmberError, match="changed|replaced|shorter"):
                for _ in range(3):  # the reader may have read the next layers already
                    sm.forward([4], cache, False)
        finally:
            sm.close()
        path.write_bytes(data)
    assert len(data) > 0


def test_streamer_reads_ranges_and_skips_an_interrupted_pass(tmp_path):
    f = tmp_path / "blob"
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)
    f.write_bytes(data.tobytes())
    s = LayerStreamer(f, {5: [(0, 100), (1000, 300)], 6: [(5000, 64)], 7: [(9000, 1000)]})
    try:
        buf, placed = s.acquire(5)
        assert [(o, n) for o, n, _ in placed] == [(0, 100), (1000, 300)]
        for off, n, at in placed:
            assert bytes(buf[at : at + n]) == data[off : off + n].tobytes()
        s.release(5)
        buf, placed = s.acquire(5)  # the pass over 6, 7 was cut short: skipped
        s.release(5)
        buf, placed = s.acquire(7)
        assert bytes(buf[placed[0][2] : placed[0][2] + 1000]) == data[9000:].tobytes()
        s.release(7)
    finally:
        s.close()


def _blob(f, n: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    with open(f, "wb") as h:
        h.write(data.tobytes())
        os.fsync(h.fileno())  # written back: clean pages can leave the page cache
    return data


def test_streamer_reads_in_pieces_that_end_inside_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "PIECE", 3 * 4096 + 100)
    f = tmp_path / "blob"
    data = _blob(f, 1 << 20, 2)
    layers = {0: [(0, 300_000)], 1: [(300_032, 400_000)], 2: [(700_032, 100_000), (900_000, 148_576)]}
    s = LayerStreamer(f, layers)
    try:
        for _ in range(2):
            for il, ranges in layers.items():
                buf, placed = s.acquire(il)
                assert [(o, n) for o, n, _ in placed] == ranges
                for off, n, at in placed:
                    assert np.array_equal(buf[at : at + n], data[off : off + n])
                s.release(il)
    finally:
        s.close()


def test_streaming_keeps_little_of_the_file_in_the_page_cache(tmp_path):
    f = tmp_path / "blob"
    layer = 16 << 20
    data = _blob(f, 3 * layer, 3)
    uncache(f)
    if cached_bytes(f) != 0:
        pytest.skip("the page cache cannot be dropped here (tmpfs?)")
    s = LayerStreamer(f, {il: [(il * layer, layer)] for il in range(3)})
    peak = 0
    try:
        for _ in range(2):
            for il in range(3):
                buf, _ = s.acquire(il)
                peak = max(peak, cached_bytes(f))
                assert buf[0] == data[il * layer] and buf[-1] == data[(il + 1) * layer - 1]
                s.release(il)
    finally:
        s.close()
    assert peak <= IN_FLIGHT, f"{peak / 2**20:.1f} MiB of the file stayed in the page cache"


def test_default_budget_only_when_the_model_does_not_fit():
    from ember.offload.plan import MARGIN, default_budget

    assert default_budget(500, 1000) is None
    assert default_budget(1000, 1000) is None
    assert default_budget(2000, 1000) == int(1000 * (1 - MARGIN))


def test_load_without_a_budget_streams_only_when_memory_is_short(tmp_path, monkeypatch, caplog):
    import ember.offload.memory as memory

    path = tg.write_family(tmp_path / "m.gguf", "llama", qtype="Q8_0", n_ctx=128, n_layer=4)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 50)
    m = ember.load(path, threads=2)
    if m.device.decoder(m.transformer) is None:
        pytest.skip("no fused step on this host")
    assert m.plan is None and m.memory_budget is None and "streaming" not in caplog.text
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)  # 1 MiB left: not even the process fits
    with pytest.raises(BudgetError, match="not enough memory is available for this model: a memory budget of 1 MB"):
        ember.load(path, threads=2).prepare(load_code=False)
    assert "m.gguf needs about" in caplog.text and "streaming what does not fit" in caplog.text
    assert ember.load(path, threads=2, memory_budget="none").transformer is not None  # never a budget


def test_available_memory_counts_a_cgroup_limit():
    import subprocess
    import sys

    from ember.bench.cgroup import MemoryCgroup, unavailable

    if unavailable():
        pytest.skip(unavailable())
    code = "from ember.offload.memory import available_bytes; print(available_bytes())"
    with MemoryCgroup(400_000_000) as cg:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=cg.enter)
    assert out.returncode == 0, out.stderr
    assert 0 < int(out.stdout) < 400_000_000


def test_the_pack_cache_holds_the_layers_in_their_order(tmp_path):
    """A streamed layer's readahead runs on into the next layer in the file: it must be the next
    layer the compute reads (blk.2 before blk.10), so the streamer uses what was read ahead."""
    m = _model(tmp_path, n_layer=12)
    _, recs = pack_cache.records(m.path)
    packed = {n: m.transformer.store.matrix(n).packed for n in sorted(recs, reverse=True)}
    pack_cache.save(m.path, packed)  # handed over in another order
    _, recs = pack_cache.records(m.path)
    first = {}
    for name, (_, specs) in recs.items():
        if name.startswith("blk."):
            il = int(name.split(".")[1])
            first[il] = min(first.get(il, 1 << 62), *(off for _, _, off, _ in specs.values()))
    assert sorted(first, key=first.get) == list(range(12))


def test_a_frugal_pack_cache_load_leaves_the_file_on_disk(tmp_path):
    """Under a budget the pack cache is checked array by array, each array's pages dropped after
    its checksum: loading does not pull the whole file into memory; the arrays still read right."""
    import gc

    path = _model(tmp_path, n_layer=6).path  # writes the pack cache
    cache = pack_cache.cache_path(path)
    want = {n: {a: v.copy() for a, v in p.arrays().items()} for n, p in pack_cache.load(path).items()}
    gc.collect()  # no mapping of the file is left: mapped pages cannot leave the page cache
    os.sync()
    uncache(cache)
    if cached_bytes(cache) != 0:
        pytest.skip("the page cache cannot be dropped here (tmpfs?)")
    got = pack_cache.load(path, frugal=True)
    assert cached_bytes(cache) <= 64 << 10  # the index; every array dropped
    for n, arrays in want.items():
        for a, v in arrays.items():
            assert np.array_equal(got[n].arrays()[a], v), (n, a)
