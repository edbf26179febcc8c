"""Tests for ember.formats.gguf: tiny models round-trip, every malformed file fails with its own
FormatError message, and random corruption never gets anything but a FormatError (fuzzed)."""

from __future__ import annotations

import itertools
import os
import resource
import signal
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
import tiny_gguf as tg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_gguf import Q, RawTensor, V

from ember.errors import FormatError
from ember.formats.gguf import GGUFFile, LazyStrings

BIG = 2**60


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, bytes, layout, model) of the default tiny model (Q8_0, gpt2 tokenizer, tied output)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    model = tg.build_tiny_model()
    tg.write_model(model, path)
    data = path.read_bytes()
    return path, data, tg.parse_layout(data), model


def broken(tiny, tmp_path, mutate):
    return tg.corrupt(tiny[0], tmp_path / "bad.gguf", mutate)


def open_bad(tiny, tmp_path, mutate, match):
    path = broken(tiny, tmp_path, mutate)
    with pytest.raises(FormatError, match=match) as e:
        GGUFFile(path)
    assert str(path) in str(e.value)
    return e.value


def raw_file(tmp_path, data: bytes):
    path = tmp_path / "raw.gguf"
    path.write_bytes(data)
    return path


def meta_equal(got, mv: tg.MetaValue) -> bool:
    if mv.type == V.FLOAT32:
        return got == float(np.float32(mv.value))
    if mv.type == V.ARRAY and mv.sub_type == V.STRING:
        return isinstance(got, LazyStrings) and got.tolist() == list(mv.value)
    if mv.type == V.ARRAY:
        return isinstance(got, np.ndarray) and np.array_equal(got, np.array(mv.value, dtype=got.dtype))
    return type(got) is type(mv.value) and got == mv.value


# ---- well-formed files -----------------------------------------------------------------------


