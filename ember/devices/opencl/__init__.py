"""The OpenCL device: a whole dense model on an OpenCL device (a GPU, or the CPU through PoCL),
its KV cache there in half precision.

`forward` enqueues a block's kernels one after another on one in-order queue (`runtime.Kernels`),
over activations that stay on the device: the host uploads the token embeddings and the RoPE
tables, and reads back the logits (or a layer range's hidden state). Nothing waits in between.
The math is the reference forward's (`runtime.model`), with the weights decoded from their GGUF
blocks inside the matmul kernels (`kernels.cl`).
"""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedError
from ...runtime.config import ROPE_NEOX
from ...runtime.rope import rope_tables
from .kv_cache import ClKVCache
from .runtime import MAX_HEAD_DIM, MAXDPT, MAXG, RWG, WG, ClMatrix, Kernels, Placement, find

SPLIT = 256  # keys per attention work-group: a decode step at 4096 keys runs 16 splits a head


class OpenCLOps:
    """A Transformer's math from host arrays (the op-by-op path, and the kernels' tests): each
    call uploads its inputs and reads its result back."""

    def __init__(self, device: OpenCLDevice):
        self.device = device

    def matmul(self, x: np.ndarray, w: ClMatrix, threads: int = 1) -> np.ndarray:
        kn = self.device.kernels
        x = np.ascontiguousarray(x, np.float32).reshape(-1, w.n_in)
        y = kn.buffer(x.shape[0] * w.n_out * 4)
        kn.matmul(w, kn.upload(x), x.shape[0], y)
        return kn.get(y, (x.shape[0], w.n_out))

    def attention(self, q, cache: ClKVCache, il: int, pos: np.ndarray, scale: float, window: int, threads: int = 1):
        kn = self.device.kernels
        n, n_head, _ = q.shape
        out = kn.buffer(n * n_head * cache.head_dim_v * 4)
        self.device.attention(
            kn.upload(np.asarray(q, np.float32)), cache, il, n, n_head, int(pos[0]), scale, window, out
        )
        return kn.get(out, (n, n_head * cache.head_dim_v))


class _Scratch:
    """The activations of a forward of up to `rows` positions, on the device."""

    def __init__(self, kn: Kernels, c, rows: int, vocab_rows: int):
        f = 4 * rows
        hq, hk, hv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
        self.rows, self.vocab_rows = rows, vocab_rows
        self.x, self.h, self.o = (kn.buffer(f * c.n_embd) for _ in range(3))
        self.q, self.k, self.v = kn.buffer(f * hq), kn.buffer(f * hk), kn.buffer(f * hv)
        self.a = kn.buffer(f * c.n_head * c.head_dim_v)
        self.g, self.u = kn.buffer(f * c.n_ff), kn.buffer(f * c.n_ff)
        self.logits = kn.buffer(4 * vocab_rows * c.n_vocab)
        self.cos = self.sin = self.cos_local = self.sin_local = None


