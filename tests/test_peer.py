"""Peer check: llama.cpp (through llama-cpp-python, the `peer` extra) loads every synthetic family
that tests/tiny_gguf.py writes, and its logits agree with ember's.

Loading is half the point: llama.cpp's loader checks each architecture's tensor names, shapes and
metadata keys, so a family that fails to load here means the writer (or ember's reading of the
format) departs from llama.cpp's conventions. Weights are F32 / F16 and the KV cache is F32, so the
two agree closely; Q8_0 is checked loosely (llama.cpp also quantizes the activations to 8 bits).
Both engines' default, a half-precision KV cache, is checked with F32 weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_gguf as tg

import ember

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `peer` extra) is not installed")

pytestmark = pytest.mark.peer

N_IDS = 12
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


def token_ids(n_vocab: int, n: int = N_IDS, seed: int = 7) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, size=n).tolist()


def _default_params_without_extra_buffers():
    """llama.cpp's model defaults with use_extra_bufts off: on CPUs with AMX-INT8 a GGML_NATIVE
    build repacks Q8_0/Q4_0 matrices for its AMX kernels, and ggml_backend_amx_mul_mat segfaults on
    these tiny shapes (seen with llama-cpp-python 0.3.36), which would take the whole test run down."""
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


_llama_cpp_api = llama_cpp.llama_cpp  # what llama_cpp.Llama calls
_default_model_params = _llama_cpp_api.llama_model_default_params
CAN_DISABLE_EXTRA_BUFFERS = any(f[0] == "use_extra_bufts" for f in _llama_cpp_api.llama_model_params._fields_)


def llama_cpp_logits(path, ids: list[int], kv_type: int = GGML_TYPE_F32) -> np.ndarray:
    if CAN_DISABLE_EXTRA_BUFFERS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_llama_cpp_api, "llama_model_default_params", _default_params_without_extra_buffers)
            return _llama_cpp_logits(path, ids, kv_type)
    return _llama_cpp_logits(path, ids, kv_type)


def _llama_cpp_logits(path, ids: list[int], kv_type: int = GGML_TYPE_F32) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=64,
        verbose=False,
        n_threads=2,
        n_threads_batch=2,
        type_k=kv_type,
        type_v=kv_type,
        flash_attn=False,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


@pytest.fixture(scope="session")
def compare(tmp_path_factory):
    """compare(family, qtype, kv="f32", **overrides) -> ember vs llama.cpp on one family's file,
    both with a KV cache of type kv ("f32" or "f16", llama.cpp's default): max |diff|,
    llama.cpp's logit std, top-1 agreement where llama.cpp's top-1 leads by >= 0.5, and how many
    positions that is."""
    cache: dict = {}

    def get(family: str, qtype: str, kv: str = "f32", **overrides) -> dict:
        key = (family, qtype, kv, tuple(sorted(overrides.items())))
        if key not in cache:
            model = tg.build_family(family, qtype=qtype, **overrides)
            path = tg.write_model(model, tmp_path_factory.mktemp(f"peer-{family}-{qtype}") / "m.gguf")
            ids = token_ids(model.hparams["n_vocab"])
            ours = ember.load(path, kv_cache=kv).logits(ids).astype(np.float64)
            theirs = llama_cpp_logits(path, ids, GGML_TYPE_F16 if kv == "f16" else GGML_TYPE_F32)
            top2 = np.sort(theirs, axis=1)[:, -2:]
            sure = top2[:, 1] - top2[:, 0] >= 0.5
            cache[key] = dict(
                max_abs=float(np.max(np.abs(ours - theirs))),
                std=float(np.std(theirs)),
                top1_agree=bool(np.all(ours[sure].argmax(1) == theirs[sure].argmax(1))),
                n_sure=int(sure.sum()),
            )
        return cache[key]

    return get


def tolerance(family: str, qtype: str) -> float:
    """Allowed max |ember - llama.cpp| / logit std. With F32 weights the two agree to ~1e-6, except
    gemma3: ggml's GELU reads an F16 lookup table (~1e-3). F16 weights: ggml rounds the activations
    to F16 (~1e-3). Q8_0 weights: ggml quantizes the activations to 8 bits (~0.1)."""
    if qtype == "Q8_0":
        return 0.25
    if qtype == "F16" or family == "gemma3":
        return 1e-2
    return 1e-4


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("family", list(tg.FAMILIES))
def test_llama_cpp_agrees(compare, family, qtype):
    if qtype == "Q8_0" and not CAN_DISABLE_EXTRA_BUFFERS:
        pytest.skip("cannot turn off llama.cpp's extra (AMX) buffers, which crash on quantized tiny models")
    r = compare(family, qtype)
    assert r["n_sure"] >= N_IDS // 2, r  # the comparison is about something
    assert r["top1_agree"], r
    assert r["max_abs"] <= tolerance(family, qtype) * r["std"], r


@pytest.mark.parametrize("family", list(tg.FAMILIES))
def test_llama_cpp_agrees_with_half_kv_caches(compare, family):
    """Both engines round keys and values to halves: the same halves where the two agree to
    float32 rounding, one half ulp (2^-11) apart where a key lies near a rounding boundary."""
    r = compare(family, "F32", kv="f16")
    assert r["n_sure"] >= N_IDS // 2 and r["top1_agree"], r
    assert r["max_abs"] <= 1e-2 * r["std"], r


def test_llama_cpp_sees_the_sliding_window(compare):
    """gemma3 with and without a sliding window (which moves the logits far beyond the tolerance,
    see test_synthetic_models.test_oracle_distinguishes_conventions): llama.cpp agrees on both."""
    a = compare("gemma3", "F32")
    b = compare("gemma3", "F32", sliding_window=0)
    for r in (a, b):
        assert r["top1_agree"] and r["max_abs"] <= tolerance("gemma3", "F32") * r["std"], r


def test_llama_cpp_agrees_on_the_synthetic_moe(tmp_path):
    """The bench's synthetic Qwen3-MoE (small): llama.cpp loads it, and ember's fused MoE step
    (K-quant experts, grouped by the rows that chose them) gives its logits."""
    from ember.bench import synth_moe
    from ember.bench.runners import QUICK_MOE

    donor = tg.write_family(tmp_path / "donor.gguf", "llama")
    path = synth_moe.write(tmp_path / "moe.gguf", donor, **QUICK_MOE)
    m = ember.load(path, kv_cache="f32")
    assert m.device.decoder(m.transformer) is not None
    ids = token_ids(m.config.n_vocab)
    ours = m.logits(ids).astype(np.float64)
    theirs = llama_cpp_logits(path, ids)
    assert np.max(np.abs(ours - theirs)) <= 0.25 * np.std(theirs)  # both quantize activations to 8 bits
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.75
