"""Tiny but complete GGUF models for tests, and tools to take GGUF files apart and break them.

Writing a model (a few ms; everything is seeded, so the same arguments give the same bytes):

    path = write_tiny_model(tmp_path / "m.gguf", n_layer=2, qtype="Q4_0")
    model = build_tiny_model(n_layer=2, qtype="Q4_0")   # the same model in memory, not written:
    model.tensors["blk.0.attn_q.weight"].weights        #   float32 weights before quantization
    model.tensors["blk.0.attn_q.weight"].data           #   exactly what is stored in the file
    model.tensors["blk.0.attn_q.weight"].dequantized()  #   what a correct reader computes with
    model.metadata["llama.block_count"].value
    write_model(model, path)

Every architecture ember knows can be written (`arch=` llama, qwen2, gemma3, qwen2moe, qwen3moe,
olmoe; llama with `n_expert` is Mixtral), with llama.cpp's tensor names, shapes and metadata keys
for it; `write_family(path, "gemma3")` writes one of the named test families in FAMILIES.

The default model is llama-shaped (llama.cpp's tensor names and metadata) with a real, small tokenizer:
byte-level BPE (`tokenizer="gpt2"`: the 256 GPT-2 byte symbols, merges learnt from a tiny English
text, every merge producing a token of the vocabulary) or SentencePiece (`tokenizer="llama"`:
`<unk>`, `<s>`, `</s>`, 256 `<0xNN>` byte tokens and scored pieces). Both add the ChatML control
tokens and a ChatML chat template.

Taking files apart and breaking them:

    layout = parse_layout(data)              # byte positions of every header field (own parser)
    layout.fields["llama.block_count"].value_pos, layout.tensors["output_norm.weight"].offset_pos
    corrupt(path, bad_path, lambda b: set_u64(b, layout.tensors[name].offset_pos, 33))
    corrupt(path, bad_path, truncate(100))
    gguf_bytes(kv=[("a", GGUFValueType.UINT32, 1)], tensors=[RawTensor("t", [32], 0, data=...)])
                                             # a hand-built file, for what GGUFWriter refuses to write
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from ember.formats.tokenizer import bytes_to_unicode

Q = GGMLQuantizationType
V = GGUFValueType

# Types gguf.quants.quantize can write (and dequantize can read back).
WRITABLE_QTYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)

# token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = (
    "The thing is that the king was singing in the evening. "
    "Then the other one said: the string is in the thing, and there is nothing in the ring! "
    "I think they were thinking of the rain in the morning, and the wind was bringing the sea in. "
    "She is reading the book, writing a letter and going to the meeting at the end of the day. "
    "We went there in 2024; it's 3 o'clock and the weather is fine."
)


# ---- tokenizers ------------------------------------------------------------------------------


# GPT-2's pre-tokenizer, with ASCII classes (good enough for the corpus)
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def learn_merges(words: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    seqs = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, syms in seqs.items():
            for a, b in zip(syms, syms[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        a, b = best
        for w, syms in seqs.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            seqs[w] = out
    return merges


@dataclass(frozen=True)
class TinyTokenizer:
    model: str  # "gpt2" or "llama"
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...] = ()  # gpt2: "a b"
    scores: tuple[float, ...] = ()  # llama: one per token
    bos_id: int = 0
    eos_id: int = 0
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_space_prefix: bool = False

    def id(self, token: str) -> int:
        return self.tokens.index(token)


@cache
def gpt2_tokenizer(n_merges: int = 48, corpus: str = CORPUS) -> TinyTokenizer:
    """Byte-level BPE: 256 byte symbols (id = byte value), one token per merge, then control tokens."""
    sym = bytes_to_unicode()
    words = Counter("".join(sym[b] for b in w.encode("utf-8")) for w in _WORDS.findall(corpus))
    merges = learn_merges(words, n_merges)
    tokens = list(sym)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    types = [NORMAL] * len(tokens)
    for t in CONTROL_TOKENS:
        tokens.append(t)
        types.append(CONTROL)
    return TinyTokenizer(
        model="gpt2",
        tokens=tuple(tokens),
        token_types=tuple(types),
        merges=tuple(f"{a} {b}" for a, b in merges),
        bos_id=tokens.index("<|endoftext|>"),
        eos_id=tokens.index("<|im_end|>"),
        pad_id=tokens.index("<|endoftext|>"),
        add_bos=False,
    )


@cache
def spm_tokenizer(n_merges: int = 48, corpus: str = CORPUS) -> TinyTokenizer:
    """SentencePiece-style: <unk> <s> </s>, <0xNN> byte tokens, the corpus' characters and merged
    pieces scored by merge order (earlier merge = higher score), then the ChatML control tokens."""
    text = "▁" + corpus.replace(" ", "▁")
    words = Counter(re.findall(r"▁?[^▁]+|▁", text))
    merges = learn_merges(words, n_merges)
    tokens = ["<unk>", "<s>", "</s>"]
    types = [UNKNOWN, CONTROL, CONTROL]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(BYTE)
        scores.append(0.0)
    chars = sorted(set(text))
    for i, ch in enumerate(chars):
        tokens.append(ch)
        types.append(NORMAL)
        scores.append(-1000.0 - i)
    seen = set(tokens)
    for i, (a, b) in enumerate(merges):
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            types.append(NORMAL)
            scores.append(-float(i))
    for t in CONTROL_TOKENS[1:]:
        tokens.append(t)
        types.append(CONTROL)
        scores.append(0.0)
    return TinyTokenizer(
        model="llama",
        tokens=tuple(tokens),
        token_types=tuple(types),
        scores=tuple(scores),
        bos_id=1,
        eos_id=2,
        unk_id=0,
        add_bos=True,
        add_space_prefix=True,
    )


def make_tokenizer(kind: str | None) -> TinyTokenizer | None:
    if kind is None:
        return None
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind in ("llama", "spm"):
        return spm_tokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r} (use 'gpt2', 'llama' or None)")


# ---- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaValue:
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None  # element type of an array


@dataclass
class TinyTensor:
    name: str
    qtype: GGMLQuantizationType
    weights: np.ndarray  # float32, NumPy shape, before quantization
    data: np.ndarray  # as stored in the file (gguf.quants.quantize output)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weights.shape

    def dequantized(self) -> np.ndarray:
        """The float32 weights a correct reader sees."""
        if self.qtype == Q.F32:
            return self.data
        return gguf.quants.dequantize(self.data, self.qtype).astype(np.float32).reshape(self.shape)

    @property
    def raw_bytes(self) -> bytes:
        return np.ascontiguousarray(self.data).tobytes()


@dataclass
class TinyModel:
    arch: str
    metadata: dict[str, MetaValue]
    tensors: dict[str, TinyTensor]
    tokenizer: TinyTokenizer | None
    hparams: dict[str, Any] = field(default_factory=dict)
    alignment: int = 32


def as_qtype(qtype: GGMLQuantizationType | int | str) -> GGMLQuantizationType:
    if isinstance(qtype, str):
        return Q[qtype.upper()]
    return Q(qtype)


def quantize(weights: np.ndarray, qtype: GGMLQuantizationType | int | str) -> np.ndarray:
    qtype = as_qtype(qtype)
    if qtype not in WRITABLE_QTYPES:
        raise ValueError(
            f"cannot write {qtype.name} tensors (gguf.quants can write {[t.name for t in WRITABLE_QTYPES]})"
        )
    block = GGML_QUANT_SIZES[qtype][0]
    if weights.shape[-1] % block:
        raise ValueError(f"row length {weights.shape[-1]} is not a multiple of the {qtype.name} block size {block}")
    return gguf.quants.quantize(np.ascontiguousarray(weights, dtype=np.float32), qtype)


def _infer_meta(key: str, v: Any) -> MetaValue:
    if isinstance(v, MetaValue):
        return v
    if isinstance(v, tuple) and len(v) in (2, 3) and isinstance(v[1], GGUFValueType):
        return MetaValue(*v)
    if isinstance(v, bool):
        return MetaValue(v, V.BOOL)
    if isinstance(v, (int, np.integer)):
        return MetaValue(int(v), V.UINT32 if 0 <= v < 2**32 else V.INT64)
    if isinstance(v, (float, np.floating)):
        return MetaValue(float(v), V.FLOAT32)
    if isinstance(v, str):
        return MetaValue(v, V.STRING)
    if isinstance(v, np.ndarray):
        sub = {
            np.dtype(np.int32): V.INT32,
            np.dtype(np.float32): V.FLOAT32,
            np.dtype(np.uint32): V.UINT32,
            np.dtype(np.int64): V.INT64,
            np.dtype(np.uint8): V.UINT8,
            np.dtype(np.float64): V.FLOAT64,
        }
        return MetaValue(v.tolist(), V.ARRAY, sub[v.dtype])
    if isinstance(v, (list, tuple)):
        if all(isinstance(x, str) for x in v):
            return MetaValue(list(v), V.ARRAY, V.STRING)
        if all(isinstance(x, bool) for x in v):
            return MetaValue(list(v), V.ARRAY, V.BOOL)
        if all(isinstance(x, (int, np.integer)) for x in v):
            return MetaValue([int(x) for x in v], V.ARRAY, V.INT32)
        return MetaValue([float(x) for x in v], V.ARRAY, V.FLOAT32)
    raise TypeError(f"cannot infer a GGUF type for metadata {key!r} = {v!r}; pass (value, GGUFValueType)")


def _file_type(qtype: GGMLQuantizationType) -> int:
    if qtype == Q.F32:
        return int(gguf.LlamaFileType.ALL_F32)
    return int(gguf.LlamaFileType[f"MOSTLY_{qtype.name}"])


# Per-architecture conventions, as llama.cpp's loader expects them (src/models/<arch>.cpp).
MOE_ARCHES = ("qwen2moe", "qwen3moe", "olmoe")  # always MoE; llama is MoE (Mixtral) when n_expert > 0
QKV_BIAS_ARCHES = ("qwen2", "qwen2moe")
UNTIED_ARCHES = ("qwen2moe", "olmoe")  # llama.cpp requires output.weight for these
GEMMA3_SWA_PERIOD = 6  # llama.cpp: every 6th gemma3 layer is global, the others use the window

# Named model families: the arguments of build_tiny_model / write_tiny_model for each.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama"),
    "mixtral": dict(arch="llama", n_expert=4, n_expert_used=2, n_ff=64, seed=3),
    "qwen2": dict(arch="qwen2"),
    "gemma3": dict(arch="gemma3", n_layer=6, head_dim=32, sliding_window=4, rope_freq_base=1e6, rms_eps=1e-6),
    "qwen2moe": dict(arch="qwen2moe", n_expert=4, n_expert_used=2, n_ff_exp=64, n_ff_shexp=96, seed=3),
    "qwen3moe": dict(arch="qwen3moe", n_expert=4, n_expert_used=2, n_ff_exp=64, head_dim=32, rms_eps=1e-6, seed=3),
    "olmoe": dict(arch="olmoe", n_head_kv=4, n_expert=4, n_expert_used=2, n_ff=64, seed=3),
}  # MoE seeds: the 12-token test sequence routes with clear margins (no near-tie between experts)


def family_kwargs(family: str, **overrides: Any) -> dict[str, Any]:
    """The build_tiny_model arguments of a named family (see FAMILIES), with overrides."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    return {**FAMILIES[family], **overrides}


