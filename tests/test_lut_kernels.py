"""The 4-bit table-lookup matvec (ember.lut_kernels.{pack,codegen,tmac}).

Every kernel path this host can run (avx512, avx512-novnni, avx2, portable) is checked against
the NumPy oracle (same tables, same integer sums: tight) and against the float truth
``dequantize(W) @ x`` (the stated table-quantization tolerance). Inputs are fresh random data
each session (never zeros); the seed is in every failure message and can be pinned with
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
from ember.lut_kernels import codegen, pack, tmac, tmac_ir
from ember.lut_kernels.pack import Q4_0, Q4_1

SEED = int(os.environ.get("EMBER_TEST_SEED", secrets.randbits(32)))
KERNELS = [k for k in codegen.host_isas() if k != "neon"]
N_OUT = [1, 7, 64, 100, 576, 1536]
N_IN = [32, 96, 576, 1536]
# kernel vs oracle: float32 block sums against float64 (measured <= 2.2e-7 of sum |terms|)
ORACLE_RTOL = 1e-6
# kernel vs float truth. Per row, |err| / sum_j |w_j x_j| (measured max: 16-bit 2e-5, 8-bit 6e-3);
# per matrix with >= 64 rows, max |err| / max |y| (measured max: 16-bit 3e-5, 8-bit 7e-3).
TRUTH_L1_RTOL = {16: 1e-4, 8: 2e-2}
TRUTH_RTOL = {16: 2e-4, 8: 3e-2}


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def random_q4(rng, n_out: int, n_in: int, qtype: int) -> np.ndarray:
    """GGUF rows of random codes, with non-zero f16 scales (and mins)."""
    nb = n_in // 32
    bb = 18 if qtype == Q4_0 else 20
    raw = rng.integers(0, 256, (n_out, nb, bb), dtype=np.uint8)

    def f16(scale):
        v = rng.uniform(0.5, 1.5, (n_out, nb)) * rng.choice([-1.0, 1.0], (n_out, nb)) * scale
        return v.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)

    raw[:, :, 0:2] = f16(0.01)
    if qtype == Q4_1:
        raw[:, :, 2:4] = f16(0.05)
    return raw.reshape(n_out, nb * bb)


def random_x(rng, n: int) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32)
    x[x == 0] = 0.5
    return x


@functools.cache
def case(qtype: int, n_out: int, n_in: int, bits: int):
    """Random matrix + x, packed, with the oracle and the float truth (shared by all kernels)."""
    rng = _rng("case", qtype, n_out, n_in)
    raw = random_q4(rng, n_out, n_in, qtype)
    x = random_x(rng, n_in)
    p = pack.pack_q4(raw, qtype)
    ref, absum, bound = tmac.lut_matvec_reference(x, p, bits, return_scale=True)
    w = dequantize(raw, qtype).reshape(n_out, n_in).astype(np.float64)
    truth = w @ x.astype(np.float64)
    l1 = np.abs(w * x).sum(axis=1)
    return raw, x, p, ref, absum, bound, truth, l1


# ---------------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1])
@pytest.mark.parametrize("n_out,n_in", [(1, 32), (7, 96), (100, 576), (130, 1536)])
def test_pack_roundtrip(qtype, n_out, n_in):
    rng = _rng("pack", qtype, n_out, n_in)
    raw = random_q4(rng, n_out, n_in, qtype)
    p = pack.pack_q4(raw, qtype)
    nb, tile = n_in // 32, p.tile
    assert (p.n_out, p.n_in, p.qtype) == (n_out, n_in, qtype)
    assert p.codes.shape == (-(-n_out // tile), nb, 4, tile, 4) and p.codes.dtype == np.uint8
    assert p.dm.shape == (p.n_tiles, nb, 2 if qtype == Q4_1 else 1, tile)
    assert p.codes.ctypes.data % 64 == 0 and p.dm.ctypes.data % 64 == 0
    # bit for bit back to GGUF
    assert np.array_equal(pack.unpack_q4(p), raw), f"seed {SEED}"
    # and the layout means what the docstring says: nibbles and scales, row by row
    blk = raw.reshape(n_out, nb, -1)
    qs = blk[:, :, -16:]
    q = np.concatenate([qs & 15, qs >> 4], axis=2)  # [n_out, nb, 32] weights
    c = p.codes.transpose(0, 3, 1, 2, 4).reshape(-1, nb, 4, 4)[:n_out]  # [row, b, gp, plane]
    got = np.zeros_like(q)
    for gp in range(4):
        for j in range(4):
            for plane in range(4):
                got[:, :, 4 * gp + j] |= ((c[:, :, gp, plane] >> j) & 1) << plane
                got[:, :, 16 + 4 * gp + j] |= ((c[:, :, gp, plane] >> (4 + j)) & 1) << plane
    assert np.array_equal(got, q)
    d = blk[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    flat = p.dm.view(np.float16).astype(np.float32).transpose(0, 3, 1, 2).reshape(-1, nb, p.dm.shape[2])[:n_out]
    assert np.array_equal(flat[:, :, 0], d)
    if qtype == Q4_1:
        m = blk[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        assert np.array_equal(flat[:, :, 1], m)
        assert np.array_equal(p.m.transpose(0, 2, 1).reshape(-1, nb)[:n_out], m)
    else:
        assert p.m is None
    # padding rows are zero
    assert not p.codes.transpose(0, 3, 1, 2, 4).reshape(-1, nb, 16)[n_out:].any()
    assert not p.dm.transpose(0, 3, 1, 2).reshape(-1, nb * p.dm.shape[2])[n_out:].any()


def test_pack_savez_roundtrip(tmp_path):
    rng = _rng("savez")
    raw = random_q4(rng, 100, 96, Q4_1)
    p = pack.pack_q4(raw, Q4_1)
    np.savez(tmp_path / "w.npz", **p.arrays())
    with np.load(tmp_path / "w.npz") as f:
        q = pack.PackedQ4.from_arrays(f)
    assert (q.n_out, q.n_in, q.qtype, q.tile) == (100, 96, Q4_1, p.tile)
    assert np.array_equal(q.codes, p.codes) and np.array_equal(q.dm, p.dm)
    assert q.codes.ctypes.data % 64 == 0
    x = random_x(rng, 96)
    assert np.array_equal(tmac.lut_matvec(x, q), tmac.lut_matvec(x, p))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack.pack_q4(np.zeros((4, 19), np.uint8), Q4_0)
    with pytest.raises(ValueError):
        pack.pack_q4(np.zeros((4, 18), np.uint8), 8)  # Q8_0 is not a Q4 type
    with pytest.raises(ValueError):
        pack.pack_q4(np.zeros((4, 18), np.uint8), Q4_0, tile=24)


# ---------------------------------------------------------------------------------------------
# tables


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [8, 16])
def test_tables_match_reference(kernel, bits):
    rng = _rng("tables", kernel, bits)
    for n in (32, 96, 576, 1536):
        for scale in (1.0, 1e-4, 3e3):
            x = (random_x(rng, n) * scale).astype(np.float32)
            if n >= 96:
                x[32:64] = 0  # a zero block: scale 0, table 0
                x[64:68] = 0  # a zero group inside a live block
            t = tmac.build_tables(x, bits, kernel)
            q, sc, xs = tmac.build_tables_reference(x, bits)
            msg = f"seed {SEED} n {n} scale {scale}"
            assert np.array_equal(t.values, q), msg
            assert np.array_equal(t.scale, sc), msg
            assert np.array_equal(t.xsum, xs), msg
            qmax = 127 if bits == 8 else 32767
            assert np.abs(q).max() == qmax and (q[:, :, ::-1] == -q).all()  # mirror symmetric
            if n >= 96:
                assert sc[1] == 0 and not q[1].any()


# ---------------------------------------------------------------------------------------------
# the matvec


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qtype", [Q4_0, Q4_1])
@pytest.mark.parametrize("n_in", N_IN)
@pytest.mark.parametrize("n_out", N_OUT)
def test_matvec(kernel, qtype, n_out, n_in):
    for bits in (16, 8) if n_out * n_in <= 576 * 576 else (16,):
        raw, x, p, ref, absum, bound, truth, l1 = case(qtype, n_out, n_in, bits)
        y = tmac.lut_matvec(x, p, kernel=kernel, table_bits=bits)
        msg = f"seed {SEED} bits {bits}"
        assert y.shape == (n_out,) and y.dtype == np.float32
        # against the oracle: the same integers, float32 vs float64 block sums
        err = np.abs(y.astype(np.float64) - ref)
        assert (err <= ORACLE_RTOL * absum + 1e-30).all(), (msg, (err / absum).max())
        # against the float truth: the guaranteed table bound, and the typical relative error
        terr = np.abs(y.astype(np.float64) - truth)
        assert (terr <= 1.001 * bound + 1e-5 * absum).all(), (msg, (terr / bound).max())
        assert (terr <= TRUTH_L1_RTOL[bits] * l1).all(), (msg, (terr / l1).max())
        if n_out >= 64:
            assert terr.max() <= TRUTH_RTOL[bits] * np.abs(truth).max(), (msg, terr.max())


@pytest.mark.parametrize("kernel", KERNELS)
def test_threads_tables_and_out(kernel):
    raw, x, p, ref, absum, bound, truth, l1 = case(Q4_1, 576, 576, 16)
    y1 = tmac.lut_matvec(x, p, kernel=kernel)
    assert np.array_equal(tmac.lut_matvec(x, p, threads=2, kernel=kernel), y1)
    t = tmac.build_tables(x, kernel=kernel)
    assert np.array_equal(tmac.lut_matvec_tables(t, p, kernel=kernel), y1)
    assert np.array_equal(tmac.lut_matvec_tables(t, p, threads=2, kernel=kernel), y1)
    out = np.full(576, np.nan, np.float32)
    assert tmac.lut_matvec(x, p, out=out, kernel=kernel) is out and np.array_equal(out, y1)
    # float64 / strided x is converted
    assert np.array_equal(tmac.lut_matvec(x.astype(np.float64), p, kernel=kernel), y1)
    x2 = np.repeat(x, 2)[::2]
    assert np.array_equal(tmac.lut_matvec(x2, p, kernel=kernel), y1)
    # a partial last tile with threads
    raw, x, p, ref, absum, bound, truth, l1 = case(Q4_0, 100, 96, 16)
    assert np.array_equal(tmac.lut_matvec(x, p, threads=2, kernel=kernel), tmac.lut_matvec(x, p, kernel=kernel))


def test_shape_errors():
    raw, x, p, *_ = case(Q4_0, 64, 96, 16)
    with pytest.raises(ValueError):
        tmac.lut_matvec(np.ones(64, np.float32), p)
    with pytest.raises(ValueError):
        tmac.lut_matvec(np.ones(100, np.float32), p)  # 96 + 4 stray values
    with pytest.raises(ValueError):
        tmac.lut_matvec(x, p, out=np.empty(200, np.float32))
    with pytest.raises(ValueError):
        tmac.lut_matvec(x, p, table_bits=4)


def test_numba_callers():
    """matvec_nb is callable from other numba code."""
    raw, x, p, *_ = case(Q4_1, 100, 576, 16)
    ftab, fk, bits = tmac.fn_addresses(Q4_1, p.tile)

    @njit
    def twice(ftab, fk, x, codes, dm, out, bits):
        tmac.matvec_nb(ftab, fk, x, codes, dm, out, bits)
        out *= 2

    out = np.empty(100, np.float32)
    twice(ftab, fk, x, p.codes, p.dm, out, bits)
    assert np.array_equal(out, 2 * tmac.lut_matvec(x, p))


def test_env_var_selects_kernel(monkeypatch):
    raw, x, p, ref, absum, *_ = case(Q4_1, 64, 96, 16)
    try:
        for k in KERNELS:
            monkeypatch.setenv("EMBER_KERNEL", k)
            tmac.reset_kernel_choice()
            assert codegen.select_kernel() == k
            y = tmac.lut_matvec(x, p)
            assert (np.abs(y - ref) <= ORACLE_RTOL * absum).all()
            ftab, fk, _ = tmac.fn_addresses(Q4_1, p.tile)
            assert (ftab == 0) == (k == "portable")
        monkeypatch.setenv("EMBER_KERNEL", "sse9")
        tmac.reset_kernel_choice()
        with pytest.raises(ValueError):
            tmac.lut_matvec(x, p)
    finally:
        monkeypatch.delenv("EMBER_KERNEL")
        tmac.reset_kernel_choice()
    assert codegen.select_kernel() == codegen.best_isa()


# ---------------------------------------------------------------------------------------------
# code generation


@pytest.mark.parametrize("bits", [8, 16])
def test_aarch64_object_compiles(bits):
    obj = tmac_ir.compile_object("neon", "aarch64-unknown-linux-gnu", table_bits=bits)
    assert obj[:4] == b"\x7fELF" and int.from_bytes(obj[18:20], "little") == 183  # EM_AARCH64
    for name in (b"tmac_tables", b"tmac_q4_0", b"tmac_q4_1"):
        assert name in obj
    asm = tmac_ir.compile_object("neon", table_bits=bits, asm=True)
    assert "tbl\t" in asm and "sdot\t" in asm


@pytest.mark.skipif("avx512" not in KERNELS, reason="host has no AVX-512BW")
def test_x86_assembly_uses_the_intended_instructions():
    asm = tmac_ir.kernel_asm("avx512", table_bits=16)
    body = asm.split("tmac_q4_1:")[1].split(".Lfunc_end")[0]
    assert body.count("vpshufb") == 64 and "zmm" in body  # 4 row vectors x 4 gp x 4 lookups
    assert ("vpdpbusd" in body) == codegen.host_features().get("avx512vnni", False)
    asm2 = tmac_ir.kernel_asm("avx2", table_bits=8)
    body2 = asm2.split("tmac_q4_1:")[1].split(".Lfunc_end")[0]
    assert "vpshufb" in body2 and "vpmaddubsw" in body2 and "zmm" not in body2


@pytest.mark.parametrize(
    "host, hint",
    [
        ("znver4", "prefetcht1"),
        ("znver3", "prefetcht1"),
        ("sapphirerapids", "prefetcht0"),
        ("skylake-avx512", "prefetcht0"),
    ],
)
def test_prefetch_hint_follows_the_host(monkeypatch, host, hint):
    """The weight streams' prefetches go to L2 (and >= 8 KiB ahead) on AMD Zen, to L1 elsewhere,
    for every ISA's module."""
    monkeypatch.setattr(codegen.llvm, "get_host_cpu_name", lambda: host)
    assert codegen.prefetch_locality() == (2 if hint == "prefetcht1" else 3)
    assert codegen.prefetch_bytes(2048) == (8192 if hint == "prefetcht1" else 2048)
    assert codegen.prefetch_bytes(16384) == 16384 and codegen.prefetch_bytes(0) == 0
    asm = tmac_ir.kernel_asm("avx2", table_bits=16)
    body = asm.split("tmac_q4_1:")[1].split(".Lfunc_end")[0]
    assert hint in body and {"prefetcht0", "prefetcht1"} - {hint} & set(body.split()) == set()
    assert "ember.prefetch" not in codegen.finish_module(["define void @f() #0 {", "  ret void", "}"], "", "")
