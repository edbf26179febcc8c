"""Bytes on disk -> typed objects: GGUF container, ggml block types, tokenizers, chat templates."""
