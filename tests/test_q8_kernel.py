"""The Q8_0 decode matvec (ember.lut_kernels.q8).

Every kernel path this host can run (avx512, avx512-novnni, avx2, portable) is checked against the
NumPy oracle (same int8 activations, exact integer block dots: tight) and against the float truth
``dequantize(W) @ x`` (the activation-quantization tolerance). Inputs are fresh random data each
session (never zeros); the seed is in every failure message and can be pinned with
``EMBER_TEST_SEED``.
"""

from __future__ import annotations

import functools
import os
import secrets
import zlib

import numpy as np
import pytest
from numba import njit

from ember.formats.quants import dequantize
from ember.lut_kernels import codegen, q8

SEED = int(os.environ.get("EMBER_TEST_SEED", secrets.randbits(32)))
KERNELS = [k for k in codegen.host_isas() if k != "neon"]
Q8_0 = 8
N_OUT = [1, 7, 64, 1000]
N_IN = [32, 96, 576]
# kernel vs oracle, per row: float32 accumulation order only (measured <= 6e-8 of sum |terms|)
ORACLE_RTOL = 1e-5


# kernel vs float truth, per row: |err| / sum_j |w_j x_j|. Measured max: n_in = 32: 7e-3 over
# 20 seeds, 1.1e-2 once in 300 seeds x 1000 rows (one block: the ratio's tail is wide);
# n_in = 96: 4.4e-3, 576: 1.4e-3 (20 seeds). The guaranteed bound is asserted as well.
def truth_l1_rtol(n_in: int) -> float:
    return 2e-2 if n_in < 64 else 1e-2


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def random_q8(rng, n_out: int, n_in: int) -> np.ndarray:
    """GGUF Q8_0 rows: random qs (all of -128..127), non-zero f16 scales of both signs."""
    nb = n_in // 32
    raw = rng.integers(0, 256, (n_out, nb, 34), dtype=np.uint8)
    d = rng.uniform(0.5, 1.5, (n_out, nb)) * rng.choice([-1.0, 1.0], (n_out, nb)) * 0.01
    raw[:, :, 0:2] = d.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * 34)


