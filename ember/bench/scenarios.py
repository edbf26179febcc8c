"""The benchmark's tests: their names, what they measure, and the prompts they feed.

ppN   one batch of N prompt tokens from an empty cache, tokens/s
tgN   N greedy single-token decodes after a PROMPT_TG-token prompt, tokens/s
kN    a forward over N new tokens after a K_CONTEXT-token context (speculative
      verification's shape), tokens/s, and its cost relative to one new token
      (forwards of 1 and of N tokens alternating, medians of K_REPS each)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import EmberError

TESTS = ("pp128", "pp512", "tg128", "k8")
QUICK_TESTS = ("pp128", "tg32")
PROMPT_TG = 16
K_CONTEXT, K_REPS = 64, 11
MAX_TOKENS = 8192

_TEST = re.compile(r"(pp|tg|k)([0-9]+)")


class BenchError(EmberError):
    """A benchmark that cannot run as asked: a bad option, a missing peer, a failed worker."""


def parse_test(name: str) -> tuple[str, int]:
    """("pp" | "tg" | "k", N) of a test name such as pp128, tg32 or k8."""
    m = _TEST.fullmatch(name.strip())
    if not m or not 1 <= int(m.group(2)) <= MAX_TOKENS:
        raise BenchError(
            f"unknown test {name!r}: give ppN (prompt), tgN (decode) or kN (N new tokens "
            f"after a context), N from 1 to {MAX_TOKENS}, e.g. --tests {','.join(TESTS)}"
        )
    return m.group(1), int(m.group(2))


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
