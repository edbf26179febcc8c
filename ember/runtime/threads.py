"""How many threads ember uses: EMBER_THREADS, or the number of physical cores."""

from __future__ import annotations

import os

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
