"""The K-quant (Q2_K..Q6_K) int8-activation matvec and small-batch matmul
(ember.lut_kernels.kquant).

Every kernel path this host can run (avx512, avx512-novnni, avx2, portable) is checked against the
NumPy oracle (same int8 activations, exact integer dots: tight) and the oracle against the float
truth ``dequantize(W) @ x`` (the guaranteed activation-quantization bound). Inputs are fresh
random data each session (never zeros); the seed is in every failure message and can be pinned
with ``EMBER_TEST_SEED``.
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
from ember.lut_kernels import codegen, kquant_ir, kquant_layout, q8
from ember.lut_kernels import kquant as K
from ember.lut_kernels.kquant_reference import kq_matmul_reference, quantize_x_reference
from ember.lut_kernels.split import MIN_ROWS

SEED = int(os.environ.get("EMBER_TEST_SEED", secrets.randbits(32)))
KERNELS = [k for k in codegen.host_isas() if k != "neon"]
NATIVE = [k for k in KERNELS if k != "portable"]
QTYPES = list(K.QTYPES)
# kernel vs oracle, per output: float32 rounding only (measured <= 1.5e-7 of the sum of the
# |terms| of the row); asserted 1e-5
ORACLE_RTOL = 1e-5


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(repr(key).encode())])


def _msg(**kw) -> str:
    return f"seed={SEED} " + " ".join(f"{k}={v}" for k, v in kw.items())


def random_raw(rng, qt: int, n_out: int, n_in: int) -> np.ndarray:
    """GGUF rows: random code / scale bytes, non-zero f16 super-block scales of both signs."""
    return K.random_kquant(rng, qt, n_out, n_in)


def random_ternary(rng, qt: int, n_out: int, n_in: int) -> np.ndarray:
    """GGUF TQ1_0 / TQ2_0 rows: random code bytes, f16 block scales ~1e-2 of random sign."""
    _, bb, off = q8.EXACT_INT8[qt]  # block bytes, offset of d
    nb = n_in // 256
    raw = rng.integers(0, 256, (n_out, nb, bb), dtype=np.uint8)
    v = rng.uniform(0.5, 1.5, (n_out, nb)) * rng.choice([-1.0, 1.0], (n_out, nb)) * 1e-2
    raw[:, :, off : off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(n_out, nb * bb)


def random_x(rng, k: int, n: int) -> np.ndarray:
    x = (rng.standard_normal((k, n)) * rng.uniform(0.1, 10, (k, 1))).astype(np.float32)
    x[x == 0] = 0.5
    return x


@functools.cache
def case(qt: int, n_out: int, n_in: int, k: int):
    rng = _rng("case", qt, n_out, n_in, k)
    raw = random_raw(rng, qt, n_out, n_in)
    x = random_x(rng, k, n_in)
    p = K.pack_kquant(raw, qt)
    ref, absum, bound = kq_matmul_reference(x, p, return_scale=True)
    w = dequantize(raw, qt).reshape(n_out, n_in).astype(np.float64)
    truth = x.astype(np.float64) @ w.T
    return raw, x, p, ref, absum, bound, truth


# ---------------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("n_out,n_in", [(1, 256), (7, 512), (65, 1536)])
def test_pack_matches_dequantize(qt, n_out, n_in):
    raw = random_raw(_rng("pack", qt, n_out, n_in), qt, n_out, n_in)
    p = K.pack_kquant(raw, qt)
    assert (p.qtype, p.n_out, p.n_in, p.nsb) == (qt, n_out, n_in, n_in // 256)
    rows = n_out + n_out % 2 if qt in (K.Q4_K, K.Q5_K) else n_out  # row pairs: a zero row
    for a in (p.q, p.sc, p.d):
        assert a.flags.c_contiguous and a.shape[0] == rows
    assert p.q.ctypes.data % 64 == 0
    # bytes read per row: Q2_K / Q6_K exactly the GGUF size, the others + 4 bytes per
    # super-block (12 packed 6-bit scale bytes become 16)
    extra = 0 if qt in (K.Q2_K, K.Q6_K) else 4
    assert p.nbytes == (p.gguf_nbytes // n_out + extra * (n_in // 256)) * rows
    assert p.nbytes / rows <= 1.037 * p.gguf_nbytes / n_out
    deq = p.dequantize()
    assert deq.dtype == np.float32 and deq.shape == (n_out, n_in)
    assert np.array_equal(deq.view(np.uint32), dequantize(raw, qt).reshape(n_out, n_in).view(np.uint32)), _msg(qt=qt)


def _ggml_block(qt: int, blk: bytes):
    """(codes, scales, mins) of one GGUF super-block, weight by weight as ggml-quants.c's
    dequantize_row_* reads it: weight = scale * code - min (Q3_K / Q6_K: code already minus
    its offset; min 0). Plain Python, independent of the packing code."""
    f16 = lambda o: float(np.frombuffer(blk[o : o + 2], np.float16)[0])  # noqa: E731
    code, scale, mn = [0] * 256, [0.0] * 256, [0.0] * 256
    if qt in (K.Q4_K, K.Q5_K):
        d, dmin, sc12 = f16(0), f16(2), blk[4:16]
        qs = blk[16:144] if qt == K.Q4_K else blk[48:176]
        for j in range(8):
            if j < 4:
                s_, m_ = sc12[j] & 63, sc12[j + 4] & 63
            else:
                s_ = (sc12[j + 4] & 0xF) | ((sc12[j - 4] >> 6) << 4)
                m_ = (sc12[j + 4] >> 4) | ((sc12[j] >> 6) << 4)
            for l in range(32):
                c = (qs[32 * (j // 2) + l] >> (4 * (j % 2))) & 15
                if qt == K.Q5_K:
                    c |= ((blk[16 + l] >> j) & 1) << 4
                code[32 * j + l], scale[32 * j + l], mn[32 * j + l] = c, d * s_, dmin * m_
    elif qt == K.Q2_K:
        d, dmin = f16(80), f16(82)
        for w in range(256):
            h, s_, l = w // 128, (w % 128) // 32, w % 32
            g = w // 16
            code[w] = (blk[16 + 32 * h + l] >> (2 * s_)) & 3
            scale[w], mn[w] = d * (blk[g] & 15), dmin * (blk[g] >> 4)
    elif qt == K.Q3_K:
        d, sc12 = f16(108), blk[96:108]
        for w in range(256):
            h, s_, l = w // 128, (w % 128) // 32, w % 32
            g = w // 16
            lo = (sc12[g % 8] >> (4 * (g // 8))) & 15
            hi = (sc12[8 + g % 4] >> (2 * (g // 4))) & 3
            hbit = (blk[l] >> (w // 32)) & 1
            code[w] = ((blk[32 + 32 * h + l] >> (2 * s_)) & 3) - (0 if hbit else 4)
            scale[w] = d * ((lo | (hi << 4)) - 32)
    else:
        d = f16(208)
        for w in range(256):
            h, s_, l = w // 128, (w % 128) // 32, w % 32
            ql = (blk[64 * h + 32 * (s_ % 2) + l] >> (4 * (s_ // 2))) & 15
            qh = (blk[128 + 32 * h + l] >> (2 * s_)) & 3
            code[w] = (ql | (qh << 4)) - 32
            scale[w] = d * np.int8(np.uint8(blk[192 + w // 16]))
    return code, scale, mn


@pytest.mark.parametrize("qt", QTYPES)
def test_codes_roundtrip(qt):
    """The natural-order codes and scales come back exactly from the kernel layout (checked
    against a weight-by-weight reading of the ggml block format)."""
    raw = random_raw(_rng("codes", qt), qt, 3, 512)
    p = K.pack_kquant(raw, qt)
    SC, MM = p.scales()
    codes = p.codes().astype(np.int64).reshape(3, 2, 256) - (kquant_layout.OFFSET[qt] if MM is None else 0)
    gw = 256 // SC.reshape(3, 2, -1).shape[2]
    SC = np.repeat(SC.reshape(3, 2, -1), gw, axis=2)
    MM = np.zeros_like(SC) if MM is None else np.repeat(MM.reshape(3, 2, -1), gw, axis=2)
    bb = raw.shape[1] // 2
    for r in range(3):
        for s_ in range(2):
            c, sc, mn = _ggml_block(qt, bytes(raw[r, bb * s_ : bb * (s_ + 1)]))
            m = _msg(qt=qt, r=r, s=s_)
            assert codes[r, s_].tolist() == c, m
            assert np.array_equal(SC[r, s_], np.array(sc, np.float32)), m
            assert np.array_equal(MM[r, s_], np.array(mn, np.float32)), m


@pytest.mark.parametrize("qt", QTYPES)
def test_packing_in_pieces_of_rows_is_packing_whole(qt, monkeypatch):
    """A large matrix packs PACK_ROWS rows at a time (bounded temporaries): the same arrays as
    packing it whole, an odd last piece included (Q4_K/Q5_K: a pair's zero row)."""
    raw = random_raw(_rng("pieces", qt), qt, 201, 512)
    whole = K.pack_kquant(raw, qt)
    monkeypatch.setattr(kquant_layout, "PACK_ROWS", 64)
    pieces = K.pack_kquant(raw, qt)
    assert (pieces.n_out, pieces.n_in) == (201, 512) and pieces.q.ctypes.data % 64 == 0
    for a, b in ((pieces.q, whole.q), (pieces.sc, whole.sc), (pieces.d, whole.d)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("qt", QTYPES)
def test_pack_savez_roundtrip(tmp_path, qt):
    _, x, p, ref, *_ = case(qt, 64, 512, 3)
    np.savez(tmp_path / "w.npz", **p.arrays())
    with np.load(tmp_path / "w.npz") as z:
        p2 = K.PackedKQ.from_arrays(z)
    assert (p2.n_out, p2.n_in, p2.qtype) == (p.n_out, p.n_in, p.qtype)
    for a, b in ((p2.q, p.q), (p2.sc, p.sc), (p2.d, p.d)):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    assert np.array_equal(K.kq_matmul(x, p2), K.kq_matmul(x, p))


def test_from_arrays_rejects_bad_input():
    _, _, p, *_ = case(K.Q4_K, 7, 512, 1)
    good = p.arrays()
    K.PackedKQ.from_arrays(good)
    bad = [
        dict(good, q=good["q"][:, :-1]),
        dict(good, sc=good["sc"][:-1]),
        dict(good, d=good["d"].astype(np.float16)),
        dict(good, sc=good["sc"].view(np.int8)),  # Q4_K scales are uint8
        dict(good, meta=np.array([7, 500, K.Q4_K])),  # n_in not a multiple of 256
        dict(good, meta=np.array([7, 512, 2])),  # not a K-quant
        dict(good, meta=np.array([7, 512])),
        dict(good, meta=np.array([7, 768, K.Q4_K])),  # shapes disagree with meta
        {k: v for k, v in good.items() if k != "d"},
    ]
    for a in bad:
        with pytest.raises(ValueError):
            K.PackedKQ.from_arrays(a)


@pytest.mark.parametrize("qt", K.TERNARY)
@pytest.mark.parametrize("n_out,n_in", [(1, 256), (7, 768), (33, 512)])
def test_ternary_rows_become_exact_q2_k(qt, n_out, n_in):
    """TQ1_0 / TQ2_0 rows rewritten as Q2_K dequantize to the same numbers (a zero weight of a
    block with d < 0 is +0 here, -0 in the file), and run the Q2_K kernels."""
    rng = _rng("ternary", qt, n_out, n_in)
    raw = random_ternary(rng, qt, n_out, n_in)
    raw.reshape(n_out, -1)[0, -2:] = 0  # one block with d = 0
    q2 = K.ternary_as_q2_k(raw, qt)
    assert q2.shape == (n_out, n_in // 256 * 84)
    w = dequantize(raw, qt).reshape(n_out, n_in)
    assert np.array_equal(dequantize(q2, K.Q2_K).reshape(n_out, n_in), w), _msg(qt=qt)
    p = K.pack_kquant(q2, K.Q2_K)
    x = random_x(rng, 3, n_in)
    ref, absum, _ = kq_matmul_reference(x, p, return_scale=True)
    assert np.all(np.abs(K.kq_matmul(x, p) - ref) <= ORACLE_RTOL * absum + 1e-30), _msg(qt=qt)
    with pytest.raises(ValueError):
        K.ternary_as_q2_k(raw, K.Q2_K)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        K.pack_kquant(np.zeros((3, 145), np.uint8), K.Q4_K)
    with pytest.raises(ValueError):
        K.pack_kquant(np.zeros(210, np.uint8), K.Q6_K)
    with pytest.raises(ValueError):
        K.pack_kquant(np.zeros((2, 0), np.uint8), K.Q2_K)
    with pytest.raises(ValueError):
        K.pack_kquant(np.zeros((1, 34), np.uint8), 8)


# ---------------------------------------------------------------------------------------------
# the activation format


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_quantize_x(kernel, k):
    rng = _rng("qx", k)
    x = random_x(rng, k, 768)
    x[0, 64:96] = 0.0  # an all-zero block: scale 0, codes 0
    x[-1, 5] = -np.abs(x[-1, :32]).max() * 2  # a negative maximum
    xq, xd, xp = K.quantize_x(x, kernel=kernel)
    kp = k + k % 2
    assert xq.shape == (3, kp, 256) and xd.shape == (4, 3, kp, 16) and xp.shape == (3, kp, 16)
    assert xq.dtype == np.int8
    for a in (xq, xd, xp):
        assert a.flags.c_contiguous and a.ctypes.data % 64 == 0
    # the IR quantizer and the numba one agree bit for bit
    n = K.quantize_x(x, kernel="portable")
    for a, b in zip((xq, xd, xp), n, strict=True):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), _msg(kernel=kernel, k=k)
    rq, rdx, rxs = quantize_x_reference(x)
    # lane L holds 16-group 2 (L % 8) + L // 8: lanes p and p + 8 are 32-block p
    lane_group = np.array([2 * (L % 8) + L // 8 for L in range(16)])
    assert np.array_equal(kquant_layout.LANE_GROUP, lane_group)
    natural = np.argsort(lane_group)

    def per_group(a):  # [3 sb, kp, 16 lanes] -> [k, 48 16-groups] in natural order
        return a[:, :k].transpose(1, 0, 2)[:, :, natural].reshape(k, 48)

    # codes in the lane order; byte 64 v + 4 L + t = weight 16 g(L) + 4 v + t
    nat = xq.astype(np.int64).reshape(3, kp, 4, 16, 4).transpose(1, 0, 3, 2, 4)[:, :, natural]
    assert np.array_equal(nat.reshape(kp, 768)[:k], rq), _msg(k=k)
    assert (xq[:, k:] == 0).all() and (xd[:, :, k:] == 0).all() and (xp[:, k:] == 0).all()
    assert np.array_equal(per_group(xd[0]), np.repeat(rdx, 2, axis=1))
    # per 16-group: float32(dx * xsum16); the chain starts of the offset types: -4 and -32
    # times the 16-group sums, int32
    assert np.array_equal(per_group(xd[1]), np.repeat(rdx, 2, axis=1) * rxs.astype(np.float32))
    xi = xd.view(np.int32)
    for c, plane in ((-4, 2), (-32, 3)):
        assert np.array_equal(per_group(xi[plane]), c * rxs)
    # per 32-block, lanes p and p + 8: float32(dx * xsum32) of block p
    xs32 = rxs.reshape(k, 24, 2).sum(axis=2)
    want = (rdx * xs32.astype(np.float32)).reshape(k, 3, 8).transpose(1, 0, 2)
    assert np.array_equal(xp[:, :k], np.concatenate([want, want], axis=2))
    assert np.abs(rq.astype(int)).max() == 127 and rdx[0, 2] == 0 and not rq[0, 64:96].any()
    err = np.abs(x.reshape(k, 24, 32) - rq.reshape(k, 24, 32) * rdx[:, :, None])
    assert (err <= rdx[:, :, None] * (0.5 + 1e-5)).all(), _msg()


# ---------------------------------------------------------------------------------------------
# the kernels


def _check(y, qt, n_out, n_in, k, **kw):
    raw, x, p, ref, absum, bound, truth = case(qt, n_out, n_in, k)
    m = _msg(qt=qt, n_out=n_out, n_in=n_in, k=k, **kw)
    assert y.dtype == np.float32 and y.shape == (k, n_out), m
    assert (np.abs(y - ref) <= ORACLE_RTOL * absum + 1e-30).all(), m
    err = np.abs(y.astype(np.float64) - truth)
    assert (err <= bound + ORACLE_RTOL * absum).all(), m  # guaranteed
    assert np.abs(y).max() > 0, m


@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("n_out,n_in", [(1, 256), (7, 512), (64, 256), (65, 1536), (300, 512)])
def test_oracle_against_float_truth(qt, n_out, n_in):
    _, x, p, ref, absum, bound, truth = case(qt, n_out, n_in, 3)
    err = np.abs(ref.astype(np.float64) - truth)
    m = _msg(qt=qt, n_out=n_out, n_in=n_in)
    assert (err <= bound + 1e-7 * absum).all(), m
    # typical data: the error is a small part of the bound and of sum |w x|
    assert (err <= 0.5 * bound + 1e-7 * absum).all(), m


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize(
    "n_out,n_in,k",
    [
        (1, 256, 1),
        (7, 512, 2),
        (64, 256, 3),
        (65, 1536, 8),
        (300, 512, 16),
        (7, 2560, 16),
        (65, 768, 1),
        (1, 1536, 3),
        (64, 512, 8),
    ],
)
def test_matmul(kernel, qt, n_out, n_in, k):
    _, x, p, *_ = case(qt, n_out, n_in, k)
    y = K.kq_matmul(x, p, kernel=kernel)
    _check(y, qt, n_out, n_in, k, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qt", QTYPES)
def test_matvec_threads_and_out(kernel, qt):
    _, x, p, ref, absum, *_ = case(qt, 300, 512, 1)
    y1 = K.kq_matvec(x[0], p, kernel=kernel)
    _check(y1[None], qt, 300, 512, 1, kernel=kernel)
    for th in (2, 3):
        out = np.full(300, np.nan, np.float32)
        r = K.kq_matvec(x[0], p, out=out, threads=th, kernel=kernel)
        assert r is out
        if kernel == "portable":
            assert (np.abs(out - y1) <= ORACLE_RTOL * absum[0]).all(), _msg(threads=th)
        else:  # the same machine code on each row range
            assert np.array_equal(out, y1), _msg(kernel=kernel, threads=th)
    x64 = np.repeat(x[0].astype(np.float64), 2)[::2]  # strided float64: converted
    assert np.array_equal(K.kq_matvec(x64, p, kernel=kernel), y1)
    # matmul of one row == matvec; rows of a matmul == matmul of each row alone
    assert np.array_equal(K.kq_matmul(x[:1], p, kernel=kernel)[0], y1)


@pytest.mark.parametrize("kernel", NATIVE)
@pytest.mark.parametrize("qt", QTYPES)
def test_rows_independent_of_batch(kernel, qt):
    """Row i of a k-row matmul is bit-identical whatever the other rows and the chunking."""
    _, x, p, *_ = case(qt, 65, 768, 16)
    y = K.kq_matmul(x, p, kernel=kernel)
    for i in (0, 5, 15):
        assert np.array_equal(K.kq_matmul(x[i : i + 1], p, kernel=kernel)[0], y[i]), _msg(i=i)
    assert np.array_equal(K.kq_matmul(x[3:10], p, kernel=kernel), y[3:10])


@pytest.mark.parametrize("qt", QTYPES)
def test_rows_of_up_to_16_match_a_row_alone_over_many_tiles(qt):
    """Speculative verification's shape: a row among up to 16 (the fused step's batches) is
    bit-identical to the row alone even when n_in spans several tiles (56 super-blocks: more
    than a tile holds at any L1 size), so a verified token is the one plain decoding makes."""
    _, x, p, *_ = case(qt, 33, 256 * 56, 16)
    alone = np.stack([K.kq_matmul(x[i : i + 1], p)[0] for i in range(16)])
    for k in (3, 4, 8, 16):
        assert np.array_equal(K.kq_matmul(x[:k], p), alone[:k]), _msg(qt=qt, k=k)


@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize(
    "opts", [{"tile_bytes": 1}, {"nr": 2}, {"kb": 2}, {"prefetch": 0}, {"pipe": False}, {"group": 1}]
)
def test_kernel_variants(qt, opts):
    """Tiling, row blocks, act chunks, prefetch and pipelining change no result."""
    kernel = NATIVE[0] if NATIVE else pytest.skip("no native kernel on this host")
    for n_out, n_in, k in ((65, 2560, 13), (7, 512, 16)):
        _, x, p, *_ = case(qt, n_out, n_in, k)
        fn = K.fn_address(qt, kernel, **opts)
        y = np.empty((k, n_out), np.float32)
        K.matmul_nb(fn, K.quant_address(kernel), x, p.q, p.sc, p.d, y)
        _check(y, qt, n_out, n_in, k, opts=opts)


@pytest.mark.parametrize("qt", QTYPES)
def test_extreme_codes_and_activations(qt):
    """Codes at both ends, activations at +-127 and an all-zero block: every path stays exact
    (no int16 saturation in the vpmaddubsw paths, no wrap in the weight sums)."""
    rng = _rng("extreme", qt)
    n_out, n_in = 8, 512
    raw = random_raw(rng, qt, n_out, n_in)
    r3 = raw.reshape(n_out, 2, -1)
    # (code bytes, scale bytes): every code at its top on even rows, at 0 on odd rows, with
    # the scales (and mins) that make the largest products
    codes, scales = {
        K.Q2_K: ((16, 80), (0, 16)),
        K.Q3_K: ((0, 96), (96, 108)),
        K.Q4_K: ((16, 144), (4, 16)),
        K.Q5_K: ((16, 176), (4, 16)),
        K.Q6_K: ((0, 192), (192, 208)),
    }[qt]
    r3[0::2, :, codes[0] : codes[1]] = 0xFF
    r3[1::2, :, codes[0] : codes[1]] = 0x00
    if qt == K.Q6_K:
        r3[:, :, 192:208] = np.array([-128, 127] * 8, np.int8).view(np.uint8)
    elif qt == K.Q3_K:  # scales 31 (even rows), -32 (odd rows)
        r3[0::2, :, 96:108] = 0xFF
        r3[1::2, :, 96:108] = 0x00
    else:  # scales and mins at their maximum
        r3[:, :, scales[0] : scales[1]] = 0xFF
    p = K.pack_kquant(raw, qt)
    x = np.empty((4, n_in), np.float32)
    x[0] = 3.0  # +127 everywhere
    x[1] = -3.0  # -127 everywhere
    x[2] = np.where(np.arange(n_in) % 2, 2.0, -2.0)
    x[3] = random_x(rng, 1, n_in)[0]
    x[3, 32:64] = 0
    ref, absum, bound = kq_matmul_reference(x, p, return_scale=True)
    truth = x.astype(np.float64) @ dequantize(raw, qt).reshape(n_out, n_in).T.astype(np.float64)
    for kernel in KERNELS:
        y = K.kq_matmul(x, p, kernel=kernel)
        assert (np.abs(y - ref) <= ORACLE_RTOL * absum).all(), _msg(kernel=kernel)
        assert (np.abs(y - truth) <= bound + ORACLE_RTOL * absum).all(), _msg(kernel=kernel)


def test_shape_errors():
    _, x, p, *_ = case(K.Q4_K, 7, 512, 2)
    with pytest.raises(ValueError):
        K.kq_matvec(x[0, :256], p)  # wrong n_in
    with pytest.raises(ValueError):
        K.kq_matvec(x[0, :300], p)  # not a multiple of 256
    with pytest.raises(ValueError):
        K.kq_matvec(x[0], p, out=np.empty(8, np.float32))
    with pytest.raises(ValueError):
        K.kq_matvec(x[0], p, out=np.empty(7, np.float64))
    with pytest.raises(ValueError):
        K.kq_matmul(x, p, out=np.empty((3, 7), np.float32))
    with pytest.raises(ValueError):
        K.kq_matmul(x[:0], p)  # k = 0
    with pytest.raises(ValueError):
        K.kq_matmul(x[:, : 512 - 256], p, kernel="portable")
    with pytest.raises(ValueError):
        K.kq_matmul(np.zeros((2, 2, 512), np.float32), p)
    with pytest.raises(ValueError):
        K.fn_address(8)


def test_numba_callers():
    _, x, p, *_ = case(K.Q6_K, 64, 512, 3)
    fn, fq = K.fn_address(K.Q6_K), K.quant_address()

    @njit
    def twice(fn, fq, x, q, sc, d, out):
        K.matmul_nb(fn, fq, x, q, sc, d, out)
        out *= 2

    @njit
    def by_rows(fn, fq, x, q, sc, d, out):
        xq, xd, xp = K.quantize_x_alloc(x, fq)
        for r in range(0, q.shape[0], 10):  # in row ranges, as a scheduler would
            K.rows_nb(fn, q, sc, d, xq, xd, xp, out, r, min(r + 10, q.shape[0]))

    out = np.empty((3, 64), np.float32)
    twice(fn, fq, x, p.q, p.sc, p.d, out)
    assert np.array_equal(out, 2 * K.kq_matmul(x, p))
    by_rows(fn, fq, x, p.q, p.sc, p.d, out)
    assert np.array_equal(out, K.kq_matmul(x, p))

    @njit
    def by_odd_rows(fn, fq, x, q, sc, d, out, step):
        xq, xd, xp = K.quantize_x_alloc(x, fq)
        out[:] = np.nan
        for r in range(0, out.shape[1], step):
            K.rows_nb(fn, q, sc, d, xq, xd, xp, out, r, min(r + step, out.shape[1]))

    # row-pair types: ranges that start and end inside a pair, an odd row count
    for qt in (K.Q4_K, K.Q5_K):
        _, x, p, ref, absum, *_ = case(qt, 37, 512, 3)
        for kern in KERNELS:
            fn = K.fn_address(qt, kern)
            out = np.empty((3, 37), np.float32)
            for step in (1, 3, 7, 37):
                by_odd_rows(fn, fq, x, p.q, p.sc, p.d, out, step)
                assert (np.abs(out - ref) <= ORACLE_RTOL * absum).all(), _msg(kern=kern, step=step)
        # threads: a batch (row ranges from split) and a few rows (prange), odd boundaries
        for k in (3, MIN_ROWS + 1):
            X = random_x(_rng("odd", qt, k), k, 512)
            one = K.kq_matmul(X, p)
            for th in (2, 3):
                assert np.array_equal(K.kq_matmul(X, p, threads=th), one), _msg(k=k, th=th)


def test_env_var_selects_kernel(monkeypatch):
    _, x, p, ref, absum, *_ = case(K.Q4_K, 64, 512, 2)
    try:
        for k in KERNELS:
            monkeypatch.setenv("EMBER_KERNEL", k)
            K.reset_kernel_choice()
            assert (K.fn_address(K.Q4_K) == 0) == (k == "portable")
            assert (K.quant_address() == 0) == (k == "portable")
            y = K.kq_matmul(x, p)
            assert (np.abs(y - ref) <= ORACLE_RTOL * absum).all(), _msg(kernel=k)
        monkeypatch.setenv("EMBER_KERNEL", "sse9")
        K.reset_kernel_choice()
        with pytest.raises(ValueError):
            K.kq_matmul(x, p)
    finally:
        monkeypatch.delenv("EMBER_KERNEL")
        K.reset_kernel_choice()


@pytest.mark.skipif("avx512" not in KERNELS, reason="host has no AVX-512BW")
def test_x86_assembly_uses_the_intended_instructions():
    asm = K.kernel_asm("avx512", width=64, pipe=True)
    body = asm[asm.index("kq_q4_k.r1c") :]  # the chunk functions and the dispatchers
    assert "zmm" in body and "prefetch" in body
    if codegen.host_features().get("avx512vnni"):
        assert "vpdpbusd" in body
    else:
        assert "vpmaddubsw" in body
    assert "vbroadcasti64x4" in body and "vcvtph2ps" in body  # row pairs: act halves
    if codegen.host_features().get("avx512vnni") and codegen.host_features().get("avx512vl"):
        y = K.kernel_asm("avx512", width=32)
        y = y[y.index("kq_q4_k.r1c8:") : y.index(".Lfunc_end", y.index("kq_q4_k.r1c8:"))]
        dots = [ln for ln in y.splitlines() if ln.split()[:1] == ["vpdpbusd"]]
        assert len(dots) >= 64 and all("ymm" in ln and "zmm" not in ln for ln in dots)
    for qt in (K.Q2_K, K.Q3_K, K.Q5_K, K.Q6_K):
        nm = kquant_layout.NAMES[qt]
        asm2 = K.kernel_asm("avx2", what=qt)
        body2 = asm2[asm2.index(f"kq_{nm}.r1c") :]
        assert "vpmaddubsw" in body2 and "vpmaddwd" in body2 and "zmm" not in body2, nm
        body = K.kernel_asm("avx512", what=qt)
        assert "zmm" in body and "vpdpbusd" in body or "vpmaddubsw" in body, nm


def test_tile_follows_the_l1d(tmp_path, monkeypatch):
    """The act tile is 3/4 of the host's L1D, read from sysfs (the 48 KB default otherwise)."""
    for name, level, kind, size in (
        ("index0", 1, "Instruction", "64K"),
        ("index1", 1, "Data", "32K"),
        ("index2", 2, "Unified", "1024K"),
    ):
        d = tmp_path / name
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert codegen.l1d_bytes(root=str(tmp_path)) == 32 << 10
    assert codegen.l1d_bytes(root=str(tmp_path / "missing")) == 48 << 10
    (tmp_path / "index1" / "size").write_text("garbage\n")
    codegen.l1d_bytes.cache_clear()  # read once per root and process
    assert codegen.l1d_bytes(root=str(tmp_path)) == 48 << 10
    monkeypatch.setattr(codegen, "l1d_bytes", lambda: 32 << 10)
    assert K.tile_bytes() == 24576
    assert K.host_opts("avx512", K.Q6_K)["tile_bytes"] == 24576
    monkeypatch.setattr(codegen, "l1d_bytes", lambda: 48 << 10)
    assert K.tile_bytes() == kquant_ir.DEFAULT_TILE_BYTES


@pytest.mark.skipif(
    "avx512" not in KERNELS
    or not codegen.host_features().get("avx512vl")
    or not codegen.host_features().get("avx512vnni"),
    reason="host has no AVX-512 VNNI/VL",
)
@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("opts", [{}, {"width": 32}, {"width": 32, "pipe": False}])
def test_vector_widths_match_the_oracle(qt, opts):
    """The ymm chunk functions of 2+ act rows (the form AMD Zen hosts run for Q4_K and Q5_K) and
    the zmm ones, on any AVX-512 VNNI host: odd shapes, k across the chunk sizes, several
    tiles. For the row pairs, within one tile, a row's result is bit-identical whatever k."""
    fq = K.quant_address()

    def mm(fn, x, n_out):
        out = np.empty((x.shape[0], n_out), np.float32)
        K.matmul_nb(fn, fq, np.ascontiguousarray(x), p.q, p.sc, p.d, out)
        return out

    fn = K.fn_address(qt, tile_bytes=4096, **opts)
    one_tile = K.fn_address(qt, tile_bytes=1 << 24, **opts)
    for n_out, n_in, k in ((37, 1536, 1), (64, 2048, 3), (9, 768, 8), (33, 512, 17)):
        _, x, p, ref, absum, *_ = case(qt, n_out, n_in, k)
        out = mm(fn, x, n_out)
        assert (np.abs(out - ref) <= ORACLE_RTOL * absum).all(), _msg(qt=qt, opts=opts, k=k)
        if qt in (K.Q4_K, K.Q5_K) or not opts:
            out = mm(one_tile, x, n_out)
            for i in {0, k // 2, k - 1}:
                one = mm(one_tile, x[i : i + 1], n_out)[0]
                assert np.array_equal(one, out[i]), _msg(qt=qt, opts=opts, i=i)


def test_zen4_hosts_run_row_pairs_on_ymm(monkeypatch):
    """On AMD Zen 4 (with AVX-512 VNNI/VL), whose 512-bit ops run as two halves, the Q4_K/Q5_K
    modules compile their chunks of 2+ act rows for ymm; elsewhere (Zen 5 included), and for
    the other types, the path's own width."""
    feats = {"avx512vl": True, "avx512vnni": True, "avx512f": True, "avx512bw": True}
    monkeypatch.setattr(codegen, "host_features", lambda: feats)
    for host, ymm in (("znver4", True), ("znver5", False), ("sapphirerapids", False)):
        monkeypatch.setattr(codegen.llvm, "get_host_cpu_name", lambda h=host: h)
        for qt in K.QTYPES:
            o = K.host_opts("avx512", qt)
            assert (o.get("width") == 32) == (ymm and qt in (K.Q4_K, K.Q5_K))
        assert "width" not in K.host_opts("avx2", K.Q4_K)
    with pytest.raises(ValueError):
        K.kernel_ir("avx2", what=K.Q4_K, width=64)
