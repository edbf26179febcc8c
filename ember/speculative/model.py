"""Drafting with a smaller model of the target's vocabulary, on a session of its own.

Each proposal feeds the draft session only what it lacks of the context (`Session.keep_prefix`:
after a fully accepted step that is the last drafted token and the target's own, in one feed),
then drafts k tokens one at a time: the argmax when greedy, else a draw from the draft's own
filtered distribution under the target's sampling settings (returned by `probs()` as q).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from ..errors import EmberError
from ..runtime.sampling import Sampler, SamplingParams, draw


def check_same_vocabulary(target, draft) -> None:
    """Raise EmberError unless the two tokenizers have the same tokens, id for id (and the
    same size): the draft's ids must mean the target's."""
    a, b = target.tokenizer.tokens, draft.tokenizer.tokens
    na, nb = target.tokenizer.n_vocab, draft.tokenizer.n_vocab
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            raise EmberError(
                f"{draft.path.name} cannot draft for {target.path.name}: their vocabularies differ "
                f"at token id {i} ({x!r} in the target, {y!r} in the draft); use a draft model of "
                f"the target's family (e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b), or draft='lookup'"
            )
    if na != nb or len(a) != len(b):
        i = min(len(a), len(b))
        x = a[i] if i < len(a) else "(none)"
        y = b[i] if i < len(b) else "(none)"
        raise EmberError(
            f"{draft.path.name} cannot draft for {target.path.name}: the target has {na} tokens and "
            f"the draft {nb}; they first differ at token id {i} ({x!r} in the target, {y!r} in the "
            f"draft); use a draft model of the target's family, or draft='lookup'"
        )


class ModelDrafter:
    cheap = False  # each drafted token is a step of the draft model: generation asks for k

    def __init__(self, draft_model, target_model):
        check_same_vocabulary(target_model, draft_model)
        self.model = draft_model
        self.name = f"model:{draft_model.path.name}"
        self._session = None
        self._sampler: Sampler | None = None
        self._q: list[np.ndarray] | None = None
        self._fed_to = 0  # len(context) of the last proposal
        self.token_s: float | None = None  # seconds of one drafted token (the last proposal's)

    @property
    def separate(self) -> bool:
        """Whether the draft model runs on a device of its own (a GPU), not the target's threads."""
        return bool(getattr(self.model, "own_device", False))

    @property
    def session(self):
        if self._session is None:
            self._session = self.model.session()
        return self._session

    def start(self, params: SamplingParams, n_vocab: int, prompt_ids: Sequence[int]) -> None:
        seed = int(np.random.SeedSequence([params.seed or 0, 1]).generate_state(1)[0]) >> 1
        self._sampler = Sampler(dataclasses.replace(params, seed=seed), n_vocab)
        s = self.session  # holds the prompt but its last token, which the first proposal feeds
        n = s.keep_prefix(prompt_ids)
        if n < len(prompt_ids) - 1:
            for _ in s.feed_batches(prompt_ids[n:-1], all_logits=False):
                pass

    def propose(self, context_ids: Sequence[int], k: int) -> list[int]:
        s, sampler = self.session, self._sampler
        k = min(k, s.n_ctx - len(context_ids))  # the session ends holding context + k - 1 drafts
        self._q = None
        if k <= 0:
            return []
        t0 = time.perf_counter()
        reused = s.keep_prefix(context_ids)
        logits = s.feed_last(context_ids[reused:])
        t1 = time.perf_counter()
        hist = list(context_ids)
        greedy = sampler.params.greedy
        tokens, qs = [], []
        for i in range(k):
            if greedy:
                t = sampler.sample(logits, hist)
            else:
                q = sampler.probabilities(logits, hist)
                t = draw(q, sampler.rng)
                qs.append(q)
            tokens.append(t)
            hist.append(t)
            if i + 1 < k:
                logits = s.feed_last([t])
        self._q = qs or None
        self._fed_to = len(context_ids)
        # one drafted token's cost, for the draft-length policy: the draft's own steps, not the
        # catch-up feed (long after plain steps); a one-token proposal's feed when it was short
        if k > 1:
            self.token_s = (time.perf_counter() - t1) / (k - 1)
        elif len(context_ids) - reused <= 2:
            self.token_s = t1 - t0
        return tokens

    def use_threads(self, threads: int) -> None:
        """Draft on `threads` threads from now on (the concurrent schedule's share, or all)."""
        self.session.use_threads(threads)

    def probs(self) -> list[np.ndarray] | None:
        return self._q

    def accepted(self, n: int) -> None:
        s = self.session
        keep = self._fed_to + n  # the context and the accepted drafts; the rest is rolled back
        if len(s) > keep:
            s.truncate(keep)

    def fork(self) -> ModelDrafter:
        other = object.__new__(ModelDrafter)
        other.__dict__.update(self.__dict__, _session=None, _sampler=None, _q=None)
        return other