class OpenCLDevice:
    """One OpenCL device (`spec`: "opencl" or "opencl:N", see `runtime.find`). `split`: keys per
    attention work-group."""

    def __init__(self, spec: str = "opencl", threads: int | None = None, split: int = SPLIT):
        from ...runtime.threads import default_threads

        self.cl_device = find(spec)
        self.name = spec
        self.threads = threads or default_threads()  # the host's share: embeddings, sampling
        self.kernels = Kernels(self.cl_device)
        self.placement = Placement(self.kernels)
        self.ops = OpenCLOps(self)
        self.split = split
        self._vectors: dict[tuple[int, str], object] = {}
        self._scratch: dict[int, _Scratch] = {}
        self._partials = (None, None, 0)  # the attention's split sums, (max, sum) pairs, rows

    def describe(self) -> str:
        d = self.cl_device
        return f"{self.name}: {d.name.strip()} ({d.platform.name.strip()})"

    def with_threads(self, threads: int, model=None) -> OpenCLDevice:
        return self

    def new_cache(self, model, n_ctx: int | None = None) -> ClKVCache:
        c = model.cfg
        self.check(model)
        return ClKVCache(self.kernels, c.n_layer, c.n_head_kv, c.head_dim, c.head_dim_v, n_ctx or c.context_length)

    def check(self, model) -> None:
        """UnsupportedError for what this device does not run yet."""
        c = model.cfg
        if c.is_moe:
            raise UnsupportedError("mixture-of-experts models do not run on the OpenCL device yet; use device='cpu'")
        dims = (c.head_dim, c.head_dim_v)
        if c.n_head // c.n_head_kv > MAXG or max(dims) > min(MAX_HEAD_DIM, MAXDPT * WG) or dims[0] % 8 or dims[1] % 8:
            raise UnsupportedError(
                f"the OpenCL attention takes up to {MAXG} query heads per key/value head and head dims that are "
                f"multiples of 8 up to {MAX_HEAD_DIM}; this model has {c.n_head // c.n_head_kv} and {dims}"
            )

    # ---- the forward ---------------------------------------------------------------------
    def _vector(self, model, name: str):
        key = (id(model), name)
        buf = self._vectors.get(key)
        if buf is None:
            buf = self._vectors[key] = self.kernels.upload(model.store.get(name).reshape(-1).astype(np.float32))
        return buf

    def _bias(self, model, name: str):
        return self._vector(model, name) if model.store.has(name) else None

    def _buffers(self, model, n: int, vocab_rows: int) -> _Scratch:
        s = self._scratch.get(id(model))
        if s is None or s.rows < n or s.vocab_rows < vocab_rows:
            rows = max(n, s.rows if s else 0)
            s = self._scratch[id(model)] = _Scratch(
                self.kernels, model.cfg, rows, max(vocab_rows, s.vocab_rows if s else 0)
            )
        return s

    def attention(self, q, cache: ClKVCache, il: int, n: int, n_head: int, pos0: int, scale: float, window: int, out):
        """out [n, n_head * dv] = attention of q [n, n_head, d] (device buffers) at positions
        pos0.. over layer il's cached keys, split-K over `split` keys a work-group (work-item
        on a CPU device)."""
        kn, c = self.kernels, cache
        n_split = -(-(pos0 + n) // self.split)
        rows = n * n_head * n_split
        parts, ml, have = self._partials
        if have < rows:
            parts, ml = kn.buffer(8 * rows * c.head_dim_v), kn.buffer(16 * rows)  # room for twice as many
            self._partials = (parts, ml, 2 * rows)
        if kn.by_rows:
            shape, local, extra = (-(-n * n_head // RWG) * RWG, n_split), (RWG, 1), (np.int32(n * n_head),)
        else:
            shape, local, extra = (WG, n * c.n_head_kv, n_split), (WG, 1, 1), ()
        kn.run(
            "attn_rows" if kn.by_rows else "attn_split",
            shape,
            local,
            q,
            c.kc[il],
            c.vc[il],
            *(np.int32(a) for a in (n_head, c.n_head_kv, c.head_dim, c.head_dim_v, c.cap, pos0, window)),
            np.float32(scale),
            np.int32(self.split),
            parts,
            ml,
            *extra,
        )
        kn.run(
            "attn_merge", (c.head_dim_v, n * n_head), None, parts, ml, np.int32(n_split), np.int32(c.head_dim_v), out
        )

    def forward(self, model, ids, cache: ClKVCache, *, all_logits: bool = True, layers: range | None = None):
        self.check(model)
        c, kn = model.cfg, self.kernels
        layers = model.check_layers(layers)
        x = model.embed(ids) if layers.start == 0 else np.asarray(ids, np.float32)
        n = x.shape[0]
        cache.check_room(n)
        cache.reserve(n)
        last = layers.stop == c.n_layer
        s = self._buffers(model, n, (n if all_logits else 1) if last else 0)
        kn.put(s.x, x)
        pos = np.arange(cache.length, cache.length + n)
        s.cos, s.sin = (kn.upload(t) for t in rope_tables(pos, c.rope_dim, c.rope_base))
        if any(c.swa_layers):
            s.cos_local, s.sin_local = (kn.upload(t) for t in rope_tables(pos, c.rope_dim, c.rope_base_local))
        for il in layers:
            self._block(model, il, s, n, cache)
        if not last:
            return kn.get(s.x, (n, c.n_embd))
        cache.commit(n)
        rows = n if all_logits else 1
        kn.copy(s.h, s.x, 4 * rows * c.n_embd, 0, 4 * (n - rows) * c.n_embd)
        self._norm(s.h, self._vector(model, "output_norm.weight"), rows, c.n_embd, c.rms_eps)
        kn.matmul(model.store.matrix(model.output_name), s.h, rows, s.logits)
        return kn.get(s.logits, (rows, c.n_vocab))

    def _norm(self, buf, w, rows: int, width: int, eps: float, out=None) -> None:
        self.kernels.run(
            "rms_norm", (rows * WG,), (WG,), buf, w, buf if out is None else out, np.int32(width), np.float32(eps)
        )

    def _block(self, model, il: int, s: _Scratch, n: int, cache: ClKVCache) -> None:
        c, kn, st = model.cfg, self.kernels, model.store
        L = f"blk.{il}."
        vec = lambda part: self._vector(model, L + part + ".weight")  # noqa: E731
        mat = lambda part: st.matrix(L + part + ".weight")  # noqa: E731
        self._norm(s.x, vec("attn_norm"), n, c.n_embd, c.rms_eps, out=s.h)
        for part, buf in (("attn_q", s.q), ("attn_k", s.k), ("attn_v", s.v)):
            kn.matmul(mat(part), s.h, n, buf, self._bias(model, L + part + ".bias"))
        if c.spec.qk_norm:
            head = c.spec.qk_norm == "head"
            for part, buf, heads in (("attn_q_norm", s.q, c.n_head), ("attn_k_norm", s.k, c.n_head_kv)):
                rows, width = (n * heads, c.head_dim) if head else (n, heads * c.head_dim)
                self._norm(buf, vec(part), rows, width, c.rms_eps)
        swa = c.swa_layers[il]
        cos, sin = (s.cos_local, s.sin_local) if swa else (s.cos, s.sin)
        neox = np.int32(c.spec.rope == ROPE_NEOX)
        half = c.rope_dim // 2
        for buf, heads in ((s.q, c.n_head), (s.k, c.n_head_kv)):
            kn.run(
                "rope",
                (n * heads * half,),
                None,
                buf,
                cos,
                sin,
                np.int32(heads),
                np.int32(c.head_dim),
                np.int32(half),
                neox,
            )
        cache.write(il, s.k, s.v, n)
        self.attention(s.q, cache, il, n, c.n_head, cache.length, c.attn_scale, c.sliding_window if swa else 0, s.a)
        kn.matmul(mat("attn_output"), s.a, n, s.o)
        if c.spec.gemma:
            self._norm(s.o, vec("post_attention_norm"), n, c.n_embd, c.rms_eps)
        kn.run("add", (n * c.n_embd,), None, s.x, s.o)
        self._norm(s.x, vec("ffn_norm"), n, c.n_embd, c.rms_eps, out=s.h)
        kn.matmul(mat("ffn_gate"), s.h, n, s.g)
        kn.matmul(mat("ffn_up"), s.h, n, s.u)
        kn.run("glu", (n * c.n_ff,), None, s.g, s.u, np.int32(c.spec.ffn_act == "gelu"))
        kn.matmul(mat("ffn_down"), s.g, n, s.o)
        if c.spec.gemma:
            self._norm(s.o, vec("post_ffw_norm"), n, c.n_embd, c.rms_eps)
        kn.run("add", (n * c.n_embd,), None, s.x, s.o)
