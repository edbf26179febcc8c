"""WeightStore: the one accessor through which the model reads its weights.

Two modes:
- "reference": every weight is dequantized to float32 on first use and kept (the NumPy oracle path);
- "fast": matrices stay in the file's encoding, memory-mapped (`QuantMatrix`), with a kernel
  layout packed on first use where a kernel exists (Q4_0/Q4_1 table lookup; int8 dot for Q8_0,
  the types repacked into its layout, Q5_0/Q5_1 and the K-quants; F16/BF16 rows are their own
  layout); only vectors (norms, biases) and F32 matrices become float32 arrays.
Embedding rows are always decoded on demand. Streaming under a byte budget plugs in here.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import FormatError
from ..formats.gguf import GGUFFile
from ..formats.quants import dequantize, dequantize_rows
from ..lut_kernels.ops import VIEW_TYPES, has_kernel, quant_matrix

log = logging.getLogger("ember")

MODES = ("reference", "fast")
_FLOAT = (T.F32,)


class WeightStore:
    def __init__(self, gguf: GGUFFile, mode: str = "fast"):
        if mode not in MODES:
            raise ValueError(f"unknown weight store mode {mode!r}; modes: {', '.join(MODES)}")
        self.gguf = gguf
        self.mode = mode
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
            raw = (self.gguf.read_rows(name, np.arange(info.n_elements // info.shape[-1]))
                   if len(info.shape) == 1 else self.gguf.tensor_bytes(name))
            w = dequantize(raw.reshape(-1), info.qtype, info.n_elements, name=name).reshape(info.shape)
            self._cache[name] = w
        return w

    def matrix(self, name: str, expert: int | None = None):
        """A weight for `ops.matmul`: [n_out, n_in], or expert `expert` of a [n_expert, n_out, n_in] tensor."""
        key = (name, -1 if expert is None else expert)
        m = self._matrices.get(key)
        if m is not None:
            return m
        info = self.gguf.info(name)
        if self.mode == "reference" or info.qtype in _FLOAT:
            full = self.get(name)
            m = full if expert is None else full[expert]
        else:
            n_out, n_in = info.shape[-2], info.shape[-1]
            raw = self.gguf.tensor_rows(name)  # [rows, row_bytes]
            if expert is not None:
                raw = raw[expert * n_out : (expert + 1) * n_out]
            m = quant_matrix(name, raw, info.qtype, n_out, n_in)
            if m.packed is not None and expert is None and info.qtype not in VIEW_TYPES:
                m.release = functools.partial(self.gguf.release, name)
                m.release()  # decode reads only the packed copy
        self._matrices[key] = m
        return m

    def prepare(self, use_cache: bool = True) -> str:
        """Give every 2-D matrix that has a kernel its kernel layout now: from the on-disk pack
        cache when a valid one exists, else packed here (and the cache written). Returns
        "cached", "packed" or "none" (reference mode, or no matrix with a kernel)."""
        names = [n for n, t in self.gguf.tensors.items()
                 if len(t.shape) == 2 and has_kernel(t.qtype) and (n, -1) not in self._matrices]
        if self.mode != "fast" or not names:
            return "none"
        from ..lut_kernels import pack_cache

        cached = pack_cache.load(self.gguf.path) if use_cache else None
        if cached is not None and set(names) <= set(cached):
            for n in names:
                info = self.gguf.info(n)
                m = quant_matrix(n, self.gguf.tensor_rows(n), info.qtype, info.shape[0],
                                 info.shape[1], cached[n])
                m.release = functools.partial(self.gguf.release, n)
                self._matrices[(n, -1)] = m
            return "cached"
        t0 = time.perf_counter()
        log.info("ember: packing %d matrices of %s for the fast kernels (once per model)",
                 len(names), self.gguf.path.name)
        packed = {n: self.matrix(n).packed for n in names}
        if use_cache:
            try:
                path = pack_cache.save(self.gguf.path, packed)
                log.info("ember: packed in %.1f s, cached in %s", time.perf_counter() - t0, path)
            except OSError as e:
                log.warning("ember: could not write the pack cache (%s); packing again next time", e)
        return "packed"

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
        if self.mode == "reference" or info.qtype in _FLOAT or len(info.shape) < 2:
            return info.n_elements * 4
        if len(info.shape) == 2:
            return self.matrix(name).nbytes
        return info.nbytes

    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self._cache.values())
