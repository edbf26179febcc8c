"""The numba attention (devices/cpu/attention.py) over the half-precision KV cache against the
NumPy reference `model.attention`; the half conversions against NumPy's."""

import numpy as np
import pytest
from numba import njit

from ember.devices.cpu.attention import (
    PART,
    TILE,
    attend,
    attend_part,
    attention_batch,
    combine,
    kernel_addresses,
    work,
)
from ember.devices.cpu.half import store_row, widen
from ember.lut_kernels.codegen import host_isas
from ember.runtime.kv_cache import from_half, to_half
from ember.runtime.model import attention


def test_half_conversions_round_as_numpy():
    @njit
    def both(x, bits, back):
        store_row(x, bits)
        for i in range(bits.size):
            back[i] = widen(bits[i])

    rng = np.random.default_rng(1)
    x = (rng.standard_normal(5000) * np.exp(rng.uniform(-20, 12, 5000))).astype(np.float32)
    x[:6] = [65504.0, 65520.0, 1e-8, -0.0, 6.1e-5, 2.0**-24 * 1.5]  # max, overflow, subnormals, ties
    bits, back = np.empty(x.size, np.uint16), np.empty(x.size, np.float32)
    with np.errstate(over="ignore"):
        both(x, bits, back)
        assert np.array_equal(bits, to_half(x))
    assert np.array_equal(back, from_half(bits))


def cache(rng, n_kv, cap, T, d, dv, kv="f16"):
    """Random keys and values as half bits (or float32); positions from T on hold NaNs: never
    read."""
    narrow = to_half if kv == "f16" else lambda x: np.asarray(x, np.float32)
    k = narrow(rng.standard_normal((n_kv, cap, d)))
    v = narrow(rng.standard_normal((n_kv, cap, dv)))
    k[:, T:] = v[:, T:] = narrow(np.float32(np.nan))
    return k, v


def floats(x):
    return from_half(x) if x.dtype == np.uint16 else x


# every path this host runs: the IR part kernel (AVX-512: 16 lanes, AVX2: 8) and the numba loops
PATHS = [p for p in host_isas() if p in ("avx512", "avx2", "portable")]


@pytest.mark.parametrize(
    "n_head,n_kv,d,dv,n,past,window",
    [
        (9, 3, 64, 64, 37, 0, 0),  # SmolLM2's heads, a prompt from an empty cache
        (12, 2, 128, 128, 8, 61, 0),  # Qwen2.5's, 8 new tokens after 61 (verification)
        (4, 1, 32, 48, 19, 5, 7),  # sliding window, dv != d
        (6, 6, 16, 16, 1, 0, 0),  # one query, one key, no grouping
        (8, 2, 40, 40, 130, 3, 50),  # several query chunks, window inside the batch
        (9, 3, 64, 64, 5, 3 * TILE + 17, 0),  # several key tiles, the last one partial
        (4, 2, 32, 32, 9, 2 * TILE - 4, TILE + 3),  # a window across tile boundaries
    ],
)
@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("path", PATHS)
def test_attention_batch_matches_reference(n_head, n_kv, d, dv, n, past, window, kv, path):
    rng = np.random.default_rng(n * 7 + past)
    T = past + n
    k, v = cache(rng, n_kv, T + 11, T, d, dv, kv)  # arrays longer than the keys in use
    q = rng.standard_normal((n, n_head, d)).astype(np.float32)
    pos = np.arange(past, T)
    scale = 1.0 / np.sqrt(d)
    want = attention(q, floats(k[:, :T]), floats(v[:, :T]), pos, scale, window)
    got = attention_batch(q, k, v, pos, scale, window, kernel=path)
    assert got.shape == want.shape == (n, n_head * dv)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(floats(v[:, :T])).max())
    for threads in (2, 3):  # each query is computed whole by one thread (n >= 64: several)
        assert np.array_equal(attention_batch(q, k, v, pos, scale, window, threads, kernel=path), got)


@pytest.mark.parametrize(
    "g,d,T,bounds",
    [
        (3, 64, 1000, (0, 333, 334, 700, 1000)),
        (2, 128, 4 * TILE + 1, (0, 1, 2 * TILE, 4 * TILE + 1)),
        (7, 16, 50, (0, 50, 50)),
        (7, 64, 2 * PART + 5, (0, 17, PART, 2 * PART + 5)),  # Qwen 0.5B's group: passes of heads
        (4, 256, 300, (0, 40, 300)),  # Gemma 3's head dim: one head a pass
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_split_parts_combine_to_one_softmax(g, d, T, bounds, path):
    """Parts over consecutive key ranges (an empty one, one key, tile-sized and ragged ones)
    combine to the attention over all of them; so do `attend`'s fixed parts of PART keys."""
    rng = np.random.default_rng(T + g)
    k, v = cache(rng, 1, T, T, d, d)
    q = rng.standard_normal((g, d)).astype(np.float32) * 2  # peaked softmaxes too
    scale = np.float32(1 / np.sqrt(d))
    want = attention(q[None], from_half(k), from_half(v), np.array([T - 1]), scale, 0)[0]
    fa = kernel_addresses(g, d, d, kernel=path)
    assert (fa[0] != 0) == path.startswith("avx512")  # the IR kernel runs where the host has one
    W, nc = work(g, d, d, fa), len(bounds) - 1
    parts, ml = np.empty((nc, g, d), np.float32), np.empty((nc, g, 2), np.float32)
    for c in range(nc):
        attend_part(q, k[0], v[0], bounds[c], bounds[c + 1], scale, W, parts[c], ml[c])
    got = np.empty(g * d, np.float32)
    combine(parts, ml, got)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    n = -(-T // PART)
    one = np.empty(g * d, np.float32)
    attend(q, k[0], v[0], 0, T, scale, W, np.empty((n, g, d), np.float32), np.empty((n, g, 2), np.float32), one)
    np.testing.assert_allclose(one, want, rtol=0, atol=2e-5)


def test_attention_batch_rejects_positions_outside_the_keys():
    q = np.ones((2, 2, 4), np.float32)
    k = to_half(np.ones((1, 3, 4)))
    with pytest.raises(ValueError, match="positions"):
        attention_batch(q, k, k, np.array([2, 3]), 0.5, 0)
    with pytest.raises(ValueError, match="positions"):
        attention_batch(q, k, k, np.array([0, 2]), 0.5, 0)
