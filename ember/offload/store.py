"""WeightStore: the one accessor through which the model reads its weights.

It gives tensor references (type, shape, bytes, the file's rows) and the model's weights in the
form a placement chose: vectors (norms, biases) always as float32; matrices through the
`placement` (a device's: `devices.cpu.placement.CpuPlacement` keeps them quantized in their
kernel layouts), or, with none, dequantized to float32 (the NumPy reference path). Embedding rows
are always decoded on demand. Streaming under a byte budget plugs in here.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..formats.gguf import GGUFFile
from ..formats.quants import dequantize, dequantize_rows


class WeightStore:
    def __init__(self, gguf: GGUFFile, placement=None):
        self.gguf = gguf
        self.placement = placement  # None: every matrix dequantized to float32
        self._cache: dict[str, np.ndarray] = {}
        self._matrices: dict[tuple[str, int], object] = {}

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.gguf.info(name).shape

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 in its NumPy shape (outermost first), cached. Vectors are read
        with pread (`GGUFFile.read_rows`), so their neighbours in the file are not mapped."""
        w = self._cache.get(name)
        if w is None:
            info = self.gguf.info(name)
            raw = (
                self.gguf.read_rows(name, np.arange(info.n_elements // info.shape[-1]))
                if len(info.shape) == 1
                else self.gguf.tensor_bytes(name)
            )
            w = dequantize(raw.reshape(-1), info.qtype, info.n_elements, name=name).reshape(info.shape)
            self._cache[name] = w
        return w

    def matrix(self, name: str, expert: int | None = None):
        """A weight for the model's ops: [n_out, n_in], or expert `expert` of a
        [n_expert, n_out, n_in] tensor, in the placement's form (cached)."""
        key = (name, -1 if expert is None else expert)
        m = self._matrices.get(key)
        if m is None:
            if self.placement is None:
                full = self.get(name)
                m = full if expert is None else full[expert]
            else:
                m = self.placement.matrix(self, name, expert)
            self._matrices[key] = m
        return m

    def raw_rows(self, name: str, expert: int | None = None) -> np.ndarray:
        """The file's rows of a matrix (or of one expert's), uint8 [n_out, row_bytes], mapped."""
        raw = self.gguf.tensor_rows(name)
        if expert is not None:
            n_out = self.gguf.info(name).shape[-2]
            raw = raw[expert * n_out : (expert + 1) * n_out]
        return raw

    def prepare(self) -> str:
        """Have the placement put every matrix in its form now (e.g. the CPU's kernel layouts,
        from its pack cache); returns what it did ("none" without a placement)."""
        return "none" if self.placement is None else self.placement.prepare(self)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D tensor as float32 [len(ids), n_cols], without decoding the rest."""
        if name in self._cache:
            return self._cache[name][ids]
        info = self.gguf.info(name)
        if len(info.shape) != 2:
            raise FormatError(f"{self.gguf.path}: {name} should be a matrix, it has shape {info.shape}")
        ids = np.asarray(ids).reshape(-1)
        raw = self.gguf.read_rows(name, ids)  # pread: no pages of the whole table get mapped
        return dequantize_rows(raw, info.qtype, np.arange(len(ids)), info.shape[1], name=name)

    def nbytes(self, name: str) -> int:
        """Bytes a read of the whole tensor costs in its resident form."""
        info = self.gguf.info(name)
        if self.placement is None or len(info.shape) < 2:
            return info.n_elements * 4
        if len(info.shape) == 2:
            return self.matrix(name).nbytes
        return info.nbytes

    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self._cache.values())
