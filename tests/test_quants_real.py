"""Dequantization of real tensors: every ggml type present in the catalog models, against gguf's
NumPy reference (`gguf.quants.dequantize`)."""

import numpy as np
import pytest
from conftest import REFERENCES
from gguf.quants import dequantize as oracle

from ember.formats.gguf import GGUFFile
from ember.formats.quants import dequantize, dequantize_rows

MAX_ROWS = 64  # rows checked per tensor: enough to cover every block layout, quick to run


@pytest.mark.parametrize("name", list(REFERENCES))
def test_every_type_in_the_model_matches_the_oracle(catalog_path, name):
    g = GGUFFile(catalog_path(name))
    seen: dict[int, int] = {}
    for t in g.tensors.values():
        if seen.get(t.qtype, 0) >= 2:  # two tensors of each type
            continue
        seen[t.qtype] = seen.get(t.qtype, 0) + 1
        raw = g.tensor_bytes(t.name)
        if len(t.shape) >= 2:
            n_rows = t.n_elements // t.shape[-1]
            rows = min(n_rows, MAX_ROWS)
            raw = raw[: rows * (t.nbytes // n_rows)]
            n = rows * t.shape[-1]
        else:
            n = t.n_elements
        ours = dequantize(raw, t.qtype, n, name=t.name)
        ref = oracle(np.asarray(raw), t.qtype).reshape(-1)
        np.testing.assert_array_equal(ours, ref, err_msg=f"{name}: {t.name} ({t.type_name})")
    assert len(seen) >= 3


@pytest.mark.parametrize("name", list(REFERENCES))
def test_embedding_rows(catalog_path, name):
    g = GGUFFile(catalog_path(name))
    info = g.info("token_embd.weight")
    mat = g.tensor("token_embd.weight")
    rows = np.random.default_rng().integers(0, info.shape[0], size=8)
    got = dequantize_rows(mat, info.qtype, rows, info.shape[1])
    for r, row in zip(rows, got):
        np.testing.assert_array_equal(row, oracle(np.asarray(mat[r]), info.qtype).reshape(-1))
