"""Prompt-lookup drafting: propose what followed the latest earlier occurrence of the context's
last n tokens (n from n_max down to n_min), in the prompt or the text generated so far. No model
runs: a proposal costs a NumPy scan of the context. Deterministic, so its q is one-hot and the
sampling rule accepts a drafted token with the target's own probability of it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import EmberError


class PromptLookup:
    name = "lookup"
    cheap = True  # a proposal costs a scan: generation asks for the most and keeps what pays

    def __init__(self, n_max: int = 3, n_min: int = 1):
        if not (isinstance(n_min, int) and isinstance(n_max, int) and 1 <= n_min <= n_max):
            raise EmberError(f"prompt lookup needs 1 <= n_min <= n_max, got n_min={n_min!r}, n_max={n_max!r}")
        self.n_max, self.n_min = n_max, n_min
        self.kind = "none"  # the last proposal's matched n-gram: acceptance is counted per kind

    def start(self, params, n_vocab: int, prompt_ids: Sequence[int]) -> None:
        pass

    def propose(self, context_ids: Sequence[int], k: int) -> list[int]:
        ctx = np.asarray(context_ids, dtype=np.int64)
        m = ctx.shape[0]
        for n in range(min(self.n_max, m - 1), self.n_min - 1, -1):
            # windows that start at s <= m - 1 - n: each is followed by at least one token
            win = sliding_window_view(ctx[: m - 1], n)
            hits = np.flatnonzero((win == ctx[m - n :]).all(axis=1))
            if hits.shape[0]:
                s = int(hits[-1]) + n
                self.kind = f"{n}-gram"
                return ctx[s : s + k].tolist()
        self.kind = "none"
        return []

    def probs(self) -> None:
        return None

    def accepted(self, n: int) -> None:
        pass

    def fork(self) -> PromptLookup:
        return PromptLookup(self.n_max, self.n_min)
