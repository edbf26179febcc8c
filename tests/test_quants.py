"""ember.formats.quants against gguf.quants: bit-identical float32 output for every supported type.

Every test draws fresh random blocks from a seed picked per run. The seed is printed in the
failure message, so a failure can be replayed with EMBER_QUANTS_SEED=<seed>.
"""

from __future__ import annotations

import os

import gguf.quants
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ember.errors import FormatError, UnsupportedError
from ember.formats import quants as q

SEED = int(os.environ.get("EMBER_QUANTS_SEED", np.random.SeedSequence().entropy % 2**32))
ERR = f"(replay with EMBER_QUANTS_SEED={SEED})"

TYPES = [
    T.F32,
    T.F16,
    T.BF16,
    T.Q4_0,
    T.Q4_1,
    T.Q5_0,
    T.Q5_1,
    T.Q8_0,
    T.Q2_K,
    T.Q3_K,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
    T.TQ1_0,
    T.TQ2_0,
]

# Byte offsets of the f16 scale fields within one block. This is test-data generation only:
# a wrong entry would leave a random (possibly NaN) scale, and the finite-scale test would see it.
F16_FIELDS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.TQ1_0: (52,),
    T.TQ2_0: (64,),
}

ids = [t.name for t in TYPES]


@pytest.fixture
def rng(request):
    # a different stream per test, all derived from the run's seed
    return np.random.default_rng([SEED, sum(map(ord, request.node.name))])


def finite_halves(rng, n):
    """n random f16 bit patterns, never inf/NaN (zeros, subnormals and both signs included)."""
    h = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    h[(h & 0x7C00) == 0x7C00] ^= 0x4000
    return h


def random_blocks(rng, qtype, n_blocks, finite=True):
    """n_blocks random blocks of qtype as uint8; finite=True makes every float field finite."""
    bw, bb = GGML_QUANT_SIZES[qtype]
    if bw == 1:  # float types: n_blocks values
        if not finite:
            return rng.integers(0, 256, n_blocks * bb, dtype=np.uint8)
        if qtype == T.F16:
            return finite_halves(rng, n_blocks).view(np.uint8)
        vals = (rng.standard_normal(n_blocks) * 3.0).astype(np.float32)
        if qtype == T.F32:
            return vals.view(np.uint8)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # BF16
    raw = rng.integers(0, 256, (n_blocks, bb), dtype=np.uint8)
    if finite:
        for off in F16_FIELDS[qtype]:
            raw[:, off : off + 2] = finite_halves(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    assert raw.any()
    return raw.reshape(-1)


def reference(raw, qtype):
    with np.errstate(all="ignore"):
        return np.asarray(gguf.quants.dequantize(raw.copy(), qtype), dtype=np.float32).reshape(-1)


def assert_bits_equal(got, want, what):
    """Bit-identical, except that NaN only has to meet NaN (payload bits may differ)."""
    assert got.dtype == np.float32 and got.shape == want.shape, what
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what} NaN positions {ERR}")
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan], err_msg=f"{what} {ERR}")


def n_units(qtype, n_blocks):
    """Blocks for quantized types; an odd value count for float types."""
    return n_blocks * 37 if GGML_QUANT_SIZES[qtype][0] == 1 else n_blocks


# ---------------------------------------------------------------------------------------------
# bit-exact against gguf


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
@pytest.mark.parametrize("n_blocks", [1, 3, 7])
def test_matches_gguf_finite_scales(rng, qtype, n_blocks):
    raw = random_blocks(rng, qtype, n_units(qtype, n_blocks))
    want = reference(raw, qtype)
    assert np.isfinite(want).all(), f"test data made a non-finite value {ERR}"
    got = q.dequantize(raw, int(qtype))
    assert got.shape == (n_units(qtype, n_blocks) * GGML_QUANT_SIZES[qtype][0],)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"{qtype.name} {ERR}")


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_matches_gguf_any_bytes(rng, qtype):
    # fully random bytes: NaN/inf scales and values. NaN must land on NaN; all else bit-exact
    raw = random_blocks(rng, qtype, n_units(qtype, 9), finite=False)
    assert_bits_equal(q.dequantize(raw, int(qtype)), reference(raw, qtype), qtype.name)