def test_tiny_model_metadata(tiny):
    path, _, _, model = tiny
    f = GGUFFile(path)
    f.validate_model()
    assert f.version == 3 and f.alignment == 32
    assert f.architecture == "llama"
    assert list(f.metadata) == list(model.metadata)
    for key, mv in model.metadata.items():
        assert meta_equal(f.metadata[key], mv), key
    assert f.get("llama.block_count") == 2 and f.arch_get("embedding_length") == 64
    assert f.arch_get("attention.head_count_kv") == 2 and f.arch_get("rope.dimension_count") == 16
    assert f.arch_get("attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert f.arch_get("vocab_size") == len(f.get("tokenizer.ggml.tokens")) == model.hparams["n_vocab"]
    toks = f.get("tokenizer.ggml.tokens")
    assert toks.raw(256) == b"in" and toks[-1] == "<|im_end|>"
    assert f.get("tokenizer.ggml.token_type").dtype == np.int32
    assert f.get("tokenizer.ggml.add_bos_token") is False
    assert f.get("tokenizer.chat_template") == tg.CHATML_TEMPLATE


@pytest.mark.parametrize("qtype", tg.WRITABLE_QTYPES, ids=lambda q: q.name)
def test_tiny_model_tensors(tmp_path, qtype):
    model = tg.build_tiny_model(qtype=qtype, tied_output=False, seed=3)
    path = tg.write_model(model, tmp_path / "m.gguf")
    f = GGUFFile(path)
    names = ["token_embd.weight"]
    for i in range(2):
        names += [
            f"blk.{i}.{n}.weight"
            for n in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
        ]
    names += ["output_norm.weight", "output.weight"]
    assert list(f.tensors) == names == list(model.tensors)
    shapes = {
        "token_embd.weight": (307, 64),
        "blk.0.attn_q.weight": (64, 64),
        "blk.0.attn_k.weight": (32, 64),
        "blk.1.ffn_down.weight": (64, 128),
        "blk.1.ffn_up.weight": (128, 64),
        "output_norm.weight": (64,),
    }
    for name, shape in shapes.items():
        assert f.tensors[name].shape == shape, name
    end = f.data_offset
    for name, t in model.tensors.items():
        info = f.tensors[name]
        assert info.shape == t.shape and info.qtype == t.qtype and info.type_name == t.qtype.name
        assert info.nbytes == len(t.raw_bytes)
        assert info.offset % 32 == 0 and info.offset >= end
        end = info.offset + info.nbytes
        assert f.tensor_bytes(name).tobytes() == t.raw_bytes, name
        arr = f.tensor(name)
        if t.qtype == Q.F32:
            np.testing.assert_array_equal(arr, t.weights)
        elif t.qtype == Q.F16:
            np.testing.assert_array_equal(arr, t.data)
            assert arr.dtype == np.float16 and arr.shape == t.shape
        else:
            assert arr.dtype == np.uint8 and arr.tobytes() == t.raw_bytes and arr.shape[0] == int(np.prod(t.shape[:-1]))
    assert end <= f.file_size
    norms = [n for n in names if "norm" in n]
    assert all(f.tensors[n].qtype == Q.F32 for n in norms)
    # the reference reader sees the same file
    ref = gguf.GGUFReader(path)
    for rt in ref.tensors:
        assert f.tensor_bytes(rt.name).tobytes() == rt.data.tobytes(), rt.name
        assert int(rt.tensor_type) == f.tensors[rt.name].qtype


def test_tiny_model_weights_are_seeded_and_never_zero(tmp_path):
    a = tg.write_tiny_model(tmp_path / "a.gguf", seed=1).read_bytes()
    assert tg.write_tiny_model(tmp_path / "b.gguf", seed=1).read_bytes() == a
    assert tg.write_tiny_model(tmp_path / "c.gguf", seed=2).read_bytes() != a
    for t in tg.build_tiny_model(qtype="F32").tensors.values():
        assert np.all(t.weights != 0) and np.all(np.isfinite(t.weights)), t.name
    q = tg.build_tiny_model(qtype="Q4_0").tensors["blk.0.attn_q.weight"]
    deq = q.dequantized()
    assert deq.shape == q.shape and np.abs(deq - q.weights).max() < 0.2 * np.abs(q.weights).max()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tokenizer=None),
        dict(tokenizer="llama"),
        dict(n_vocab=320),
        dict(alignment=64, tied_output=False),
        dict(n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=64, qtype="Q5_1", embd_qtype="F16"),
        dict(arch="qwen2", extra_metadata={"qwen2.context_length": 4096, "x.flag": True, "x.list": [1, 2, 3]}),
    ],
    ids=["no-tokenizer", "spm", "padded-vocab", "align64", "small", "qwen2-extra"],
)
def test_tiny_model_variants(tmp_path, kwargs):
    model = tg.build_tiny_model(**kwargs)
    f = GGUFFile(tg.write_model(model, tmp_path / "m.gguf"))
    f.validate_model()
    assert f.alignment == model.alignment
    assert all(t.offset % f.alignment == 0 for t in f.tensors.values())
    for key, mv in model.metadata.items():
        assert meta_equal(f.metadata[key], mv), key
    for name, t in model.tensors.items():
        assert f.tensor_bytes(name).tobytes() == t.raw_bytes
    n_vocab = model.hparams["n_vocab"]
    assert f.tensors["token_embd.weight"].shape == (n_vocab, model.hparams["n_embd"])
    if model.tokenizer is not None:
        assert len(f.get("tokenizer.ggml.tokens")) == len(f.get("tokenizer.ggml.token_type")) == n_vocab
    else:
        assert "tokenizer.ggml.model" not in f.metadata


def test_extra_metadata_overrides_and_removes(tmp_path):
    f = GGUFFile(
        tg.write_tiny_model(
            tmp_path / "m.gguf",
            extra_metadata={
                "llama.context_length": 8192,
                "general.name": None,
                "x.f64": (0.5, V.FLOAT64),
                "x.i8": (-3, V.INT8),
            },
        )
    )
    assert f.arch_get("context_length") == 8192 and "general.name" not in f.metadata
    assert f.get("x.f64") == 0.5 and f.get("x.i8") == -3


