"""Tests for ember.runtime.sampling: greedy, the filter chain against a NumPy oracle, the repetition
penalty, seeding, the empirical distribution under temperature, masked tokens, and parameter checks."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.errors import EmberError
from ember.runtime.sampling import (
    Sampler,
    SamplingError,
    SamplingParams,
    apply_repetition_penalty,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_999 = {2: 13.82, 3: 16.27, 5: 20.52, 7: 24.32, 9: 27.88}


def rand_logits(rng: np.random.Generator, n: int, scale: float = 3.0, dtype=np.float32) -> np.ndarray:
    """Fresh random logits, none of them zero (a zero would sit on the penalty's sign boundary)."""
    x = (rng.standard_normal(n) * scale).astype(dtype)
    x[x == 0] = dtype(0.5)
    return x


def tied_logits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Small integers as logits (never 0): many ties, including at every filter's boundary."""
    x = rng.integers(1, 9, n).astype(np.float32) * rng.choice([-1.0, 1.0], n).astype(np.float32)
    return x


# -- the oracle: the chain written out plainly ------------------------------------------------------


def oracle_penalty(logits, history, penalty, last_n):
    out = np.array(logits, copy=True)
    window = list(history) if last_n < 0 else (list(history)[-last_n:] if last_n > 0 else [])
    pen = out.dtype.type(penalty)
    for t in set(window):  # each distinct token once
        out[t] = out[t] / pen if out[t] > 0 else out[t] * pen
    return out


def softmax(v):
    w = np.exp(v - v.max())
    return w / w.sum()


def oracle_allowed(logits, params: SamplingParams, history=(), top_p_shift=0.0) -> list[int]:
    """The ids the chain leaves, by logit descending then id ascending (llama.cpp's chain, stable sort).

    top_p_shift moves top-p's threshold, to bracket cases where a cumulative probability lands on top_p
    itself and rounding decides (tied logits make such exact landings common).
    """
    x = oracle_penalty(logits, history, params.repeat_penalty, params.repeat_last_n).astype(np.float64)
    order = np.argsort(-x, kind="stable")
    if 0 < params.top_k < x.size:
        order = order[: params.top_k]
    if params.top_p < 1.0:
        cum = np.cumsum(softmax(x[order]))
        hit = np.flatnonzero(cum >= params.top_p + top_p_shift)
        keep = int(hit[0]) + 1 if hit.size else len(order)
        order = order[:keep]
    if params.min_p > 0.0:
        p = softmax(x[order])
        order = order[p >= params.min_p * p.max()]
    return [int(i) for i in order if x[i] > -np.inf]


def assert_matches_oracle(got, logits, params, history=()):
    """got (ids, in order) is the oracle's list; or, where rounding at top_p's threshold decides, lies
    between the oracle's lists for a threshold a hair lower and a hair higher."""
    exact = oracle_allowed(logits, params, history)
    fewer = oracle_allowed(logits, params, history, -1e-9)
    more = oracle_allowed(logits, params, history, 1e-9)
    if fewer == more:
        assert list(got) == exact
    else:
        assert set(fewer) <= set(got) <= set(more)
    return more


def draws(sampler, logits, n, history=()):
    return np.array([sampler.sample(logits, history) for _ in range(n)])


def chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# -- greedy -----------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 500), temp=st.sampled_from([0.0, 1e-7]))
def test_greedy_is_argmax(seed, n, temp):
    rng = np.random.default_rng(seed)
    logits = rand_logits(rng, n)
    s = Sampler(SamplingParams(temperature=temp, top_k=5, top_p=0.5, min_p=0.3), n)
    assert s.sample(logits) == int(np.argmax(logits))


def test_greedy_ties_take_lowest_id():
    rng = np.random.default_rng()
    logits = rand_logits(rng, 64, scale=1.0)
    top = logits.max() + 1.0
    logits[[40, 7, 21]] = top
    assert Sampler(SamplingParams(), 64).sample(logits) == 7


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 300))
def test_greedy_ties_hypothesis(seed, n):
    logits = tied_logits(np.random.default_rng(seed), n)
    assert Sampler(SamplingParams(), n).sample(logits) == int(np.flatnonzero(logits == logits.max())[0])


