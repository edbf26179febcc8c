"""The `Model` object behind `ember.load()`: a GGUF file with its tokenizer and chat format.

Opening is cheap (the file is memory-mapped and its header parsed); the tokenizer is built on
first use.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from . import hub
from .formats.chat import ChatFormat
from .formats.gguf import GGUFFile
from .formats.tokenizer import Tokenizer


class Model:
    """A language model loaded from a GGUF file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.gguf = GGUFFile(self.path)
        self.gguf.validate_model()

    @property
    def architecture(self) -> str:
        return self.gguf.architecture

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.gguf)

    @cached_property
    def chat_format(self) -> ChatFormat:
        tok = self.tokenizer
        return ChatFormat(
            self.gguf.get("tokenizer.chat_template"),
            bos_token=tok.tokens[tok.bos_id] if tok.bos_id is not None else "",
            eos_token=tok.tokens[tok.eos_id] if tok.eos_id is not None else "",
            architecture=self.architecture,
            vocab_has_chatml=tok.token_to_id("<|im_start|>") is not None,
        )

    # ---- text <-> ids --------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, ids, special: bool = False) -> str:
        return self.tokenizer.decode(ids, special=special)

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        return self.chat_format.render(messages, add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; BOS is added only if the template did not write it."""
        text = self.render_chat(messages, add_generation_prompt)
        tok = self.tokenizer
        bos_text = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
        add_bos = tok.add_bos and not (bos_text and text.startswith(bos_text))
        return tok.encode(text, special=True, add_bos=add_bos)

    # ---- description ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        g = self.gguf
        n_params = sum(t.n_elements for t in g.tensors.values())
        tok_model = g.get("tokenizer.ggml.model")
        tokens = g.get("tokenizer.ggml.tokens")
        return {
            "path": str(self.path),
            "name": g.get("general.name"),
            "architecture": g.architecture,
            "file_bytes": g.file_size,
            "gguf_version": g.version,
            "parameters": n_params,
            "block_count": g.arch_get("block_count"),
            "embedding_length": g.arch_get("embedding_length"),
            "feed_forward_length": g.arch_get("feed_forward_length"),
            "head_count": g.arch_get("attention.head_count"),
            "head_count_kv": g.arch_get("attention.head_count_kv"),
            "expert_count": g.arch_get("expert_count"),
            "context_length": g.arch_get("context_length"),
            "rope_freq_base": g.arch_get("rope.freq_base"),
            "file_type": g.get("general.file_type"),
            "tensor_count": len(g.tensors),
            "tensor_types": g.type_histogram(),
            "tokenizer": {
                "model": tok_model,
                "pre": g.get("tokenizer.ggml.pre"),
                "vocab_size": len(tokens) if tokens is not None else None,
                "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
                "add_bos_token": g.get("tokenizer.ggml.add_bos_token"),
            },
            "chat_template": "from the model" if g.get("tokenizer.chat_template") else "none (built-in fallback)",
        }

    def __repr__(self) -> str:
        return f"<ember.Model {self.path.name} ({self.architecture})>"


def load(model: str | os.PathLike = hub.DEFAULT_MODEL, *, pull: bool = True) -> Model:
    """Open a catalog model by name (pulled on first use) or a local .gguf file by path."""
    return Model(hub.resolve(model, pull_missing=pull))