def test_gpt2_tokenizer_is_valid():
    tok = tg.gpt2_tokenizer()
    vocab = {t: i for i, t in enumerate(tok.tokens)}
    assert len(vocab) == len(tok.tokens)  # no duplicates
    assert tok.tokens[:256] == tg.bytes_to_unicode() and len(set(tok.tokens[:256])) == 256
    assert 24 <= len(tok.merges) <= 100
    for m in tok.merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab, m
    assert {"in", "th", "Ġthe", "ing", "Ġthing"} <= vocab.keys()
    for t in tg.CONTROL_TOKENS:
        assert tok.token_types[vocab[t]] == tg.CONTROL
    assert sum(t == tg.CONTROL for t in tok.token_types) == 3
    assert tok.tokens[tok.eos_id] == "<|im_end|>" and tok.tokens[tok.bos_id] == "<|endoftext|>" and not tok.add_bos

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in tok.merges]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    text = "the king is singing in the evening, thinking of 2024 — ünïcødé 🙂"
    enc = hf.encode(text)
    assert hf.decode(enc.ids) == text
    assert vocab["Ġthe"] in enc.ids and vocab["ing"] in enc.ids
    assert len(enc.ids) < len(text.encode())  # merges do compress


def test_spm_tokenizer_is_valid():
    tok = tg.spm_tokenizer()
    vocab = {t: i for i, t in enumerate(tok.tokens)}
    assert len(vocab) == len(tok.tokens) == len(tok.scores) == len(tok.token_types)
    assert tok.tokens[:3] == ("<unk>", "<s>", "</s>") and tok.unk_id == 0 and tok.add_bos
    assert [tok.tokens[3 + b] for b in (0, 10, 255)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    normal = {t for t, ty in zip(tok.tokens, tok.token_types) if ty == tg.NORMAL}
    assert "▁the" in normal
    for t in normal:  # every multi-character piece is two pieces merged
        assert len(t) == 1 or any(t[:k] in normal and t[k:] in normal for k in range(1, len(t))), t


def test_writing_is_fast(tmp_path):
    tg.write_tiny_model(tmp_path / "warm.gguf")
    best = min(_timed(lambda: tg.write_tiny_model(tmp_path / "m.gguf", seed=9)) for _ in range(3))
    assert best < 0.2
    start = time.perf_counter()
    GGUFFile(tmp_path / "m.gguf")
    assert time.perf_counter() - start < 0.2


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_parse_layout_agrees_with_reader(tiny):
    path, data, layout, model = tiny
    f = GGUFFile(path)
    assert layout.n_kv == len(f.metadata) and layout.n_tensors == len(f.tensors)
    assert layout.data_offset == f.data_offset
    for name, tf in layout.tensors.items():
        assert f.tensors[name].offset == f.data_offset + tf.offset
        assert tuple(reversed(tf.dims)) == f.tensors[name].shape
    assert layout.fields["llama.block_count"].value == 2


# ---- malformed files: each with its own message ----------------------------------------------


def test_wrong_magic(tiny, tmp_path):
    open_bad(tiny, tmp_path, tg.overwrite(0, b"GGML"), r"not a GGUF file \(magic b'GGML', expected b'GGUF'\)")


@pytest.mark.parametrize("version", [0, 1, 4, 99, 3 << 24])  # 3 << 24: a big-endian v3 file
def test_unsupported_version(tiny, tmp_path, version):
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u32(b, tg.Layout.VERSION_POS, version),
        rf"GGUF version {version} is not supported \(ember reads versions 2, 3\)",
    )


def test_version_2_is_read(tiny, tmp_path):
    f = GGUFFile(broken(tiny, tmp_path, lambda b: tg.set_u32(b, tg.Layout.VERSION_POS, 2)))
    assert f.version == 2 and len(f.tensors) == len(tiny[3].tensors)


def test_truncated_in_tensor_data(tiny, tmp_path):
    path, data, layout, _ = tiny
    e = open_bad(
        tiny,
        tmp_path,
        tg.truncate(len(data) - 100),
        r"tensor 'output_norm.weight' \(256 bytes at offset \d+\) runs past the end of the file "
        rf"\({len(data) - 100} bytes\): the file is truncated",
    )
    assert "re-download" in str(e)
    # cut just after the header: the first tensor is already missing
    open_bad(tiny, tmp_path, tg.truncate(layout.data_offset + 1), r"tensor 'token_embd.weight' .* runs past the end")


def test_truncated_in_string_value(tiny, tmp_path):
    # claim only the first metadata entry, so the counts fit the cut file
    f = tiny[2].fields["general.architecture"]
    one_entry = tg.chain(
        lambda b: tg.set_u64(b, tg.Layout.N_TENSORS_POS, 0), lambda b: tg.set_u64(b, tg.Layout.N_KV_POS, 1)
    )
    open_bad(
        tiny,
        tmp_path,
        tg.chain(one_entry, tg.truncate(f.value_pos + 8 + 2)),
        rf"value of 'general.architecture' needs 5 bytes at offset {f.value_pos + 8}, "
        rf"past the end of the file \({f.value_pos + 10} bytes\)",
    )


