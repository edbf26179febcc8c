"""How many threads ember uses (EMBER_THREADS, or the number of physical cores), and which CPU
they run on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

from ..errors import EmberError


def default_threads() -> int:
    """EMBER_THREADS, or the number of physical cores."""
    env = os.environ.get("EMBER_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise EmberError(f"EMBER_THREADS={env!r} is not a number of threads") from None
        if n > 0:
            return n
        raise EmberError(f"EMBER_THREADS={env!r} must be at least 1")
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine's architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("model name", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
