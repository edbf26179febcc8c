"""The fast CPU path (quantized weights in place, table-lookup matvec) against the float32 reference."""

import numpy as np

from conftest import reference


def test_logits_close_to_reference(catalog_model):
    fast, ref = catalog_model("smollm2-135m"), catalog_model("smollm2-135m", "numpy")
    for p in reference("smollm2-135m")["prompts"][:3]:
        ids = p["prompt_token_ids"]
        a, b = fast.logits(ids), ref.logits(ids)  # prefill: dequantized tiles + BLAS
        assert np.abs(a - b).max() < 0.05
        s, r = fast.session(), ref.session()  # decode: the matvec kernels, one token at a time
        s.feed(ids[:-1]), r.feed(ids[:-1])
        da, db = s.feed(ids[-1:])[0], r.feed(ids[-1:])[0]
        assert np.abs(da - db).max() < 0.25 * db.std()
        assert set(np.argsort(-da)[:5].tolist()) & set(np.argsort(-db)[:5].tolist())


def test_perplexity_within_1_percent_of_reference(catalog_model, ppl_text):
    fast = catalog_model("smollm2-135m").perplexity(ppl_text)
    ref = catalog_model("smollm2-135m", "numpy").perplexity(ppl_text)
    assert abs(fast / ref - 1) < 0.01, (fast, ref)