def test_truncated_in_string_array(tiny, tmp_path):
    f = tiny[2].fields["tokenizer.ggml.tokens"]
    last = f.item_pos[-1]
    open_bad(
        tiny,
        tmp_path,
        tg.truncate(last + 8 + 3),
        r"array 'tokenizer.ggml.tokens': string 306 of 307 claims 10 bytes, past the end of the file",
    )
    open_bad(
        tiny,
        tmp_path,
        tg.truncate(last + 4),
        r"array 'tokenizer.ggml.tokens': string 306 of 307 starts past the end of the file",
    )
    open_bad(tiny, tmp_path, tg.truncate(f.item_pos[100]), r"array 'tokenizer.ggml.tokens' needs 2456 bytes at offset")


def test_truncated_in_numeric_array(tiny, tmp_path):
    f = tiny[2].fields["tokenizer.ggml.token_type"]
    open_bad(
        tiny,
        tmp_path,
        tg.truncate(f.item_pos[5]),
        r"array 'tokenizer.ggml.token_type' of 307 elements needs 1228 bytes",
    )


def test_truncated_in_tensor_infos(tiny, tmp_path):
    t = tiny[2].tensors["output_norm.weight"]
    open_bad(
        tiny,
        tmp_path,
        tg.truncate(t.offset_pos + 3),
        rf"offset of tensor 'output_norm.weight' needs 8 bytes at offset {t.offset_pos}, past the end",
    )


def test_truncated_right_after_counts(tiny, tmp_path):
    # the counts claim more entries than 30 bytes could hold
    open_bad(tiny, tmp_path, tg.truncate(30), r"absurd counts: 20 tensors and 24 metadata entries in a 30-byte file")


def test_truncated_in_metadata_key(tmp_path):
    kv = [(f"general.key{i:011d}", V.STRING, "llama") for i in range(3)]  # 22-byte keys
    entry = len(tg.encode_string(kv[0][0])) + 4 + len(tg.encode_value(V.STRING, "llama"))
    cut = 24 + 2 * entry + 8 + 10  # 10 bytes into the third key
    data = tg.gguf_bytes(kv)[:cut]
    with pytest.raises(
        FormatError,
        match=rf"metadata key 2 needs 22 bytes at offset {cut - 10}, "
        rf"past the end of the file \({cut} bytes\)",
    ):
        GGUFFile(raw_file(tmp_path, data))


@pytest.mark.parametrize("size", [0, 10, 23])
def test_too_small_file(tiny, tmp_path, size):
    open_bad(tiny, tmp_path, tg.truncate(size), rf"{size} bytes is too small to be a GGUF file")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(FormatError, match="is a directory, not a GGUF file"):
        GGUFFile(tmp_path)
    with pytest.raises(FormatError, match="not a regular file"):
        GGUFFile("/dev/null")


@pytest.mark.parametrize("offset", [2**40, 2**64 - 32])
def test_tensor_offset_out_of_range(tiny, tmp_path, offset):
    t = tiny[2].tensors["blk.1.ffn_up.weight"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, t.offset_pos, offset),
        rf"tensor 'blk.1.ffn_up.weight' \(8704 bytes at offset {tiny[2].data_offset + offset}\) "
        r"runs past the end of the file",
    )


def test_misaligned_tensor_offset(tiny, tmp_path):
    t = tiny[2].tensors["blk.0.attn_k.weight"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, t.offset_pos, t.offset + 4),
        rf"tensor 'blk.0.attn_k.weight': data offset {t.offset + 4} is not aligned to 32 bytes",
    )


@pytest.mark.parametrize("count", [BIG, 2**64 - 1])
def test_absurd_tensor_count(tiny, tmp_path, count):
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, tg.Layout.N_TENSORS_POS, count),
        rf"absurd counts: {count} tensors and 24 metadata entries in a \d+-byte file",
    )


@pytest.mark.parametrize("count", [BIG, 2**64 - 1])
def test_absurd_metadata_count(tiny, tmp_path, count):
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, tg.Layout.N_KV_POS, count),
        rf"absurd counts: 20 tensors and {count} metadata entries",
    )


