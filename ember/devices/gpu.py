"""A whole dense model on a GPU-style device (OpenCL, CUDA): the forward, written once over a
backend's primitives, with activations that stay on the device.

`GpuDevice.forward` runs a block's steps one after another (RMSNorm, the q/k/v matmuls and their
biases, q/k norms, RoPE, the key/value store, split-K attention, the output matmul, the gated FFN,
the residual adds); the host uploads the token embeddings and the RoPE tables and reads back the
logits (or a layer range's hidden state). A backend (`opencl.OpenCLDevice`,
`cuda.CudaDevice`) supplies:

- `kernels`: `buffer(nbytes)`, `region(buf, offset, nbytes)` (a buffer's bytes as a buffer),
  `upload(host)`, `put(buf, host)`, `get(buf, shape)`,
  `copy(dst, src, nbytes, dst_offset, src_offset)` and `matmul(w, x, n, y, bias)` over its
  buffers (`GpuMatrix.buf` holds a matrix's GGUF rows, decoded in the kernel);
  `halves(*shape)` (a float16 array: the KV cache, `GpuKVCache`) and `kv_store(k, v, kc, vc,
  n, cache)` (n new positions into a layer's cache at its length);
- `norm`, `rope`, `add`, `glu` and `attention` (below);
- its limits (`max_group`, `max_head_dim`) and `describe()`.

`attend_rows` runs one layer's attention for rows handed over from the host (the hybrid
device's, `devices.hybrid`). The math is the reference forward's (`runtime.model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from ..errors import UnsupportedError
from ..formats.gguf import type_name
from ..runtime.config import ROPE_NEOX
from ..runtime.kv_cache import KVCache, from_half
from ..runtime.rope import rope_tables

# the GGUF types the matmul kernels of every backend decode, by the kernel's suffix
MATMUL_TYPES = {
    int(GGMLType.F32): "f32",
    int(GGMLType.F16): "f16",
    int(GGMLType.Q4_0): "q4_0",
    int(GGMLType.Q4_1): "q4_1",
    int(GGMLType.Q5_0): "q5_0",
    int(GGMLType.Q5_1): "q5_1",
    int(GGMLType.Q8_0): "q8_0",
    int(GGMLType.Q4_K): "q4_k",
    int(GGMLType.Q5_K): "q5_k",
    int(GGMLType.Q6_K): "q6_k",
}


@dataclass
class GpuMatrix:
    """A matrix on a device: its GGUF rows as they are in the file."""

    buf: object
    kind: str  # the matmul kernel's suffix
    n_out: int
    n_in: int
    row_bytes: int
    nbytes: int


class GpuPlacement:
    """A WeightStore's placement on a device: each matrix uploaded as its rows."""

    frugal = False  # a CPU placement's option; the device holds its own copy

    def __init__(self, device: GpuDevice):
        self.device = device

    def matrix(self, store, name: str, expert: int | None = None) -> GpuMatrix:
        info = store.gguf.info(name)
        kind = MATMUL_TYPES.get(int(info.qtype))
        if kind is None:
            names = ", ".join(type_name(t) for t in MATMUL_TYPES)
            raise UnsupportedError(
                f"{name}: type {info.type_name} has no {self.device.kind} kernel (these do: {names}); use device='cpu'"
            )
        if info.shape[-1] % 32:
            raise UnsupportedError(
                f"{name}: rows of {info.shape[-1]} weights; the {self.device.kind} kernels take multiples of 32"
            )
        raw = store.raw_rows(name, expert)
        return GpuMatrix(
            self.device.kernels.upload(raw.reshape(-1)), kind, raw.shape[0], info.shape[-1], raw.shape[1], raw.nbytes
        )

    def prepare(self, store) -> str:
        n = 0
        for name, info in store.gguf.tensors.items():
            if len(info.shape) == 2 and name != "token_embd.weight":
                store.matrix(name)
                n += 1
        return f"{n} matrices uploaded to {self.device.describe()}"


