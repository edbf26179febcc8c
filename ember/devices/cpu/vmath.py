"""Vectorizable float32 math for numba loops.

numba turns ``np.exp`` on a float32 scalar into a libm call per element (no vector math
library is bundled), about 8x slower than NumPy's vectorized exp: it was the largest cost of the
fused k-token step's SiLU and of the batch attention's softmax. The loops here compile to
SIMD code.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def exp_into(x, out, e2):
    """out = exp(x) for |x| <= 87 (x clipped there; out may be x): Cephes' expf, exp(r) on
    |r| <= ln2 / 2 times 2^n added into the exponent bits, ~1 ulp. ``e2``: an int32 scratch as
    long as x."""
    for i in range(x.size):
        v = min(max(x[i], np.float32(-87.0)), np.float32(87.0))
        n = np.floor(v * np.float32(1.44269504088896341) + np.float32(0.5))
        r = v - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        out[i] = p * r * r + r + np.float32(1.0)
        e2[i] = np.int32(n) << 23
    bits = out.view(np.int32)
    for i in range(x.size):
        bits[i] += e2[i]