def random_x(rng, n: int) -> np.ndarray:
    x = (rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
    x[x == 0] = 0.5
    return x


@functools.cache
def case(n_out: int, n_in: int):
    rng = _rng("case", n_out, n_in)
    raw = random_q8(rng, n_out, n_in)
    x = random_x(rng, n_in)
    p = q8.pack_q8_0(raw)
    ref, absum, bound = q8.q8_matvec_reference(x, p, return_scale=True)
    w = dequantize(raw, Q8_0).reshape(n_out, n_in).astype(np.float64)
    truth = w @ x.astype(np.float64)
    l1 = np.abs(w * x).sum(axis=1)
    return raw, x, p, ref, absum, bound, truth, l1


def _msg(**kw) -> str:
    return f"seed={SEED} " + " ".join(f"{k}={v}" for k, v in kw.items())


# ---------------------------------------------------------------------------------------------
# packing and the activation quantization


@pytest.mark.parametrize("n_out,n_in", [(1, 32), (7, 96), (64, 576)])
def test_pack_matches_dequantize(n_out, n_in):
    raw, x, p, *_ = case(n_out, n_in)
    assert p.qs.dtype == np.int8 and p.qs.shape == (n_out, n_in) and p.qs.flags.c_contiguous
    assert p.d.dtype == np.uint16 and p.d.shape == (n_out, n_in // 32)
    assert p.nbytes == n_out * n_in + 2 * n_out * (n_in // 32)  # GGUF's bytes exactly
    assert np.array_equal(p.dequantize(), dequantize(raw, Q8_0).reshape(n_out, n_in))


def test_pack_savez_roundtrip(tmp_path):
    _, x, p, ref, *_ = case(64, 96)
    np.savez(tmp_path / "w.npz", **p.arrays())
    with np.load(tmp_path / "w.npz") as z:
        p2 = q8.PackedQ8.from_arrays(z)
    assert np.array_equal(p2.qs, p.qs) and np.array_equal(p2.d, p.d)
    assert (p2.n_out, p2.n_in) == (64, 96)
    assert np.array_equal(q8.q8_matvec(x, p2), q8.q8_matvec(x, p))


def random_exact_int8_blocks(rng, qtype: int, n_out: int, n_in: int) -> np.ndarray:
    """Random GGUF rows of a type in q8.EXACT_INT8: random code bytes (every code and high-bit
    pattern), random f16 scales ~1e-2 of random sign."""
    bw, bb, off = q8.EXACT_INT8[qtype]
    nb = n_in // bw
    raw = rng.integers(0, 256, (n_out, nb, bb), dtype=np.uint8)
    d = rng.uniform(0.5, 1.5, (n_out, nb)) * rng.choice([-1.0, 1.0], (n_out, nb)) * 1e-2
    raw[:, :, off : off + 2] = d.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * bb)


@pytest.mark.parametrize("qtype", sorted(q8.EXACT_INT8))
@pytest.mark.parametrize("n_out,n_in,chunk", [(1, 256, 4096), (7, 768, 3), (130, 512, 64)])
def test_exact_int8_packing(qtype, n_out, n_in, chunk):
    """TQ1_0 / TQ2_0 blocks become Q8_0 blocks that dequantize to the same float32
    bits, and the int8 kernels then match their oracle and the float truth as on Q8_0."""
    rng = _rng("exact", qtype, n_out, n_in)
    raw = random_exact_int8_blocks(rng, qtype, n_out, n_in)
    p = q8.pack_exact_int8(raw, qtype, chunk=chunk)
    assert p.qs.shape == (n_out, n_in) and p.d.shape == (n_out, n_in // 32)
    w = dequantize(raw, qtype).reshape(n_out, n_in)
    assert np.array_equal(p.dequantize(), w)
    x = random_x(rng, n_in)
    ref, absum, bound = q8.q8_matvec_reference(x, p, return_scale=True)
    got = q8.q8_matvec(x, p)
    assert np.all(np.abs(got - ref) <= 1e-5 * absum + 1e-30)
    truth = w.astype(np.float64) @ x.astype(np.float64)
    assert np.all(np.abs(ref - truth) <= bound * (1 + 1e-6) + 1e-6 * np.abs(w * x).sum(axis=1))


def test_exact_int8_packing_zero_scale_and_bad_input():
    rng = _rng("exact-zero")
    raw = random_exact_int8_blocks(rng, 34, 4, 512)
    raw.reshape(4, 2, 54)[1, 0, 52:54] = 0  # d = 0: a block of zeros (TQ1_0)
    p = q8.pack_exact_int8(raw, 34)
    assert np.array_equal(p.dequantize(), dequantize(raw, 34).reshape(4, 512))
    assert not p.qs[1, :256].any()
    with pytest.raises(ValueError):
        q8.pack_exact_int8(np.zeros((3, 55), np.uint8), 34)


def random_q5(rng, qtype: int, n_out: int, n_in: int) -> np.ndarray:
    """GGUF Q5_0 / Q5_1 rows: random code bytes (every 5-bit code), f16 scales ~1e-2 of both
    signs (Q5_1: and mins ~3e-2 of both signs)."""
    nb = n_in // 32
    bb = 22 if qtype == 6 else 24
    raw = rng.integers(0, 256, (n_out, nb, bb), dtype=np.uint8)
    for off, mag in ((0, 1e-2), (2, 3e-2))[: 1 if qtype == 6 else 2]:
        v = rng.uniform(0.5, 1.5, (n_out, nb)) * rng.choice([-1.0, 1.0], (n_out, nb)) * mag
        raw[:, :, off : off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * bb)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qtype", [6, 7])
@pytest.mark.parametrize("n_out,n_in", [(1, 32), (7, 96), (65, 576), (130, 896)])
def test_q5(kernel, qtype, n_out, n_in):
    """Q5_0 / Q5_1 in their 5-bit layout (``q5_0_rows`` / ``q5_1_rows``: the unsigned codes
    against the int8 activations, plus the mins, -16 d for Q5_0): the file's bytes (+20 per row
    for an odd block count), dequantize() gives the file's float32 weights bit for bit, and
    every path matches the oracle, with odd and even block counts."""
    rng = _rng("q5", qtype, n_out, n_in)
    raw = random_q5(rng, qtype, n_out, n_in)
    p = q8.pack_q5(raw, qtype)
    nb = n_in // 32
    assert p.q.shape == (n_out, 20 * (nb + nb % 2)) and p.q.dtype == np.uint8
    assert p.nbytes == raw.nbytes + 20 * n_out * (nb % 2)
    assert p.codes().max() <= 31 and (n_out < 7 or p.codes().max() == 31)
    w = dequantize(raw, qtype).reshape(n_out, n_in)
    assert np.array_equal(p.dequantize().view(np.uint32), w.view(np.uint32)), _msg()
    x = random_x(rng, n_in)
    ref, absum, bound = q8.q8_matvec_reference(x, p, return_scale=True)
    truth = w.astype(np.float64) @ x.astype(np.float64)
    assert np.all(np.abs(ref - truth) <= bound * (1 + 1e-6) + 1e-6 * absum), _msg()
    for threads in (1, 2):
        got = q8.q8_matvec(x, p, kernel=kernel, threads=threads)
        assert np.all(np.abs(got - ref) <= ORACLE_RTOL * absum + 1e-30), _msg(kernel=kernel)
    assert np.abs(ref).max() > 0


def test_q5_savez_roundtrip_and_bad_input(tmp_path):
    rng = _rng("q5-io")
    p = q8.pack_q5(random_q5(rng, 7, 9, 96), 7)
    np.savez(tmp_path / "w.npz", **p.arrays())
    with np.load(tmp_path / "w.npz") as z:
        p2 = q8.PackedQ5.from_arrays(z)
    assert p2.qtype == 7 and np.array_equal(p2.d, p.d) and np.array_equal(p2.q, p.q)
    x = random_x(rng, 96)
    assert np.array_equal(q8.q8_matvec(x, p2), q8.q8_matvec(x, p))
    good = p.arrays()
    for bad in (
        dict(good, d=good["d"][:, :-1]),
        dict(good, q=good["q"][:, :-1]),
        dict(good, meta=np.array([9, 96, 6])),
        {"q": good["q"], "d": good["d"]},
    ):
        with pytest.raises(ValueError):
            q8.PackedQ5.from_arrays(bad)
    with pytest.raises(ValueError):
        q8.pack_q5(np.zeros((3, 25), np.uint8), 7)
    with pytest.raises(ValueError):
        q8.pack_q5(np.zeros((3, 22), np.uint8), 8)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        q8.pack_q8_0(np.zeros((3, 33), np.uint8))
    with pytest.raises(ValueError):
        q8.pack_q8_0(np.zeros(68, np.uint8))


def test_quantize_x_matches_reference():
    rng = _rng("qx")
    x = random_x(rng, 576)
    x[64:96] = 0.0  # one all-zero block: scale 0, codes 0
    x[5] = -np.abs(x[:32]).max() * 2  # a negative maximum
    xq = np.empty(576, np.int8)
    dxv = np.full(16 * 18 + 40, np.nan, np.float32)  # a longer scratch buffer is fine
    q8.quantize_x_nb(x, xq, dxv)
    rq, rdx = q8.quantize_x_reference(x)
    assert np.array_equal(xq, rq), _msg()
    assert np.array_equal(dxv[: 8 * 18], np.repeat(rdx, 8)), _msg()
    dxs = dxv[8 * 18 : 16 * 18].reshape(18, 8)  # per block: float32(dx xsum), 7 zeros
    want = rdx * rq.reshape(18, 32).astype(np.int32).sum(axis=1).astype(np.float32)
    assert np.array_equal(dxs[:, 0], want) and not dxs[:, 1:].any(), _msg()
    assert np.abs(rq.astype(int)).max() == 127 and rdx[2] == 0 and not rq[64:96].any()
    # half a step: |x - xq * dx| <= dx / 2 (+ float32 rounding)
    err = np.abs(x.reshape(18, 32) - rq.reshape(18, 32) * rdx[:, None])
    assert (err <= rdx[:, None] * (0.5 + 1e-5)).all(), _msg()


# ---------------------------------------------------------------------------------------------
# the kernels


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n_in", N_IN)
@pytest.mark.parametrize("n_out", N_OUT)
def test_matvec(kernel, n_out, n_in):
    raw, x, p, ref, absum, bound, truth, l1 = case(n_out, n_in)
    y = q8.q8_matvec(x, p, kernel=kernel)
    assert y.dtype == np.float32 and y.shape == (n_out,)
    m = _msg(kernel=kernel, n_out=n_out, n_in=n_in)
    assert (np.abs(y - ref) <= ORACLE_RTOL * absum + 1e-30).all(), m
    err = np.abs(y.astype(np.float64) - truth)
    assert (err <= bound + ORACLE_RTOL * absum).all(), m  # guaranteed
    assert (err <= truth_l1_rtol(n_in) * l1).all(), m  # typical data
    assert np.abs(y).max() > 0, m


@pytest.mark.parametrize("kernel", KERNELS)
def test_threads_and_out(kernel):
    _, x, p, ref, absum, *_ = case(1000, 576)
    y1 = q8.q8_matvec(x, p, kernel=kernel)
    for th in (2, 3):
        out = np.full(1000, np.nan, np.float32)
        r = q8.q8_matvec(x, p, out=out, threads=th, kernel=kernel)
        assert r is out, _msg(kernel=kernel, threads=th)
        if kernel == "portable":  # (numba may contract to FMAs differently once inlined)
            assert (np.abs(out - y1) <= ORACLE_RTOL * absum).all(), _msg(threads=th)
        else:  # the same machine code on each row range
            assert np.array_equal(out, y1), _msg(kernel=kernel, threads=th)
    # a strided / float64 x is converted
    x64 = np.repeat(x.astype(np.float64), 2)[::2]
    assert np.array_equal(q8.q8_matvec(x64, p, kernel=kernel), y1)


def test_zero_block_and_extreme_weights():
    """An all-zero activation block, qs of -128 and 127 everywhere: every path stays exact."""
    rng = _rng("extreme")
    raw = random_q8(rng, 64, 96)
    r3 = raw.reshape(64, 3, 34)
    r3[::2, :, 2:] = 0x80  # -128
    r3[1::2, :, 2:] = 0x7F  # 127
    p = q8.pack_q8_0(raw)
    x = random_x(rng, 96)
    x[32:64] = 0
    x[0] = 100 * np.abs(x).max()
    ref, absum, bound = q8.q8_matvec_reference(x, p, return_scale=True)
    truth = dequantize(raw, Q8_0).reshape(64, 96).astype(np.float64) @ x.astype(np.float64)
    for k in KERNELS:
        y = q8.q8_matvec(x, p, kernel=k)
        assert (np.abs(y - ref) <= ORACLE_RTOL * absum).all(), _msg(kernel=k)
        assert (np.abs(y - truth) <= bound + ORACLE_RTOL * absum).all(), _msg(kernel=k)


def test_shape_errors():
    _, x, p, *_ = case(7, 96)
    with pytest.raises(ValueError):
        q8.q8_matvec(x[:64], p)
    with pytest.raises(ValueError):
        q8.q8_matvec(x, p, out=np.empty(8, np.float32))


def test_numba_callers():
    _, x, p, *_ = case(64, 576)
    fn = q8.fn_address()

    @njit
    def twice(fn, x, qs, d, out):
        q8.matvec_nb(fn, x, qs, d, out)
        out *= 2

    out = np.empty(64, np.float32)
    twice(fn, x, p.qs, p.d, out)
    assert np.array_equal(out, 2 * q8.q8_matvec(x, p))


def test_env_var_selects_kernel(monkeypatch):
    _, x, p, ref, absum, *_ = case(64, 96)
    try:
        for k in KERNELS:
            monkeypatch.setenv("EMBER_KERNEL", k)
            q8.reset_kernel_choice()
            assert (q8.fn_address() == 0) == (k == "portable")
            y = q8.q8_matvec(x, p)
            assert (np.abs(y - ref) <= ORACLE_RTOL * absum).all()
        monkeypatch.setenv("EMBER_KERNEL", "sse9")
        q8.reset_kernel_choice()
        with pytest.raises(ValueError):
            q8.q8_matvec(x, p)
    finally:
        monkeypatch.delenv("EMBER_KERNEL")
        q8.reset_kernel_choice()


@pytest.mark.skipif("avx512" not in KERNELS, reason="host has no AVX-512BW")
def test_x86_assembly_uses_the_intended_instructions():
    body = q8.kernel_asm("avx512").split("q8_rows:")[1]
    assert "zmm" in body and "prefetch" in body
    if codegen.host_features().get("avx512vnni"):
        assert "vpdpbusd" in body
    else:
        assert "vpmaddubsw" in body
    body2 = q8.kernel_asm("avx2").split("q8_rows:")[1]
    assert "vpmaddubsw" in body2 and "vpmaddwd" in body2 and "zmm" not in body2
