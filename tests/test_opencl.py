"""The OpenCL device (ember.devices.opencl) on PoCL, the CPU's OpenCL: every kernel against a
NumPy oracle on fresh random inputs (shapes that are not multiples of the work-group, ROWS or
the attention's split), then whole models against the CPU device on the public references.

The seed is in every failure message and can be pinned with ``EMBER_TEST_SEED``.
"""

from __future__ import annotations

import math
import os
import secrets
import zlib

import numpy as np
import pytest
from conftest import opencl_compiler_problem, reference
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ember.devices.gpu import MATMUL_TYPES, GpuMatrix
from ember.devices.opencl import OpenCLDevice
from ember.devices.opencl.runtime import ROWS, WG
from ember.errors import DeviceError
from ember.formats.quants import dequantize
from ember.runtime.kv_cache import from_half, to_half
from ember.runtime.model import attention, gelu_tanh, rms_norm, silu
from ember.runtime.rope import apply_rope, rope_tables

SEED = int(os.environ.get("EMBER_TEST_SEED", secrets.randbits(32)))
# where the f16 scales of a block sit
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.Q4_K: (0, 2)}
F16_FIELDS |= {T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def _msg(**kw) -> str:
    return f"seed={SEED} " + " ".join(f"{k}={v}" for k, v in kw.items())


@pytest.fixture(autouse=True, scope="module")
def _compiler_targets_this_cpu():
    """PoCL (pyopencl's wheel) cannot compile for a CPU its LLVM 14 does not know (a Zen 5):
    there the device cannot run, and `ember run --device opencl` says so (test_cli_process)."""
    why = opencl_compiler_problem()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def dev():
    return OpenCLDevice("opencl", split=64)


def random_rows(rng, qt, n_out: int, n_in: int) -> np.ndarray:
    """GGUF rows of type qt: random code bytes, f16 scales ~1e-2 of both signs (floats: normal)."""
    if qt in (T.F32, T.F16):
        w = rng.standard_normal((n_out, n_in)).astype(np.float32 if qt == T.F32 else np.float16)
        return w.view(np.uint8)
    bw, bb = GGML_QUANT_SIZES[qt]
    nb = n_in // bw
    raw = rng.integers(0, 256, (n_out, nb, bb), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        v = rng.uniform(0.5, 1.5, (n_out, nb)) * rng.choice([-1.0, 1.0], (n_out, nb)) * 1e-2
        raw[:, :, off : off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * bb)


def random_x(rng, *shape) -> np.ndarray:
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2.0)).astype(np.float32)
    x[x == 0] = 0.5
    return x


@pytest.mark.parametrize("by_rows", [True, False], ids=["item-per-row", "group-per-row"])
@pytest.mark.parametrize("qt", sorted(MATMUL_TYPES), ids=lambda t: T(t).name)
def test_matmul_matches_dequantize(dev, qt, by_rows):
    kn = dev.kernels
    n_out, n_in = WG + 7, 512
    raw = random_rows(_rng("mm", qt), qt, n_out, n_in)
    w = GpuMatrix(kn.upload(raw), MATMUL_TYPES[qt], n_out, n_in, raw.shape[1], raw.nbytes)
    wf = dequantize(raw.reshape(-1), qt).reshape(n_out, n_in).astype(np.float64)
    saved, kn.by_rows = kn.by_rows, by_rows
    try:
        for n in (1, ROWS - 3, 2 * ROWS + 5):
            x = random_x(_rng("mm-x", qt, n), n, n_in)
            bias = random_x(_rng("mm-b", qt, n), n_out)
            y = kn.buffer(4 * n * n_out)
            kn.matmul(w, kn.upload(x), n, y, kn.upload(bias))
            got = kn.get(y, (n, n_out))
            truth = x.astype(np.float64) @ wf.T + bias
            scale = np.abs(x).astype(np.float64) @ np.abs(wf).T + np.abs(bias)
            err = np.abs(got - truth) / scale
            assert err.max() < 1e-5, _msg(qt=T(qt).name, n=n, worst=err.max())
    finally:
        kn.by_rows = saved


def _run(dev, name, shape, local, *args):
    dev.kernels.run(name, shape, local, *args)