def test_absurd_key_length(tiny, tmp_path):
    pos = tiny[2].fields["general.name"].pos
    open_bad(tiny, tmp_path, lambda b: tg.set_u64(b, pos, BIG), rf"metadata key 1 claims {BIG} bytes \(limit 65536\)")


def test_absurd_tensor_name_length(tiny, tmp_path):
    pos = tiny[2].tensors["blk.0.attn_norm.weight"].pos
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, pos, 2**64 - 1),
        rf"name of tensor 1 claims {2**64 - 1} bytes \(limit 65536\)",
    )


def test_absurd_string_value_length(tiny, tmp_path):
    f = tiny[2].fields["general.architecture"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, f.value_pos, BIG),
        rf"value of 'general.architecture' needs {BIG} bytes at offset {f.value_pos + 8}, past the end",
    )


@pytest.mark.parametrize("length", [BIG, 2**63 + 5, 2**64 - 1])
def test_absurd_string_length_in_array(tiny, tmp_path, length):
    f = tiny[2].fields["tokenizer.ggml.merges"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, f.item_pos[3], length),
        rf"array 'tokenizer.ggml.merges': string 3 of 48 claims {length} bytes, past the end of the file",
    )


@pytest.mark.parametrize("count", [BIG, 2**64 - 1])
def test_absurd_array_length(tiny, tmp_path, count):
    f = tiny[2].fields["tokenizer.ggml.token_type"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, f.array_count_pos, count),
        rf"array 'tokenizer.ggml.token_type' of {count} elements needs {count * 4} bytes",
    )


def test_absurd_string_array_length(tiny, tmp_path):
    f = tiny[2].fields["tokenizer.ggml.tokens"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, f.array_count_pos, BIG),
        rf"array 'tokenizer.ggml.tokens' needs {8 * BIG} bytes at offset {f.array_count_pos + 8}",
    )


def test_absurd_nested_array_length(tmp_path):
    kv = [("general.architecture", V.STRING, "llama"), ("a", V.ARRAY, (V.ARRAY, [(V.UINT8, [1])]))]
    data = bytearray(tg.gguf_bytes(kv))
    count_pos = 24 + len(tg.encode_string(kv[0][0])) + 4 + len(tg.encode_value(V.STRING, "llama"))
    count_pos += len(tg.encode_string("a")) + 4 + 4
    assert struct.unpack_from("<Q", data, count_pos)[0] == 1
    tg.set_u64(data, count_pos, BIG)
    with pytest.raises(FormatError, match=rf"array 'a' of {BIG} arrays needs {12 * BIG} bytes"):
        GGUFFile(raw_file(tmp_path, bytes(data)))


def test_arrays_nested_too_deeply(tmp_path):
    arr = (V.UINT8, [1])
    for _ in range(4):
        arr = (V.ARRAY, [arr])
    with pytest.raises(FormatError, match=r"metadata 'deep' nests arrays too deeply"):
        GGUFFile(raw_file(tmp_path, tg.gguf_bytes([("deep", V.ARRAY, arr)])))
    two_levels = GGUFFile(
        raw_file(tmp_path, tg.gguf_bytes([("ok", V.ARRAY, (V.ARRAY, [(V.STRING, ["x"]), (V.INT16, [-1])]))]))
    )
    inner = two_levels.get("ok")
    assert inner[0].tolist() == ["x"] and inner[1].tolist() == [-1]


@pytest.mark.parametrize(
    "odd",
    [[], [b"a\x00b"], [b"\xff", b"\xc3"], [b"\xe2\x82", b"\xac"]],
    ids=["valid", "nul", "invalid", "split-sequence"],
)
def test_string_arrays_decode_each_string_alone(tmp_path, odd):
    """The one-decode fast path and the string-by-string one give the same strings, U+FFFD for
    invalid bytes, whatever the strings hold (a multi-byte character cut across two strings
    stays two invalid strings)."""
    rng = np.random.default_rng(7)
    words = ["", "in", "Ġthe", "<|im_end|>", "é", "日本", "🙂x", " "] + [
        "".join(map(chr, rng.integers(32, 0x3000, 5))) for _ in range(40)
    ]
    items = [w.encode() for w in words] + list(odd) + [b"end"]
    f = GGUFFile(raw_file(tmp_path, tg.gguf_bytes([("s", V.ARRAY, (V.STRING, items))])))
    assert f.get("s").tolist() == [b.decode("utf-8", errors="replace") for b in items]


