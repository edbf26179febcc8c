"""The draft's lighter copy (ember.speculative.light): which matrices are requantized to Q4_0 and
how closely, what is kept byte for byte, the cache of copies, the fallback when it cannot be
written, and that drafting from it leaves greedy output the target's own."""

from __future__ import annotations

import logging
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

import ember
from ember.lut_kernels import pack_cache
from ember.speculative import light_copy
from ember.speculative.light import light_path
from tests.tiny_gguf import write_tiny_model


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _fields(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: [bytes(p) for p in f.parts] for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_heavy_matrices_become_q4_0_the_rest_stays_byte_for_byte(tmp_path):
    src = write_tiny_model(
        tmp_path / "d.gguf",
        arch="qwen2",
        qtype=Q.Q8_0,
        output_qtype=Q.Q5_0,
        tied_output=False,
        n_embd=256,
        n_ff=512,
        seed=3,
    )
    out = light_copy(src)
    assert out != src and out.parent.name == "drafts" and out.name.endswith(".q4_0.gguf")
    a, b = _tensors(src), _tensors(out)
    assert list(a) == list(b) and _fields(src) == _fields(out)
    light = {n for n, t in b.items() if t.tensor_type == Q.Q4_0}
    heavy = {n for n, t in a.items() if len(t.shape) == 2 and t.tensor_type in (Q.Q8_0, Q.Q5_0)} - {"token_embd.weight"}
    assert light == heavy and "output.weight" in light and "blk.0.ffn_down.weight" in light
    for name, t in a.items():
        if name in light:  # within Q4_0's error of the source's values: ~1/16 of a block's range
            w = quants.dequantize(np.asarray(t.data), Q(t.tensor_type))
            w4 = quants.dequantize(np.asarray(b[name].data), Q.Q4_0)
            rel = np.sqrt(np.mean((w - w4) ** 2) / np.mean(w**2))
            assert w.shape == w4.shape and 0 < rel < 0.15, (name, rel)
        else:
            assert np.array_equal(np.asarray(t.data), np.asarray(b[name].data)) and t.tensor_type == b[name].tensor_type


def test_a_tied_embedding_is_the_output_matrix_and_is_requantized(tmp_path):
    """Also: a file aligned to 64 bytes gives a copy aligned (and saying so) the same way."""
    src = write_tiny_model(tmp_path / "t.gguf", qtype=Q.Q8_0, tied_output=True, n_embd=128, alignment=64)
    out = light_copy(src)
    b = _tensors(out)
    assert "output.weight" not in b and b["token_embd.weight"].tensor_type == Q.Q4_0
    assert _fields(out)["general.alignment"] == _fields(src)["general.alignment"]
    assert all(t.data_offset % 64 == 0 for t in b.values())
    ember.load(out)  # ember's own reader checks the offsets against the stated alignment


def test_the_copy_is_made_once_and_anew_when_the_file_changes(tmp_path):
    src = write_tiny_model(tmp_path / "d.gguf", qtype=Q.Q8_0)
    out = light_copy(src)
    made = out.stat().st_mtime_ns
    assert light_copy(src) == out and out.stat().st_mtime_ns == made
    ember.load(out).prepare()  # its weights packed for the kernels, cached
    packed = pack_cache.cache_path(out)
    assert packed.exists()
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file replaced by a newer one
    new = light_copy(src)
    assert new != out and new.exists() and not out.exists()  # the earlier version's copy is gone
    ember.load(new).prepare()  # and its pack cache with the next one saved; another file's stays
    assert pack_cache.cache_path(new).exists() and not packed.exists()
    (tmp_path / "other").mkdir()
    other = write_tiny_model(tmp_path / "other" / "d.gguf", qtype=Q.Q8_0)
    assert light_copy(other).exists() and light_path(src).exists()


def test_nothing_to_lighten_or_nowhere_to_write_drafts_from_the_file(tmp_path, monkeypatch, caplog):
    light = write_tiny_model(tmp_path / "q4.gguf", qtype=Q.Q4_0, embd_qtype=Q.Q4_0)
    assert light_copy(light) == light and not light_path(light).exists()
    src = write_tiny_model(tmp_path / "d.gguf", qtype=Q.Q8_0)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("EMBER_CACHE_DIR", str(blocker))  # the cache folder cannot be made
    with caplog.at_level(logging.WARNING, logger="ember"):
        assert light_copy(src) == src
    assert "could not write the draft's 4-bit copy" in caplog.text and "as it is" in caplog.text


def test_drafting_from_the_copy_is_lossless(tmp_path):
    src = write_tiny_model(tmp_path / "d.gguf", qtype=Q.Q8_0, n_embd=128, n_ff=256, seed=5)
    target = ember.load(src)
    ids = target.tokenize("the quick brown fox jumps over the lazy dog and the cat")
    plain = [i for c in target.generate(ids, max_tokens=24, temperature=0.0) for i in c.token_ids]
    for quant in ("q4_0", "file"):
        m = ember.load(src, draft=str(src), draft_k=4, draft_schedule="turns", draft_quant=quant)
        got = [i for c in m.generate(ids, max_tokens=24, temperature=0.0) for i in c.token_ids]
        assert got == plain
        assert (".q4_0.gguf" in m.stats["drafter"]) == (quant == "q4_0") and m.stats["drafted_tokens"] > 0
    with pytest.raises(ember.EmberError, match="draft_quant must be one of q4_0, file"):
        ember.load(src, draft=str(src), draft_quant="q2")
