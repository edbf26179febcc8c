"""Speculative decoding: drafters, the verify rule, and that speculation never changes the output
(greedy: the same tokens as the target alone; sampling: the same distribution)."""

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest

import ember
from ember.cli import main
from ember.errors import EmberError
from ember.runtime.generate import GenerationConfig, GenerationError, generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.speculate import verify_draft
from ember.speculative import ModelDrafter, PromptLookup, light_copy

ECHO = (
    "monday tuesday wednesday thursday friday\nmonday tuesday wednesday thursday friday\n"
    "monday tuesday"
)  # smollm2-135m repeats it: long accepted runs


def run(model, prompt_ids, drafter=None, k=None, session=None, schedule="auto", **cfg):
    """(ids, text, finish_reason, stats, session) of one generation."""
    stats = {}
    session = model.session() if session is None else session
    config = GenerationConfig(**cfg)
    chunks = list(
        generate(session, model.tokenizer, prompt_ids, config, stats, drafter=drafter, k=k, schedule=schedule)
    )
    ids = [i for c in chunks for i in c.token_ids]
    assert all(c.finish_reason is None for c in chunks[:-1])
    return ids, "".join(c.text for c in chunks), chunks[-1].finish_reason, stats, session


def same_as_plain(model, prompt_ids, drafter, k=None, schedule="auto", **cfg):
    """Generate with and without the drafter; assert the same ids, text, end and session."""
    a_ids, a_text, a_fin, a_st, a_s = run(model, prompt_ids, **cfg)
    b_ids, b_text, b_fin, b_st, b_s = run(model, prompt_ids, drafter, k, schedule=schedule, **cfg)
    if a_ids != b_ids:
        j = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y), min(len(a_ids), len(b_ids)))
        pytest.fail(
            f"speculative output differs from plain at generated token {j}: "
            f"{a_ids[j : j + 4]} (plain) vs {b_ids[j : j + 4]} ({b_st['drafter']})"
        )
    assert (b_text, b_fin, b_st["stopped_by"]) == (a_text, a_fin, a_st["stopped_by"])
    assert b_s.ids == a_s.ids  # the session holds what plain decoding leaves there
    assert b_st["verify_steps"] >= 1 and 0 <= b_st["accepted_tokens"] <= b_st["drafted_tokens"]
    return a_ids, a_text, b_st


# ---- prompt lookup ------------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    d = PromptLookup(n_max=3, n_min=1)
    #          0  1  2  3  4  5  6  7  8  9
    ctx = [5, 6, 7, 1, 5, 6, 7, 2, 9, 6, 7]
    assert d.propose(ctx, 3) == [2, 9, 6]  # "6 7" last seen at 5..6 (3-gram "9 6 7" never before)
    assert d.propose([5, 6, 7, 1, 5, 6, 7, 2, 5, 6, 7], 2) == [2, 5]  # the 3-gram, latest match
    assert d.propose([1, 2, 3], 4) == []  # no earlier occurrence of any suffix
    assert d.propose([4, 4], 3) == [4]  # the match may run into the tail
    assert PromptLookup(n_max=2, n_min=2).propose([1, 2, 3, 2], 2) == []
    with pytest.raises(EmberError, match="n_min"):
        PromptLookup(n_max=1, n_min=2)


@pytest.fixture(scope="module")
def smol(catalog_model):
    return catalog_model("smollm2-135m")


@pytest.mark.parametrize(
    "prompt",
    [
        "The capital of France is",
        ECHO,
        "Repeat after me: the quick brown fox",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    ],
)
def test_lookup_greedy_is_lossless(smol, prompt):
    ids = smol.tokenize(prompt)
    plain, text, st = same_as_plain(smol, ids, PromptLookup(), max_tokens=48)
    if prompt == ECHO:
        assert st["accepted_tokens"] >= 30  # most of the reply drafted and kept (k: timing-chosen)


def test_lookup_greedy_cut_by_stop_string_eos_and_max_tokens(smol):
    ids = smol.tokenize(ECHO)
    plain, text, _ = same_as_plain(smol, ids, PromptLookup(), max_tokens=48)
    # a stop string in the middle of an accepted run: cut at the same place
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    assert stop.strip()
    _, t2, _ = same_as_plain(smol, ids, PromptLookup(), max_tokens=48, stop=[stop])
    assert t2 == text[: text.index(stop)]
    # max_tokens inside a step, for several k
    for k in (1, 3, 15):
        same_as_plain(smol, ids, PromptLookup(), k=k, max_tokens=7)
    # EOS: a chat reply that ends its turn (plain decoding ends at EOS before 64 tokens)
    chat = smol.chat_ids([{"role": "user", "content": "Say hello."}])
    _, _, st = same_as_plain(smol, chat, PromptLookup(), max_tokens=64)
    assert st["stopped_by"] == "eos"
    # the context limit: a window just past the prompt
    small = ember.load(smol.path, n_ctx=len(ids) + 9)
    same_as_plain(small, ids, PromptLookup(), max_tokens=48)
    with pytest.raises(GenerationError, match="draft length"):
        run(smol, ids, PromptLookup(), k=16)