@pytest.mark.parametrize(
    "dims", [[64, 2**40], [2**64 - 1, 1], [2**32, 2**32, 2**32, 2**32]], ids=["2^40", "u64max", "4x2^32"]
)
def test_absurd_dimensions(tmp_path, dims):
    data = tg.gguf_bytes([], [RawTensor("t", dims, Q.F32, offset=0)])
    with pytest.raises(FormatError, match=r"tensor 't' has absurd dimensions"):
        GGUFFile(raw_file(tmp_path, data))


def test_absurd_dimensions_patched(tiny, tmp_path):
    t = tiny[2].tensors["token_embd.weight"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, t.dims_pos[1], 2**40),
        rf"tensor 'token_embd.weight' has absurd dimensions \[64, {2**40}\]",
    )


def test_zero_dimension(tiny, tmp_path):
    t = tiny[2].tensors["blk.0.ffn_gate.weight"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, t.dims_pos[1], 0),
        r"tensor 'blk.0.ffn_gate.weight' has a zero dimension \[64, 0\]",
    )


@pytest.mark.parametrize("n_dims", [0, 5, 2**32 - 1])
def test_bad_dimension_count(tiny, tmp_path, n_dims):
    t = tiny[2].tensors["blk.0.attn_v.weight"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u32(b, t.n_dims_pos, n_dims),
        rf"tensor 'blk.0.attn_v.weight' has {n_dims} dimensions \(1 to 4 allowed\)",
    )


def test_four_dimensions_are_allowed(tmp_path):
    data = tg.gguf_bytes([], [RawTensor("t", [2, 3, 4, 5], Q.F32, data=np.arange(120, dtype=np.float32).tobytes())])
    f = GGUFFile(raw_file(tmp_path, data))
    np.testing.assert_array_equal(f.tensor("t"), np.arange(120, dtype=np.float32).reshape(5, 4, 3, 2))


@pytest.mark.parametrize("type_id", [4, 5, 255, 2**32 - 1])  # 4, 5: the removed Q4_2 / Q4_3
def test_unknown_tensor_type(tiny, tmp_path, type_id):
    t = tiny[2].tensors["blk.1.attn_output.weight"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u32(b, t.type_pos, type_id),
        rf"tensor 'blk.1.attn_output.weight' has unknown ggml type id {type_id}",
    )


@pytest.mark.parametrize("vtype", [13, 2**32 - 1])
def test_unknown_metadata_value_type(tiny, tmp_path, vtype):
    f = tiny[2].fields["general.name"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u32(b, f.type_pos, vtype),
        rf"metadata 'general.name' has unknown value type {vtype}",
    )


def test_unknown_array_element_type(tiny, tmp_path):
    f = tiny[2].fields["tokenizer.ggml.token_type"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u32(b, f.value_pos, 13),
        r"metadata 'tokenizer.ggml.token_type' has an array of unknown value type 13",
    )


def test_row_length_not_a_block_multiple(tiny, tmp_path):
    t = tiny[2].tensors["blk.0.attn_q.weight"]
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u64(b, t.dims_pos[0], 48),
        r"tensor 'blk.0.attn_q.weight': row length 48 is not a multiple of the Q8_0 block size 32",
    )
    # a 64-wide row labelled as a 256-wide-block type
    open_bad(
        tiny,
        tmp_path,
        lambda b: tg.set_u32(b, t.type_pos, Q.Q4_K),
        r"tensor 'blk.0.attn_q.weight': row length 64 is not a multiple of the Q4_K block size 256",
    )


def test_duplicate_key(tmp_path):
    data = tg.gguf_bytes(
        [
            ("general.architecture", V.STRING, "llama"),
            ("llama.block_count", V.UINT32, 1),
            ("general.architecture", V.STRING, "qwen2"),
        ]
    )
    with pytest.raises(FormatError, match=r"metadata key 'general.architecture' appears twice"):
        GGUFFile(raw_file(tmp_path, data))