def test_f16_every_half_bit_exact():
    # includes NaN payloads: F16 tensors decode exactly like numpy's (and gguf's) cast
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = halves.view(np.float16).astype(np.float32)
    got = q.dequantize(halves.view(np.uint8), int(T.F16))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_bf16_every_value_bit_exact():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = q.dequantize(halves, int(T.BF16))
    np.testing.assert_array_equal(got.view(np.uint32), halves.astype(np.uint32) << 16)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_many_blocks_and_tiles(rng, qtype):
    # enough blocks to run every vector loop body, decoded whole and as uneven tiles of blocks
    bw, bb = GGML_QUANT_SIZES[qtype]
    n_blocks = 301 if bw > 1 else 1001
    raw = random_blocks(rng, qtype, n_blocks)
    want = reference(raw, qtype)
    np.testing.assert_array_equal(q.dequantize(raw, int(qtype)), want, err_msg=ERR)
    out = np.full(n_blocks * bw, np.nan, np.float32)
    for lo, hi in [(0, 1), (1, 64), (64, 65), (65, n_blocks)]:
        q.dequantize_into(raw[lo * bb : hi * bb], int(qtype), out[lo * bw : hi * bw])
    np.testing.assert_array_equal(out, want, err_msg=ERR)


# ---------------------------------------------------------------------------------------------
# inputs: buffers, views, n_elements


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.F32, T.F16], ids=lambda t: t.name)
def test_accepts_any_buffer(rng, qtype):
    raw = random_blocks(rng, qtype, n_units(qtype, 3))
    want = reference(raw, qtype)
    n = want.size
    padded = np.zeros(raw.size + 3, np.uint8)
    padded[1:-2] = raw
    unaligned = padded[1:-2]  # not aligned to anything bigger than a byte
    readonly = np.frombuffer(raw.tobytes(), np.uint8)
    strided = np.repeat(raw, 2)[::2]  # not contiguous
    for buf in (
        raw.tobytes(),
        bytearray(raw.tobytes()),
        memoryview(raw.tobytes()),
        unaligned,
        readonly,
        strided,
        raw.reshape(-1, 1),
    ):
        got = q.dequantize(buf, qtype, n)  # GGMLQuantizationType works as the id too
        assert got.flags.writeable and got.flags.owndata
        np.testing.assert_array_equal(got, want, err_msg=f"{type(buf)} {ERR}")
    if qtype == T.F16:  # GGUFReader hands F16 tensors over as float16 arrays
        np.testing.assert_array_equal(q.dequantize(raw.view(np.float16), qtype), want)


def test_memmap_slice(rng, tmp_path):
    raw = random_blocks(rng, T.Q6_K, 5)
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x01" * 7 + raw.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    np.testing.assert_array_equal(q.dequantize(mm[7:], int(T.Q6_K), 5 * 256), reference(raw, T.Q6_K))


def test_empty_input():
    assert q.dequantize(b"", int(T.Q4_0)).shape == (0,)
    assert q.dequantize(b"", int(T.Q4_K), 0).shape == (0,)


