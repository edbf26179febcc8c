"""The numba attention (devices/cpu/attention.py) against the NumPy reference `model.attention`."""

import numpy as np
import pytest

from ember.devices.cpu.attention import attention_batch
from ember.runtime.model import attention


@pytest.mark.parametrize(
    "n_head,n_kv,d,dv,n,past,window",
    [
        (9, 3, 64, 64, 37, 0, 0),  # SmolLM2's heads, a prompt from an empty cache
        (12, 2, 128, 128, 8, 61, 0),  # Qwen2.5's, 8 new tokens after 61 (verification)
        (4, 1, 32, 48, 19, 5, 7),  # sliding window, dv != d
        (6, 6, 16, 16, 1, 0, 0),  # one query, one key, no grouping
        (8, 2, 40, 40, 130, 3, 50),  # several query chunks, window inside the batch
    ],
)
def test_attention_batch_matches_reference(n_head, n_kv, d, dv, n, past, window):
    rng = np.random.default_rng(n * 7 + past)
    T = past + n
    cap = T + 11  # cache arrays longer than the keys in use: they must never be read
    q = rng.standard_normal((n, n_head, d)).astype(np.float32)
    k = rng.standard_normal((n_kv, cap, d)).astype(np.float32)
    v = rng.standard_normal((n_kv, cap, dv)).astype(np.float32)
    k[:, T:] = np.nan
    v[:, T:] = np.nan
    pos = np.arange(past, T)
    scale = 1.0 / np.sqrt(d)
    want = attention(q, k[:, :T], v[:, :T], pos, scale, window)
    got = attention_batch(q, k, v, pos, scale, window)
    assert got.shape == want.shape == (n, n_head * dv)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(v[:, :T]).max())
    for threads in (2, 3):  # each query is computed whole by one thread (n >= 64: several)
        assert np.array_equal(attention_batch(q, k, v, pos, scale, window, threads), got)


def test_attention_batch_rejects_positions_outside_the_keys():
    q = np.ones((2, 2, 4), np.float32)
    k = np.ones((1, 3, 4), np.float32)
    with pytest.raises(ValueError, match="positions"):
        attention_batch(q, k, k, np.array([2, 3]), 0.5, 0)
    with pytest.raises(ValueError, match="positions"):
        attention_batch(q, k, k, np.array([0, 2]), 0.5, 0)