def test_load_with_lookup_and_sampling(smol):
    m = ember.load(smol.path, draft="lookup")
    assert isinstance(m.drafter, PromptLookup)
    greedy = [i for c in m.generate(ECHO, max_tokens=32) for i in c.token_ids]
    assert greedy == [i for c in smol.generate(ECHO, max_tokens=32) for i in c.token_ids]
    assert m.stats["drafter"] == "lookup" and m.stats["accepted_tokens"] > 0
    cfg = dict(max_tokens=32, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=7)
    a = [i for c in m.generate(ECHO, **cfg) for i in c.token_ids]
    assert a == [i for c in m.generate(ECHO, **cfg) for i in c.token_ids]  # seeded: reproducible
    assert len(a) >= 1 and m.stats["verify_steps"] >= 1


# ---- the verify rule ----------------------------------------------------------------------------


def test_verify_greedy_accepts_the_agreeing_prefix_and_adds_the_target_token():
    rows = np.full((4, 5), -1.0, dtype=np.float32)
    for i, t in enumerate([3, 1, 4, 0]):
        rows[i, t] = 2.0
    s = Sampler(SamplingParams(), 5)
    assert verify_draft(s, rows, [3, 1, 4], None, [0]) == ([3, 1, 4, 0], 3)
    assert verify_draft(s, rows, [3, 2, 4], None, [0]) == ([3, 1], 1)
    assert verify_draft(s, rows, [0, 1, 4], None, [0]) == ([3], 0)
    assert verify_draft(s, rows[:1], [], None, [0]) == ([3], 0)


# chi-squared critical values at p = 0.001, by degrees of freedom
CHI2_001 = {3: 16.266, 5: 20.515, 7: 24.322, 8: 26.124, 15: 37.697, 35: 66.619}


def chi2_ok(counts: np.ndarray, probs: np.ndarray) -> None:
    """Assert that counts could come from probs (chi-squared test at p = 0.001)."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    e = n * probs[keep]
    stat = float(((counts[keep] - e) ** 2 / e).sum())
    dof = int(keep.sum()) - 1
    assert stat < CHI2_001[dof], f"chi-squared {stat:.1f} with {dof} degrees of freedom"


@pytest.mark.parametrize("case", ["model-q", "one-hot-q", "filtered"])
def test_verify_sampling_reproduces_the_target_distribution(case):
    """Over many seeds, the first two tokens that speculation emits (a second from the next step's
    logits when the first step ends after one) are distributed as p0 x p1 exactly."""
    V, N = 6, 30000
    rng = np.random.default_rng(1234)
    rows = np.log(
        np.array(
            [[0.30, 0.05, 0.25, 0.10, 0.20, 0.10], [0.10, 0.35, 0.05, 0.15, 0.15, 0.20], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]]
        )
    )
    q = np.array(
        [
            [0.05, 0.30, 0.10, 0.35, 0.10, 0.10],  # the draft favours other tokens
            [0.30, 0.10, 0.30, 0.10, 0.10, 0.10],
        ]
    )
    params = SamplingParams(temperature=1.0)
    if case == "filtered":  # p has zeros where q has mass: those tokens must never come out
        params = SamplingParams(temperature=0.7, top_k=4, min_p=0.3)
    p = [Sampler(params, V).probabilities(r) for r in rows[:2]]
    counts = np.zeros((V, V))
    for seed in range(N):
        s = Sampler(dataclasses.replace(params, seed=seed), V)
        if case == "one-hot-q":
            draft, qs = [int(rng.integers(V)), int(rng.integers(V))], None
        else:
            draft = [int(rng.choice(V, p=q[0])), int(rng.choice(V, p=q[1]))]
            qs = [q[0], q[1]]
        tokens, n = verify_draft(s, rows, draft, qs, [])
        assert tokens[:n] == draft[:n] and len(tokens) == n + 1
        t1 = tokens[1] if len(tokens) > 1 else verify_draft(s, rows[1:2], [], None, [])[0][0]
        counts[tokens[0], t1] += 1
    chi2_ok(counts.sum(axis=1), p[0])
    chi2_ok(counts.ravel(), np.outer(p[0], p[1]).ravel())


def test_verify_sampling_reproduces_a_real_models_distribution(catalog_model):
    """Real logits: SmolLM2's next token after a prompt, sampled at temperature 0.8 among its top
    8, drafted from a flatter distribution over the whole vocabulary (most drafts fall outside
    the 8 and must be rejected, the residual drawn instead). Over many seeds the first token
    that speculation emits is distributed as plain sampling's."""
    m = catalog_model("smollm2-135m")
    ids = m.tokenize("The three most common colors of a flag are", special=False)
    first = m.logits(ids)[-1]
    after = m.logits([*ids, int(np.argmax(first))])[-1]  # emitted only when the first is accepted
    rows = np.stack([first, after, after]).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=8)
    V, N = m.config.n_vocab, 6000
    p0 = Sampler(params, V).probabilities(first)
    q = [np.exp(r / 1.6 - (r / 1.6).max()) for r in rows[:2].astype(np.float64)]
    q = [x / x.sum() for x in q]
    rng = np.random.default_rng(99)
    counts = np.zeros(V)
    for seed in range(N):
        s = Sampler(dataclasses.replace(params, seed=seed), V)
        draft = [int(rng.choice(V, p=q[0])), int(rng.choice(V, p=q[1]))]
        tokens, n = verify_draft(s, rows, draft, q, [])
        assert tokens[:n] == draft[:n]
        counts[tokens[0]] += 1
    assert 0.05 < q[0][p0 > 0].sum() < 0.95, "the draft should often miss the target's top 8"
    chi2_ok(counts, p0)