class GpuOps:
    """A Transformer's math from host arrays (the op-by-op path, and the kernels' tests): each
    call uploads its inputs and reads its result back."""

    def __init__(self, device: GpuDevice):
        self.device = device

    def matmul(self, x: np.ndarray, w: GpuMatrix, threads: int = 1) -> np.ndarray:
        kn = self.device.kernels
        x = np.ascontiguousarray(x, np.float32).reshape(-1, w.n_in)
        y = kn.buffer(x.shape[0] * w.n_out * 4)
        kn.matmul(w, kn.upload(x.reshape(-1)), x.shape[0], y)
        return kn.get(y, (x.shape[0], w.n_out))

    def attention(self, q, cache, il: int, pos: np.ndarray, scale: float, window: int, threads: int = 1):
        kn = self.device.kernels
        n, n_head, _ = q.shape
        out = kn.buffer(n * n_head * cache.head_dim_v * 4)
        q = kn.upload(np.ascontiguousarray(q, np.float32).reshape(-1))
        self.device.attention(q, cache, il, n, n_head, int(pos[0]), scale, window, out)
        return kn.get(out, (n, n_head * cache.head_dim_v))


class Scratch:
    """The activations of a forward of up to `rows` positions, on the device (float32 buffers)."""

    def __init__(self, kn, c, rows: int, vocab_rows: int):
        f = 4 * rows
        hq, hk, hv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
        self.rows, self.vocab_rows = rows, vocab_rows
        self.x, self.h, self.o = (kn.buffer(f * c.n_embd) for _ in range(3))
        self.q, self.k, self.v = kn.buffer(f * hq), kn.buffer(f * hk), kn.buffer(f * hv)
        self.a = kn.buffer(f * c.n_head * c.head_dim_v)
        self.g, self.u = kn.buffer(f * c.n_ff), kn.buffer(f * c.n_ff)
        self.logits = kn.buffer(4 * vocab_rows * c.n_vocab)
        self.cos = self.sin = self.cos_local = self.sin_local = None


