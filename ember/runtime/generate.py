"""Generation: prefill the prompt, then sample and decode token by token, streaming text chunks.

Stops at the model's end-of-generation tokens (unless `ignore_eos`), at a stop string (the text
before it is emitted, the stop string is not), at `max_tokens` (None: no cap), or when the
context is full. Records time to first token, prefill and decode speeds, peak memory, the seed
drawn (`seed=None` draws a fresh one, recorded so the run can be repeated) and why it stopped.

The session keeps what it held before: only the prompt's tokens after the longest prefix it
shares with the session's are fed (a chat's next turn prefills only the new messages). When a
generation ends the session holds every token it emitted but the last one (and the last one too
when it ended at an end-of-generation token, which is not emitted).

Speculative decoding (`drafter=`, see `ember.speculative` and docs/speculative.md): each step
feeds the last emitted token and the drafter's proposal (k tokens) in one `Session.feed`, so the
fused step reads each weight once for all k+1 rows; `verify_draft` keeps the drafted tokens the
target agrees with (greedy: its argmax; sampling: the rejection rule, which leaves the output
distribution exactly the target's) plus one token of the target's own, the session is truncated
to drop the rejected rows, and the tokens go out one by one through the same stop / EOS /
max_tokens / context rules as plain generation.
"""

from __future__ import annotations

import dataclasses
import resource
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EmberError
from ..formats.tokenizer import Tokenizer
from .draft_policy import DraftPolicy, calibrate
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .session import Session


class GenerationError(EmberError, ValueError):
    """Bad generation arguments: an empty prompt, max_tokens <= 0, a prompt past the context."""


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int | None = 128  # None: until the end of the turn or the context
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = 0
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        m = self.max_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
            raise GenerationError(f"max_tokens must be a positive integer or None, got {m!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")
        _ = self.sampling  # validates the sampling values now, not at the first token

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            repeat_last_n=self.repeat_last_n,
            seed=self.seed,
        )


