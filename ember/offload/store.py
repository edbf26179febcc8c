"""WeightStore: the one accessor through which the model reads its weights.

Today every weight is dequantized from the memory-mapped GGUF on first use and kept in host RAM as
float32 (the reference path). Embedding rows are decoded on demand, so a large vocabulary is only
decoded in full when it doubles as the output matrix. Streaming under a byte budget plugs in here.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..formats.gguf import GGUFFile
from ..formats.quants import dequantize, dequantize_rows


class WeightStore:
    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf
        self._cache: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.gguf.info(name).shape

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 in its NumPy shape (outermost first), cached."""
        w = self._cache.get(name)
        if w is None:
            info = self.gguf.info(name)
            w = dequantize(self.gguf.tensor_bytes(name), info.qtype, info.n_elements, name=name).reshape(info.shape)
            self._cache[name] = w
        return w

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D tensor as float32 [len(ids), n_cols], without decoding the rest."""
        if name in self._cache:
            return self._cache[name][ids]
        info = self.gguf.info(name)
        if len(info.shape) != 2:
            raise FormatError(f"{self.gguf.path}: {name} should be a matrix, it has shape {info.shape}")
        return dequantize_rows(self.gguf.tensor(name), info.qtype, ids, info.shape[1])

    def nbytes(self, name: str) -> int:
        """Bytes a read of the whole tensor costs in its resident form (float32 here)."""
        return self.gguf.info(name).n_elements * 4

    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self._cache.values())
