"""The CUDA kernels (ember.devices.cuda.kernels) under numba's CUDA simulator, on small shapes,
against NumPy oracles on fresh random inputs (shapes that are not multiples of the block, ROWS
or the attention's split). The simulator runs each thread as a Python thread: minutes for
large shapes, so these stay small.

The seed is in every failure message and can be pinned with ``EMBER_TEST_SEED``.
"""

from __future__ import annotations

import os

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba.cuda is first imported
from numba.core import config  # noqa: E402

config.reload_config()

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numba import cuda  # noqa: E402
from test_opencl import _msg, _rng, random_rows, random_x  # noqa: E402

from ember.devices.cuda import kernels as K  # noqa: E402

del os.environ["NUMBA_ENABLE_CUDASIM"]  # numba.cuda is the simulator now; the CLI tests' processes stay plain
from ember.devices.gpu import MATMUL_TYPES  # noqa: E402
from ember.formats.quants import dequantize  # noqa: E402
from ember.runtime.model import attention, gelu_tanh, rms_norm, silu  # noqa: E402
from ember.runtime.rope import apply_rope, rope_tables  # noqa: E402


def test_the_simulator_is_on():
    assert cuda.jit.__module__.startswith("numba.cuda.simulator") and cuda.is_available()


@pytest.mark.parametrize("kind", sorted(K.MATMUL), ids=str)
def test_matmul_matches_dequantize(kind):
    qt = next(t for t, k in MATMUL_TYPES.items() if k == kind)
    n_out, n_in = 3, 256 if kind in ("q4_k", "q5_k", "q6_k") else 96
    raw = random_rows(_rng("cuda-mm", qt), qt, n_out, n_in)
    wf = dequantize(raw.reshape(-1), qt).reshape(n_out, n_in).astype(np.float64)
    n = K.ROWS + 3  # two row blocks, the second partial
    x = random_x(_rng("cuda-mm-x", qt), n, n_in)
    bias = random_x(_rng("cuda-mm-b", qt), n_out)
    y = np.zeros((n, n_out), np.float32)
    K.matmul(kind, raw.reshape(-1), raw.shape[1], n_in, x, n, y, n_out, bias, True)
    truth = x.astype(np.float64) @ wf.T + bias
    scale = np.abs(x).astype(np.float64) @ np.abs(wf).T + np.abs(bias)
    err = np.abs(y - truth) / scale
    assert err.max() < 1e-5, _msg(kind=kind, worst=err.max())