class GpuKVCache(KVCache):
    """The KV cache on a device: KVCache's length, room and rollback; per layer, keys [n_kv,
    cap, head_dim] and values [n_kv, cap, head_dim_v] in half precision (`kernels.halves`),
    grown by doubling up to the context length (a grown cache copies each head's positions)."""

    def __init__(self, kernels, n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int, max_len: int):
        super().__init__(n_layer, n_head_kv, head_dim, head_dim_v, max_len)
        self.kernels = kernels
        self.cap = 0
        self.kc: list = []  # per layer, device buffers
        self.vc: list = []

    def _reserve(self, n: int) -> None:
        if n <= self.cap:
            return
        cap = min(self.max_len, max(n, 2 * self.cap, 256))
        kn = self.kernels
        new = []
        for bufs, dim in ((self.kc, self.head_dim), (self.vc, self.head_dim_v)):
            grown = [kn.halves(self.n_head_kv, cap, dim) for _ in range(self.n_layer)]
            if self.cap:  # every position, committed or not: a batch run layer by layer commits last
                for old, buf in zip(bufs, grown):
                    for h in range(self.n_head_kv):
                        kn.copy(buf, old, self.cap * dim * 2, h * cap * dim * 2, h * self.cap * dim * 2)
            new.append(grown)
        self.kc, self.vc = new
        self.cap = cap

    def write(self, il: int, k, v, n: int) -> None:
        """Keys and values of n new positions (device buffers [n, n_kv, d], float32) after the
        committed ones, rounded to halves."""
        self.check_room(n)
        self._reserve(self.length + n)
        self.kernels.kv_store(k, v, self.kc[il], self.vc[il], n, self)

    def store(self, il: int, k: np.ndarray, v: np.ndarray) -> None:
        """KVCache.store from the host (the op-by-op path): k, v [n, n_head_kv, d], float32."""
        kn = self.kernels
        up = lambda a: kn.upload(np.ascontiguousarray(a, np.float32).reshape(-1))  # noqa: E731
        self.write(il, up(k), up(v), k.shape[0])

    def floats(self, il: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer il's keys and values of positions < end as float32 ([n_head_kv, end, d]), read back."""
        kn = self.kernels
        k = kn.get(self.kc[il], (self.n_head_kv, self.cap, self.head_dim), np.uint16)[:, :end]
        v = kn.get(self.vc[il], (self.n_head_kv, self.cap, self.head_dim_v), np.uint16)[:, :end]
        return from_half(k), from_half(v)

    def nbytes(self) -> int:
        return 2 * self.n_layer * self.n_head_kv * self.cap * (self.head_dim + self.head_dim_v)


class GpuDevice:
    """The forward over a backend's primitives; a subclass sets `kernels`, `kind` ("OpenCL",
    "CUDA"), `max_group`, `max_head_dim` and implements the primitives below."""

    kind = "GPU"
    max_group = 16  # query heads per key/value head, at most
    max_head_dim = 256

    def __init__(self, name: str, threads: int | None, kernels, split: int = 256):
        from ..runtime.threads import default_threads

        self.name = name
        self.threads = threads or default_threads()  # the host's share: embeddings, sampling
        self.kernels = kernels
        self.placement = GpuPlacement(self)
        self.ops = GpuOps(self)
        self._vectors: dict[tuple[int, str], object] = {}
        self._scratch: dict[int, Scratch] = {}
        self._handoff: tuple = (None,)  # (layout, buffer, its q, k, v regions, the output): `attend_rows`
        self.split = split  # keys per split of the attention (flash decoding)
        self._partials = (None, None, 0)  # the attention's split sums, (max, sum) pairs, rows

    def with_threads(self, threads: int, model=None) -> GpuDevice:
        return self

    def check(self, model) -> None:
        """UnsupportedError for what this device does not run yet."""
        if model.cfg.is_moe:
            raise UnsupportedError(
                f"mixture-of-experts models do not run on the {self.kind} device yet; use device='cpu'"
            )
        self.check_attention(model)

    def check_attention(self, model) -> None:
        """UnsupportedError for an attention this device's kernels do not take."""
        c = model.cfg
        dims = (c.head_dim, c.head_dim_v)
        if c.n_head // c.n_head_kv > self.max_group or max(dims) > self.max_head_dim or dims[0] % 8 or dims[1] % 8:
            raise UnsupportedError(
                f"the {self.kind} attention takes up to {self.max_group} query heads per key/value head and head "
                f"dims that are multiples of 8 up to {self.max_head_dim}; this model has "
                f"{c.n_head // c.n_head_kv} and {dims}"
            )

    # ---- a backend's primitives (buffers hold float32 unless said) -------------------------
    def norm(self, buf, w, rows: int, width: int, eps: float, out=None) -> None:
        """out (or buf) [rows, width] = RMSNorm of buf's rows, times w."""
        raise NotImplementedError

    def rope(self, buf, cos, sin, n: int, heads: int, head_dim: int, half: int, neox: bool) -> None:
        """RoPE in place on buf [n, heads, head_dim], its first 2 * half dims (cos, sin [n, half])."""
        raise NotImplementedError

    def add(self, x, y, count: int) -> None:
        """x[:count] += y[:count]."""
        raise NotImplementedError

    def glu(self, g, u, count: int, gelu: bool) -> None:
        """g[:count] = act(g) * u: SiLU, or the tanh approximation of GELU."""
        raise NotImplementedError

    def attention(self, q, cache, il: int, n: int, n_head: int, pos0: int, scale: float, window: int, out) -> None:
        """out [n, n_head * dv] = attention of q [n, n_head, d] at positions pos0.. over layer
        il's cached keys (split-K: flash-decoding)."""
        raise NotImplementedError

    def split_sums(self, cache: GpuKVCache, n: int, n_head: int, pos0: int):
        """(splits, buffers of the splits' sums and their (max, sum) pairs) for the attention of
        n rows at pos0.. over `split` keys each; the buffers grow, with room to spare."""
        n_split = -(-(pos0 + n) // self.split)
        rows = n * n_head * n_split
        parts, ml, have = self._partials
        if have < rows:
            kn = self.kernels
            parts, ml = kn.buffer(8 * rows * cache.head_dim_v), kn.buffer(16 * rows)  # room for twice as many
            self._partials = (parts, ml, 2 * rows)
        return n_split, parts, ml

    def new_cache(self, model, n_ctx: int | None = None) -> GpuKVCache:
        c = model.cfg
        self.check_attention(model)
        return GpuKVCache(self.kernels, c.n_layer, c.n_head_kv, c.head_dim, c.head_dim_v, n_ctx or c.context_length)

    def describe(self) -> str:
        raise NotImplementedError

    def attend_rows(self, model, cache: GpuKVCache, il: int, flat: np.ndarray, offsets, n: int) -> np.ndarray:
        """Layer il's attention of n rows given from the host in one array (`flat`: q [n,
        n_head * head_dim], k [n, n_kv * head_dim] and v [n, n_kv * head_dim_v] rows, RoPE
        done, starting at `offsets` bytes: the fused step's hand-off), uploaded in one copy:
        their keys and values into the cache at its length, the output [n, n_head * head_dim_v]
        read back."""
        c, kn = model.cfg, self.kernels
        key = (flat.nbytes, tuple(offsets))
        if self._handoff[0] != key:
            buf = kn.buffer(flat.nbytes)
            ends = (*offsets[1:], flat.nbytes)
            rows = (offsets[1] - offsets[0]) // (4 * c.n_head * c.head_dim)  # the rows a q block holds
            out = kn.buffer(4 * rows * c.n_head * c.head_dim_v)
            self._handoff = (key, buf, *(kn.region(buf, o, e - o) for o, e in zip(offsets, ends)), out)
        _, buf, q, k, v, out = self._handoff
        kn.put(buf, flat)
        cache.write(il, k, v, n)
        window = c.sliding_window if c.swa_layers[il] else 0
        self.attention(q, cache, il, n, c.n_head, cache.length, c.attn_scale, window, out)
        return kn.get(out, (n, c.n_head * c.head_dim_v))

    # ---- the forward ---------------------------------------------------------------------
    def _vector(self, model, name: str):
        key = (id(model), name)
        buf = self._vectors.get(key)
        if buf is None:
            buf = self._vectors[key] = self.kernels.upload(model.store.get(name).reshape(-1).astype(np.float32))
        return buf

    def _bias(self, model, name: str):
        return self._vector(model, name) if model.store.has(name) else None

    def _buffers(self, model, n: int, vocab_rows: int) -> Scratch:
        s = self._scratch.get(id(model))
        if s is None or s.rows < n or s.vocab_rows < vocab_rows:
            rows = max(n, s.rows if s else 0)
            s = self._scratch[id(model)] = Scratch(
                self.kernels, model.cfg, rows, max(vocab_rows, s.vocab_rows if s else 0)
            )
        return s

    def forward(self, model, ids, cache, *, all_logits: bool = True, layers: range | None = None):
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
        self.norm(s.h, self._vector(model, "output_norm.weight"), rows, c.n_embd, c.rms_eps)
        kn.matmul(model.store.matrix(model.output_name), s.h, rows, s.logits)
        return kn.get(s.logits, (rows, c.n_vocab))

    def _block(self, model, il: int, s: Scratch, n: int, cache) -> None:
        c, kn, st = model.cfg, self.kernels, model.store
        L = f"blk.{il}."
        vec = lambda part: self._vector(model, L + part + ".weight")  # noqa: E731
        mat = lambda part: st.matrix(L + part + ".weight")  # noqa: E731
        self.norm(s.x, vec("attn_norm"), n, c.n_embd, c.rms_eps, out=s.h)
        for part, buf in (("attn_q", s.q), ("attn_k", s.k), ("attn_v", s.v)):
            kn.matmul(mat(part), s.h, n, buf, self._bias(model, L + part + ".bias"))
        if c.spec.qk_norm:
            head = c.spec.qk_norm == "head"
            for part, buf, heads in (("attn_q_norm", s.q, c.n_head), ("attn_k_norm", s.k, c.n_head_kv)):
                rows, width = (n * heads, c.head_dim) if head else (n, heads * c.head_dim)
                self.norm(buf, vec(part), rows, width, c.rms_eps)
        swa = c.swa_layers[il]
        cos, sin = (s.cos_local, s.sin_local) if swa else (s.cos, s.sin)
        neox = c.spec.rope == ROPE_NEOX
        for buf, heads in ((s.q, c.n_head), (s.k, c.n_head_kv)):
            self.rope(buf, cos, sin, n, heads, c.head_dim, c.rope_dim // 2, neox)
        cache.write(il, s.k, s.v, n)
        self.attention(s.q, cache, il, n, c.n_head, cache.length, c.attn_scale, c.sliding_window if swa else 0, s.a)
        kn.matmul(mat("attn_output"), s.a, n, s.o)
        if c.spec.gemma:
            self.norm(s.o, vec("post_attention_norm"), n, c.n_embd, c.rms_eps)
        self.add(s.x, s.o, n * c.n_embd)
        self.norm(s.x, vec("ffn_norm"), n, c.n_embd, c.rms_eps, out=s.h)
        kn.matmul(mat("ffn_gate"), s.h, n, s.g)
        kn.matmul(mat("ffn_up"), s.h, n, s.u)
        self.glu(s.g, s.u, n * c.n_ff, c.spec.ffn_act == "gelu")
        kn.matmul(mat("ffn_down"), s.g, n, s.o)
        if c.spec.gemma:
            self.norm(s.o, vec("post_ffw_norm"), n, c.n_embd, c.rms_eps)
        self.add(s.x, s.o, n * c.n_embd)