def build_family(family: str, **overrides: Any) -> TinyModel:
    return build_tiny_model(**family_kwargs(family, **overrides))


def write_family(path: str | Path, family: str, **overrides: Any) -> Path:
    return write_model(build_family(family, **overrides), path)


def build_tiny_model(
    *,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_vocab: int | None = None,
    qtype: GGMLQuantizationType | int | str = Q.Q8_0,
    seed: int = 0,
    tokenizer: str | None = "gpt2",
    extra_metadata: dict[str, Any] | None = None,
    tied_output: bool | None = None,
    n_ctx: int = 256,
    rope_freq_base: float = 10000.0,
    rms_eps: float = 1e-5,
    pre: str = "default",
    embd_qtype: GGMLQuantizationType | int | str | None = None,
    output_qtype: GGMLQuantizationType | int | str | None = None,
    norm_qtype: GGMLQuantizationType | int | str = Q.F32,
    alignment: int = 32,
    head_dim: int | None = None,
    n_expert: int | None = None,
    n_expert_used: int = 2,
    n_ff_exp: int | None = None,
    n_ff_shexp: int | None = None,
    qkv_bias: bool | None = None,
    sliding_window: int | None = None,
) -> TinyModel:
    """The model `write_tiny_model` writes, in memory. See `write_tiny_model` for the arguments."""
    qtype = as_qtype(qtype)
    embd_qtype = qtype if embd_qtype is None else as_qtype(embd_qtype)
    output_qtype = qtype if output_qtype is None else as_qtype(output_qtype)
    norm_qtype = as_qtype(norm_qtype)
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    if n_head % n_head_kv:
        raise ValueError(f"n_head {n_head} is not a multiple of n_head_kv {n_head_kv}")
    explicit_head_dim = head_dim is not None and head_dim != n_embd // n_head
    head_dim = n_embd // n_head if head_dim is None else head_dim
    gemma = arch == "gemma3"
    if n_expert is None:
        n_expert = 4 if arch in MOE_ARCHES else 0
    if n_expert and not 0 < n_expert_used <= n_expert:
        raise ValueError(f"n_expert_used {n_expert_used} does not fit {n_expert} experts")
    if arch in ("qwen2moe", "qwen3moe"):
        n_ff_exp = n_ff // n_expert_used if n_ff_exp is None else n_ff_exp
    ff_exp = n_ff_exp or n_ff  # the experts' width (Mixtral and OLMoE: feed_forward_length)
    shared = arch == "qwen2moe"
    if shared:
        n_ff_shexp = n_ff if n_ff_shexp is None else n_ff_shexp
    if qkv_bias is None:
        qkv_bias = arch in QKV_BIAS_ARCHES
    if tied_output is None:
        tied_output = arch not in UNTIED_ARCHES
    if sliding_window is None:
        sliding_window = 0
    tok = make_tokenizer(tokenizer)
    if tok is not None:
        if n_vocab is None:
            n_vocab = len(tok.tokens)
        elif n_vocab < len(tok.tokens):
            raise ValueError(f"n_vocab {n_vocab} is smaller than the tokenizer's {len(tok.tokens)} tokens")
    elif n_vocab is None:
        n_vocab = 320

    rng = np.random.default_rng(seed)

    def rand(shape: tuple[int, ...], std: float) -> np.ndarray:
        w = (rng.standard_normal(shape) * std).astype(np.float32)
        w[w == 0] = std  # never an exact zero
        return w

    tensors: dict[str, TinyTensor] = {}

    def add(name: str, w: np.ndarray, qt: GGMLQuantizationType) -> None:
        tensors[name] = TinyTensor(name, qt, w, quantize(w, qt))

    def norm(n: int = n_embd) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    add("token_embd.weight", rand((n_vocab, n_embd), 0.5), embd_qtype)
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", norm(), norm_qtype)
        add(p + "attn_q.weight", rand((q_dim, n_embd), n_embd**-0.5), qtype)
        add(p + "attn_k.weight", rand((kv_dim, n_embd), n_embd**-0.5), qtype)
        add(p + "attn_v.weight", rand((kv_dim, n_embd), n_embd**-0.5), qtype)
        if qkv_bias:
            add(p + "attn_q.bias", rand((q_dim,), 0.3), norm_qtype)
            add(p + "attn_k.bias", rand((kv_dim,), 0.3), norm_qtype)
            add(p + "attn_v.bias", rand((kv_dim,), 0.3), norm_qtype)
        if gemma or arch == "qwen3moe":  # per-head q/k RMSNorm
            add(p + "attn_q_norm.weight", norm(head_dim), norm_qtype)
            add(p + "attn_k_norm.weight", norm(head_dim), norm_qtype)
        elif arch == "olmoe":  # RMSNorm over the whole q / k projection
            add(p + "attn_q_norm.weight", norm(q_dim), norm_qtype)
            add(p + "attn_k_norm.weight", norm(kv_dim), norm_qtype)
        add(p + "attn_output.weight", rand((n_embd, q_dim), q_dim**-0.5), qtype)
        if gemma:
            add(p + "post_attention_norm.weight", norm(), norm_qtype)
        add(p + "ffn_norm.weight", norm(), norm_qtype)
        if n_expert:
            add(p + "ffn_gate_inp.weight", rand((n_expert, n_embd), 3.0 * n_embd**-0.5), norm_qtype)
            add(p + "ffn_gate_exps.weight", rand((n_expert, ff_exp, n_embd), n_embd**-0.5), qtype)
            add(p + "ffn_up_exps.weight", rand((n_expert, ff_exp, n_embd), n_embd**-0.5), qtype)
            add(p + "ffn_down_exps.weight", rand((n_expert, n_embd, ff_exp), ff_exp**-0.5), qtype)
            if shared:
                add(p + "ffn_gate_inp_shexp.weight", rand((n_embd,), n_embd**-0.5), norm_qtype)
                add(p + "ffn_gate_shexp.weight", rand((n_ff_shexp, n_embd), n_embd**-0.5), qtype)
                add(p + "ffn_up_shexp.weight", rand((n_ff_shexp, n_embd), n_embd**-0.5), qtype)
                add(p + "ffn_down_shexp.weight", rand((n_embd, n_ff_shexp), n_ff_shexp**-0.5), qtype)
        else:
            add(p + "ffn_gate.weight", rand((n_ff, n_embd), n_embd**-0.5), qtype)
            add(p + "ffn_up.weight", rand((n_ff, n_embd), n_embd**-0.5), qtype)
            add(p + "ffn_down.weight", rand((n_embd, n_ff), n_ff**-0.5), qtype)
        if gemma:
            add(p + "post_ffw_norm.weight", norm(), norm_qtype)
    add("output_norm.weight", norm(), norm_qtype)
    if not tied_output:
        add("output.weight", rand((n_vocab, n_embd), 0.5), output_qtype)  # logits of O(4), like tied ones

    md: dict[str, MetaValue] = {}
    md["general.architecture"] = MetaValue(arch, V.STRING)
    md["general.name"] = MetaValue(f"tiny-{arch}", V.STRING)
    md["general.file_type"] = MetaValue(_file_type(qtype), V.UINT32)
    if any(t.qtype not in (Q.F32, Q.F16, Q.BF16) for t in tensors.values()):
        md["general.quantization_version"] = MetaValue(2, V.UINT32)
    if alignment != 32:
        md["general.alignment"] = MetaValue(alignment, V.UINT32)
    K = gguf.Keys
    for key, v in (
        (K.LLM.CONTEXT_LENGTH, n_ctx),
        (K.LLM.EMBEDDING_LENGTH, n_embd),
        (K.LLM.BLOCK_COUNT, n_layer),
        (K.LLM.FEED_FORWARD_LENGTH, n_ff),
        (K.Attention.HEAD_COUNT, n_head),
        (K.Attention.HEAD_COUNT_KV, n_head_kv),
        (K.Rope.DIMENSION_COUNT, head_dim),
        (K.LLM.VOCAB_SIZE, n_vocab),
    ):
        md[key.format(arch=arch)] = MetaValue(int(v), V.UINT32)
    md[K.Attention.LAYERNORM_RMS_EPS.format(arch=arch)] = MetaValue(float(rms_eps), V.FLOAT32)
    md[K.Rope.FREQ_BASE.format(arch=arch)] = MetaValue(float(rope_freq_base), V.FLOAT32)
    arch_keys: list[tuple[str, int]] = []
    if gemma or explicit_head_dim:
        arch_keys += [(K.Attention.KEY_LENGTH, head_dim), (K.Attention.VALUE_LENGTH, head_dim)]
    if sliding_window:
        arch_keys.append((K.Attention.SLIDING_WINDOW, sliding_window))
    if n_expert:
        arch_keys += [(K.LLM.EXPERT_COUNT, n_expert), (K.LLM.EXPERT_USED_COUNT, n_expert_used)]
        if n_ff_exp:
            arch_keys.append((K.LLM.EXPERT_FEED_FORWARD_LENGTH, n_ff_exp))
        if shared:
            arch_keys.append((K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, n_ff_shexp))
    for key, v in arch_keys:
        md[key.format(arch=arch)] = MetaValue(int(v), V.UINT32)

    if tok is not None:
        tokens, types, scores = list(tok.tokens), list(tok.token_types), list(tok.scores)
        for i in range(len(tokens), n_vocab):  # pad the vocabulary to the embedding's rows
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            if scores:
                scores.append(-1e9)
        T = K.Tokenizer
        md[T.MODEL] = MetaValue(tok.model, V.STRING)
        if tok.model == "gpt2":
            md[T.PRE] = MetaValue(pre, V.STRING)
        md[T.LIST] = MetaValue(tokens, V.ARRAY, V.STRING)
        if scores:
            md[T.SCORES] = MetaValue(scores, V.ARRAY, V.FLOAT32)
        md[T.TOKEN_TYPE] = MetaValue(types, V.ARRAY, V.INT32)
        if tok.merges:
            md[T.MERGES] = MetaValue(list(tok.merges), V.ARRAY, V.STRING)
        md[T.BOS_ID] = MetaValue(tok.bos_id, V.UINT32)
        md[T.EOS_ID] = MetaValue(tok.eos_id, V.UINT32)
        if tok.unk_id is not None:
            md[T.UNK_ID] = MetaValue(tok.unk_id, V.UINT32)
        if tok.pad_id is not None:
            md[T.PAD_ID] = MetaValue(tok.pad_id, V.UINT32)
        md[T.ADD_BOS] = MetaValue(tok.add_bos, V.BOOL)
        if tok.model == "llama":
            md[T.ADD_PREFIX] = MetaValue(tok.add_space_prefix, V.BOOL)
        md[T.CHAT_TEMPLATE] = MetaValue(CHATML_TEMPLATE, V.STRING)

    for key, v in (extra_metadata or {}).items():
        if v is None:
            md.pop(key, None)  # None removes a key, e.g. to test a missing one
        else:
            md[key] = _infer_meta(key, v)
    if "general.alignment" in md:
        alignment = int(md["general.alignment"].value)

    hparams = dict(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=n_vocab,
        head_dim=head_dim,
        n_ctx=n_ctx,
        rope_freq_base=rope_freq_base,
        rms_eps=rms_eps,
        tied_output=tied_output,
        qtype=qtype,
        n_expert=n_expert,
        n_expert_used=n_expert_used if n_expert else 0,
        n_ff_exp=ff_exp if n_expert else 0,
        n_ff_shexp=n_ff_shexp if shared else 0,
        qkv_bias=qkv_bias,
        sliding_window=sliding_window,
        swa_layers=tuple(
            bool(sliding_window) and (i + 1) % GEMMA3_SWA_PERIOD != 0 if gemma else False for i in range(n_layer)
        ),
    )
    return TinyModel(arch, md, tensors, tok, hparams, alignment)


