"""The drafter protocol that speculative generation (`ember.runtime.generate`) drives.

Per generation: `start(params, n_vocab, prompt_ids)` once (with the target's prefill), then per
verify step `propose(context_ids, k)`, `probs()` (only when sampling) and `accepted(n)`.
Generation never asks for more than fits the target's context or the tokens still wanted, and
truncates the target's session itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..runtime.sampling import SamplingParams


class Drafter(Protocol):
    name: str  # what stats["drafter"] shows
    # cheap: proposing is free (prompt lookup): generation asks for the most it can use and keeps
    # the prefix its DraftPolicy finds worth verifying; else it asks for exactly that many
    cheap: bool
    # kind (optional): a label of the last proposal (lookup: its matched n-gram) under which the
    # policy counts acceptance; the drafter's name when absent

    def start(self, params: SamplingParams, n_vocab: int, prompt_ids: Sequence[int]) -> None:
        """A generation of `prompt_ids` begins, under these sampling settings (the seed resolved);
        a drafter that keeps state reads the prompt now (it counts as the prompt's time)."""

    def propose(self, context_ids: Sequence[int], k: int) -> list[int]:
        """Up to k token ids to follow `context_ids` (the prompt and every token emitted so far);
        fewer, or none, when the drafter has no good guess."""

    def probs(self) -> list[np.ndarray] | None:
        """For the last proposal: the distribution each token was drawn from (float vectors over
        the vocabulary, under the same sampling settings as the target's), or None when the
        proposal is deterministic (each q one-hot at its token)."""

    def accepted(self, n: int) -> None:
        """The target kept the first n tokens of the last proposal (and added one of its own)."""

    def fork(self) -> Drafter:
        """A drafter that can run alongside this one (another generation at the same time)."""
