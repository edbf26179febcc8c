"""Session: a KV cache and a position over one model on a device, the low-level handle that
generation and speculation build on.

`feed(ids)` appends tokens and returns their logits; `truncate(n)` rolls back to n tokens;
`keep_prefix(ids)` keeps what the session shares with a new prompt. Long inputs are fed in
batches of N_BATCH so memory stays bounded; how a batch runs is the device's business
(`devices.cpu.CpuDevice` by default).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..devices.cpu import CpuDevice
from ..errors import EmberError
from .model import Transformer

N_BATCH = 512  # positions per device call when feeding long inputs


class Session:
    def __init__(self, model: Transformer, n_ctx: int | None = None, threads: int | None = None, device=None):
        self.model = model
        self.device = device or CpuDevice(threads)
        self.threads = self.device.threads
        self.cache = self.device.new_cache(model, n_ctx)
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
            try:
                logits = self.device.forward(self.model, batch, self.cache, all_logits=all_logits)
            finally:  # what the cache committed, even when interrupted part way (Ctrl-C)
                self.ids.extend(batch[: self.cache.length - len(self.ids)])
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

    def reserve(self, n: int) -> None:
        """Make room in the cache for n more tokens now (growing it mid-generation stalls a step)."""
        self.cache.reserve(min(n, self.n_ctx - len(self.ids)))

    def use_threads(self, threads: int) -> None:
        """Run the next feeds on `threads` of the device's threads (the KV cache stays)."""
        self.device = self.device.with_threads(threads, self.model)
        self.threads = self.device.threads

    def truncate(self, n: int) -> None:
        if not 0 <= n <= len(self.ids):
            raise ValueError(f"cannot truncate a session of {len(self.ids)} tokens to {n}")
        self.cache.truncate(n)
        del self.ids[n:]

    def reset(self) -> None:
        self.truncate(0)
