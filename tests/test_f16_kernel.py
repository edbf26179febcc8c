"""The F16 / BF16 decode matvec (ember.lut_kernels.f16): every kernel path this host can run
against the float64 truth of the same float32 weights and activations, on fresh random inputs
(the seed is in every failure message; pin it with ``EMBER_TEST_SEED``)."""

from __future__ import annotations

import os
import secrets
import zlib

import numpy as np
import pytest

from ember.formats.quants import dequantize
from ember.lut_kernels import codegen, f16

SEED = int(os.environ.get("EMBER_TEST_SEED", secrets.randbits(32)))
KERNELS = [k for k in codegen.host_isas() if k != "neon"]
RTOL = 1e-5  # of sum_j |w_j x_j|: float32 accumulation only (measured <= 4e-8)


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def random_rows(rng, qtype: int, n_out: int, n_in: int) -> np.ndarray:
    """GGUF rows (uint8 [n_out, 2 n_in]) of random finite F16 / BF16 values of mixed scale."""
    w = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.01, 3, (n_out, 1))).astype(np.float32)
    bits = w.astype(np.float16).view(np.uint16) if qtype == f16.F16 else (w.view(np.uint32) >> 16).astype(np.uint16)
    return bits.view(np.uint8).reshape(n_out, 2 * n_in)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qtype", [f16.F16, f16.BF16])
@pytest.mark.parametrize("n_out,n_in", [(1, 7), (7, 96), (65, 100), (130, 576), (64, 1000)])
def test_matvec(kernel, qtype, n_out, n_in):
    rng = _rng("mv", qtype, n_out, n_in)
    raw = random_rows(rng, qtype, n_out, n_in)
    p = f16.pack_f16(raw, qtype)
    assert p.w.base is not None and p.nbytes == raw.nbytes  # a view, the file's bytes
    assert np.array_equal(p.dequantize().view(np.uint32), dequantize(raw, qtype).reshape(n_out, n_in).view(np.uint32))
    x = (rng.standard_normal(n_in) * rng.uniform(0.1, 10)).astype(np.float32)
    ref, absum = f16.f16_matvec_reference(x, p)
    for threads in (1, 2):
        y = f16.f16_matvec(x, p, kernel=kernel, threads=threads)
        assert y.dtype == np.float32 and y.shape == (n_out,)
        assert (np.abs(y - ref) <= RTOL * absum).all(), f"seed={SEED} {kernel} {threads}"
    out = np.empty(n_out, np.float32)
    assert f16.f16_matvec(x, p, out=out, kernel=kernel) is out


def test_bad_input():
    p = f16.pack_f16(random_rows(_rng("bad"), f16.F16, 3, 64), f16.F16)
    with pytest.raises(ValueError):
        f16.f16_matvec(np.ones(63, np.float32), p)
    with pytest.raises(ValueError):
        f16.f16_matvec(np.ones(64, np.float32), p, out=np.empty(4, np.float32))
    with pytest.raises(ValueError):
        f16.pack_f16(np.zeros((2, 3), np.uint8), f16.F16)
    with pytest.raises(ValueError):
        f16.pack_f16(np.zeros((2, 4), np.uint8), 8)
    with pytest.raises(ValueError):
        f16.fn_address(2)


@pytest.mark.skipif("avx512" not in KERNELS, reason="host has no AVX-512")
def test_x86_assembly_uses_the_intended_instructions():
    asm = f16.kernel_asm("avx512")
    body = asm[asm.index("f16_rows:") : asm.index("bf16_rows:")]
    assert "vcvtph2ps" in body and "zmm" in body and "vfmadd" in body
    body2 = f16.kernel_asm("avx2")
    assert "vcvtph2ps" in body2 and "zmm" not in body2