class _ToyDevice:
    """A device whose model is a Markov chain: the logits after token t are log P[t]."""

    def __init__(self, threads=2):
        self.threads = threads

    def describe(self):
        return "a Markov chain"

    def with_threads(self, threads, model=None):
        return _ToyDevice(threads)

    def new_cache(self, model, n_ctx):
        return types.SimpleNamespace(
            max_len=n_ctx, length=0, check_room=lambda n: None, truncate=lambda n: None, reserve=lambda n: None
        )

    def forward(self, model, ids, cache, all_logits=True):
        cache.length += len(ids)
        rows = np.log(model.P[ids])
        return rows if all_logits else rows[-1:]


class _ToyModel:
    def __init__(self, P, name):
        self.P, self.path = np.asarray(P), Path(f"{name}.gguf")
        n = self.P.shape[0]
        self.tokenizer = types.SimpleNamespace(
            n_vocab=n,
            tokens=[chr(97 + i) for i in range(n)],
            stop_ids=frozenset(),
            stream=lambda special=False: types.SimpleNamespace(feed=lambda ids: "", flush=lambda: ""),
        )
        self.threads = 2

    def session(self):
        from ember.runtime.session import Session

        return Session(self, 64, device=_ToyDevice())


@pytest.mark.parametrize("schedule", ["turns", "concurrent"])
def test_speculative_generation_samples_the_target_chain(schedule):
    """Whole generations over many seeds, a Markov-chain target and a draft that disagrees with
    it: the emitted tokens at positions 3 and 4 (drafted ahead, beside a verify, under the
    concurrent schedule) are distributed as the target chain's."""
    P = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2]])
    Q = np.array([[0.5, 0.4, 0.1], [0.1, 0.3, 0.6], [0.2, 0.7, 0.1]])
    target, draft = _ToyModel(P, "toy"), _ToyModel(Q, "toy-draft")
    drafter = ModelDrafter(draft, target)
    counts, hits = np.zeros((3, 3)), 0
    for seed in range(8000):
        cfg = GenerationConfig(max_tokens=7, temperature=1.0, seed=seed)
        stats: dict = {}
        chunks = generate(target.session(), target.tokenizer, [0], cfg, stats, drafter, k=2, schedule=schedule)
        ids = [i for c in chunks for i in c.token_ids]
        counts[ids[3], ids[4]] += 1
        hits += stats.get("ahead_hits", 0)
    start = np.linalg.matrix_power(P, 4)[0]  # token 3 after the prompt's token 0
    chi2_ok(counts.ravel(), (start[:, None] * P).ravel())
    assert (hits > 1000) == (schedule == "concurrent")


# ---- a draft model ------------------------------------------------------------------------------

CODE_PROMPTS = [
    "Write a Python function is_prime(n). Only the code.",
    'Complete this function:\n```python\ndef flatten(xs):\n    """Flatten a list of lists."""\n',
    "Write a JavaScript function that reverses a string, with a one-line comment.",
]


@pytest.fixture(scope="module")
def qwen_pair(catalog_model, catalog_path):
    """The catalog pair as `ember.load(..., draft=)` makes it: the draft from its 4-bit copy."""
    target = catalog_model("qwen2.5-coder-1.5b")
    return target, ModelDrafter(ember.load(light_copy(catalog_path("qwen2.5-coder-0.5b"))), target)


