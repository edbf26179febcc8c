"""The fast CPU path (quantized weights in place, table-lookup matvec) against the float32 reference."""

import numpy as np
from conftest import reference


def test_logits_close_to_reference(catalog_model):
    fast, ref = catalog_model("smollm2-135m"), catalog_model("smollm2-135m", "numpy")
    for p in reference("smollm2-135m")["prompts"][:3]:
        ids = p["prompt_token_ids"]
        b = ref.logits(ids)
        tr = fast.transformer  # a prefill past session.N_FUSED_STEPS: dequantized tiles + BLAS
        a = tr.forward(ids, tr.new_cache(len(ids)), all_logits=True, threads=1)
        assert np.abs(a - b).max() < 0.05
        a = fast.logits(ids)  # a short one: the fused step's kernels, 16 tokens at a time
        assert np.abs(a - b).max() < 0.25 * b.std()
        s, r = fast.session(), ref.session()  # decode: the matvec kernels, one token at a time
        s.feed(ids[:-1]), r.feed(ids[:-1])
        da, db = s.feed(ids[-1:])[0], r.feed(ids[-1:])[0]
        assert np.abs(da - db).max() < 0.25 * db.std()
        assert set(np.argsort(-da)[:5].tolist()) & set(np.argsort(-db)[:5].tolist())


def test_perplexity_within_1_percent_of_reference(catalog_model, ppl_text):
    fast = catalog_model("smollm2-135m").perplexity(ppl_text)
    ref = catalog_model("smollm2-135m", "numpy").perplexity(ppl_text)
    assert abs(fast / ref - 1) < 0.01, (fast, ref)


def test_batch_split_between_threads_agrees(tmp_path):
    """A batch of >= 64 rows runs its tiles, float matmuls and attention on several threads.
    Every output is computed whole by one thread, but BLAS may round a column block at the
    edge of a share differently, and the KV cache's rounding to halves can turn such a
    last-bit difference into one half ulp (2^-11) of a key: the logits agree to that, not bit
    for bit."""
    import tiny_gguf as tg

    import ember

    for qtype in ("BF16", "F32"):  # dequantized tiles; a float matrix
        path = tg.write_family(tmp_path / f"{qtype}.gguf", "qwen2", qtype=qtype, n_ctx=128)
        ids = np.random.default_rng(5).integers(0, 200, 100).tolist()
        out = [ember.load(path, threads=t).session().feed(ids) for t in (1, 2, 3)]
        for o in out[1:]:
            assert np.abs(o - out[0]).max() <= 2e-3 * np.abs(out[0]).max()
