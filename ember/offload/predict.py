"""Which experts the next MoE layer will choose, guessed before it runs (pre-gating, as in
ExpertFlow and SmallThinker): layer l + 1's router applied to layer l's hidden state after its
attention. The residual stream changes little from one layer to the next, so the guess is
mostly right, and the expert cache reads the guessed experts while layer l computes. Each
guess is checked when the layer's real routing is known: precision (guessed experts that were
chosen) and recall (chosen experts that were guessed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARGIN = 2  # experts guessed per row beyond the n_used a token takes


@dataclass
class PredictStats:
    guessed: int = 0  # experts guessed (each layer's union over the rows)
    chosen: int = 0  # experts chosen where a guess was made
    right: int = 0  # guessed and chosen

    def as_dict(self) -> dict:
        return {"predict_guessed": self.guessed, "predict_chosen": self.chosen, "predict_right": self.right}


def precision_recall(d: dict) -> tuple[float | None, float | None]:
    """(precision, recall) from a stats dict's predict_* counts (None where nothing counts)."""
    g, c, r = d.get("predict_guessed", 0), d.get("predict_chosen", 0), d.get("predict_right", 0)
    return (r / g if g else None, r / c if c else None)


class Predictor:
    """`routers[l]`: layer l's router [n_expert, d] (float32), `norms[l]` its FFN norm [d]."""

    def __init__(self, routers, norms, eps: float, n_used: int, margin: int = MARGIN):
        self.routers, self.norms, self.eps = routers, norms, np.float32(eps)
        self.k = min(n_used + margin, routers[0].shape[0])
        self.stats = PredictStats()
        self._guess: dict[tuple[int, int], set[int]] = {}

    def predict(self, layer: int, x: np.ndarray, rows: int = 0) -> list[int]:
        """The experts layer `layer` is likely to choose for the rows of hidden state `x` [k, d],
        most likely first (the best guess of every row before the second-best of any); `rows`
        names which rows of a batch they are, for `check`."""
        x = np.asarray(x, np.float32)
        h = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + self.eps) * self.norms[layer]
        logits = h @ self.routers[layer].T
        top = np.argsort(-logits, axis=1, kind="stable")[:, : self.k]
        out, seen = [], set()
        for e in top.T.reshape(-1):
            if int(e) not in seen:
                seen.add(int(e))
                out.append(int(e))
        self._guess[layer, rows] = seen
        return out

    def check(self, layer: int, chosen, rows: int = 0) -> None:
        """Layer `layer`'s real routing of `rows`: score the guess made for them, if any."""
        guess = self._guess.pop((layer, rows), None)
        if guess is None:
            return
        chosen = {int(e) for e in np.asarray(chosen).reshape(-1)}
        self.stats.guessed += len(guess)
        self.stats.chosen += len(chosen)
        self.stats.right += len(guess & chosen)