@dataclass
class Chunk:
    text: str  # complete UTF-8 text this chunk adds
    token_ids: list[int]  # ids this chunk adds
    finish_reason: str | None = None  # None, "stop" or "length"
    stats: dict = field(default_factory=dict, repr=False)  # the call's figures, complete at the end


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class _StopFilter:
    """Holds back text that might be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


MAX_DRAFT = 15  # drafted tokens per verify step: with the last token, one fused step of 16 rows


class _Emitter:
    """Turns sampled tokens into chunks under the stop rules: end-of-generation tokens (unless
    ignore_eos), stop strings, max_tokens and the context. One token at a time, for plain and
    speculative generation alike; `done` once a chunk carried a finish_reason."""

    def __init__(self, tokenizer: Tokenizer, cfg: GenerationConfig, prompt_ids: list[int], n_ctx: int, stats: dict):
        self.cfg, self.n_ctx, self.stats = cfg, n_ctx, stats
        self.stop_ids = frozenset() if cfg.ignore_eos else tokenizer.stop_ids
        self.detok = tokenizer.stream(special=False)
        self.stops = _StopFilter(cfg.stop)
        self.history = list(prompt_ids)  # the prompt and the emitted tokens
        self.generated: list[int] = []
        self.t_first: float | None = None
        self.done = False
        self.eos = False

    @property
    def held(self) -> int:
        """How many tokens the session holds once generation ends (or pauses at a chunk): all of
        the history but the last token, which is fed with the next step; all of it after an EOS."""
        return len(self.history) - (0 if self.eos else 1)

    def emit(self, token: int, t0: float) -> Chunk:
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.stats["ttft_s"] = self.t_first - t0
        stats, generated = self.stats, self.generated
        if token in self.stop_ids:
            tail = self.stops.flush() + self.detok.flush()
            self.done = self.eos = True
            _finish(stats, generated, self.t_first, "eos")
            return Chunk(tail, [], "stop", stats)
        generated.append(token)
        self.history.append(token)
        text, hit = self.stops.push(self.detok.feed([token]))
        if hit:
            self.done = True
            _finish(stats, generated, self.t_first, "stop_string")
            return Chunk(text, [token], "stop", stats)
        capped = self.cfg.max_tokens is not None and len(generated) >= self.cfg.max_tokens
        if capped or len(self.history) >= self.n_ctx:  # the session holds all but this token
            text += self.stops.push(self.detok.flush())[0] + self.stops.flush()
            self.done = True
            _finish(stats, generated, self.t_first, "max_tokens" if capped else "context")
            return Chunk(text, [token], "length", stats)
        return Chunk(text, [token], None, stats)


def generate(
    session: Session,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    cfg: GenerationConfig,
    stats: dict | None = None,
    drafter=None,
    k: int | None = None,
) -> Iterator[Chunk]:
    """Stream the continuation of `prompt_ids` after what `session` holds of it; fills `stats`
    (a new dict when None; every chunk carries it) as it goes.

    `drafter` (an `ember.speculative` drafter, or None for plain decoding) proposes `k` tokens
    per step (1..MAX_DRAFT; None: a `DraftPolicy` chooses per step from the costs and the
    acceptance it measures, 0 when a plain step pays more). Greedy output is the same tokens as
    plain decoding; sampled output has the same distribution."""
    stats = {} if stats is None else stats
    if not prompt_ids:
        raise GenerationError("the prompt is empty: give some text or token ids")
    n_ctx = session.n_ctx
    if len(prompt_ids) >= n_ctx:
        raise GenerationError(
            f"the prompt has {len(prompt_ids)} tokens but the context window holds {n_ctx} "
            f"(and one more is needed to generate): shorten the prompt or raise the context size "
            f"(n_ctx=, or -c on the command line)"
        )
    bad = [i for i in prompt_ids if not 0 <= i < tokenizer.n_vocab]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.n_vocab - 1})")
    if drafter is not None and k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT:
            raise GenerationError(f"the draft length k must be an integer from 1 to {MAX_DRAFT}, got {k!r}")
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    params = dataclasses.replace(cfg.sampling, seed=seed)
    sampler = Sampler(params, tokenizer.n_vocab)
    out = _Emitter(tokenizer, cfg, prompt_ids, n_ctx, stats)
    stats.clear()
    stats.update(prompt_tokens=len(prompt_ids), tokens_generated=0, seed=seed)

    t0 = time.perf_counter()
    reused = session.keep_prefix(prompt_ids)
    logits = session.feed_last(prompt_ids[reused:])
    if drafter is not None:  # a draft model reads the prompt now: part of the prompt's time
        drafter.start(params, tokenizer.n_vocab, prompt_ids)
    t_prefill = time.perf_counter() - t0
    stats.update(
        prompt_tokens_reused=reused,
        prefill_s=t_prefill,
        prefill_tokens_per_s=(len(prompt_ids) - reused) / max(t_prefill, 1e-9),
    )
    if drafter is None:
        while True:
            token = sampler.sample(logits, out.history)
            yield out.emit(token, t0)
            if out.done:
                return
            logits = session.feed_last([token])

    cheap = getattr(drafter, "cheap", False)  # proposes the most for free: the policy cuts it
    # under sampling the costs stay priors: timings would steer the random draws, and a seed must
    # repeat a run
    policy = DraftPolicy(MAX_DRAFT, fixed=k, draft_overhead=0 if cheap else 1, timed=params.greedy)
    if k is None and params.greedy:  # the verify costs, measured once per model (rolled back at once)
        for rows, seconds in calibrate(session, out.history, min(MAX_DRAFT, n_ctx - len(out.history) - 1)).items():
            policy.observe_step(rows, seconds)
    spec: dict = dict(
        drafter=drafter.name,
        draft_k=k if k is not None else "auto",
        verify_steps=0,
        drafted_tokens=0,
        accepted_tokens=0,
        acceptance_rate=0.0,
        mean_accepted_length=0.0,
    )
    stats.update(spec)
    try:
        yield out.emit(sampler.sample(logits, out.history), t0)  # the first token: from the prefill
        while not out.done:
            history = out.history
            base = len(session)  # == len(history) - 1: all but the last token
            left = MAX_DRAFT if cfg.max_tokens is None else cfg.max_tokens - len(out.generated) - 1
            room = max(0, min(MAX_DRAFT, left, n_ctx - len(history)))  # room + 1 rows fit the context
            t = time.perf_counter()
            if cheap:
                draft = [int(x) for x in drafter.propose(history, room)][:room] if room else []
                kind = getattr(drafter, "kind", drafter.name)
                draft = draft[: policy.choose(kind, len(draft))]
            else:
                kind = getattr(drafter, "kind", drafter.name)
                n = policy.choose(kind, room)
                draft = [int(x) for x in drafter.propose(history, n)][:n] if n else []
            policy.observe_draft(len(draft), time.perf_counter() - t, getattr(drafter, "token_s", None))
            q = drafter.probs() if draft and not params.greedy else None
            t = time.perf_counter()
            rows = session.feed([history[-1], *draft])
            policy.observe_step(len(draft) + 1, time.perf_counter() - t)
            tokens, accepted = verify_draft(sampler, rows, draft, q, history)
            session.truncate(base + 1 + accepted)
            if draft:
                drafter.accepted(accepted)
                policy.observe_accept(kind, len(draft), accepted)
            spec["verify_steps"] += 1
            spec["drafted_tokens"] += len(draft)
            spec["accepted_tokens"] += accepted
            spec["acceptance_rate"] = spec["accepted_tokens"] / max(spec["drafted_tokens"], 1)
            spec["mean_accepted_length"] = spec["accepted_tokens"] / spec["verify_steps"]
            stats.update(spec)
            stats.update(policy.stats())
            for token in tokens:
                yield out.emit(token, t0)
                if out.done:
                    break
    finally:  # also when the caller stops reading: the session holds what plain decoding would
        if len(session) > out.held:
            session.truncate(out.held)


def verify_draft(
    sampler: Sampler, rows: np.ndarray, draft: Sequence[int], q, history: Sequence[int]
) -> tuple[list[int], int]:
    """The tokens one verify step emits, and how many of `draft` it accepted.

    rows: the target's logits [len(draft) + 1, n_vocab] after history[-1] and after each drafted
    token. Position i is judged under the target's sampling settings with `history` plus the
    drafted tokens before i (the repeat penalty's view, as in plain decoding). Greedy: the
    longest drafted prefix equal to the target's argmax, then the argmax after it. Sampling: the
    rejection rule; d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
    rejection the token is drawn from normalize(max(0, p_i - q_i)); when all are accepted one more
    is drawn from p_k. q: the drafter's distributions, one float vector per drafted token, or None
    for a deterministic drafter (q_i one-hot at d_i). Random numbers come from `sampler.rng`.
    """
    hist = list(history)
    if sampler.params.greedy:
        for i, d in enumerate(draft):
            t = sampler.sample(rows[i], hist)
            if t != d:
                return [*draft[:i], t], i
            hist.append(d)
        return [*draft, sampler.sample(rows[len(draft)], hist)], len(draft)
    rng = sampler.rng
    for i, d in enumerate(draft):
        p = sampler.probabilities(rows[i], hist)
        qd = 1.0 if q is None else float(q[i][d])
        if rng.random() * qd < p[d]:  # accepted with probability min(1, p(d) / q(d))
            hist.append(d)
            continue
        if q is None:
            r = p
            r[d] = 0.0
        else:
            r = np.maximum(p - q[i], 0.0)
        return [*draft[:i], draw(r if r.sum() > 0 else p, rng)], i
    return [*draft, draw(sampler.probabilities(rows[len(draft)], hist), rng)], len(draft)


def draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index j drawn with probability weights[j] / weights.sum() (weights >= 0, not all 0),
    from one uniform number of `rng`; never a j whose weight is 0."""
    nz = np.flatnonzero(weights)
    c = np.cumsum(weights[nz])
    j = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    return int(nz[min(j, nz.shape[0] - 1)])


def _finish(stats: dict, generated: list[int], t_first: float, why: str) -> None:
    """Records the decode figures and why generation ended: "eos", "stop_string", "max_tokens"
    or "context" (the chunk's finish_reason is "stop" for the first two, "length" otherwise)."""
    t_decode = time.perf_counter() - t_first
    n = len(generated)
    stats.update(
        stopped_by=why,
        tokens_generated=n,
        decode_s=t_decode,
        decode_tokens_per_s=(n - 1) / t_decode if n > 1 and t_decode > 0 else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
    )
