"""The CPU device's fused step (devices/cpu/step.py) against the op-by-op forward pass."""

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import tiny_gguf as tg
from numba import njit

import ember
from ember.devices.cpu import CpuDevice
from ember.devices.cpu.attention import PART
from ember.devices.cpu.step import FusedDecoder
from ember.devices.cpu.vmath import exp_into
from ember.errors import EmberError
from ember.lut_kernels import fused
from ember.runtime.session import Session

pytestmark = pytest.mark.skipif(not fused.available(), reason="no native x86 kernel path")


def _steps(tr, ids, threads, fused_on, n_gen=6):
    """Prefill ids[:-1], then feed ids[-1] and n_gen greedy tokens one at a time: their logits."""
    s = Session(tr, 256, device=CpuDevice(threads, fused=fused_on))
    if len(ids) > 1:
        s.feed(ids[:-1])
    out = [s.feed([ids[-1]])[0]]
    for _ in range(n_gen):
        out.append(s.feed([int(np.argmax(out[-1]))])[0])
    return np.stack(out)


def test_smollm2_fused_matches_op_by_op(catalog_model):
    m = catalog_model("smollm2-135m")
    tr = m.transformer
    assert CpuDevice(1).decoder(tr) is not None, "smollm2 (Q4_1 + Q8_0) must take the fused path"
    ids = m.tokenize("The capital of France is", special=False)
    ref = _steps(tr, ids, 1, False)
    got1 = _steps(tr, ids, 1, True)
    got2 = _steps(tr, ids, 2, True)
    exact = _steps(catalog_model("smollm2-135m", "numpy").transformer, ids, 1, False)
    # Same kernels; attention and norms sum in another order. A last-bit difference can flip the
    # rounding of an int8 activation of the Q8_0 output matrix, so the bound is the kernels' own noise
    # against the float32 reference (0.2-0.4 here), not float32 rounding.
    assert np.abs(got1 - ref).max() < 0.5 * np.abs(ref - exact).max()
    assert np.abs(got1 - exact).max() < 1.25 * np.abs(ref - exact).max()
    assert (got1.argmax(1) == ref.argmax(1)).all()
    # every row is computed whole by one thread: the thread count changes nothing
    assert np.array_equal(got1, got2)


FUSABLE = ["llama", "qwen2", "gemma3"]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "F16", "BF16"])
@pytest.mark.parametrize("family", FUSABLE)
def test_tiny_families_fused_match_op_by_op(tmp_path, family, qtype):
    # n_embd 96 / n_ff 160: matrices with partial 64-row units and an odd number of 32-blocks
    path = tg.write_family(tmp_path / "m.gguf", family, qtype=qtype, embd_qtype="Q8_0", n_embd=96, n_ff=160, n_ctx=64)
    m = ember.load(path)
    tr = m.transformer
    assert CpuDevice(2).decoder(tr) is not None
    rng = np.random.default_rng(1)
    ids = rng.integers(0, m.config.n_vocab, 9).tolist()
    ref = _steps(tr, ids, 1, False, n_gen=12)  # positions 8..20: past gemma3's window of 4
    exact = _steps(ember.load(path, kernels="numpy").transformer, ids, 1, False, n_gen=12)
    noise = np.abs(ref - exact).max()  # the kernels' own activation quantization
    # A last-bit difference (attention, norms) can flip the rounding of an int8 activation, and
    # these random tiny models amplify it: the fused path must be as close to the exact float32
    # path as the op-by-op kernels are, and pick the same token wherever that is clear.
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * noise
    for threads in (1, 2, 3):
        got = _steps(tr, ids, threads, True, n_gen=12)
        assert np.abs(got - exact).max() < 1.25 * noise + 1e-3 * ref.std(), threads
        assert (got.argmax(1) == ref.argmax(1))[clear].all()
    # the one-row kernels run k rows in turn: the same arithmetic as one token at a time
    _rows_agree(m, tr, ids, 0.0, 1.25 * noise + 1e-3 * ref.std())