def test_duplicate_key_patched(tiny, tmp_path):
    # rename general.file_type (key 2) to llama.block_count (key 6): same length, so the file stays well-formed
    f = tiny[2].fields["general.file_type"]
    open_bad(
        tiny, tmp_path, tg.overwrite(f.key_pos, b"llama.block_count"), r"metadata key 'llama.block_count' appears twice"
    )


def test_duplicate_tensor(tmp_path):
    d = np.ones(32, dtype=np.float32).tobytes()
    data = tg.gguf_bytes(
        [], [RawTensor("w", [32], Q.F32, d), RawTensor("v", [32], Q.F32, d), RawTensor("w", [32], Q.F32, d)]
    )
    with pytest.raises(FormatError, match=r"tensor 'w' appears twice"):
        GGUFFile(raw_file(tmp_path, data))


@pytest.mark.parametrize(
    "align",
    [
        (V.UINT32, 0),
        (V.UINT32, 3),
        (V.UINT32, 48),
        (V.UINT32, 2**21),
        (V.INT32, -32),
        (V.FLOAT32, 32.0),
        (V.STRING, "32"),
    ],
)
def test_bad_alignment(tmp_path, align):
    vt, value = align
    data = tg.gguf_bytes([("general.alignment", vt, value)])
    with pytest.raises(FormatError, match=rf"general.alignment = {value!r} is not a power of two"):
        GGUFFile(raw_file(tmp_path, data))


def test_custom_alignment(tmp_path):
    d = np.arange(32, dtype=np.float32).tobytes()
    data = tg.gguf_bytes(
        [("general.alignment", V.UINT32, 8)],
        [RawTensor("a", [3], Q.F32, d[:12]), RawTensor("b", [32], Q.F32, d)],
        alignment=8,
    )
    f = GGUFFile(raw_file(tmp_path, data))
    assert f.alignment == 8 and f.tensors["b"].offset - f.data_offset == 16
    np.testing.assert_array_equal(f.tensor("b"), np.arange(32, dtype=np.float32))


def test_missing_architecture(tmp_path):
    f = GGUFFile(tg.write_tiny_model(tmp_path / "m.gguf", extra_metadata={"general.architecture": None}))
    assert "general.architecture" not in f.metadata
    with pytest.raises(FormatError, match=r"required metadata key 'general.architecture' is missing"):
        _ = f.architecture
    with pytest.raises(FormatError, match=r"required metadata key 'general.architecture' is missing"):
        f.validate_model()
    with pytest.raises(FormatError, match=r"required metadata key 'general.architecture' is missing"):
        f.require("general.architecture")


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "attention.head_count"])
def test_missing_required_key(tmp_path, key):
    f = GGUFFile(tg.write_tiny_model(tmp_path / "m.gguf", extra_metadata={f"llama.{key}": None}))
    with pytest.raises(FormatError, match=rf"required metadata key 'llama.{key}' for architecture 'llama' is missing"):
        f.validate_model()


def test_missing_tensor(tiny):
    f = GGUFFile(tiny[0])
    for access in (f.tensor, f.tensor_bytes, f.info):
        with pytest.raises(FormatError, match=r"tensor 'output.weight' is missing"):
            access("output.weight")


# ---- fuzzing ---------------------------------------------------------------------------------