def test_rms_norm_rows_and_heads(dev):
    kn = dev.kernels
    for rows, width in ((3, 576), (5 * 7, 64), (1, WG + 9)):
        x, w = random_x(_rng("norm", rows, width), rows, width), random_x(_rng("norm-w", width), width)
        buf = kn.upload(x)
        out = kn.buffer(x.nbytes)
        _run(dev, "rms_norm", (rows * WG,), (WG,), buf, kn.upload(w), out, np.int32(width), np.float32(1e-6))
        np.testing.assert_allclose(kn.get(out, x.shape), rms_norm(x, w, 1e-6), rtol=2e-6, atol=1e-6, err_msg=_msg())


@pytest.mark.parametrize("style", ["norm", "neox"])
def test_rope_matches_the_reference(dev, style):
    kn = dev.kernels
    n, heads, head_dim, rope_dim = 5, 3, 64, 48  # a partial rotation too
    x = random_x(_rng("rope", style), n, heads, head_dim)
    cos, sin = rope_tables(np.arange(17, 17 + n), rope_dim, 10000.0)
    buf = kn.upload(x)
    half = rope_dim // 2
    args = (np.int32(heads), np.int32(head_dim), np.int32(half), np.int32(style == "neox"))
    _run(dev, "rope", (n * heads * half,), None, buf, kn.upload(cos), kn.upload(sin), *args)
    want = apply_rope(x, cos, sin, style)
    np.testing.assert_allclose(kn.get(buf, x.shape), want, rtol=1e-6, atol=1e-6, err_msg=_msg(style=style))


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_glu(dev, act):
    kn = dev.kernels
    g, u = (random_x(_rng("glu", act, i), 1000) * 4 for i in range(2))
    buf = kn.upload(g)
    _run(dev, "glu", (g.size,), None, buf, kn.upload(u), np.int32(act == "gelu"))
    want = (gelu_tanh(g) if act == "gelu" else silu(g)) * u
    np.testing.assert_allclose(kn.get(buf, g.shape), want, rtol=2e-5, atol=2e-5, err_msg=_msg(act=act))


@pytest.mark.parametrize("by_rows", [True, False], ids=["item-per-head", "group-per-kv-head"])
@pytest.mark.parametrize(
    "n_head, n_kv, d, window",
    [(9, 3, 64, 0), (14, 2, 64, 0), (4, 1, 256, 0), (4, 4, 128, 0), (6, 2, 64, 37)],
    ids=["smollm2", "qwen", "gemma-wide", "mha", "window"],
)
@pytest.mark.parametrize("split", [64, 160])
def test_attention_through_the_cache(dev, by_rows, n_head, n_kv, d, window, split):
    """Keys written in pieces (1 token, then batches) whose lengths are not multiples of the tile
    (WG) or of the split: the device's split-K attention against the reference on the same
    half-rounded keys, at contexts of one split and of several, splits of one tile and of
    several (160: two and a half), the cache grown past its first capacity (256) on the way."""
    kn, saved = dev.kernels, (dev.kernels.by_rows, dev.split)
    kn.by_rows, dev.split = by_rows, split
    try:
        cache = dev_cache(dev, n_kv, d, 1024)
        keys, vals = np.zeros((n_kv, 0, d), np.float32), np.zeros((n_kv, 0, d), np.float32)
        for n in (1, 3, 65, 1, 200, 7):  # ends at 277 tokens
            rng = _rng("attn", n_head, n_kv, d, window, cache.length)
            q, k, v = (random_x(rng, n, h, d) for h in (n_head, n_kv, n_kv))
            cache.write(0, kn.upload(k), kn.upload(v), n)
            keys = np.concatenate([keys, from_half(to_half(k)).transpose(1, 0, 2)], axis=1)
            vals = np.concatenate([vals, from_half(to_half(v)).transpose(1, 0, 2)], axis=1)
            pos = np.arange(cache.length, cache.length + n)
            out = kn.buffer(4 * n * n_head * d)
            dev.attention(kn.upload(q), cache, 0, n, n_head, cache.length, 1 / math.sqrt(d), window, out)
            got = kn.get(out, (n, n_head * d))
            want = attention(q, keys, vals, pos, 1 / math.sqrt(d), window)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=_msg(n=n, length=cache.length))
            cache.commit(n)
        k_back, v_back = cache.floats(0, cache.length)
        assert np.array_equal(k_back, keys) and np.array_equal(v_back, vals)
    finally:
        kn.by_rows, dev.split = saved