def write_model(model: TinyModel, path: str | Path) -> Path:
    """Write a `TinyModel` with gguf.GGUFWriter (keys and tensors in the model's order)."""
    path = Path(path)
    w = GGUFWriter(path, model.arch)
    w.kv_data[0].clear()  # GGUFWriter adds general.architecture itself; we add what the model has
    if model.alignment != 32:
        w.data_alignment = model.alignment
    for key, mv in model.metadata.items():
        w.add_key_value(key, mv.value, mv.type, sub_type=mv.sub_type)
    for t in model.tensors.values():
        w.add_tensor(t.name, t.data, raw_dtype=None if t.qtype in (Q.F32, Q.F16) else t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_model(path: str | Path, **kwargs: Any) -> Path:
    """Write a tiny llama-style model to `path` and return the path.

    Arguments (all keyword): arch="llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128,
    n_vocab (default: the tokenizer's size; larger pads with UNUSED "[PAD{i}]" tokens),
    qtype=Q8_0 (the 2D weights; any of WRITABLE_QTYPES, as enum, id or name), seed=0,
    tokenizer="gpt2" | "llama" | None, extra_metadata (key -> value, a `MetaValue`, or
    (value, GGUFValueType[, sub_type]); None removes a key), tied_output=True (no output.weight),
    n_ctx=256, rope_freq_base=1e4, rms_eps=1e-5, pre="default" (gpt2 pre-tokenizer name),
    embd_qtype / output_qtype (default: qtype), norm_qtype=F32, alignment=32.

    The tensors follow `arch` (llama.cpp's names and shapes for it; any other name gets llama's):
    tied_output (default: True, but False for qwen2moe / olmoe, which llama.cpp needs untied),
    head_dim (default n_embd // n_head; when different, {arch}.attention.key_length/value_length
    are written, as they always are for gemma3), qkv_bias (default: qwen2, qwen2moe),
    n_expert (default 4 for qwen2moe / qwen3moe / olmoe, else 0; llama with experts is Mixtral),
    n_expert_used=2, n_ff_exp (qwen2moe / qwen3moe: {arch}.expert_feed_forward_length, default
    n_ff // n_expert_used; Mixtral and OLMoE experts are n_ff wide), n_ff_shexp (qwen2moe's shared
    expert, default n_ff), sliding_window (gemma3: {arch}.attention.sliding_window; 0 = none).
    gemma3 adds per-head attn_q_norm / attn_k_norm, post_attention_norm and post_ffw_norm;
    qwen3moe per-head q/k norms; olmoe q/k norms over the whole projection (n_head * head_dim and
    n_head_kv * head_dim; llama.cpp needs n_head_kv == n_head for olmoe). Matrix weights use
    `qtype`; norms, biases and the MoE routers (ffn_gate_inp, ffn_gate_inp_shexp) use norm_qtype.
    See FAMILIES / write_family(path, "gemma3") for the named test families.
    """
    return write_model(build_tiny_model(**kwargs), path)


# ---- taking files apart ----------------------------------------------------------------------

_SCALAR_FMT = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<?",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}


@dataclass
class KVField:
    key: str
    pos: int  # start of the entry (the key's length)
    type_pos: int  # the value type (u32)
    value_pos: int  # the value: a scalar, a string's length, or an array's element type
    end: int
    vtype: int
    value: Any
    array_type: int | None = None
    array_count_pos: int | None = None  # arrays: the element count (u64)
    item_pos: list[int] = field(default_factory=list)  # arrays: where each element starts

    @property
    def key_pos(self) -> int:
        return self.pos + 8


@dataclass
class TensorField:
    name: str
    pos: int  # the name's length
    n_dims_pos: int
    dims_pos: list[int]
    dims: list[int]  # GGUF order (innermost first)
    type_pos: int
    qtype: int
    offset_pos: int
    offset: int  # relative to data_offset


@dataclass
class Layout:
    version: int
    n_tensors: int
    n_kv: int
    fields: dict[str, KVField]
    tensors: dict[str, TensorField]
    header_end: int  # end of the tensor infos
    alignment: int
    data_offset: int

    VERSION_POS = 4
    N_TENSORS_POS = 8
    N_KV_POS = 16


def parse_layout(data: bytes) -> Layout:
    """Parse a well-formed GGUF v2/v3 header, recording where each field lies (trusts the file)."""
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = data[pos : pos + n].decode("utf-8")
        pos += n
        return s

    def value(vt: int) -> Any:
        if vt == V.STRING:
            return string()
        if vt == V.ARRAY:
            raise AssertionError("nested arrays are read by the caller")
        return take(_SCALAR_FMT[V(vt)])

    assert data[:4] == b"GGUF", data[:4]
    pos = 4
    version = take("<I")
    n_tensors = take("<Q")
    n_kv = take("<Q")
    fields: dict[str, KVField] = {}
    for _ in range(n_kv):
        start = pos
        key = string()
        type_pos = pos
        vt = take("<I")
        value_pos = pos
        if vt == V.ARRAY:
            et = take("<I")
            count_pos = pos
            count = take("<Q")
            items, item_pos = [], []
            for _ in range(count):
                item_pos.append(pos)
                items.append(value(et))
            fields[key] = KVField(key, start, type_pos, value_pos, pos, vt, items, et, count_pos, item_pos)
        else:
            v = value(vt)
            fields[key] = KVField(key, start, type_pos, value_pos, pos, vt, v)
    tensors: dict[str, TensorField] = {}
    for _ in range(n_tensors):
        start = pos
        name = string()
        n_dims_pos = pos
        n_dims = take("<I")
        dims_pos, dims = [], []
        for _ in range(n_dims):
            dims_pos.append(pos)
            dims.append(take("<Q"))
        type_pos = pos
        qt = take("<I")
        offset_pos = pos
        offset = take("<Q")
        tensors[name] = TensorField(name, start, n_dims_pos, dims_pos, dims, type_pos, qt, offset_pos, offset)
    align = fields["general.alignment"].value if "general.alignment" in fields else 32
    return Layout(version, n_tensors, n_kv, fields, tensors, pos, align, -(-pos // align) * align)


# ---- breaking files --------------------------------------------------------------------------

Mutation = Callable[[bytearray], "bytes | bytearray | None"]


def corrupt(path_in: str | Path, path_out: str | Path, mutate: Mutation) -> Path:
    """Copy a file through `mutate` (edits the bytearray in place, or returns new bytes)."""
    data = bytearray(Path(path_in).read_bytes())
    out = mutate(data)
    path_out = Path(path_out)
    path_out.write_bytes(bytes(data if out is None else out))
    return path_out


def set_u32(data: bytearray, pos: int, v: int) -> None:
    struct.pack_into("<I", data, pos, v)


def set_u64(data: bytearray, pos: int, v: int) -> None:
    struct.pack_into("<Q", data, pos, v)


def truncate(n: int) -> Mutation:
    return lambda data: data[:n]


def overwrite(pos: int, new: bytes) -> Mutation:
    def m(data: bytearray) -> None:
        data[pos : pos + len(new)] = new

    return m


def chain(*mutations: Mutation) -> Mutation:
    def m(data: bytearray) -> bytes | bytearray:
        for f in mutations:
            out = f(data)
            if out is not None:
                data = bytearray(out)
        return data

    return m


# ---- hand-built files ------------------------------------------------------------------------


@dataclass
class RawTensor:
    name: str
    dims: Sequence[int]  # GGUF order (innermost first)
    qtype: int
    data: bytes = b""
    offset: int | None = None  # relative to the data section; None: next aligned position


def encode_string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype: int, value: Any) -> bytes:
    """A metadata value. Arrays: value = (element_type, items); nested arrays recurse."""
    if vtype == V.STRING:
        return encode_string(value)
    if vtype == V.ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(encode_value(etype, x) for x in items)
    return struct.pack(_SCALAR_FMT[V(vtype)], value)


def gguf_bytes(
    kv: Iterable[tuple[str, int, Any]] = (),
    tensors: Iterable[RawTensor] = (),
    *,
    version: int = 3,
    alignment: int = 32,
    magic: bytes = b"GGUF",
    n_tensors: int | None = None,
    n_kv: int | None = None,
) -> bytes:
    """A GGUF file byte by byte, with nothing checked: kv = (key, value type, value) entries.
    `alignment` is only used to place the data (add a general.alignment entry yourself)."""
    kv, tensors = list(kv), list(tensors)
    head = magic + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv
    )
    for key, vt, v in kv:
        head += encode_string(key) + struct.pack("<I", vt) + encode_value(vt, v)
    blob = bytearray()
    infos = b""
    for t in tensors:
        if t.offset is None:
            off = -(-len(blob) // alignment) * alignment
        else:
            off = t.offset
        if t.data:
            blob.extend(b"\0" * (off + len(t.data) - len(blob)))
            blob[off : off + len(t.data)] = t.data
        infos += encode_string(t.name) + struct.pack("<I", len(t.dims))
        infos += b"".join(struct.pack("<Q", d) for d in t.dims) + struct.pack("<IQ", t.qtype, off)
    head += infos
    head += b"\0" * (-len(head) % alignment)
    return bytes(head) + bytes(blob)


def random_blocks_model(path, layer_qtype, v_down_qtype, embd_qtype, family="llama", **kw):
    """A tiny model whose matrices are random valid blocks (gguf cannot quantize K-quants or
    ternary types; random blocks are as good a test): `layer_qtype` for most layer matrices
    (experts included; routers stay float32), `v_down_qtype` for attn_v / ffn_down(_exps),
    `embd_qtype` for the tied embedding."""
    from gguf import GGMLQuantizationType as Q

    from ember.formats.quants import block_info
    from ember.lut_kernels import kquant

    model = build_family(family, **{**dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_ctx=64), **kw})
    rng = np.random.default_rng(7)
    for name, t in model.tensors.items():
        if t.weights.ndim not in (2, 3) or "ffn_gate_inp" in name:
            continue
        qt = (
            embd_qtype
            if name == "token_embd.weight"
            else v_down_qtype
            if name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight"))
            else layer_qtype
        )
        n_in = t.weights.shape[-1]
        n_out = t.weights.size // n_in
        if qt in kquant.QTYPES:
            raw = kquant.random_kquant(rng, qt, n_out, n_in)
            offs, nbytes = kquant._F16_FIELDS[qt], block_info(qt)[1]
        else:  # Q5_0 (d at 0), TQ1_0 / TQ2_0 (d at 52 / 64)
            bw, nbytes = block_info(qt)
            off = {Q.Q5_0: 0, Q.TQ1_0: 52, Q.TQ2_0: 64}[qt]
            raw = rng.integers(0, 256, (n_out, n_in // bw * nbytes), dtype=np.uint8)
            d = rng.uniform(0.5, 1.5, (n_out, n_in // bw)) * 1e-3 * (32 / bw)
            raw.reshape(n_out, -1, nbytes)[:, :, off : off + 2] = (
                d.astype(np.float16).view(np.uint8).reshape(n_out, -1, 2)
            )
            offs = ()
        # scale the f16 d (and dmin) down: weights ~0.02, like a trained model's, so attention
        # is not a one-hot softmax that any rounding can flip
        blk = raw.reshape(n_out, -1, nbytes)
        for off in offs:
            h = blk[:, :, off : off + 2].copy().view(np.float16) * np.float16(0.03)
            blk[:, :, off : off + 2] = h.view(np.uint8)
        t.qtype, t.data = qt, raw.reshape(*t.weights.shape[:-1], -1)
    return write_model(model, path)
