"""Synthetic mixture-of-experts models for the bench's `moe` scenario (and, small, for tests):
a qwen3moe-layout GGUF with Qwen3-30B-A3B's layer shape (128 experts, 8 used a token, d_model
2048, expert FFN 768, 32 query heads and 4 kv heads of 128) and fewer layers (12: ~4 GB),
written with `gguf.GGUFWriter`. llama.cpp loads the same file, so it is the peer for speed.

The weights are random valid blocks (Q4_K experts and attention, a Q6_K tied embedding, float32
norms and routers) scaled to a trained model's magnitudes. What is synthetic about the routing,
and made to look like a trained model's:
- expert popularity: a router row's norm sets how widely its expert's logit swings, so how
  often it makes the top k; the norms fall off as a Zipf law (exponent `zipf`) over a random
  order of each layer's experts, so a few experts are chosen often and most rarely.
- the residual stream: the token embeddings are scaled up (EMBD_SCALE) and the projections
  into the stream down (OUT_SCALE), so each layer changes a token's hidden state a little and
  the token keeps its own, as in trained models; guessing layer l + 1's experts from layer l's
  state then finds most of them (docs/moe.md has the figures).
Token statistics are not: ids are drawn at random, the text they make is meaningless. The
tokenizer is a donor file's (the Qwen tokenizer of the catalog's Qwen2.5 models, as Qwen3's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VERSION = 3  # of the weights' recipe: part of the bench's file name, so a changed recipe writes anew
QWEN3_30B_A3B = dict(n_expert=128, n_expert_used=8, n_embd=2048, n_ff_exp=768, n_head=32, n_head_kv=4, head_dim=128)
WEIGHT_SCALE = 0.03  # of random_kquant's f16 scales: weights ~0.01-0.03, as in a trained model
# the token embeddings x30 and the projections into the residual stream (attention output, experts'
# down) x0.6: each layer changes the stream a little and a token's own embedding stays in it (see
# the module's docstring); at 1 and 1, every token's stream was nearly the same from layer 1 on
EMBD_SCALE, OUT_SCALE = 30.0, 0.6


def _blocks(rng, qtype, n_out: int, n_in: int, scale: float = 1.0) -> np.ndarray:
    from ..lut_kernels import kquant

    raw = kquant.random_kquant(rng, qtype, n_out, n_in)
    bb = raw.shape[1] // (n_in // 256)
    blk = raw.reshape(n_out, -1, bb)
    for off in kquant._F16_FIELDS[qtype]:
        h = blk[:, :, off : off + 2].copy().view(np.float16) * np.float16(WEIGHT_SCALE * scale)
        blk[:, :, off : off + 2] = h.view(np.uint8)
    return raw


def _copy_tokenizer(w, donor: Path) -> int:
    """The donor GGUF's tokenizer keys into writer `w`; returns its vocabulary size."""
    import gguf

    from ..formats.gguf_write import copy_fields

    r = gguf.GGUFReader(str(donor))
    copy_fields(r, w, keep=lambda name: name.startswith("tokenizer."))
    return len(r.fields["tokenizer.ggml.tokens"].data)


def write(
    path,
    donor,
    n_layer: int = 12,
    zipf: float = 0.8,
    seed: int = 0,
    n_expert: int = 128,
    n_expert_used: int = 8,
    n_embd: int = 2048,
    n_ff_exp: int = 768,
    n_head: int = 32,
    n_head_kv: int = 4,
    head_dim: int = 128,
    embd_scale: float = EMBD_SCALE,
    out_scale: float = OUT_SCALE,
) -> Path:
    """Write the synthetic qwen3moe model to `path` (the tokenizer from the GGUF `donor`)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(tmp), "qwen3moe")
    n_vocab = _copy_tokenizer(w, Path(donor))
    w.add_name(f"synthetic qwen3moe {n_layer} layers")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff_exp * n_expert_used)
    w.add_expert_feed_forward_length(n_ff_exp)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_expert_used)

    def q(name, qtype, n_out, n_in, lead=(), scale=1.0):
        raw = _blocks(rng, qtype, int(np.prod(lead, dtype=np.int64)) * n_out, n_in, scale)
        w.add_tensor(name, raw.reshape(*lead, n_out, -1), raw_dtype=qtype)

    def f32(name, a):
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))

    q("token_embd.weight", Q.Q6_K, n_vocab, n_embd, scale=embd_scale)
    f32("output_norm.weight", np.ones(n_embd))
    # a router row's norm sets how widely its logit swings, so how often it makes the top k
    spread = 1.0 + 6.0 / np.arange(1, n_expert + 1) ** zipf  # 128 experts, 8 used: the top tenth
    #   of the experts takes ~31% of the choices, the most popular ~6x its even share
    for il in range(n_layer):
        p = f"blk.{il}."
        f32(p + "attn_norm.weight", np.ones(n_embd))
        f32(p + "ffn_norm.weight", np.ones(n_embd))
        f32(p + "attn_q_norm.weight", np.ones(head_dim))
        f32(p + "attn_k_norm.weight", np.ones(head_dim))
        q(p + "attn_q.weight", Q.Q4_K, n_head * head_dim, n_embd)
        q(p + "attn_k.weight", Q.Q4_K, n_head_kv * head_dim, n_embd)
        q(p + "attn_v.weight", Q.Q6_K, n_head_kv * head_dim, n_embd)
        q(p + "attn_output.weight", Q.Q4_K, n_embd, n_head * head_dim, scale=out_scale)
        order = rng.permutation(n_expert)  # each layer its own popular experts
        router = rng.standard_normal((n_expert, n_embd)) * (spread[order] * n_embd**-0.5)[:, None]
        f32(p + "ffn_gate_inp.weight", router)
        q(p + "ffn_gate_exps.weight", Q.Q4_K, n_ff_exp, n_embd, (n_expert,))
        q(p + "ffn_up_exps.weight", Q.Q4_K, n_ff_exp, n_embd, (n_expert,))
        q(p + "ffn_down_exps.weight", Q.Q6_K, n_embd, n_ff_exp, (n_expert,), scale=out_scale)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path
