"""ember: a lightweight local inference runtime for GGUF language models on edge machines.

    import ember
    m = ember.load("smollm2-135m")      # a catalog name (pulled on first use) or a path to a .gguf
    m.tokenize("Hello")
"""

import os

# numpy's OpenBLAS keeps idle threads spinning for ~0.1 s after each call (2^28 cycles); on a
# 2-core machine that halves the speed of the decode threads that run right after a
# multi-threaded prefill (measured: the next ~10 tokens). 2^24 cycles (~6 ms) still keeps them
# awake between the BLAS calls of one prefill (2^20 cost pp512 ~10 % at 2 threads). It only takes
# effect if OpenBLAS is not loaded yet (set it yourself otherwise).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "24")

from .api import Model, load  # noqa: E402
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
    "load", "Model",
    "EmberError", "FormatError", "UnsupportedError", "ModelNotFoundError", "BudgetError",
    "DeviceError", "PullError", "ChatTemplateError",
]