def test_greedy_applies_penalty_first():
    logits = np.array([2.0, 1.5, -3.0], dtype=np.float32)
    s = Sampler(SamplingParams(repeat_penalty=1.2), 3)
    assert s.sample(logits) == 0
    assert s.sample(logits, history=[0]) == 0  # 2 / 1.2 = 1.67 > 1.5
    s = Sampler(SamplingParams(repeat_penalty=1.5), 3)
    assert s.sample(logits, history=[0]) == 1  # 2 / 1.5 = 1.33 < 1.5


# -- seeding ----------------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seeds_differ():
    rng = np.random.default_rng()
    n = 1000
    seq = [rand_logits(rng, n, scale=1.0) for _ in range(50)]
    params = SamplingParams(temperature=1.0, top_k=200, top_p=0.98, seed=1234)

    def run(p):
        s = Sampler(p, n)
        return [s.sample(x) for x in seq]

    a, b = run(params), run(params)
    assert a == b
    c = run(SamplingParams(temperature=1.0, top_k=200, top_p=0.98, seed=4321))
    assert a != c
    d = run(SamplingParams(temperature=1.0, top_k=200, top_p=0.98, seed=None))
    assert len(d) == 50 and all(0 <= t < n for t in d)


# -- the filters against the oracle -----------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    top_k=st.integers(0, 450),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    ties=st.booleans(),
)
def test_candidates_match_oracle(seed, n, top_k, top_p, min_p, ties):
    rng = np.random.default_rng(seed)
    logits = tied_logits(rng, n) if ties else rand_logits(rng, n, scale=float(rng.uniform(0.3, 4)))
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    s = Sampler(params, n)
    allowed = assert_matches_oracle(s.candidates(logits).tolist(), logits, params)
    drawn = set(draws(s, logits, 30).tolist())
    assert drawn <= set(allowed)


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [
        (0, 0.95, 0.0),
        (0, 0.3, 0.0),
        (0, 1.0, 0.05),
        (0, 0.9, 0.02),
        (5, 1.0, 0.0),
        (40, 0.95, 0.05),
        (60, 0.8, 0.0),
        (200, 1.0, 0.1),
        (5000, 0.95, 0.0),
    ],
)
@pytest.mark.parametrize("kind", ["flat", "peaked", "ties"])
def test_candidates_match_oracle_large_vocab(top_k, top_p, min_p, kind):
    """Exercises the large-vocabulary paths: the block prefilter of top-k, top-p's growing head."""
    n = 60_001
    rng = np.random.default_rng()
    logits = {
        "flat": lambda: rand_logits(rng, n, 1.0),
        "peaked": lambda: rand_logits(rng, n, 4.0),
        "ties": lambda: tied_logits(rng, n),
    }[kind]()
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    s = Sampler(params, n)
    allowed = assert_matches_oracle(s.candidates(logits).tolist(), logits, params)
    assert set(draws(s, logits, 20).tolist()) <= set(allowed)


def test_top_k_boundary_ties_keep_lowest_ids():
    logits = np.array([5, 1, 3, 3, 0.5, 3, 3, 2], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_k=3), 8)
    assert s.candidates(logits).tolist() == [0, 2, 3]
    assert set(draws(s, logits, 300).tolist()) == {0, 2, 3}


def test_top_k_at_least_vocab_is_off():
    rng = np.random.default_rng()
    logits = rand_logits(rng, 20)
    s = Sampler(SamplingParams(temperature=1.0, top_k=20), 20)
    assert sorted(s.candidates(logits).tolist()) == list(range(20))


def test_filters_draw_every_allowed_token():
    """Not only a subset: with enough draws every allowed token of reasonable probability shows up."""
    rng = np.random.default_rng()
    n = 50
    logits = rand_logits(rng, n, scale=1.0)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.8, min_p=0.1, seed=7)
    allowed = oracle_allowed(logits, params)
    counts = collections.Counter(draws(Sampler(params, n), logits, 3000).tolist())
    assert set(counts) <= set(allowed)
    p = softmax(logits[allowed].astype(np.float64))
    for t, pt in zip(allowed, p):
        if pt * 3000 > 30:
            assert counts[t] > 0


# -- temperature: the empirical distribution --------------------------------------------------------


@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_distribution_matches_softmax_over_temperature(temp):
    rng = np.random.default_rng()
    logits = rand_logits(rng, 8, scale=1.0)
    s = Sampler(SamplingParams(temperature=temp, seed=2024), 8)
    counts = np.bincount(draws(s, logits, 20_000), minlength=8)
    assert chi2(counts, softmax(logits.astype(np.float64) / temp)) < CHI2_999[7]


