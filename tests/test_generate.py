"""Generation: streaming chunks, stop conditions, stats, sessions, and bad input."""

import numpy as np
import pytest

import ember
from ember.errors import EmberError, UnsupportedError
from ember.runtime.generate import GenerationError, _StopFilter

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol(catalog_model):
    return catalog_model("smollm2-135m")


def collect(stream):
    chunks = list(stream)
    return chunks, "".join(c.text for c in chunks), [i for c in chunks for i in c.token_ids]


def test_greedy_stream_is_deterministic_and_matches_logits(smol):
    chunks, text, ids = collect(smol.generate(PROMPT, max_tokens=6))
    assert len(ids) == 6 and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert text == smol.detokenize(ids)
    assert collect(smol.generate(PROMPT, max_tokens=6))[2] == ids
    # each greedy token is the argmax of one causal pass over everything before it
    prompt = smol.tokenize(PROMPT)
    full = smol.logits(prompt + ids[:-1])
    assert full[len(prompt) - 1 :].argmax(axis=1).tolist() == ids
    st = smol.stats
    assert st["tokens_generated"] == 6 and st["prompt_tokens"] == len(prompt)
    assert st["ttft_s"] > 0 and st["decode_tokens_per_s"] > 0 and st["peak_rss_bytes"] > 10_000_000


def test_next_turn_feeds_only_what_is_new(smol):
    """The model's session keeps the last call's tokens: a follow-up prefills only the new
    messages, and gives what a fresh session gives."""
    turn1 = [{"role": "user", "content": "Name a fruit."}]
    _, reply, _ = collect(smol.chat(turn1, max_tokens=8))
    first = dict(smol.stats)
    assert first["prompt_tokens_reused"] == 0 or first["prompt_tokens_reused"] < first["prompt_tokens"]
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And a colour?"}]
    chunks, _, ids = collect(smol.chat(turn2, max_tokens=8))
    st = chunks[-1].stats
    assert st is smol.stats and st["prompt_tokens"] == len(smol.chat_ids(turn2))
    assert st["prompt_tokens_reused"] >= first["prompt_tokens"]  # turn 1's prompt at least
    assert st["prompt_tokens"] - st["prompt_tokens_reused"] < 30
    fresh = smol.session()
    prompt = smol.chat_ids(turn2)
    logits = fresh.feed(prompt + ids[:-1])
    assert logits[len(prompt) - 1 :].argmax(axis=1).tolist() == ids


def test_keep_prefix_truncates_to_the_shared_part(smol):
    s = smol.session()
    s.feed([1, 2, 3, 4, 5])
    assert s.keep_prefix([1, 2, 9, 4]) == 2 and s.ids == [1, 2]
    s.feed([3])
    assert s.keep_prefix([1, 2, 3]) == 2  # the last token is always fed again: its logits
    assert s.keep_prefix([7]) == 0 and len(s) == 0


def test_overlapping_generations_keep_their_own_stats(smol):
    a = smol.generate(PROMPT, max_tokens=3)
    first = next(a)
    b = collect(smol.generate("Once upon a time", max_tokens=2))[0]  # while `a` streams
    rest = list(a)
    assert rest[-1].stats is first.stats and rest[-1].stats["tokens_generated"] == 3
    assert b[-1].stats["tokens_generated"] == 2 and b[-1].stats is not first.stats


def test_stop_string_cuts_text(smol):
    _, text, _ = collect(smol.generate(PROMPT, max_tokens=6))
    word = text.split()[0]
    chunks, cut, _ = collect(smol.generate(PROMPT, max_tokens=6, stop=[word]))
    assert chunks[-1].finish_reason == "stop" and word not in cut and text.startswith(cut)


def test_eos_stops_unless_ignored(smol):
    chunks, text, ids = collect(smol.chat([{"role": "user", "content": "Say OK."}], max_tokens=64))
    assert chunks[-1].finish_reason == "stop" and len(ids) < 64
    assert not set(ids) & smol.tokenizer.stop_ids and "<|im_end|>" not in text
    chunks, _, ids2 = collect(
        smol.chat([{"role": "user", "content": "Say OK."}], max_tokens=len(ids) + 3, ignore_eos=True)
    )
    assert chunks[-1].finish_reason == "length" and len(ids2) == len(ids) + 3


def test_seeded_sampling_reproducible(smol):
    a = collect(smol.generate(PROMPT, max_tokens=8, temperature=0.9, top_k=40, seed=7))[2]
    b = collect(smol.generate(PROMPT, max_tokens=8, temperature=0.9, top_k=40, seed=7))[2]
    assert a == b