@pytest.mark.parametrize("family,kv", [(f, "f16") for f in FUSABLE] + [("qwen2", "q8_0"), ("gemma3", "q8_0")])
def test_long_context_attention_is_shared_out_exactly(tmp_path, family, kv):
    """Past one part of keys (attention.PART) a kv group's parts are shared out between the
    threads: every thread count, and 7 tokens in one step or one at a time, give the same
    bits; the op-by-op forward agrees within the kernels' noise (its batch writes the prompt's
    8-bit rows with NumPy, the step the new ones in its loops). gemma3's window is set to cross
    part boundaries. An 8-bit cache takes heads of whole blocks of 32."""
    window = {"sliding_window": PART + 40} if family == "gemma3" else {}
    n_embd = 96 if kv == "f16" else 192
    path = tg.write_family(tmp_path / "m.gguf", family, n_embd=n_embd, n_head=6, n_head_kv=3, n_ctx=2048, **window)
    m = ember.load(path, kv_cache=kv)
    tr = m.transformer
    assert tr.kv_type == kv
    # 7 parts: on 2 threads a unit is a run of 2 of them, the last run 1
    ids = np.random.default_rng(2).integers(0, m.config.n_vocab, 6 * PART + 7).tolist()
    prefix, new = ids[: 6 * PART], ids[6 * PART :]

    def logits(threads, fused_on, at_once, model=tr):
        s = Session(model, 2048, device=CpuDevice(threads, fused=fused_on))
        s.feed(prefix)
        return s.feed(new) if at_once else np.stack([s.feed([t])[0] for t in new])

    one = logits(1, True, False)
    for threads in (2, 3):
        assert np.array_equal(logits(threads, True, False), one), threads
        assert np.array_equal(logits(threads, True, True), one), threads
    assert np.array_equal(logits(1, True, True), one)
    ref = logits(1, False, False)
    exact = logits(1, False, False, ember.load(path, kernels="numpy").transformer)
    noise = np.abs(ref - exact).max()
    assert np.abs(one - exact).max() < 1.25 * noise + 1e-3 * ref.std()


def _rows_agree(m, tr, ids, tol_steps, tol_forward):
    """Seven tokens through one fused step (after two) agree with feeding them one at a time
    (within tol_steps) and with the op-by-op forward (tol_forward); every thread count gives
    the same bits; all_logits=False gives the last row's."""
    s, s1 = m.session(), m.session()
    s.feed(ids[:2]), s1.feed(ids[:2])
    many = s.feed(ids[2:9])
    one_by_one = np.stack([s1.feed([t])[0] for t in ids[2:9]])
    assert np.abs(many - one_by_one).max() <= tol_steps
    cache = tr.new_cache(64)
    tr.forward(ids[:2], cache, threads=1)
    op_by_op = tr.forward(ids[2:9], cache, threads=1)
    assert np.abs(many - op_by_op).max() < tol_forward
    for threads in (1, 3):  # rows are computed whole by one thread: the count changes nothing
        c2 = tr.new_cache(64)
        CpuDevice(threads).decoder(tr).step_rows(ids[:2], c2)
        assert np.array_equal(CpuDevice(threads).decoder(tr).step_rows(ids[2:9], c2), many)
    c3 = tr.new_cache(64)
    CpuDevice(2).decoder(tr).step_rows(ids[:2], c3)
    assert np.array_equal(CpuDevice(2).decoder(tr).step_rows(ids[2:9], c3, all_logits=False), many[-1:])
    assert c3.length == 9
    with pytest.raises(ValueError, match="tokens at once"):
        CpuDevice(1).decoder(tr).step_rows(list(range(17)), tr.new_cache(64))
    # a longer input runs the fused step 16 tokens at a time
    long = (list(ids) * 5)[:37]
    got = m.session().feed(long)
    s5 = m.session()
    one_by_one = np.stack([s5.feed([t])[0] for t in long])
    assert got.shape == one_by_one.shape and np.abs(got - one_by_one).max() <= tol_steps
    assert np.abs(m.session().feed_last(long) - got[-1]).max() <= tol_steps


def test_reference_mode_is_not_fused(tmp_path):
    path = tg.write_family(tmp_path / "d.gguf", "llama")
    assert CpuDevice(1).decoder(ember.load(path, kernels="numpy").transformer) is None


MOE = ["mixtral", "qwen2moe", "qwen3moe", "olmoe"]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("family", MOE)
def test_moe_families_fused_match_op_by_op(tmp_path, family, qtype):
    """Routing, the chosen experts over the rows that chose them, the shared expert (qwen2moe),
    renormalised top-k (mixtral, qwen3moe): as close to the exact float32 path as the op-by-op
    kernels, whatever the thread count; k rows at once as one at a time."""
    path = tg.write_family(tmp_path / "m.gguf", family, qtype=qtype, embd_qtype="Q8_0", n_ctx=64)
    m = ember.load(path)
    tr = m.transformer
    assert CpuDevice(2).decoder(tr) is not None, "MoE layers take the fused step"
    ids = np.random.default_rng(1).integers(0, m.config.n_vocab, 9).tolist()
    ref = _steps(tr, ids, 1, False, n_gen=8)
    exact = _steps(ember.load(path, kernels="numpy").transformer, ids, 1, False, n_gen=8)
    noise = np.abs(ref - exact).max()
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * noise
    got = {t: _steps(tr, ids, t, True, n_gen=8) for t in (1, 2, 3)}
    assert np.abs(got[1] - exact).max() < 1.25 * noise + 1e-3 * ref.std()
    assert (got[1].argmax(1) == ref.argmax(1))[clear].all()
    assert np.array_equal(got[1], got[2]) and np.array_equal(got[1], got[3])
    _rows_agree(m, tr, ids, 0.0, 1.25 * noise + 1e-3 * ref.std())


