"""The bit-plane table-lookup matvec for every low-bit type (bench/experiments/planes.py: an
experiment the runtime does not use, kept tested so its measured results stay reproducible).

Packing must reproduce the file's weights bit for bit; every kernel path this host can run
(avx512, avx512-novnni, avx2, portable) must equal the NumPy oracle up to float32 rounding,
and the oracle must stay within its stated table-rounding bound of the float truth
``dequantize(W) @ x``. The AVX-512 forms are also compiled (never run) for an AVX-512 CPU, so
a host without AVX-512 still checks that their IR is valid and has the planned instruction
mix. Inputs are fresh random data each session; the seed is in every failure message
(``EMBER_TEST_SEED`` pins it).
"""

from __future__ import annotations

import collections
import os
import secrets
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from ember.formats.quants import dequantize
from ember.lut_kernels import codegen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/
from bench.experiments import planes as P  # noqa: E402

SEED = int(os.environ.get("EMBER_TEST_SEED", secrets.randbits(32)))
KERNELS = [k for k in codegen.host_isas() if k != "neon"]
# kernel vs oracle, per row: float32 sums against float64 (measured <= 1e-7 of sum |terms|)
ORACLE_RTOL = 1e-6


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def _shapes(qt):
    u = P.spec(qt).unit
    return [(1, u), (7, 2 * u), (37, 3 * u), (64, max(u, 576 // u * u))]


CASES = [(qt, n_out, n_in) for qt in P.QTYPES for n_out, n_in in _shapes(qt)]


@pytest.mark.parametrize("qt,n_out,n_in", CASES)
def test_packing_is_exact(qt, n_out, n_in, tmp_path):
    raw = P.random_rows(_rng("pack", qt, n_out, n_in), qt, n_out, n_in)
    p = P.pack_planes(raw, qt)
    w = dequantize(raw, qt).reshape(n_out, n_in)
    assert np.array_equal(p.dequantize().view(np.uint32), w.view(np.uint32)), f"seed={SEED}"
    assert p.codes.ctypes.data % 64 == 0
    assert p.gguf_nbytes == raw.nbytes
    np.savez(tmp_path / "p.npz", **p.arrays())
    with np.load(tmp_path / "p.npz") as z:
        p2 = P.PackedPlanes.from_arrays(z)
    assert np.array_equal(p2.dequantize(), p.dequantize())


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("qt,n_out,n_in", CASES)
def test_kernels_match_the_oracle_and_the_truth(qt, n_out, n_in, bits):
    rng = _rng("mv", qt, n_out, n_in, bits)
    raw = P.random_rows(rng, qt, n_out, n_in)
    p = P.pack_planes(raw, qt)
    x = (rng.standard_normal(n_in) * rng.uniform(0.1, 10)).astype(np.float32)
    ref, absum, bound = P.planes_matvec_reference(x, p, bits, return_scale=True)
    truth = dequantize(raw, qt).reshape(n_out, n_in).astype(np.float64) @ x.astype(np.float64)
    slack = 1e-5 * absum + 1e-30  # float32 rounding of the sums
    assert np.all(np.abs(ref - truth) <= bound + slack), f"seed={SEED}"
    for kernel in KERNELS:
        for threads in (1, 2):
            y = P.planes_matvec(x, p, kernel=kernel, threads=threads, table_bits=bits)
            err = np.abs(y - ref)
            assert y.shape == (n_out,) and np.all(err <= ORACLE_RTOL * absum + 1e-30), (
                f"seed={SEED} {kernel} threads={threads} max {np.max(err / absum):.2e}"
            )


def test_the_bound_is_tight_enough_to_mean_something():
    """16-bit tables: the oracle's error against the truth is a small part of the bound, and
    the bound itself a small part of the row's magnitude."""
    rng = _rng("tight")
    for qt in (P.Q2_K, P.TQ2_0, P.Q4_0):
        raw = P.random_rows(rng, qt, 64, 512)
        p = P.pack_planes(raw, qt)
        x = rng.standard_normal(512).astype(np.float32)
        ref, absum, bound = P.planes_matvec_reference(x, p, 16, return_scale=True)
        w = dequantize(raw, qt).reshape(64, 512).astype(np.float64)
        l1 = np.abs(w * x).sum(axis=1)
        assert np.all(bound <= 2e-3 * l1), f"seed={SEED}"
        assert np.all(np.abs(ref - w @ x) <= 1e-4 * l1), f"seed={SEED}"


@pytest.mark.parametrize(
    "form,cpu",
    [
        ((64, "permb", "vnni"), "icelake-server"),
        ((64, "shuf4", "maddubs"), "skylake-avx512"),
        ((32, "shuf4", "maddubs"), "haswell"),
    ],
)
@pytest.mark.parametrize("qt", P.QTYPES)
def test_every_form_compiles_to_its_instruction_mix(qt, form, cpu):
    """Lookups and dot products per (16 rows, 32-block): permb 2 bits x 2 nibbles x 2 table
    bytes each; shuf4 4 times the lookups. No register spills in the zmm forms."""
    asm = P.kernel_asm(qt, form, cpu)
    ops = collections.Counter(
        ln.split()[0] for ln in asm.splitlines() if ln.startswith("\t") and not ln.lstrip().startswith(".")
    )
    s = P.spec(qt)
    per_block = 4 * s.bits * (1 if form[1] == "permb" else 4) * (64 // form[0])
    blocks = s.unit // 32
    look = ops["vpermb"] if form[1] == "permb" else ops["vpshufb"]
    dots = ops["vpdpbusd"] if form[2] == "vnni" else ops["vpmaddubsw"]
    assert look == per_block * blocks and dots == per_block * blocks, ops
    if form[0] == 64:
        assert "Spill" not in asm


def test_bad_input():
    rng = _rng("bad")
    p = P.pack_planes(P.random_rows(rng, P.Q2_K, 5, 512), P.Q2_K)
    with pytest.raises(ValueError):
        P.planes_matvec(np.ones(256, np.float32), p)
    with pytest.raises(ValueError):
        P.planes_matvec(np.ones(512, np.float32), p, out=np.empty(6, np.float32))
    with pytest.raises(ValueError):
        P.pack_planes(np.zeros((3, 83), np.uint8), P.Q2_K)  # not whole blocks
    with pytest.raises(ValueError):
        P.pack_planes(np.zeros((3, 34), np.uint8), 8)  # Q8_0: no planes
    a = p.arrays()
    a["codes"] = a["codes"][:, :1]
    with pytest.raises(ValueError):
        P.PackedPlanes.from_arrays(a)
    with pytest.raises(ValueError):
        P.PackedPlanes.from_arrays({"codes": p.codes})
