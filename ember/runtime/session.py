"""Session: a KV cache and a position over one model, the low-level handle speculation builds on.

`feed(ids)` appends tokens and returns their logits; `truncate(n)` rolls back to n tokens.
New tokens run the fused decode step (`FusedDecoder.step_rows`), 16 at a time: all of them
when every matrix is a K-quant (their kernels read each weight once for the 16 rows: Qwen2.5-1.5B
512 tokens at 2 threads 3.9 s, 4.6 s through `Transformer.forward`), up to N_FUSED_STEPS otherwise
(the one-row kernels re-read each weight group from L2 per row; past ~48 tokens the forward's
dequantized BLAS wins for the q8-heavy models).
Long inputs are fed in batches so memory stays bounded. BLAS runs on one thread: `ops.matmul`
splits a batch between ember's threads itself (and runs batches under 64 rows on one, since on a
2-core machine a second busy process stalls a multi-threaded small matmul by milliseconds).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import EmberError
from .allocator import keep_large_blocks
from .decode import MAX_ROWS
from .model import Transformer
from .threads import default_threads

N_BATCH = 512  # positions per forward call when feeding long inputs
# Up to this many new tokens go through the fused step (in steps of decode.MAX_ROWS) when some
# matrix has only a one-row kernel: 2 threads, fused vs forward, ms: SmolLM2 (T-MAC) 48 tokens
# 85 vs 220, 192: 331 vs 363; Qwen2.5-0.5B (Q8_0) 48: 361 vs 482, 128: 956 vs 574; Gemma3-270M
# 48: 154 vs 157.
N_FUSED_STEPS = 48
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
        for batch in self.feed_batches(ids, all_logits=False):
            out = batch
        return out[-1]

    def feed_batches(self, ids, all_logits: bool = True) -> Iterator[np.ndarray]:
        """Append `ids` in batches of N_BATCH, yielding each batch's logits as it is computed
        (only the last position of each batch when all_logits is False)."""
        ids = self._check(ids)
        for start in range(0, len(ids), N_BATCH):
            batch = ids[start : start + N_BATCH]
            dec = self.model.decoder(self.threads)
            if dec is not None and (dec.multi_row or len(batch) <= N_FUSED_STEPS):
                parts = []
                for i in range(0, len(batch), MAX_ROWS):
                    part = batch[i : i + MAX_ROWS]
                    parts.append(dec.step_rows(part, self.cache, all_logits))
                    self.ids.extend(part)
                yield np.concatenate(parts) if all_logits and len(parts) > 1 else parts[-1]
                continue
            keep_large_blocks()  # from the first batch on (decode alone allocates little)
            with _blas_threads(1):  # ops.matmul splits a batch between ember's threads
                logits = self.model.forward(batch, self.cache, all_logits=all_logits, threads=self.threads)
            self.ids.extend(batch)
            yield logits

    def keep_prefix(self, ids) -> int:
        """Truncate to the longest prefix that the session shares with `ids`, leaving at least
        the last of `ids` to feed (its logits are wanted); returns that prefix's length."""
        limit = min(len(self.ids), len(ids) - 1)
        n = 0
        while n < limit and self.ids[n] == ids[n]:
            n += 1
        self.truncate(n)
        return n

    def truncate(self, n: int) -> None:
        if not 0 <= n <= len(self.ids):
            raise ValueError(f"cannot truncate a session of {len(self.ids)} tokens to {n}")
        self.cache.truncate(n)
        del self.ids[n:]

    def reset(self) -> None:
        self.truncate(0)