def test_kquant_moe_fused_matches_op_by_op(tmp_path):
    """K-quant experts: the rows that chose an expert go through its kernel together (their
    k-row activation quantization sums in another order than one row's)."""
    from gguf import GGMLQuantizationType as Q

    path = tg.random_blocks_model(
        tmp_path / "kq.gguf",
        Q.Q4_K,
        Q.Q6_K,
        Q.Q6_K,
        "qwen3moe",
        n_ff_exp=256,
        n_expert=8,
        n_expert_used=3,
        n_ff=768,
        head_dim=64,
    )
    _kquant_fused_agrees(path)


def test_fused_step_checks_token_and_context(tmp_path):
    path = tg.write_family(tmp_path / "m.gguf", "llama", n_ctx=8)
    m = ember.load(path)
    dec = CpuDevice(1).decoder(m.transformer)
    cache = m.transformer.new_cache(4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.step(m.config.n_vocab, cache)
    for t in range(4):
        dec.step(t, cache)
    with pytest.raises(EmberError, match="context window"):
        dec.step(1, cache)
    assert cache.length == 4


@njit(nogil=True)  # a barrier partner holding the GIL would stall the other one
def _two_party(fn, yf, state, nth):
    return fused.barrier(fn, yf, state, nth)


def test_barrier_synchronizes_and_aborts():
    fn, yf, _ = fused.barrier_address()
    st = fused.new_barrier_state()
    results = []
    t = threading.Thread(target=lambda: results.append(_two_party(fn, yf, st, 2)))
    t.start()
    results.append(_two_party(fn, yf, st, 2))
    t.join(5)
    assert results == [0, 0] and st[8] == 1 and st[0] == 0
    # a partner that never arrives: the abort word releases the waiter with status 2
    timer = threading.Timer(0.2, lambda: st.__setitem__(fused.ABORT, 1))
    timer.start()
    assert _two_party(fn, yf, st, 2) == 2
    timer.join()


def test_decoder_refuses_unfusable_matrices(tmp_path):
    path = tg.write_family(tmp_path / "m.gguf", "llama", qtype="F32")  # float32 arrays
    from ember.devices.cpu.step import NotFusable

    with pytest.raises(NotFusable):
        FusedDecoder(ember.load(path).transformer, 1)


def _fixed(tr, ids, threads, fused_on, n_prefix=3):
    """Logits of ids[n_prefix:], fed one at a time after a prefill of ids[:n_prefix]."""
    s = Session(tr, 64, device=CpuDevice(threads, fused=fused_on))
    s.feed(ids[:n_prefix])
    return np.stack([s.feed([t])[0] for t in ids[n_prefix:]])


@pytest.mark.parametrize("layer,v_down,embd", [("Q4_K", "Q6_K", "Q6_K"), ("Q5_K", "Q3_K", "Q2_K")])
def test_kquant_model_fused_matches_op_by_op(tmp_path, layer, v_down, embd):
    """Random K-quant layer matrices (one type for most, one for attn_v / ffn_down) and a tied
    embedding of a third."""
    from gguf import GGMLQuantizationType as Q

    path = tg.random_blocks_model(tmp_path / "kq.gguf", Q[layer], Q[v_down], Q[embd])
    noise, exact_std = _kquant_fused_agrees(path)
    assert noise < 0.05 * exact_std  # int8 activations against the exact float32 path


def _kquant_fused_agrees(path) -> tuple[float, float]:
    """The fused step on a K-quant model is as close to the exact float32 path as op by op, at 1
    and 2 threads, and k rows at once agree with one at a time (the K-quant kernels take all k
    rows in one pass over the weights; their k-row activation quantization sums in another order
    than one row's). Returns the op-by-op path's distance to the exact one and the logits' std."""
    m = ember.load(path)
    tr = m.transformer
    assert CpuDevice(2).decoder(tr) is not None
    ids = np.random.default_rng(1).integers(0, m.config.n_vocab, 12).tolist()
    ref = _fixed(tr, ids, 1, False)
    exact = _fixed(ember.load(path, kernels="numpy").transformer, ids, 1, False)
    noise = np.abs(ref - exact).max()
    for threads in (1, 2):
        got = _fixed(tr, ids, threads, True)
        assert np.abs(got - exact).max() < 1.25 * noise + 1e-3 * ref.std()
    tol = 2.5 * noise + 1e-3 * ref.std()
    _rows_agree(m, tr, ids, tol, tol)
    return noise, exact.std()


@njit
def _exp_of(x):
    out = np.empty_like(x)
    exp_into(x, out, np.empty(x.size, np.int32))
    return out


def test_vector_exp_is_within_two_ulp_of_libm():
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [np.linspace(-87, 87, 100_001), rng.normal(0, 5, 10_001), [-1e30, -100.0, 0.0, -0.0, 100.0, 1e30]]
    ).astype(np.float32)
    got = _exp_of(x).astype(np.float64)
    want = np.exp(np.clip(x, -87, 87).astype(np.float64))
    assert (np.abs(got - want) <= 2 * np.spacing(want.astype(np.float32)).astype(np.float64)).all()