def test_distribution_after_top_k_is_tempered_softmax_of_survivors():
    rng = np.random.default_rng()
    logits = rand_logits(rng, 10, scale=1.0)
    s = Sampler(SamplingParams(temperature=1.3, top_k=3, seed=99), 10)
    kept = np.argsort(-logits, kind="stable")[:3]
    counts = np.bincount(draws(s, logits, 10_000), minlength=10)
    assert counts.sum() == counts[kept].sum()
    assert chi2(counts[kept], softmax(logits[kept].astype(np.float64) / 1.3)) < CHI2_999[2]


def test_distribution_large_vocab_two_level_draw():
    """A vocabulary long enough for the blocked draw; the live tokens sit at block edges and in the tail."""
    n = 9000
    rng = np.random.default_rng()
    logits = np.full(n, -np.inf, dtype=np.float32)
    live = np.array([0, 1, 1023, 1024, 2047, 4096, 7000, 8191, 8192, n - 1])
    logits[live] = rand_logits(rng, live.size, scale=1.0)
    s = Sampler(SamplingParams(temperature=0.9, seed=5), n)
    got = draws(s, logits, 6_000)
    assert np.isin(got, live).all()
    counts = np.array([np.count_nonzero(got == t) for t in live])
    assert chi2(counts, softmax(logits[live].astype(np.float64) / 0.9)) < CHI2_999[9]


# -- repetition penalty -----------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 60),
    penalty=st.floats(0.05, 5.0),
    last_n=st.integers(-1, 12),
    hist_len=st.integers(0, 40),
)
def test_repetition_penalty_matches_oracle(seed, n, penalty, last_n, hist_len):
    rng = np.random.default_rng(seed)
    logits = rand_logits(rng, n)
    history = rng.integers(0, n, hist_len).tolist()
    before = logits.copy()
    got = apply_repetition_penalty(logits, history, penalty, last_n)
    assert np.array_equal(got, oracle_penalty(logits, history, penalty, last_n))
    assert np.array_equal(logits, before)
    s = Sampler(SamplingParams(repeat_penalty=penalty, repeat_last_n=last_n), n)
    assert s.sample(logits, history) == int(np.argmax(oracle_penalty(logits, history, penalty, last_n)))


def test_repetition_penalty_signs_duplicates_and_window():
    logits = np.array([2.0, 1.5, -1.0, -1.3, 0.0], dtype=np.float32)
    pen = np.float32(1.2)
    out = apply_repetition_penalty(logits, [0, 2, 4], 1.2, 64)
    assert out[0] == logits[0] / pen and out[2] == logits[2] * pen and out[4] == 0.0
    assert out[1] == logits[1] and out[3] == logits[3]
    # a token seen many times is penalized once: 2/1.2 = 1.67 still beats 1.5 (twice would be 1.39)
    s = Sampler(SamplingParams(repeat_penalty=1.2), 5)
    assert s.sample(logits, [0, 0, 0, 0]) == 0
    # negative logits: -1 * 1.2 = -1.2 still beats -1.3 (twice would be -1.44)
    neg = np.array([-1.0, -1.3], dtype=np.float32)
    assert Sampler(SamplingParams(repeat_penalty=1.2), 2).sample(neg, [0, 0, 0]) == 0
    # the window: only the last repeat_last_n tokens count
    h = [0, 2, 2]
    assert np.array_equal(apply_repetition_penalty(logits, h, 2.0, 2), oracle_penalty(logits, [2], 2.0, 64))
    assert np.array_equal(apply_repetition_penalty(logits, h, 2.0, -1), oracle_penalty(logits, [0, 2], 2.0, 64))
    assert np.array_equal(apply_repetition_penalty(logits, h, 2.0, 0), logits)
    strong = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=2), 5)
    assert strong.sample(logits, h) == 0  # token 0 is outside the window
    assert Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=3), 5).sample(logits, h) == 1  # 2/2 < 1.5
    assert strong.sample(logits, collections.deque(h)) == 0  # any sequence, even one without slices


def test_history_out_of_range_raises():
    s = Sampler(SamplingParams(repeat_penalty=1.1), 10)
    logits = rand_logits(np.random.default_rng(), 10)
    for bad in ([3, 10], [-1]):
        with pytest.raises(SamplingError, match="history"):
            s.sample(logits, bad)
    with pytest.raises(SamplingError, match="history"):
        s.sample(logits, [1.5])


