"""The numba attention (devices/cpu/attention.py) over the half-precision, 8-bit and float32 KV
caches against the NumPy reference `model.attention` (over the cache's values widened by
NumPy); the half conversions and 8-bit rows against NumPy's."""

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
from ember.devices.cpu.kv_rows import store_key, store_row, widen
from ember.lut_kernels.codegen import host_isas
from ember.runtime.kv_cache import from_half, from_q8, hadamard, narrow, to_half, to_q8
from ember.runtime.kv_cache import widen as widened
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


def test_q8_rows_as_numpy_writes_them():
    """`store_row` into an 8-bit row: NumPy's codes and scales bit for bit (blocks of very
    different magnitudes, an all-zero block, values at half steps); dequantized within half a
    step."""

    @njit(fastmath=True)  # as the fused step compiles it
    def write(x, rows):
        for r in range(x.shape[0]):
            store_row(x[r], rows[r])

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((300, 4, 32)) * np.exp(rng.uniform(-6, 6, (300, 4, 1)))).astype(np.float32)
    x = x.reshape(300, 128)
    x[0, 32:64] = 0
    x[1, :32] = np.arange(32) - 15.5  # max 15.5: codes of the others near k + 1/2
    rows = np.empty((300, 144), np.int8)
    write(x, rows)
    want = to_q8(x)
    assert np.array_equal(rows, want)
    back = from_q8(rows)
    step = np.abs(x.reshape(300, 4, 32)).max(-1, keepdims=True) / 127
    assert np.all(np.abs(back - x).reshape(300, 4, 32) <= step * 0.5 * (1 + 1e-5))
    assert np.all(back[0, 32:64] == 0)


@pytest.mark.parametrize("d", [32, 64, 128, 256])
def test_keys_of_an_8bit_cache_rotated_as_numpy_rotates_them(d):
    """`store_key` rotates a key (Hadamard) before its 8-bit row: `narrow(key=True)`'s row bit
    for bit; the rotation is orthonormal and its own inverse, so `widen(key=True)` gives the key
    back within the 8-bit step, and q.k survives it."""

    @njit(fastmath=True)
    def write(x, rows):
        for r in range(x.shape[0]):
            store_key(x[r], rows[r])

    rng = np.random.default_rng(d)
    x = rng.standard_normal((50, d)).astype(np.float32)
    x[:, 3] += 140  # an outlier channel, as Qwen2's k bias makes
    rows = np.empty((50, d + d // 8), np.int8)
    write(x.copy(), rows)
    assert np.array_equal(rows, narrow(x, "q8_0", key=True))
    h = hadamard(np.eye(d, dtype=np.float32))
    np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-6)
    np.testing.assert_allclose(hadamard(hadamard(x)), x, atol=1e-4)
    back = widened(rows, "q8_0", key=True)
    plain = from_q8(to_q8(x))
    # rotated, the outlier no longer sets the step of the other channels of its block
    assert np.abs(back - x)[:, :32].mean() < 0.25 * np.abs(plain - x)[:, :32].mean()


def cache(rng, n_kv, cap, T, d, dv, kv="f16"):
    """Random keys and values as the cache stores them (`narrow`); positions from T on hold
    NaNs: never read."""
    k = narrow(rng.standard_normal((n_kv, cap, d)), kv, key=True)
    v = narrow(rng.standard_normal((n_kv, cap, dv)), kv)
    with np.errstate(invalid="ignore"):
        k[:, T:] = narrow(np.full((n_kv, cap - T, d), np.nan, np.float32), kv, key=True)
        v[:, T:] = narrow(np.full((n_kv, cap - T, dv), np.nan, np.float32), kv)
    return k, v


def floats(x, key=False):
    """A test cache's keys (key=True) or values as float32."""
    return widened(x, {np.dtype(np.uint16): "f16", np.dtype(np.int8): "q8_0"}.get(x.dtype, "f32"), key)


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
@pytest.mark.parametrize("kv", ["f16", "f32", "q8_0"])
@pytest.mark.parametrize("path", PATHS)
def test_attention_batch_matches_reference(n_head, n_kv, d, dv, n, past, window, kv, path):
    if kv == "q8_0" and (d % 32 or dv % 32):
        pytest.skip("an 8-bit cache takes head sizes of whole blocks of 32")
    rng = np.random.default_rng(n * 7 + past)
    T = past + n
    k, v = cache(rng, n_kv, T + 11, T, d, dv, kv)  # arrays longer than the keys in use
    q = rng.standard_normal((n, n_head, d)).astype(np.float32)
    pos = np.arange(past, T)
    scale = 1.0 / np.sqrt(d)
    want = attention(q, floats(k[:, :T], key=True), floats(v[:, :T]), pos, scale, window)
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
@pytest.mark.parametrize("kv", ["f16", "q8_0"])
@pytest.mark.parametrize("path", PATHS)
def test_split_parts_combine_to_one_softmax(g, d, T, bounds, kv, path):
    """Parts over consecutive key ranges (an empty one, one key, tile-sized and ragged ones)
    combine to the attention over all of them; so do `attend`'s fixed parts of PART keys."""
    if kv == "q8_0" and d % 32:
        pytest.skip("an 8-bit cache takes head sizes of whole blocks of 32")
    rng = np.random.default_rng(T + g)
    k, v = cache(rng, 1, T, T, d, d, kv)
    q = rng.standard_normal((g, d)).astype(np.float32) * 2  # peaked softmaxes too
    scale = np.float32(1 / np.sqrt(d))
    want = attention(q[None], floats(k, key=True), floats(v), np.array([T - 1]), scale, 0)[0]
    fa = kernel_addresses(g, d, d, k.dtype, kernel=path)
    if kv == "q8_0":
        q = hadamard(q)  # the queries of an 8-bit cache come rotated as its keys
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