def test_token_id_prompt(smol):
    ids = smol.tokenize(PROMPT)
    assert collect(smol.generate(ids, max_tokens=3))[2] == collect(smol.generate(PROMPT, max_tokens=3))[2]


def test_session_feed_truncate(smol):
    s = smol.session()
    ids = smol.tokenize("one two three four five")
    a = s.feed(ids)
    assert len(s) == len(ids) and a.shape == (len(ids), smol.config.n_vocab)
    s.truncate(2)
    assert len(s) == 2
    b = s.feed(ids[2:])
    np.testing.assert_allclose(b, a[2:], atol=2e-3, rtol=1e-4)
    s.reset()
    assert len(s) == 0
    with pytest.raises(ValueError):
        s.truncate(5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_generation_values(smol, kwargs, message):
    with pytest.raises(EmberError, match=message):
        smol.generate(PROMPT, **kwargs)


def test_empty_prompt(smol):
    with pytest.raises(GenerationError, match="empty"):
        next(smol.generate(""))
    with pytest.raises(GenerationError, match="empty"):
        next(smol.generate([]))


def test_prompt_past_context(catalog_path):
    m = ember.load(catalog_path("smollm2-135m"), n_ctx=16)
    with pytest.raises(GenerationError, match="context window holds 16"):
        next(m.generate("word " * 30))
    chunks, _, ids = collect(m.generate("one two three", max_tokens=100))
    assert chunks[-1].finish_reason == "length" and len(m.tokenize("one two three")) + len(ids) <= 16
    with pytest.raises(EmberError, match="context window"):
        m.session().feed(list(range(17)))


def test_bad_token_ids(smol):
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        next(smol.generate([1, 2, 10**9]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.logits([-1])


def test_unsupported_options_are_honest(catalog_path):
    with pytest.raises(UnsupportedError, match="kernels='numpy'"):
        _ = ember.load(catalog_path("smollm2-135m"), memory_budget="512MB", kernels="numpy").transformer
    with pytest.raises(ember.DeviceError, match="not one ember knows"):
        ember.load(catalog_path("smollm2-135m"), device="tpu")
    with pytest.raises(ember.DeviceError, match="cuda:99"):  # (numba's simulator in this process: one GPU)
        ember.load(catalog_path("smollm2-135m"), device="cuda:99")


def test_kv_cache_types(catalog_path):
    """Halves by default (the reference path: float32), float32 or 8 bits when asked; half the
    bytes; the same greedy reply here; a bad type is a clear error before anything loads."""
    path = catalog_path("smollm2-135m")
    half, full = ember.load(path), ember.load(path, kv_cache="f32")
    assert (half.kv_cache, full.kv_cache, ember.load(path, kernels="numpy").kv_cache) == ("f16", "f32", "f32")
    s16, s32 = half.session(), full.session()
    ids = half.tokenize("The capital of France is", special=False)
    a, b = s16.feed(ids), s32.feed(ids)
    assert s16.cache.k_all.dtype == np.uint16 and s32.cache.k_all.dtype == np.float32
    assert s16.cache.nbytes() * 2 == s32.cache.nbytes()
    assert np.abs(a - b).max() < 0.02 * b.std() and (a.argmax(1) == b.argmax(1)).all()
    assert half.config.kv_cache_bytes(100) * 2 == half.config.kv_cache_bytes(100, "f32")
    # 8 bits and a float32 scale per 32 (72 bytes a row of 64), keys rotated: close to float32
    q8 = ember.load(path, kv_cache="q8_0")
    s8 = q8.session()
    c = s8.feed(ids)
    s8.feed(ids[:3])  # decoded rows, written by the fused step
    assert s8.cache.k_all.dtype == np.int8 and s8.cache.k_all.shape[-1] == 72
    assert np.abs(c - b).max() < 0.1 * b.std() and (c.argmax(1) == b.argmax(1)).all()
    assert q8.config.kv_cache_bytes(100, "q8_0") == 30 * 3 * 100 * 2 * 72
    with pytest.raises(ember.EmberError, match="kv_cache"):
        ember.load(path, kv_cache="q8")


def test_stop_filter_holds_back_prefixes():
    f = _StopFilter(["</end>"])
    assert f.push("hello </") == ("hello ", False)
    assert f.push("e") == ("", False)
    assert f.push("x") == ("</ex", False)
    assert f.push(" a </end> b") == (" a ", True)
