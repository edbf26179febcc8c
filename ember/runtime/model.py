"""The transformer forward pass over a batch of positions, for dense and MoE architectures.

One code path serves prefill (many positions), verification (a few) and decode (one): embeddings,
then per layer RMSNorm -> q/k/v -> (q/k norms) -> RoPE -> KV cache -> grouped-query attention with
causal and sliding-window masks -> output projection -> (post-norm) -> residual -> RMSNorm -> gated
FFN or top-k experts -> (post-norm) -> residual; then the final norm and the output projection.

Weights come from a `WeightStore`; the math of projections and attention comes from an `ops`
object: `ReferenceOps` here (NumPy, float32 weights: the oracle), or a device's (the CPU's
quantized kernels, `devices.cpu.ops`). Activations are float32. `forward` runs a range of layers
(`layers=`): from token ids when it starts at layer 0, else from the hidden state a previous range
returned; it returns logits when it ends at the last layer, else the hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ..offload.store import WeightStore
from .config import ModelConfig, bytes_per_token
from .kv_cache import KV_TYPES, KVCache, row_width
from .rope import apply_rope, rope_tables


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def silu(x: np.ndarray) -> np.ndarray:
    t = np.negative(x)  # one temporary, updated in place: x / (1 + exp(-x))
    np.exp(t, out=t)
    t += np.float32(1.0)
    return np.divide(x, t, out=t)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.subtract(x, np.max(x, axis=axis, keepdims=True))
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float, window: int) -> np.ndarray:
    """q [n, n_head, d]; k [n_kv, T, d]; v [n_kv, T, dv]; key j sits at position j.
    Returns [n, n_head * dv]. Causal; with window > 0 a query at p sees keys p - window < j <= p."""
    n, n_head, d = q.shape
    n_kv, T, dv = v.shape
    g = n_head // n_kv
    qg = q.reshape(n, n_kv, g, d).transpose(1, 2, 0, 3).reshape(n_kv, g * n, d)
    scores = np.matmul(qg, k.transpose(0, 2, 1)) * np.float32(scale)  # [n_kv, g*n, T]
    keys = np.arange(T)
    allowed = keys[None, :] <= q_pos[:, None]
    if window:
        allowed &= keys[None, :] > q_pos[:, None] - window
    scores = scores.reshape(n_kv, g, n, T)
    scores[:, :, ~allowed] = np.float32(-np.inf)
    probs = softmax(scores)
    out = np.matmul(probs.reshape(n_kv, g * n, T), v)  # [n_kv, g*n, dv]
    return out.reshape(n_kv, g, n, dv).transpose(2, 0, 1, 3).reshape(n, n_head * dv)


class ReferenceOps:
    """The reference math: float32 weight arrays [n_out, n_in] and NumPy attention over the keys
    written so far. `threads` is accepted and unused (BLAS threads are BLAS's own)."""

    def matmul(self, x: np.ndarray, w: np.ndarray, threads: int = 1) -> np.ndarray:
        return x @ w.T

    def attention(
        self, q, cache: KVCache, il: int, pos: np.ndarray, scale: float, window: int, threads: int = 1
    ) -> np.ndarray:
        end = int(pos[-1]) + 1
        return attention(q, *cache.floats(il, end), pos, scale, window)


@dataclass
class LayerNames:
    """Tensor names of one block."""

    i: int

    def __getattr__(self, part: str) -> str:
        return f"blk.{self.i}.{part}.weight"

    def bias(self, part: str) -> str:
        return f"blk.{self.i}.{part}.bias"


class Transformer:
    def __init__(self, config: ModelConfig, store: WeightStore, ops=None, kv_type: str = "f16"):
        self.cfg = config
        self.store = store
        self.ops = ops or ReferenceOps()
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        row_width(kv_type, config.head_dim), row_width(kv_type, config.head_dim_v)  # q8_0 takes whole blocks
        self.kv_type = kv_type  # the KV caches' storage
        self.output_name = "output.weight" if store.has("output.weight") else "token_embd.weight"
        self._check_tensors()
        self._threads = 1

    # ---- validation ----------------------------------------------------------------------
    def _expect(self, name: str, shape: tuple[int, ...], required: bool = True) -> None:
        if not self.store.has(name):
            if required:
                raise FormatError(f"{self.store.gguf.path}: tensor {name!r} is missing (needed by {self.cfg.arch})")
            return
        got = self.store.shape(name)
        if tuple(got) != tuple(shape) and not (len(shape) == 1 and got == (1, shape[0])):
            raise FormatError(f"{self.store.gguf.path}: tensor {name!r} has shape {got}, expected {shape}")

    def _check_tensors(self) -> None:
        c = self.cfg
        d, hq, hk = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        hv = c.n_head_kv * c.head_dim_v
        self._expect("token_embd.weight", (c.n_vocab, d))
        self._expect("output_norm.weight", (d,))
        self._expect(self.output_name, (c.n_vocab, d))
        for i in range(c.n_layer):
            L = LayerNames(i)
            for name, shape in (
                (L.attn_norm, (d,)),
                (L.attn_q, (hq, d)),
                (L.attn_k, (hk, d)),
                (L.attn_v, (hv, d)),
                (L.attn_output, (d, c.n_head * c.head_dim_v)),
                (L.ffn_norm, (d,)),
            ):
                self._expect(name, shape)
            for part, width in (("attn_q", hq), ("attn_k", hk), ("attn_v", hv)):
                self._expect(L.bias(part), (width,), required=False)
            if c.spec.qk_norm == "head":
                self._expect(L.attn_q_norm, (c.head_dim,))
                self._expect(L.attn_k_norm, (c.head_dim,))
            elif c.spec.qk_norm == "full":
                self._expect(L.attn_q_norm, (hq,))
                self._expect(L.attn_k_norm, (hk,))
            if c.spec.gemma:
                for name in (L.post_attention_norm, L.post_ffw_norm):
                    self._expect(name, (d,))
            if self.store.has(L.ffn_gate_inp):
                if not c.is_moe:
                    raise FormatError(
                        f"{self.store.gguf.path}: {L.ffn_gate_inp} is present but {c.arch}.expert_count is not"
                    )
                ff = c.n_ff_exp or c.n_ff
                self._expect(L.ffn_gate_inp, (c.n_expert, d))
                self._expect(L.ffn_gate_exps, (c.n_expert, ff, d))
                self._expect(L.ffn_up_exps, (c.n_expert, ff, d))
                self._expect(L.ffn_down_exps, (c.n_expert, d, ff))
                if c.spec.shared_expert:
                    self._expect(L.ffn_up_shexp, (c.n_ff_shexp or c.n_ff, d))
                self._expect(L.ffn_gate_inp_shexp, (d,), required=c.spec.shared_expert)
                if self.store.has(L.ffn_up_shexp):
                    sh = c.n_ff_shexp or self.store.shape(L.ffn_up_shexp)[0]
                    self._expect(L.ffn_gate_shexp, (sh, d))
                    self._expect(L.ffn_up_shexp, (sh, d))
                    self._expect(L.ffn_down_shexp, (d, sh))
            elif c.is_moe:
                raise FormatError(
                    f"{self.store.gguf.path}: MoE model without {L.ffn_gate_inp} (per-expert tensors "
                    "from old converters are not supported; reconvert the model)"
                )
            else:
                for name, shape in ((L.ffn_gate, (c.n_ff, d)), (L.ffn_up, (c.n_ff, d)), (L.ffn_down, (d, c.n_ff))):
                    self._expect(name, shape)

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decoded token reads, in their resident form (`bytes_per_token`)."""
        return bytes_per_token(self.store.gguf.tensors, self.store.nbytes, self.cfg.n_expert_used, self.cfg.n_expert)

    # ---- forward -------------------------------------------------------------------------
    def new_cache(self, max_len: int | None = None) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layer, c.n_head_kv, c.head_dim, c.head_dim_v, max_len or c.context_length, self.kv_type)

    def check_layers(self, layers: range | None) -> range:
        """`layers` (None: all of them), checked: a non-empty range of layers, step 1."""
        n = self.cfg.n_layer
        if layers is None:
            return range(n)
        if not isinstance(layers, range) or not 0 <= layers.start < layers.stop <= n or layers.step != 1:
            raise ValueError(f"layers must be a non-empty range within 0..{n} with step 1, got {layers!r}")
        return layers

    def embed(self, ids) -> np.ndarray:
        """The input hidden state [n, n_embd] of token ids (checked against the vocabulary)."""
        c = self.cfg
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward() needs at least one token")
        if ids.min() < 0 or ids.max() >= c.n_vocab:
            bad = ids[(ids < 0) | (ids >= c.n_vocab)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{c.n_vocab - 1})")
        x = self.store.rows("token_embd.weight", ids).astype(np.float32)
        if c.embed_scale != 1.0:
            x *= np.float32(c.embed_scale)
        return x

    def forward(
        self, ids, cache: KVCache, all_logits: bool = True, threads: int = 1, layers: range | None = None
    ) -> np.ndarray:
        """Run layers `layers` (default: all) at the positions after the cache's; append their
        keys and values. The input is token ids when the range starts at layer 0, else the
        hidden state [n, n_embd] the previous range returned. A range that ends at the last
        layer commits the positions to the cache and returns logits [n, n_vocab] (or
        [1, n_vocab] for the last position when all_logits is False); another returns the
        hidden state. `threads`: for the ops (BLAS threads are set by the caller)."""
        self._threads = threads
        c = self.cfg
        layers = self.check_layers(layers)
        x = self.embed(ids) if layers.start == 0 else np.asarray(ids, dtype=np.float32)
        n = x.shape[0]
        cache.check_room(n)
        pos = np.arange(cache.length, cache.length + n)
        ropes = {False: rope_tables(pos, c.rope_dim, c.rope_base)}
        if any(c.swa_layers):
            ropes[True] = rope_tables(pos, c.rope_dim, c.rope_base_local)
        for il in layers:
            swa = c.swa_layers[il]
            x = self._block(il, x, pos, cache, ropes[swa], c.sliding_window if swa else 0)
        if layers.stop < c.n_layer:
            return x
        cache.commit(n)
        if not all_logits:
            x = x[-1:]
        x = rms_norm(x, self.store.get("output_norm.weight"), c.rms_eps)
        return self._mm(x, self.store.matrix(self.output_name))

    def _mm(self, x: np.ndarray, w) -> np.ndarray:
        return self.ops.matmul(x, w, self._threads)

    def _proj(self, x: np.ndarray, name: str, bias: str | None = None) -> np.ndarray:
        y = self._mm(x, self.store.matrix(name))
        if bias is not None and self.store.has(bias):
            y += self.store.get(bias)
        return y

    def _block(self, il, x, pos, cache, rope, window) -> np.ndarray:
        c, st, L = self.cfg, self.store, LayerNames(il)
        n = x.shape[0]
        h = rms_norm(x, st.get(L.attn_norm), c.rms_eps)
        q = self._proj(h, L.attn_q, L.bias("attn_q"))
        k = self._proj(h, L.attn_k, L.bias("attn_k"))
        v = self._proj(h, L.attn_v, L.bias("attn_v"))
        q, k = self._qk_norm(L, q, k)
        q = q.reshape(n, c.n_head, c.head_dim)
        k = k.reshape(n, c.n_head_kv, c.head_dim)
        v = v.reshape(n, c.n_head_kv, c.head_dim_v)
        q = apply_rope(q, *rope, c.spec.rope)
        k = apply_rope(k, *rope, c.spec.rope)
        cache.store(il, k, v)
        a = self.ops.attention(q, cache, il, pos, c.attn_scale, window, self._threads)
        o = self._mm(a, st.matrix(L.attn_output))
        if c.spec.gemma:
            o = rms_norm(o, st.get(L.post_attention_norm), c.rms_eps)
        x = x + o
        h = rms_norm(x, st.get(L.ffn_norm), c.rms_eps)
        f = self._moe(L, h) if c.is_moe else self._ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down)
        if c.spec.gemma:
            f = rms_norm(f, st.get(L.post_ffw_norm), c.rms_eps)
        return x + f

    def _qk_norm(self, L: LayerNames, q: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RMSNorm of q and k where the architecture has it: per head (Gemma 3, Qwen3) or over
        the whole projection (OLMoE)."""
        c, st = self.cfg, self.store
        if not c.spec.qk_norm:
            return q, k
        n = q.shape[0]
        out = []
        for t, name, heads in ((q, L.attn_q_norm, c.n_head), (k, L.attn_k_norm, c.n_head_kv)):
            w = st.get(name).reshape(-1)
            if c.spec.qk_norm == "head":
                t = rms_norm(t.reshape(n, heads, c.head_dim), w, c.rms_eps).reshape(n, -1)
            else:
                t = rms_norm(t, w, c.rms_eps)
            out.append(t)
        return out[0], out[1]

    def _ffn(self, h, gate, up, down, expert: int | None = None) -> np.ndarray:
        st = self.store
        g = self._mm(h, st.matrix(gate, expert))
        u = self._mm(h, st.matrix(up, expert))
        act = gelu_tanh(g) if self.cfg.spec.ffn_act == "gelu" else silu(g)
        return self._mm(act * u, st.matrix(down, expert))

    def _moe(self, L: LayerNames, h: np.ndarray) -> np.ndarray:
        c, st = self.cfg, self.store
        probs = softmax(self._mm(h, st.matrix(L.ffn_gate_inp)))  # [n, n_expert]
        top = np.argsort(-probs, axis=1, kind="stable")[:, : c.n_expert_used]
        w = np.take_along_axis(probs, top, axis=1)
        if c.spec.moe_norm_topk:
            w = w / np.sum(w, axis=1, keepdims=True)
        out = np.zeros_like(h)
        for e in np.unique(top).tolist():
            rows, slot = np.nonzero(top == e)
            y = self._ffn(h[rows], L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps, expert=e)
            out[rows] += w[rows, slot][:, None] * y
        if st.has(L.ffn_up_shexp):
            y = self._ffn(h, L.ffn_gate_shexp, L.ffn_up_shexp, L.ffn_down_shexp)
            if st.has(L.ffn_gate_inp_shexp):
                y = y * (1.0 / (1.0 + np.exp(-self._mm(h, st.get(L.ffn_gate_inp_shexp).reshape(1, -1)))))
            out += y
        return out