def dev_cache(dev, n_kv: int, d: int, max_len: int):
    from ember.devices.gpu import GpuKVCache

    return GpuKVCache(dev.kernels, 1, n_kv, d, d, max_len)


# ---------------------------------------------------------------------------------------------
# whole models


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
def test_families_match_the_reference_and_ranges(tmp_path, family, qtype):
    """Every dense family the device runs (biases, q/k norms, GELU, post-norms, sliding windows)
    against the float32 reference with the same half-precision cache, whole and by layer ranges,
    fed in pieces, with a rollback."""
    import tiny_gguf as tg

    import ember

    path = tg.write_family(tmp_path / "m.gguf", family, qtype=qtype, n_ctx=64)
    m = ember.load(path, device="opencl")
    ref = ember.load(path, kernels="numpy", kv_cache="f16")
    ids = _rng("fam", family).integers(0, m.config.n_vocab, 23).tolist()
    want = ref.logits(ids)
    s = m.session()
    got = np.concatenate([s.feed(ids[:9]), s.feed(ids[9:10]), s.feed(ids[10:])])
    tol = 1e-3 * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol, err_msg=_msg(family=family))
    s.truncate(12)
    np.testing.assert_allclose(s.feed(ids[12:]), want[12:], atol=tol, err_msg=_msg(family=family, after="truncate"))
    tr, dev = m.transformer, m.device
    cache = dev.new_cache(tr, 64)
    h = ids
    for lo in range(m.config.n_layer):
        h = dev.forward(tr, h, cache, layers=range(lo, lo + 1))
    assert cache.length == len(ids)
    np.testing.assert_allclose(h, want, atol=tol, err_msg=_msg(family=family, by="layer ranges"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "qwen3moe"])
def test_attention_on_the_device_beside_the_cpu(tmp_path, family):
    """device="cpu+opencl": the CPU's kernels with the attention and the cache on the device
    give the CPU's logits (the same kernels; the attention sums in another order, which can flip
    an activation's int8 rounding in the kernels of quantized weights: F16 weights here, the
    catalog models in the greedy test below): fed in pieces (the fused step's pieces a layer),
    after a rollback, by layer ranges, and a batch past the fused step's (one-row kernels: the
    op-by-op forward with the device's attention). An MoE model's experts stay with the CPU's
    step."""
    import tiny_gguf as tg

    import ember

    path = tg.write_family(tmp_path / "m.gguf", family, qtype="F16", n_ctx=128)
    m, cpu = ember.load(path, device="cpu+opencl"), ember.load(path)
    assert m.device.describe().startswith("cpu+opencl: matmuls on cpu (")
    ids = _rng("hybrid", family).integers(0, m.config.n_vocab, 90).tolist()
    want = cpu.session()
    want = np.concatenate([want.feed(ids[:9]), want.feed(ids[9:10]), want.feed(ids[10:30]), want.feed(ids[30:])])
    s = m.session()
    got = np.concatenate([s.feed(ids[:9]), s.feed(ids[9:10]), s.feed(ids[10:30]), s.feed(ids[30:])])
    tol = 1e-3 * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol, err_msg=_msg(family=family))
    s.truncate(12)
    np.testing.assert_allclose(s.feed(ids[12:20]), want[12:20], atol=tol, err_msg=_msg(family=family, after="rollback"))
    tr, dev = m.transformer, m.device
    cache = dev.new_cache(tr, 64)
    h = dev.forward(tr, ids[:7], cache, layers=range(0, 1))
    got = dev.forward(tr, h, cache, layers=range(1, m.config.n_layer))
    np.testing.assert_allclose(got, want[:7], atol=tol, err_msg=_msg(family=family, by="layer ranges"))
    assert cache.length == 7


