"""ember: a lightweight local inference runtime for GGUF language models on edge machines.

import ember
m = ember.load("smollm2-135m")      # a catalog name (pulled on first use) or a path to a .gguf
m.tokenize("Hello")
"""

import os

# numpy's OpenBLAS keeps idle threads spinning for ~0.1 s after each call (2^28 cycles); on a
# 2-core machine that takes a core from whatever runs next: the decode threads right after a
# multi-threaded BLAS call. ember runs BLAS single-threaded in its batches (lut_kernels/split.py
# shares the work out); 2^4 also keeps a user's own multi-threaded BLAS calls from stalling
# ember's threads afterwards. It only takes effect if OpenBLAS is not loaded yet (set it
# yourself otherwise).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _numba_cache() -> None:
    """numba's on-disk cache for ember's functions in a folder per version of ember's numba
    sources (``home.numba_cache_dir``), unless $NUMBA_CACHE_DIR says otherwise. Set before any
    ember module defines a cached function (numba picks the folder then): through the
    environment while numba is not imported yet (importing it here would cost the command line
    0.2 s and defeat its scipy shortcut, cli._quiet_startup), else in numba's config."""
    import sys

    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    from .home import numba_cache_dir

    path = numba_cache_dir()
    if path is None:
        return
    if "numba" in sys.modules:
        from numba.core import config

        config.CACHE_DIR = str(path)
    else:
        os.environ["NUMBA_CACHE_DIR"] = str(path)


_numba_cache()

from .api import Model, list_devices, load  # noqa: E402
from .errors import (  # noqa: E402
    BudgetError,
    ChatTemplateError,
    DeviceError,
    EmberError,
    FormatError,
    ModelNotFoundError,
    PullError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "load",
    "list_devices",
    "Model",
    "EmberError",
    "FormatError",
    "UnsupportedError",
    "ModelNotFoundError",
    "BudgetError",
    "DeviceError",
    "PullError",
    "ChatTemplateError",
]