@pytest.mark.parametrize("prompt", CODE_PROMPTS)
def test_draft_model_greedy_is_lossless(qwen_pair, prompt):
    target, drafter = qwen_pair
    ids = target.chat_ids([{"role": "user", "content": prompt}])
    # k pinned: auto may rightly decide on a slow, busy machine that drafting does not pay
    plain, text, st = same_as_plain(target, ids, drafter, k=4, schedule="turns", max_tokens=48)
    assert st["drafter"].startswith("model:") and st["acceptance_rate"] > 0.3
    if prompt is CODE_PROMPTS[0]:  # a stop string inside an accepted run
        stop = text[len(text) // 3 : len(text) // 3 + 5]
        _, t2, _ = same_as_plain(target, ids, drafter, k=4, schedule="turns", max_tokens=48, stop=[stop])
        assert t2 == text[: text.index(stop)]


@pytest.mark.parametrize("prompt", CODE_PROMPTS)
def test_concurrent_schedule_greedy_is_lossless(qwen_pair, prompt):
    """The draft drafts the next block on its own thread while the target verifies: the same
    tokens, and the drafter's threads are all of them again afterwards."""
    target, drafter = qwen_pair
    ids = target.chat_ids([{"role": "user", "content": prompt}])
    _, text, st = same_as_plain(target, ids, drafter, k=4, schedule="concurrent", max_tokens=40)
    assert st["schedule"] == "concurrent" and st["steps_by_schedule"]["concurrent"] == st["verify_steps"]
    assert st["ahead_drafts"] >= 1 and st["ahead_hits"] >= 1 and st["ahead_wasted_tokens"] >= 0
    assert drafter.session.threads == target.threads
    if prompt is CODE_PROMPTS[1]:  # a stop string inside an accepted run; auto picks per step
        stop = text[len(text) // 2 : len(text) // 2 + 4]
        _, t2, st2 = same_as_plain(target, ids, drafter, schedule="concurrent", max_tokens=40, stop=[stop])
        assert t2 == text[: text.index(stop)]
        _, _, st3 = same_as_plain(target, ids, drafter, max_tokens=40)
        assert set(st3["steps_by_schedule"]) == {"turns", "concurrent"} and "verify_s_concurrent" in st3


def test_concurrent_schedule_needs_a_draft_model_and_two_threads(smol, qwen_pair):
    ids = smol.tokenize(ECHO)
    with pytest.raises(EmberError, match="concurrent schedule needs a draft model"):
        run(smol, ids, PromptLookup(), schedule="concurrent", max_tokens=4)
    _, _, _, st, _ = run(smol, ids, PromptLookup(), max_tokens=4)
    assert st["schedule"] == "auto" and "turns only" in st["schedule_note"]
    target, drafter = qwen_pair
    one = target.session()
    one.use_threads(1)
    with pytest.raises(EmberError, match="at least 2 threads"):
        run(target, target.tokenize("def f():"), drafter, session=one, schedule="concurrent", max_tokens=4)
    with pytest.raises(GenerationError, match="schedule must be one of"):
        run(target, target.tokenize("def f():"), drafter, schedule="sideways", max_tokens=4)
    with pytest.raises(EmberError, match="draft_schedule must be one of"):
        ember.load(smol.path, draft="lookup", draft_schedule="sideways")


def test_draft_model_eos_and_sampling(qwen_pair):
    target, drafter = qwen_pair
    ids = target.chat_ids([{"role": "user", "content": "Reply with just the word: yes"}])
    _, _, st = same_as_plain(target, ids, drafter, max_tokens=48)
    assert st["stopped_by"] == "eos"
    cfg = dict(max_tokens=16, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=3)
    a, _, _, st, _ = run(target, ids, drafter, **cfg)
    assert a == run(target, ids, drafter, **cfg)[0] and st["verify_steps"] >= 1


def test_draft_vocabulary_mismatch_is_a_clear_error(catalog_path):
    with pytest.raises(EmberError, match=r"differ at token id 0 \('!' in the target, '<\|endoftext\|>' in the draft\)"):
        ember.load(catalog_path("qwen2.5-coder-1.5b"), draft=str(catalog_path("smollm2-135m")))


# ---- the command line ---------------------------------------------------------------------------


def test_cli_lookup_gives_the_same_ids_and_reports_acceptance(capsys, catalog_path):
    argv = ["run", str(catalog_path("smollm2-135m")), ECHO, "--raw", "--temp", "0", "-n", "32", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--lookup"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["ids"] == plain["ids"] and spec["text"] == plain["text"]
    st = spec["stats"]
    assert st["drafter"] == "lookup" and st["accepted_tokens"] > 0
    for key in ("draft_k", "drafted_tokens", "acceptance_rate", "mean_accepted_length", "verify_steps"):
        assert key in st
    assert "drafter" not in plain["stats"]
