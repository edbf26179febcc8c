"""Session: a KV cache and a position over one model, the low-level handle speculation builds on.

`feed(ids)` appends tokens and returns their logits; `truncate(n)` rolls back to n tokens.
Up to 16 new tokens at once run the fused decode step (`FusedDecoder.step_rows`).
Long inputs are fed in batches so memory stays bounded. BLAS runs on one thread: `ops.matmul`
splits a batch between ember's threads itself (and runs batches under 64 rows on one, since on a
2-core machine a second busy process stalls a multi-threaded small matmul by milliseconds).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import EmberError
from .allocator import keep_large_blocks
from .model import Transformer
from .threads import default_threads

N_BATCH = 512  # positions per forward call when feeding long inputs
# Up to this many new tokens go through the fused step at once (decode.MAX_ROWS): cheaper than
# dequantizing every matrix for BLAS, and the file's pages stay untouched.
N_FUSED_STEPS = 16
_BLAS = None  # one ThreadpoolController: creating one scans the loaded libraries (~2 ms)


def _blas_threads(n: int):
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=n, user_api="blas")


class Session:
    def __init__(self, model: Transformer, n_ctx: int | None = None, threads: int | None = None):
        self.model = model
        self.threads = threads or default_threads()
        self.cache = model.new_cache(n_ctx)
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_ctx(self) -> int:
        return self.cache.max_len

    def _check(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise EmberError("nothing to feed: the list of token ids is empty")
        self.cache.check_room(len(ids))
        return ids

    def feed(self, ids) -> np.ndarray:
        """Append `ids`; return their logits [len(ids), n_vocab]."""
        parts = list(self.feed_batches(ids, all_logits=True))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def feed_last(self, ids) -> np.ndarray:
        """Append `ids`; return only the logits after the last one [n_vocab]."""
        out = None
        for out in self.feed_batches(ids, all_logits=False):
            pass
        return out[-1]

    def feed_batches(self, ids, all_logits: bool = True) -> Iterator[np.ndarray]:
        """Append `ids` in batches of N_BATCH, yielding each batch's logits as it is computed
        (only the last position of each batch when all_logits is False)."""
        ids = self._check(ids)
        for start in range(0, len(ids), N_BATCH):
            batch = ids[start : start + N_BATCH]
            dec = self.model.decoder(self.threads) if len(batch) <= N_FUSED_STEPS else None
            if dec is not None:
                logits = dec.step_rows(batch, self.cache, all_logits)
                self.ids.extend(batch)
                yield logits
                continue
            keep_large_blocks()  # from the first batch on (decode alone allocates little)
            with _blas_threads(1):  # ops.matmul splits a batch between ember's threads
                logits = self.model.forward(batch, self.cache, all_logits=all_logits, threads=self.threads)
            self.ids.extend(batch)
            yield logits

    def truncate(self, n: int) -> None:
        if not 0 <= n <= len(self.ids):
            raise ValueError(f"cannot truncate a session of {len(self.ids)} tokens to {n}")
        self.cache.truncate(n)
        del self.ids[n:]

    def reset(self) -> None:
        self.truncate(0)