@pytest.mark.parametrize("layer,v_down", [("Q5_0", "TQ2_0"), ("TQ1_0", "Q5_0")])
def test_q5_and_ternary_types_fused_match_op_by_op(tmp_path, layer, v_down):
    """Q5_0 (its 5-bit layout, the q8 module's kernels) and TQ1_0 / TQ2_0 (rewritten exactly as
    Q2_K, the K-quant kernels) in the fused step."""
    from gguf import GGMLQuantizationType as Q

    path = tg.random_blocks_model(tmp_path / "m.gguf", Q[layer], Q[v_down], Q.Q6_K)
    m = ember.load(path)
    tr = m.transformer
    assert CpuDevice(2).decoder(tr) is not None
    ids = np.random.default_rng(2).integers(0, m.config.n_vocab, 10).tolist()
    ref = _fixed(tr, ids, 1, False)
    exact = _fixed(ember.load(path, kernels="numpy").transformer, ids, 1, False)
    noise = np.abs(ref - exact).max()
    assert noise < 0.05 * exact.std()
    for threads in (1, 2):
        got = _fixed(tr, ids, threads, True)
        assert np.abs(got - exact).max() < 1.25 * noise + 1e-3 * ref.std()
    # the q8 kernels run k rows in turn, the K-quant ones (Q6_K, the ternary) all k in one pass
    _rows_agree(m, tr, ids, 2.5 * noise + 1e-3 * ref.std(), 1.25 * noise + 1e-3 * ref.std())


def test_numba_cache_is_keyed_on_all_of_embers_numba_sources(tmp_path, monkeypatch):
    """The fused step inlines code from the kernel modules; numba alone would keep its cached
    machine code after one of them changed. ember points numba's cache at a folder named by a
    digest of every ember source that uses numba."""
    from numba.core import config

    import ember.devices.cpu.step as decode
    from ember import home

    want = home.numba_cache_dir()  # (conftest moved $EMBER_CACHE_DIR after `import ember`)
    if not os.environ.get("NUMBA_CACHE_DIR"):
        got = Path(config.CACHE_DIR)
        assert got.name == want.name and got.parent.name == "numba"
        assert decode._decode._cache._cache_path.startswith(str(got))
    assert want == home.numba_cache_dir() and want.parent == home.cache_dir("numba")
    # another version of a numba source: another folder, and only the 3 newest are kept
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    seen = set()
    real = Path.read_bytes
    for i in range(5):
        monkeypatch.setattr(
            Path,
            "read_bytes",
            lambda self, i=i: real(self) + (f"# numba {i}".encode() if self.name == "kquant.py" else b""),
        )
        seen.add(home.numba_cache_dir().name)
    assert len(seen) == 5
    assert len(list((tmp_path / "numba").iterdir())) == 3
    # an unwritable cache folder: numba keeps its own default places
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    assert home.numba_cache_dir() is None


def test_moe_with_a_broken_router_gives_garbage_not_a_crash(tmp_path):
    """NaN router logits choose no expert by value: the step still picks ids in range."""
    model = tg.build_family("mixtral", qtype="Q8_0", n_ctx=64)
    t = model.tensors["blk.0.ffn_gate_inp.weight"]
    t.data = np.full_like(t.data, np.nan)
    m = ember.load(tg.write_model(model, tmp_path / "nan.gguf"))
    assert m.device.decoder(m.transformer) is not None
    logits = m.session().feed([1, 2, 3])
    assert logits.shape == (3, m.config.n_vocab)
