"""Where a model's weights live on the CPU: quantized matrices stay in the file's encoding,
memory-mapped (`QuantMatrix`), with the kernel layout of their type (Q4_0/Q4_1 table lookup; the
int8 dot layouts of Q8_0, Q5_0/Q5_1 and the K-quants; F16/BF16 rows are their own layout), packed
once per model and kept in the on-disk pack cache (`lut_kernels.pack_cache`). F32 matrices are
float32 arrays. A matrix whose kernel reads only its packed copy gives its file pages back.
"""

from __future__ import annotations

import functools
import logging
import time

from gguf import GGMLQuantizationType as T

from ...home import uncache
from ...lut_kernels import pack_cache
from ...lut_kernels.ops import VIEW_TYPES, has_kernel, quant_matrix

log = logging.getLogger("ember")


def cache_name(name: str, expert: int | None) -> str:
    """A matrix's name in the pack cache: the tensor's, and "#e" for expert e of a 3-D one."""
    return name if expert is None else f"{name}#{expert}"


class CpuPlacement:
    """The `placement` of a `WeightStore` for the CPU's kernels."""

    name = "cpu"

    def __init__(self, use_cache: bool = True):
        self.use_cache = use_cache
        self.frugal = False  # under a memory budget: loading leaves the pack cache's pages on disk

    def matrix(self, store, name: str, expert: int | None = None):
        info = store.gguf.info(name)
        if info.qtype == T.F32:
            full = store.get(name)
            return full if expert is None else full[expert]
        m = quant_matrix(name, store.raw_rows(name, expert), info.qtype, info.shape[-2], info.shape[-1])
        if m.packed is not None and expert is None and info.qtype not in VIEW_TYPES:
            m.release = functools.partial(store.gguf.release, name)
            m.release()  # decode reads only the packed copy
        return m

    def prepare(self, store) -> str:
        """Give every matrix that has a kernel (and every expert of a 3-D tensor) its kernel
        layout now: from the on-disk pack cache when a valid one exists, else packed here, the
        cache written and mapped back (the packed copies then are the file's pages, which the
        page cache can reclaim and a memory budget can drop, not anonymous memory). Returns
        "cached", "packed" or "none" (no matrix with a kernel left to prepare)."""
        g = store.gguf
        keys = [
            (n, e)
            for n, t in g.tensors.items()
            if len(t.shape) in (2, 3) and has_kernel(t.qtype)
            for e in ([None] if len(t.shape) == 2 else range(t.shape[0]))
            if (n, -1 if e is None else e) not in store._matrices
        ]
        if not keys:
            return "none"
        if self._place_cached(store, keys):
            return "cached"
        t0 = time.perf_counter()
        log.info("ember: packing %d matrices of %s for the fast kernels (once per model)", len(keys), g.path.name)
        if self.use_cache:
            # packed one at a time as the cache is written, none kept: a model bigger than the
            # memory packs in the memory of its largest matrix
            packed = {cache_name(n, e): functools.partial(self._pack, store, n, e) for n, e in keys}
            try:
                path = pack_cache.save(g.path, packed)
                log.info("ember: packed in %.1f s, cached in %s", time.perf_counter() - t0, path)
                if self._place_cached(store, keys):
                    return "packed"
            except OSError as e:
                log.warning("ember: could not write the pack cache (%s); packing again next time", e)
        for n, e in keys:  # kept in memory
            store.matrix(n, e)
        return "packed"

    def _pack(self, store, name: str, expert: int | None):
        """The packed copy of a matrix (an expert), its file pages given back once read."""
        packed = self.matrix(store, name, expert).packed
        if expert is not None:
            store.gguf.release(name)
        if self.frugal:
            uncache(store.gguf.path)
        return packed

    def _place_cached(self, store, keys) -> bool:
        """Place `keys` from the pack cache; False (nothing placed) without a valid one."""
        g = store.gguf
        cached = pack_cache.load(g.path, frugal=self.frugal) if self.use_cache else None
        if cached is None or not {cache_name(*k) for k in keys} <= set(cached):
            return False
        for n, e in keys:
            info = g.info(n)
            packed = cached[cache_name(n, e)]
            m = quant_matrix(n, store.raw_rows(n, e), info.qtype, info.shape[-2], info.shape[-1], packed)
            if e is None:
                m.release = functools.partial(g.release, n)
            store._matrices[(n, -1 if e is None else e)] = m
        return True
