"""Generation: prefill the prompt, then sample and decode token by token, streaming text chunks.

Stops at the model's end-of-generation tokens (unless `ignore_eos`), at a stop string (the text
before it is emitted, the stop string is not), at `max_tokens` (None: no cap), or when the
context is full. Records time to first token, prefill and decode speeds, peak memory, the seed
drawn (`seed=None` draws a fresh one, recorded so the run can be repeated) and why it stopped.

The session keeps what it held before: only the prompt's tokens after the longest prefix it
shares with the session's are fed (a chat's next turn prefills only the new messages). When a
generation ends the session holds every token it emitted but the last one (and the last one too
when it ended at an end-of-generation token, which is not emitted).

Speculative decoding (`drafter=`): `speculate` runs the steps; the tokens go out through the
same stop / EOS / max_tokens / context rules (`_Emitter`) as plain generation.
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

from ..errors import EmberError
from ..formats.tokenizer import Tokenizer
from .sampling import Sampler, SamplingParams
from .speculate import MAX_DRAFT, SCHEDULE_CHOICES, speculate

if TYPE_CHECKING:
    from .session import Session


RESERVE_MAX = 512  # reply tokens the KV cache makes room for up front (growing it stalls a step)


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
    schedule: str = "auto",
) -> Iterator[Chunk]:
    """Stream the continuation of `prompt_ids` after what `session` holds of it; fills `stats`
    (a new dict when None; every chunk carries it) as it goes.

    `drafter` (an `ember.speculative` drafter, or None for plain decoding) proposes `k` tokens
    per step (1..MAX_DRAFT; None: a `DraftPolicy` chooses per step from the costs and the
    acceptance it measures, 0 when a plain step pays more), in turns with the target or
    concurrently (`schedule`: "turns", "concurrent" or "auto", see `speculate`). Greedy output is
    the same tokens as plain decoding; sampled output has the same distribution."""
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
    if schedule not in SCHEDULE_CHOICES:
        raise GenerationError(f"the schedule must be one of {', '.join(SCHEDULE_CHOICES)}, got {schedule!r}")
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    params = dataclasses.replace(cfg.sampling, seed=seed)
    sampler = Sampler(params, tokenizer.n_vocab)
    out = _Emitter(tokenizer, cfg, prompt_ids, n_ctx, stats)
    stats.clear()
    stats.update(prompt_tokens=len(prompt_ids), tokens_generated=0, seed=seed, device=session.device.describe())

    t0 = time.perf_counter()
    reused = session.keep_prefix(prompt_ids)
    logits = session.feed_last(prompt_ids[reused:])
    if drafter is not None:  # a draft model reads the prompt now: part of the prompt's time
        drafter.start(params, tokenizer.n_vocab, prompt_ids)
    if cfg.max_tokens is not None:  # room for the reply (and a draft beyond it) before the first token
        session.reserve(len(prompt_ids) + min(cfg.max_tokens, RESERVE_MAX) + MAX_DRAFT - len(session))
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

    yield from speculate(session, drafter, sampler, out, cfg, stats, t0, logits, k=k, schedule=schedule)


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