def test_the_op_by_op_path_on_the_device(tmp_path):
    """The Transformer's own forward with the device's ops (host arrays in and out, the keys
    and values stored through the device's cache) gives the device's forward."""
    import tiny_gguf as tg

    import ember

    path = tg.write_family(tmp_path / "m.gguf", "qwen2", n_ctx=64)
    m = ember.load(path, device="opencl")
    tr, dev = m.transformer, m.device
    ids = _rng("op-by-op").integers(0, m.config.n_vocab, 9).tolist()
    want = dev.forward(tr, ids, dev.new_cache(tr, 64))
    cache = dev.new_cache(tr, 64)
    got = np.concatenate([tr.forward(ids[:5], cache), tr.forward(ids[5:], cache)])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), err_msg=_msg())
    assert cache.length == 9


def test_moe_and_missing_devices_are_clear_errors(tmp_path):
    import tiny_gguf as tg

    import ember
    from ember.errors import UnsupportedError

    with pytest.raises(DeviceError, match="OpenCL devices here are opencl:0"):
        OpenCLDevice("opencl:99")
    with pytest.raises(DeviceError, match="'opencl' or 'opencl:N'"):
        OpenCLDevice("opencl:x")
    path = tg.write_family(tmp_path / "moe.gguf", "mixtral", n_ctx=32)
    with pytest.raises(UnsupportedError, match="mixture-of-experts"):
        ember.load(path, device="opencl").logits([1, 2])
    with pytest.raises(UnsupportedError, match="memory_budget"):
        ember.load(path, device="opencl", memory_budget="100MB")


GREEDY_STEPS = 16
MARGIN = 0.5


@pytest.fixture(scope="module")
def opencl_model(catalog_path):
    import ember

    cache = {}

    def get(name, device="opencl"):
        if (name, device) not in cache:
            cache[name, device] = ember.load(catalog_path(name), device=device)
        return cache[name, device]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("device", ["opencl", "cpu+opencl"])
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_greedy_tokens_equal_the_cpu(catalog_model, opencl_model, name, device):
    """On every public reference prompt, 16 greedy steps of the CPU fed to both: the device's
    argmax is the CPU's at every step where the CPU's own top-1 / top-2 margin is at least 0.5
    (a closer call may go either way), so also past the first close call. The whole model on
    the device, and the attention alone there beside the CPU's kernels."""
    cpu, ocl = catalog_model(name), opencl_model(name, device)
    checked = 0
    for p in reference(name)["prompts"]:
        a, b = cpu.session(), ocl.session()
        la, lb = a.feed(p["prompt_token_ids"])[-1], b.feed(p["prompt_token_ids"])[-1]
        for step in range(GREEDY_STEPS):
            tok = int(np.argmax(la))
            top2 = np.sort(la)[-2:]
            if top2[1] - top2[0] >= MARGIN:
                assert int(np.argmax(lb)) == tok, f"{p['name']} step {step}"
                checked += 1
            la, lb = a.feed([tok])[-1], b.feed([tok])[-1]
    assert checked >= GREEDY_STEPS * len(reference(name)["prompts"]) // 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_perplexity_within_half_a_percent_of_the_cpu(catalog_model, opencl_model, ppl_text, name):
    cpu, ocl = catalog_model(name).perplexity(ppl_text), opencl_model(name).perplexity(ppl_text)
    assert math.isfinite(ocl) and abs(ocl / cpu - 1) < 0.005, f"opencl {ocl:.4f} vs cpu {cpu:.4f}"


@pytest.mark.slow
def test_a_draft_model_on_the_device_beside_the_target(catalog_path):
    """Heterogeneous speculative decoding: the draft model on the OpenCL device, the target on
    all of the CPU's threads, drafting the next block while the target verifies this one: the
    target's own greedy tokens."""
    import ember

    path = catalog_path("smollm2-135m")
    plain = ember.load(path)
    ids = plain.tokenize("def fibonacci(n):\n    ")
    want = [i for c in plain.generate(ids, max_tokens=24, temperature=0) for i in c.token_ids]
    m = ember.load(path, draft=path, draft_device="opencl", draft_schedule="concurrent", draft_k=4)
    assert m.drafter.separate and m.drafter.model.device.describe().startswith("opencl")
    got = [i for c in m.generate(ids, max_tokens=24, temperature=0) for i in c.token_ids]
    st = m.stats
    assert got == want, st
    assert st["schedule"] == "concurrent" and st["steps_by_schedule"]["concurrent"] == st["verify_steps"]
    assert st["ahead_drafts"] >= 1 and st["acceptance_rate"] > 0.5 and m.drafter.session.threads == m.threads
