"""The benchmark's scenarios and tests: their names, their sizes (full and --quick), and the
prompts they feed.

Scenarios (`--scenario`): dense, ttft, memory, long-context, offload, moe, moe-budget, speculative,
devices
(`SCENARIOS`; what each measures is in ember.bench.runners).

Tests (`--tests`, the dense scenario's, and the workers' unit of work):
ppN       one batch of N prompt tokens from an empty cache, tokens/s
tgN       N greedy single-token decodes after a PROMPT_TG-token prompt, tokens/s
tgN@CTX   N greedy decodes after a CTX-token prompt (long-context), tokens/s
kN        a forward over N new tokens after a K_CONTEXT-token context (speculative
          verification's shape), tokens/s, and its cost relative to one new token
          (forwards of 1 and of N tokens alternating, medians of K_REPS each)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import EmberError

SCENARIOS = ("dense", "ttft", "memory", "long-context", "offload", "moe", "moe-budget", "speculative", "devices")
TESTS = ("pp128", "pp512", "tg128", "k8")
QUICK_TESTS = ("pp128", "tg32")
CONTEXTS, QUICK_CONTEXTS = (128, 512, 2048, 4096), (128, 1024)  # long-context: prompt lengths
CONTEXT_DECODE, QUICK_CONTEXT_DECODE = 32, 16  # long-context: decodes after each prompt
DEVICE_CONTEXTS, QUICK_DEVICE_CONTEXTS = (512, 2048, 4096, 8192), (128, 512)  # devices: prompt lengths
DEVICE_DECODE, QUICK_DEVICE_DECODE = 16, 4  # devices: decodes after each prompt
BUDGETS = (1.0, 0.6, 0.4, 0.3, 0.15)  # offload: fractions of the weight bytes (--quick: one, see runners)
OFFLOAD_DECODE, QUICK_OFFLOAD_DECODE = 24, 12
SPEC_DECODE, QUICK_SPEC_DECODE = 128, 32  # speculative: greedy tokens per run
MOE_PROMPT, MOE_DECODE, QUICK_MOE_DECODE = 32, 48, 12  # moe-budget: tokens fed as a prompt, then one by one
MOE_BUDGET_SHARE = 0.25  # moe-budget: the budget, of the routed experts' bytes (--quick: of the slots)
DRAFTS = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}  # catalog target -> its catalog draft model
PROMPT_TG = 16
K_CONTEXT, K_REPS = 64, 11
MAX_TOKENS = 8192

_TEST = re.compile(r"(pp|tg|k)([0-9]+)(?:@([0-9]+))?")


class BenchError(EmberError):
    """A benchmark that cannot run as asked: a bad option, a missing peer, a failed worker."""


def replay_ids(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    """n token ids drawn at random (seeded), the same for both engines: a synthetic model's text
    means nothing and its greedy output repeats one token (one routing, every token), so its
    decode is timed on these ids fed one at a time, each step a decode's work."""
    import numpy as np

    return np.random.default_rng(seed).integers(min(1000, n_vocab // 2), min(n_vocab, 100_000), n).tolist()


def parse_test(name: str) -> tuple[str, int]:
    """("pp" | "tg" | "k", N) of a test name such as pp128, tg32, tg32@4096 or k8."""
    m = _TEST.fullmatch(name.strip())
    ctx = m and m.group(3)
    if (
        not m
        or not 1 <= int(m.group(2)) <= MAX_TOKENS
        or (ctx and (m.group(1) != "tg" or not 1 <= int(ctx) <= MAX_TOKENS))
    ):
        raise BenchError(
            f"unknown test {name!r}: give ppN (prompt), tgN (decode), tgN@CTX (decode after a "
            f"CTX-token prompt) or kN (N new tokens after a context), N from 1 to {MAX_TOKENS}, "
            f"e.g. --tests {','.join(TESTS)}"
        )
    return m.group(1), int(m.group(2))


def test_context(name: str) -> int:
    """The prompt length a test decodes after: CTX of tgN@CTX, else PROMPT_TG (or K_CONTEXT for kN)."""
    parse_test(name)
    kind, _, ctx = name.strip().partition("@")
    return int(ctx) if ctx else (K_CONTEXT if kind.startswith("k") else PROMPT_TG)


def parse_scenarios(spec: str) -> list[str]:
    """The scenario names of a comma-separated --scenario value ("all": every one), checked."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(SCENARIOS)
    bad = [n for n in names if n not in SCENARIOS]
    if bad or not names:
        raise BenchError(f"unknown scenario {bad[0] if bad else spec!r}: give some of {','.join(SCENARIOS)} or all")
    return [n for n in SCENARIOS if n in names]


def parse_tests(spec: str) -> list[str]:
    """The test names of a comma-separated --tests value, checked, duplicates dropped."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise BenchError(f"--tests is empty; give e.g. --tests {','.join(TESTS)}")
    for n in names:
        parse_test(n)
    return list(dict.fromkeys(names))


def parse_threads(spec: str) -> list[int]:
    """The thread counts of a comma-separated --threads value, checked, duplicates dropped."""
    try:
        counts = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise BenchError(f"--threads {spec!r}: give thread counts of at least 1, comma-separated, e.g. --threads 1,2")
    return list(dict.fromkeys(counts))


def english_text() -> str:
    """The benchmark's English prose (ppl_public.txt, shipped in the package: llama.cpp's
    reference perplexities in tests/data were measured on it)."""
    return (Path(__file__).resolve().parent / "ppl_public.txt").read_text(encoding="utf-8")


def prompt_ids(n: int, tokenize: Callable[[str], list[int]]) -> list[int]:
    """The first n token ids of the benchmark's English text (repeated when it is shorter)."""
    ids = list(tokenize(english_text()))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


REWRITE_REQUESTS = {
    # the reply changes most lines a little
    "type hints": "Add type hints to every function of this Python module. Reply with the whole module only.",
    # the reply echoes the module with a few words changed, as small edits do
    "rename": "Rename the function parse_amount to parse_money everywhere in this Python module. "
    "Reply with the whole module only.",
}


def rewrite_prompt(request: str = "type hints") -> str:
    """The speculative scenario's request: rewrite a short Python module (rewrite.py.txt, shipped
    in the package) as REWRITE_REQUESTS[request] asks; the reply echoes much of the prompt."""
    code = (Path(__file__).resolve().parent / "rewrite.py.txt").read_text(encoding="utf-8")
    return f"{REWRITE_REQUESTS[request]}\n\n{code}"