def test_rms_norm_add_glu_rope():
    rng = _rng("cuda-misc")
    x, w = random_x(rng, 3, 40), random_x(rng, 40)
    y = np.zeros_like(x)
    K.rms_norm[3, K.WG](x, w, y, np.float32(1e-6))
    np.testing.assert_allclose(y, rms_norm(x, w, 1e-6), rtol=2e-6, atol=1e-6, err_msg=_msg())
    a, b = random_x(rng, 50), random_x(rng, 50)
    s = a.copy()
    K.add[2, K.WG](s, b)
    np.testing.assert_allclose(s, a + b, rtol=1e-6, err_msg=_msg())
    for gelu in (0, 1):
        g = a.copy() * 4
        K.glu[2, K.WG](g, b, gelu)
        want = (gelu_tanh(a * 4) if gelu else silu(a * 4)) * b
        np.testing.assert_allclose(g, want, rtol=2e-5, atol=2e-5, err_msg=_msg(gelu=gelu))
    for style in ("norm", "neox"):
        q = random_x(rng, 2, 3, 16)
        cos, sin = rope_tables(np.arange(5, 7), 12, 10000.0)  # a partial rotation
        got = q.copy()
        K.rope[-(-2 * 3 * 6 // K.WG), K.WG](got, cos, sin, style == "neox")
        np.testing.assert_allclose(got, apply_rope(q, cos, sin, style), rtol=1e-6, atol=1e-6, err_msg=_msg(style=style))


@pytest.mark.parametrize("window", [0, 5])
def test_attention_through_the_cache(window):
    """Keys written in two pieces, the second of many rows; splits of 36 keys, so the context
    spans two and a split holds a full tile (WG) and a partial one; GQA 4 query heads on 2
    key/value heads."""
    n_head, n_kv, d, split = 4, 2, 16, 36
    rng = _rng("cuda-attn", window)
    Kc, Vc = np.zeros((n_kv, 64, d), np.float16), np.zeros((n_kv, 64, d), np.float16)
    length = 0
    for n in (5, 37):
        q, k, v = random_x(rng, n, n_head, d), random_x(rng, n, n_kv, d), random_x(rng, n, n_kv, d)
        K.kv_store[-(-n * n_kv * d // K.WG), K.WG](k, v, Kc, Vc, length)
        n_split = -(-(length + n) // split)
        Op = np.zeros((n, n_head, n_split, d), np.float32)
        ML = np.zeros((n, n_head, n_split, 2), np.float32)
        K.attn_split[(n * n_kv, n_split), K.WG](q, Kc, Vc, length, window, np.float32(1 / math.sqrt(d)), split, Op, ML)
        out = np.zeros((n, n_head, d), np.float32)
        K.attn_merge[-(-n * n_head * d // K.WG), K.WG](Op, ML, out)
        end = length + n
        keys, vals = Kc[:, :end].astype(np.float32), Vc[:, :end].astype(np.float32)
        assert np.array_equal(keys[:, length:], k.astype(np.float16).astype(np.float32).transpose(1, 0, 2))
        want = attention(q, keys, vals, np.arange(length, end), 1 / math.sqrt(d), window)
        np.testing.assert_allclose(out.reshape(n, -1), want, rtol=1e-4, atol=1e-5, err_msg=_msg(n=n, window=window))
        length = end


def test_the_cache_grows_and_rolls_back():
    """The device's KV cache (gpu.GpuKVCache over the CUDA kernels): positions written in two
    pieces across a growth (256 -> 512 positions), read back as the halves of what was written,
    and a rollback that the next write overwrites."""
    from ember.devices.cuda.runtime import Kernels, find
    from ember.devices.gpu import GpuKVCache

    rng = _rng("cuda-cache")
    cache = GpuKVCache(Kernels(find("cuda")), 2, 2, 16, 8, 600)
    k, v = random_x(rng, 300, 2, 16), random_x(rng, 300, 2, 8)
    for lo, hi in ((0, 200), (200, 300)):
        cache.reserve(hi - lo)
        for il in range(2):
            cache.store(il, k[lo:hi] + il, v[lo:hi] - il)
        cache.commit(hi - lo)
    assert cache.cap == 512 and cache.nbytes() == 2 * 2 * 2 * 512 * (16 + 8)
    keys, vals = cache.floats(1, 300)
    half = lambda a: a.astype(np.float16).astype(np.float32).transpose(1, 0, 2)  # noqa: E731
    assert np.array_equal(keys, half(k + 1)) and np.array_equal(vals, half(v - 1)), _msg()
    cache.truncate(250)
    cache.reserve(1)
    cache.store(0, k[:1], v[:1])
    cache.commit(1)
    keys, _ = cache.floats(0, 251)
    assert np.array_equal(keys[:, 250], half(k[:1])[:, 0]) and np.array_equal(keys[:, :250], half(k[:250])), _msg()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Simulator timings are bogus")
def test_the_device_runs_a_model_as_the_reference(tmp_path):
    """`device="cuda"` (gpu.GpuDevice over the CUDA kernels) on a one-layer qwen2 model (biases,
    NEOX RoPE, grouped heads) against the float32 reference with the same half cache: fed in two
    pieces, then again after a rollback. (Each forward takes the simulator ~15 s.)"""
    import tiny_gguf as tg

    import ember

    path = tg.write_family(tmp_path / "m.gguf", "qwen2", n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=32, n_ctx=32)
    m = ember.load(path, device="cuda")
    assert m.device.describe().startswith("cuda: ")
    ref = ember.load(path, kernels="numpy", kv_cache="f16")
    ids = _rng("cuda-model").integers(0, m.config.n_vocab, 5).tolist()
    m.device.kernels.profile = True  # (the simulator's timings are zeros: what is timed, by kind)
    _fed_in_pieces(m, ids, ref.logits(ids), 3, 4)
    assert set(m.device.kernels.times) == {"matmul", "attention", "other", "transfers"}


def _fed_in_pieces(m, ids, want, cut: int, back: int) -> None:
    """m's logits of ids fed in two pieces (cut at `cut`), then from `back` on again after a
    rollback, against `want`."""
    s = m.session()
    got = np.concatenate([s.feed(ids[:cut]), s.feed(ids[cut:])])
    tol = 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol, err_msg=_msg())
    s.truncate(back)
    np.testing.assert_allclose(s.feed(ids[back:]), want[back:], atol=tol, err_msg=_msg(after="rollback"))


def test_attention_on_the_device_beside_the_cpu(tmp_path):
    """device="cpu+cuda": the CPU's kernels with the attention and the cache on the (simulated)
    GPU give the CPU's logits, fed in pieces and after a rollback (F16 weights: no int8
    rounding of activations for the attention's other summation order to flip)."""
    import tiny_gguf as tg

    import ember

    path = tg.write_family(tmp_path / "m.gguf", "qwen2", qtype="F16", n_ctx=32)
    m, cpu = ember.load(path, device="cpu+cuda"), ember.load(path)
    assert m.device.describe().startswith("cpu+cuda: matmuls on cpu (")
    ids = _rng("cuda-hybrid").integers(0, m.config.n_vocab, 7).tolist()
    _fed_in_pieces(m, ids, cpu.logits(ids), 5, 4)