# -- masked tokens, NaN, bad logits -----------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), top_k=st.integers(0, 250))
def test_neg_inf_never_drawn(seed, n, top_k):
    rng = np.random.default_rng(seed)
    logits = rand_logits(rng, n)
    masked = rng.random(n) < 0.7
    masked[rng.integers(n)] = False
    logits[masked] = -np.inf
    s = Sampler(SamplingParams(temperature=5.0, top_k=top_k, seed=seed), n)
    got = draws(s, logits, 40)
    assert not masked[got].any()
    assert not masked[s.candidates(logits)].any()
    assert not masked[Sampler(SamplingParams(), n).sample(logits)]


def test_all_neg_inf_raises():
    logits = np.full(10, -np.inf, dtype=np.float32)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, top_k=3)):
        with pytest.raises(SamplingError, match="-inf"):
            Sampler(params, 10).sample(logits)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=0.7, min_p=0.1),
        SamplingParams(temperature=0.7, repeat_penalty=1.3),
    ],
)
def test_nan_and_pos_inf_raise(params):
    rng = np.random.default_rng()
    logits = rand_logits(rng, 32)
    logits[13] = np.nan
    with pytest.raises(SamplingError, match="logits contain NaN"):
        Sampler(params, 32).sample(logits, [1, 2])
    logits[13] = np.inf
    with pytest.raises(SamplingError, match=r"\+inf"):
        Sampler(params, 32).sample(logits, [1, 2])


def test_logits_shape_and_dtype():
    s = Sampler(SamplingParams(temperature=1.0, top_k=3), 16)
    rng = np.random.default_rng()
    with pytest.raises(SamplingError, match="shape"):
        s.sample(rand_logits(rng, 15))
    with pytest.raises(SamplingError, match="shape"):
        s.sample(rand_logits(rng, 16).reshape(4, 4))
    with pytest.raises(SamplingError, match="real"):
        s.sample(np.array(["a"] * 16))
    x = rand_logits(rng, 16)
    for arr in (x.astype(np.float16), x.astype(np.float64), list(x.astype(np.float64))):
        assert 0 <= s.sample(arr) < 16
    ints = rng.integers(-5, 5, 16)
    assert Sampler(SamplingParams(), 16).sample(ints) == int(np.argmax(ints))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(repeat_penalty=1.3),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.8, min_p=0.05, top_p=0.5),
    ],
)
def test_input_logits_unchanged(params):
    rng = np.random.default_rng()
    for n in (100, 20_000):
        logits = rand_logits(rng, n)
        before = logits.copy()
        history = rng.integers(0, n, 80).tolist()
        s = Sampler(params, n)
        s.sample(logits, history)
        s.candidates(logits, history)
        assert np.array_equal(logits, before)
        logits.flags.writeable = False  # any write into it would now raise
        s.sample(logits, history)


# -- parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "0.7"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": None}, "min_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"repeat_penalty": -1.0}, "repeat_penalty"),
        ({"repeat_penalty": float("nan")}, "repeat_penalty"),
        ({"repeat_last_n": -2}, "repeat_last_n"),
        ({"repeat_last_n": 3.5}, "repeat_last_n"),
        ({"seed": -1}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"seed": False}, "seed"),
    ],
)
def test_invalid_params_raise(kwargs, name):
    with pytest.raises(SamplingError, match=name) as e:
        SamplingParams(**kwargs)
    assert isinstance(e.value, EmberError) and isinstance(e.value, ValueError)
    assert repr(next(iter(kwargs.values())))[:3] in str(e.value)  # the message shows the value


def test_valid_params_are_normalized():
    p = SamplingParams(temperature=1, top_k=np.int64(5), top_p=np.float32(0.5), min_p=0, repeat_penalty=2)
    assert type(p.temperature) is float and type(p.top_k) is int and type(p.top_p) is float
    assert p == SamplingParams(temperature=1.0, top_k=5, top_p=0.5, min_p=0.0, repeat_penalty=2.0)
    assert SamplingParams(repeat_last_n=-1, seed=None).seed is None
    assert SamplingParams(temperature=5e-7).greedy and not SamplingParams(temperature=1e-6).greedy


def test_sampler_checks_its_arguments():
    with pytest.raises(SamplingError, match="n_vocab"):
        Sampler(SamplingParams(), 0)
    with pytest.raises(SamplingError, match="params"):
        Sampler({"temperature": 1.0}, 10)
    assert math.isfinite(Sampler(SamplingParams(), 10).params.temperature)
