"""ember: a lightweight local inference runtime for GGUF language models on edge machines.

    import ember
    m = ember.load("smollm2-135m")      # a catalog name (pulled on first use) or a path to a .gguf
    m.tokenize("Hello")
"""

import os

# numpy's OpenBLAS keeps idle threads spinning for ~0.1 s after each call (2^28 cycles); on a
# 2-core machine that takes a core from whatever runs next: the decode threads right after a
# multi-threaded prefill, and numba's threads (attention, the K-quant kernels) between the BLAS
# calls of a prefill (2^24 cycles: SmolLM2 pp512 at 2 threads spent 2x as long in attention).
# 2^4 sleeps at once; prefill tiles are large enough (ops.TILE_BYTES) that waking the BLAS
# threads per call costs little. It only takes effect if OpenBLAS is not loaded yet (set it
# yourself otherwise).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
# A batch runs numba's parallel regions (attention, K-quant kernels) between ember's own threaded
# tile matmuls; libgomp's idle workers spin after each region and took a core from the tile
# threads (SmolLM2 pp128 at 2 threads: 330 tok/s spinning, 530 passive). Passive workers sleep
# at once; waking them costs microseconds per region. Read when numba first loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