# ---------------------------------------------------------------------------------------------
# dequantize_rows


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_rows_match_whole_matrix(rng, qtype):
    bw, bb = GGML_QUANT_SIZES[qtype]
    n_rows, n_cols = 7, (3 * bw if bw > 1 else 37)
    raw = random_blocks(rng, qtype, n_rows * n_cols // bw)
    raw2d = raw.reshape(n_rows, -1)
    whole = q.dequantize(raw, int(qtype)).reshape(n_rows, n_cols)
    np.testing.assert_array_equal(whole, reference(raw, qtype).reshape(n_rows, n_cols))
    for rows in ([3, 0, 3, 6], np.array([5, 1]), [-1], (2,), range(n_rows)):
        got = q.dequantize_rows(raw2d, int(qtype), rows, n_cols)
        np.testing.assert_array_equal(got, whole[np.asarray(rows)], err_msg=f"{rows} {ERR}")
    single = q.dequantize_rows(raw2d, int(qtype), 4, n_cols)
    assert single.shape == (1, n_cols)
    np.testing.assert_array_equal(single[0], whole[4])
    assert q.dequantize_rows(raw2d, int(qtype), [], n_cols).shape == (0, n_cols)


def test_rows_of_readonly_and_typed_matrices(rng):
    raw = random_blocks(rng, T.Q8_0, 4 * 2)
    ro = np.frombuffer(raw.tobytes(), np.uint8).reshape(4, -1)
    whole = q.dequantize(raw, int(T.Q8_0)).reshape(4, 64)
    np.testing.assert_array_equal(q.dequantize_rows(ro, int(T.Q8_0), [2, 1], 64), whole[[2, 1]])
    halves = finite_halves(rng, 5 * 9).view(np.float16).reshape(5, 9)  # as GGUFReader gives F16
    np.testing.assert_array_equal(q.dequantize_rows(halves, int(T.F16), [4, 0], 9), halves[[4, 0]].astype(np.float32))


def test_rows_errors(rng):
    raw2d = random_blocks(rng, T.Q4_0, 6).reshape(3, -1)  # 3 rows of 64 weights
    with pytest.raises(IndexError):
        q.dequantize_rows(raw2d, int(T.Q4_0), [3], 64)
    with pytest.raises(IndexError):
        q.dequantize_rows(raw2d, int(T.Q4_0), -4, 64)
    with pytest.raises(FormatError, match="36"):  # rows are 36 bytes, not the 54 of 96 weights
        q.dequantize_rows(raw2d, int(T.Q4_0), [0], 96)
    with pytest.raises(FormatError, match="emb"):
        q.dequantize_rows(raw2d, int(T.Q4_0), [0], 65, name="emb")
    with pytest.raises(UnsupportedError, match="token_embd.weight"):
        q.dequantize_rows(raw2d, 16, [0], 256, name="token_embd.weight")


# ---------------------------------------------------------------------------------------------
# errors and tables


@pytest.mark.parametrize("qtype, label", [(16, "IQ2_XXS (16)"), (99, "99")])
def test_unsupported_type_names_tensor(qtype, label):
    with pytest.raises(UnsupportedError) as e:
        q.dequantize(b"\x01" * 66, qtype, name="blk.0.attn_q.weight")
    msg = str(e.value)
    assert "'blk.0.attn_q.weight'" in msg and label in msg and "Q4_K" in msg, msg


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_wrong_length_is_format_error(rng, qtype):
    bw, bb = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(rng, qtype, 2 if bw > 1 else 64)
    n = raw.size // bb * bw
    with pytest.raises(FormatError) as e:
        q.dequantize(raw[:-1], int(qtype), n, name="blk.3.ffn_up.weight")
    msg = str(e.value)
    assert str(raw.size) in msg and str(raw.size - 1) in msg and "blk.3.ffn_up.weight" in msg, msg
    with pytest.raises(FormatError, match=str(raw.size + bb)):
        q.dequantize(raw, int(qtype), n + bw)
    if bw > 1:
        with pytest.raises(FormatError):  # no n_elements: bytes must still be whole blocks
            q.dequantize(raw[:-1], int(qtype))
        with pytest.raises(FormatError):  # n_elements not a whole number of blocks
            q.dequantize(raw, int(qtype), n - 1)


def test_dequantize_into_checks_out(rng):
    raw = random_blocks(rng, T.Q4_0, 2)
    with pytest.raises(ValueError):
        q.dequantize_into(raw, int(T.Q4_0), np.empty(64, np.float64))
    with pytest.raises(FormatError):
        q.dequantize_into(raw, int(T.Q4_0), np.empty(96, np.float32))
    out = np.empty((2, 32), np.float32)
    assert q.dequantize_into(raw, int(T.Q4_0), out) is out
    np.testing.assert_array_equal(out.reshape(-1), reference(raw, T.Q4_0))


def test_tables():
    assert q.SUPPORTED == frozenset(int(t) for t in TYPES)
    assert q.type_name(12) == "Q4_K" and q.type_name(T.BF16) == "BF16"
    assert q.type_name(99) == "type 99"
    for t, sizes in GGML_QUANT_SIZES.items():
        assert q.block_info(int(t)) == tuple(sizes)
    assert q.block_info(16) == (256, 66)  # known sizes even where ember cannot decode
    with pytest.raises(UnsupportedError, match="99"):
        q.block_info(99)
    assert q.row_nbytes(int(T.Q4_K), 512) == 288
    assert q.row_nbytes(int(T.F16), 3) == 6
    with pytest.raises(FormatError, match="256"):
        q.row_nbytes(int(T.Q4_K), 100)
