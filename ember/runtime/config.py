"""ModelConfig: the hyper-parameters of a model, read from GGUF metadata, per architecture.

Known architectures: dense `llama` (SmolLM2; also Mixtral-style MoE when it has experts), `qwen2`,
`gemma3`, and the MoE families `qwen2moe` (with a gated shared expert), `qwen3moe` and `olmoe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, UnsupportedError
from ..formats.gguf import GGUFFile
from .kv_cache import KV_TYPES, row_width

ROPE_NORM = "norm"  # rotate adjacent pairs (x0, x1), (x2, x3), ...
ROPE_NEOX = "neox"  # rotate (x_i, x_{i + d/2})


@dataclass(frozen=True)
class ArchSpec:
    rope: str
    qkv_bias: bool = False  # q/k/v projections may carry biases
    ffn_act: str = "silu"  # gated FFN activation: silu (SwiGLU) or gelu (GeGLU, tanh approximation)
    moe_norm_topk: bool = False  # renormalise the top-k expert weights to sum to 1
    qk_norm: str = ""  # RMSNorm of q and k: "head" (per head) or "full" (over the whole projection)
    shared_expert: bool = False  # MoE with a sigmoid-gated shared expert beside the routed ones
    gemma: bool = False  # embedding x sqrt(d), post-attention/post-FFN norms, sliding window


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(ROPE_NORM, moe_norm_topk=True),
    "qwen2": ArchSpec(ROPE_NEOX, qkv_bias=True),
    "qwen2moe": ArchSpec(ROPE_NEOX, qkv_bias=True, shared_expert=True),
    "qwen3moe": ArchSpec(ROPE_NEOX, moe_norm_topk=True, qk_norm="head"),
    "olmoe": ArchSpec(ROPE_NEOX, qk_norm="full"),
    "gemma3": ArchSpec(ROPE_NEOX, ffn_act="gelu", qk_norm="head", gemma=True),
}

# Gemma 3 defaults when the file does not say (llama.cpp uses the same)
GEMMA3_SWA_PERIOD = 6  # every 6th layer is global, the others use the sliding window
GEMMA3_ROPE_BASE_LOCAL = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    spec: ArchSpec
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # per-head width of q and k
    head_dim_v: int
    n_ff: int
    n_vocab: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    attn_scale: float  # multiplies q.k
    embed_scale: float  # multiplies the embedding row
    sliding_window: int  # 0 = none
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding window (and the local RoPE base)
    rope_base_local: float
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def kv_cache_bytes(self, n_ctx: int, kv_type: str = "f16") -> int:
        """Bytes of the KV cache at a context of n_ctx tokens (kv_type: a `KV_TYPES` name)."""
        per_value = np.dtype(KV_TYPES[kv_type]).itemsize
        row = row_width(kv_type, self.head_dim) + row_width(kv_type, self.head_dim_v)
        return self.n_layer * self.n_head_kv * n_ctx * row * per_value

    @classmethod
    def from_gguf(cls, g: GGUFFile, n_vocab: int) -> ModelConfig:
        arch = g.architecture
        if arch not in ARCHITECTURES:
            raise UnsupportedError(
                f"architecture {arch!r} is not supported; ember knows: {', '.join(sorted(ARCHITECTURES))}"
            )
        spec = ARCHITECTURES[arch]
        g.validate_model()

        def need(key: str) -> int | float:
            v = g.arch_get(key)
            if v is None:
                raise FormatError(f"{g.path}: required metadata key '{arch}.{key}' is missing")
            return v

        def positive(key: str, v, limit: float = 1 << 24) -> int:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= limit:
                raise FormatError(f"{g.path}: metadata '{arch}.{key}' = {v!r} is not a sensible positive integer")
            return v

        n_embd = positive("embedding_length", need("embedding_length"))
        n_head = positive("attention.head_count", need("attention.head_count"))
        n_head_kv = positive("attention.head_count_kv", g.arch_get("attention.head_count_kv", n_head))
        if n_head % n_head_kv:
            raise FormatError(f"{g.path}: {n_head} attention heads cannot be shared by {n_head_kv} KV heads")
        head_dim = positive("attention.key_length", g.arch_get("attention.key_length", n_embd // n_head))
        head_dim_v = positive("attention.value_length", g.arch_get("attention.value_length", head_dim))
        n_layer = positive("block_count", need("block_count"), 4096)
        n_expert = int(g.arch_get("expert_count", 0) or 0)
        n_expert_used = int(g.arch_get("expert_used_count", 0) or 0)
        if n_expert and not 0 < n_expert_used <= n_expert:
            raise FormatError(
                f"{g.path}: '{arch}.expert_used_count' = {n_expert_used} must be between 1 and "
                f"'{arch}.expert_count' = {n_expert}"
            )
        n_ff = int(g.arch_get("feed_forward_length", 0) or 0)
        # llama.cpp's fallback when the expert width is not stored
        default_ff_exp = n_ff // n_expert_used if n_expert and arch in ("qwen2moe", "qwen3moe") else 0
        n_ff_exp = int(g.arch_get("expert_feed_forward_length", default_ff_exp) or 0)
        rope_dim = positive("rope.dimension_count", g.arch_get("rope.dimension_count", head_dim))
        if rope_dim > head_dim or rope_dim % 2:
            raise FormatError(f"{g.path}: rope dimension {rope_dim} does not fit head size {head_dim}")
        eps = g.arch_get("attention.layer_norm_rms_epsilon", 1e-5)
        rope_base = float(g.arch_get("rope.freq_base", 10000.0))
        ctx = positive("context_length", g.arch_get("context_length", 2048), 1 << 22)

        sliding_window = 0
        swa_layers = (False,) * n_layer
        attn_scale = 1.0 / math.sqrt(head_dim)
        embed_scale = 1.0
        rope_base_local = rope_base
        if spec.gemma:
            sliding_window = int(g.arch_get("attention.sliding_window", 0) or 0)
            period = g.arch_get("attention.sliding_window_pattern", GEMMA3_SWA_PERIOD)
            if not isinstance(period, int) or isinstance(period, bool) or period < 1:
                raise FormatError(
                    f"{g.path}: '{arch}.attention.sliding_window_pattern' = {period!r} is not a positive integer"
                )
            if sliding_window:
                swa_layers = tuple((i + 1) % period != 0 for i in range(n_layer))
            rope_base_local = float(g.arch_get("rope.freq_base_swa", GEMMA3_ROPE_BASE_LOCAL))
            embed_scale = math.sqrt(n_embd)
        if (
            g.arch_get("rope.scaling.type", "none") not in ("none", None)
            and g.arch_get("rope.scaling.factor", 1.0) != 1.0
        ):
            raise UnsupportedError(
                f"RoPE scaling ({g.arch_get('rope.scaling.type')} x{g.arch_get('rope.scaling.factor')}) "
                "is not supported yet"
            )
        return cls(
            arch=arch,
            spec=spec,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_ff=n_ff,
            n_vocab=n_vocab,
            context_length=ctx,
            rms_eps=float(eps),
            rope_base=rope_base,
            rope_dim=rope_dim,
            attn_scale=attn_scale,
            embed_scale=embed_scale,
            sliding_window=sliding_window,
            swa_layers=swa_layers,
            rope_base_local=rope_base_local,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            n_ff_exp=n_ff_exp,
            n_ff_shexp=int(g.arch_get("expert_shared_feed_forward_length", 0) or 0),
        )


def bytes_per_token(tensors: dict, nbytes, n_used: int = 0, n_expert: int = 0) -> int:
    """Bytes of weights one decoded token reads, `nbytes(name)` a tensor's: every tensor once
    (experts: the used share), one embedding row unless the embedding is also the output matrix."""
    tied = "output.weight" not in tensors
    total = 0
    for name, info in tensors.items():
        if name == "token_embd.weight" and not tied:
            total += nbytes(name) // info.shape[0]
        elif "_exps." in name and n_expert:
            total += nbytes(name) * n_used // n_expert
        else:
            total += nbytes(name)
    return total
