"""matmul: the one function every projection in the model goes through.

The reference implementation multiplies by float32 weights with BLAS; the table-lookup kernels
replace it for packed low-bit weights.
"""

from __future__ import annotations

import numpy as np


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [n, n_in] times a weight stored as [n_out, n_in] -> [n, n_out]."""
    return x @ w.T