MEMORY_LIMIT = 200 << 20
# EMBER_FUZZ_EXAMPLES=20000 for a long run
FUZZ_EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "200"))
_counter = itertools.count()


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    """A smaller model (with an explicit general.alignment, so that is fuzzed too) and the byte
    positions of every integer field of its header."""
    d = tmp_path_factory.mktemp("fuzz")
    path = tg.write_tiny_model(
        d / "base.gguf", n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=64, extra_metadata={"general.alignment": 32}
    )
    data = path.read_bytes()
    layout = tg.parse_layout(data)
    fields = [(tg.Layout.VERSION_POS, 4), (tg.Layout.N_TENSORS_POS, 8), (tg.Layout.N_KV_POS, 8)]
    for f in layout.fields.values():
        fields += [(f.pos, 8), (f.type_pos, 4)]
        if f.vtype == V.ARRAY:
            fields += [(f.value_pos, 4), (f.array_count_pos, 8)]
            if f.array_type == V.STRING:
                fields += [(p, 8) for p in f.item_pos[:: max(1, len(f.item_pos) // 16)] + f.item_pos[-1:]]
        elif f.vtype == V.STRING:
            fields.append((f.value_pos, 8))
        else:
            fields.append((f.value_pos, struct.calcsize(tg._SCALAR_FMT[V(f.vtype)])))
    for t in layout.tensors.values():
        fields += [(t.pos, 8), (t.n_dims_pos, 4), (t.type_pos, 4), (t.offset_pos, 8)] + [(p, 8) for p in t.dims_pos]
    return d, data, layout, fields


INTERESTING = [
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    13,
    31,
    32,
    33,
    255,
    256,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**60,
    2**63 - 1,
    2**63,
    2**64 - 32,
    2**64 - 1,
]


def _exercise(path) -> None:
    """Open a file and touch everything a caller might; only FormatError may come out."""
    try:
        f = GGUFFile(path)
    except FormatError:
        return
    for v in f.metadata.values():
        if isinstance(v, LazyStrings):
            v.tolist()
            if len(v):
                v.raw(len(v) - 1)
                v.raw_region()
    for name, t in f.tensors.items():
        raw = f.tensor_bytes(name)
        assert len(raw) == t.nbytes and t.offset + t.nbytes <= f.file_size
        if t.nbytes:
            int(raw[0]) + int(raw[-1])
        arr = f.tensor(name)
        assert arr.nbytes == t.nbytes
    repr(f)
    f.type_histogram()
    try:
        f.validate_model()
    except FormatError:
        pass


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("GGUFFile took more than 5 s on a corrupt file")


def _guarded(path) -> None:
    """_exercise under a 5 s alarm, with allocations traced: the Python/numpy heap must stay small
    (tracemalloc also sees numpy buffers that are allocated but never touched, which RSS misses)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    tracemalloc.start()
    try:
        _exercise(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert peak < MEMORY_LIMIT, f"allocated {peak >> 20} MiB"


@pytest.fixture(scope="module")
def memory_watch():
    """Check the process's peak RSS grows by < 200 MB over all the fuzzing."""
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    assert grew < MEMORY_LIMIT, f"peak RSS grew by {grew >> 20} MiB while fuzzing"


def _write_case(base_dir, data: bytes):
    path = base_dir / f"case{next(_counter)}.gguf"
    path.write_bytes(data)
    return path


@st.composite
def corruptions(draw, base):
    d, data, layout, fields = base
    buf = bytearray(data)
    kind = draw(st.sampled_from(["bytes", "bits", "field", "field", "truncate"]))
    if kind == "truncate":
        return bytes(buf[: draw(st.integers(0, len(buf)))])
    header = layout.data_offset
    n = draw(st.integers(1, 3 if kind == "field" else 8))
    for _ in range(n):
        if kind == "bytes":
            buf[draw(st.integers(0, header - 1))] = draw(st.integers(0, 255))
        elif kind == "bits":
            buf[draw(st.integers(0, header - 1))] ^= 1 << draw(st.integers(0, 7))
        else:
            pos, width = draw(st.sampled_from(fields))
            v = draw(st.sampled_from(INTERESTING) if draw(st.integers(0, 3)) else st.integers(0, 2 ** (8 * width) - 1))
            v &= (1 << (8 * width)) - 1
            if width == 8:
                tg.set_u64(buf, pos, v)
            else:
                tg.set_u32(buf, pos, v)
    return bytes(buf)


def test_fuzz_base_is_valid(fuzz_base):
    d, data, _, _ = fuzz_base
    _exercise(_write_case(d, data))
    GGUFFile(d / "base.gguf").validate_model()


@settings(max_examples=FUZZ_EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.data())
def test_fuzz_corruption_only_raises_format_error(fuzz_base, memory_watch, case):
    d = fuzz_base[0]
    data = case.draw(corruptions(fuzz_base))
    path = _write_case(d, data)
    try:
        _guarded(path)
    finally:
        path.unlink()


@settings(max_examples=max(40, FUZZ_EXAMPLES // 5), deadline=2000)
@given(cut=st.integers(0, 2**20))
def test_fuzz_truncation_only_raises_format_error(fuzz_base, memory_watch, cut):
    d, data, _, _ = fuzz_base
    cut %= len(data) + 1
    path = _write_case(d, data[:cut])
    try:
        if cut < len(data):
            with pytest.raises(FormatError):
                GGUFFile(path)
        _guarded(path)
    finally:
        path.unlink()
