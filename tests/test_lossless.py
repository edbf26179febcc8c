"""Speculative decoding changes no token: greedy generation with each drafter and schedule gives
the target's own tokens, on the public reference prompts (tests/data, written by llama.cpp) and on
20 code prompts, qwen2.5-coder-1.5b with the 0.5B draft model and prompt lookup, smollm2-135m with
prompt lookup."""

from __future__ import annotations

import pytest
from conftest import reference

from ember.runtime.generate import GenerationConfig, generate
from ember.speculative import ModelDrafter, PromptLookup

# chat requests (rendered with the chat template) and raw code to complete
CODE_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case.",
    "Write a SQL query that returns the ten customers with the highest total order amount.",
    "Write a Bash script that counts the lines of every .py file under the current folder.",
    "Write a JavaScript function debounce(fn, ms).",
    "Write a Rust function that sums the even numbers of a slice of i64.",
    "Write a C function that reverses a string in place.",
    "Write a Python class Stack with push, pop and peek methods.",
    "Explain what a Python generator is, with a short example.",
    "Write a Go function that reads a file and returns its lines.",
    "def binary_search(xs, target):\n",
    'import json\n\n\ndef load_config(path):\n    """Read a JSON config file and return it as a dict."""\n',
    "class LRUCache:\n    def __init__(self, capacity: int):\n",
    "# Merge two sorted lists into one sorted list\ndef merge(a, b):\n",
    "function fizzbuzz(n) {\n",
    "SELECT name, COUNT(*) AS n\nFROM orders\n",
    "def parse_csv_line(line: str) -> list[str]:\n",
    "#include <stdio.h>\n\nint main(void) {\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n",
    "async def fetch_all(urls):\n",
]
TOKENS = 32


def _ids(model, prompt: str) -> list[int]:
    if prompt.endswith("\n") or prompt.startswith(("SELECT", "#")):  # code to complete
        return model.tokenize(prompt)
    return model.chat_ids([{"role": "user", "content": prompt}])


def _greedy(model, ids, drafter=None, schedule="auto") -> list[int]:
    cfg = GenerationConfig(max_tokens=TOKENS, temperature=0.0)
    chunks = generate(model.session(), model.tokenizer, ids, cfg, {}, drafter=drafter, schedule=schedule)
    return [i for c in chunks for i in c.token_ids]


def _check(model, prompts: dict[str, list[int]], drafters: dict) -> None:
    """Every drafter's tokens equal plain decoding's, prompt by prompt; the first difference named."""
    bad = []
    for name, ids in prompts.items():
        plain = _greedy(model, ids)
        for label, (drafter, schedule) in drafters.items():
            got = _greedy(model, ids, drafter, schedule)
            if got != plain:
                j = next((i for i, (a, b) in enumerate(zip(plain, got)) if a != b), min(len(plain), len(got)))
                bad.append(f"{name} with {label}: differs at generated token {j}")
    assert not bad, "; ".join(bad)


@pytest.fixture(scope="module")
def qwen(catalog_model):
    target = catalog_model("qwen2.5-coder-1.5b")
    draft = ModelDrafter(catalog_model("qwen2.5-coder-0.5b"), target)
    drafters = {
        "the 0.5B draft, auto": (draft, "auto"),
        "the 0.5B draft, concurrent": (draft, "concurrent"),
        "the 0.5B draft, turns": (draft, "turns"),
        "prompt lookup": (PromptLookup(), "auto"),
    }
    return target, drafters


def test_qwen_reference_prompts(qwen):
    target, drafters = qwen
    prompts = {p["name"]: p["prompt_token_ids"] for p in reference("qwen2.5-coder-0.5b")["prompts"]}
    _check(target, prompts, drafters)


@pytest.mark.parametrize("half", [0, 1])
def test_qwen_code_prompts(qwen, half):
    target, drafters = qwen
    chosen = CODE_PROMPTS[half * 10 : half * 10 + 10]
    _check(target, {p[:40]: _ids(target, p) for p in chosen}, drafters)


def test_smollm2_lookup_on_reference_and_code_prompts(catalog_model):
    smol = catalog_model("smollm2-135m")
    prompts = {p["name"]: p["prompt_token_ids"] for p in reference("smollm2-135m")["prompts"]}
    prompts.update({p[:40]: _ids(smol, p) for p in CODE_PROMPTS})
    _check(smol, prompts, {"prompt lookup": (PromptLookup(), "auto")})
