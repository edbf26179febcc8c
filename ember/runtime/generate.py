"""Generation: prefill the prompt, then sample and decode token by token, streaming text chunks.

Stops at the model's end-of-generation tokens (unless `ignore_eos`), at a stop string (the text
before it is emitted, the stop string is not), at `max_tokens` (None: no cap), or when the
context is full. Records time to first token, prefill and decode speeds, peak memory, the seed
drawn (`seed=None` draws a fresh one, recorded so the run can be repeated) and why it stopped.

The session keeps what it held before: only the prompt's tokens after the longest prefix it
shares with the session's are fed (a chat's next turn prefills only the new messages).
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
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n, seed=self.seed,
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


def generate(session: Session, tokenizer: Tokenizer, prompt_ids: list[int], cfg: GenerationConfig,
             stats: dict | None = None) -> Iterator[Chunk]:
    """Stream the continuation of `prompt_ids` after what `session` holds of it; fills `stats`
    (a new dict when None; every chunk carries it) as it goes."""
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
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    sampler = Sampler(dataclasses.replace(cfg.sampling, seed=seed), tokenizer.n_vocab)
    stop_ids = frozenset() if cfg.ignore_eos else tokenizer.stop_ids
    detok = tokenizer.stream(special=False)
    stops = _StopFilter(cfg.stop)
    stats.clear()
    stats.update(prompt_tokens=len(prompt_ids), tokens_generated=0, seed=seed)

    t0 = time.perf_counter()
    reused = session.keep_prefix(prompt_ids)
    logits = session.feed_last(prompt_ids[reused:])
    t_prefill = time.perf_counter() - t0
    stats.update(prompt_tokens_reused=reused, prefill_s=t_prefill,
                 prefill_tokens_per_s=(len(prompt_ids) - reused) / max(t_prefill, 1e-9))
    history = list(prompt_ids)
    generated: list[int] = []
    t_first = None
    while True:
        token = sampler.sample(logits, history)
        if t_first is None:
            t_first = time.perf_counter()
            stats["ttft_s"] = t_first - t0
        if token in stop_ids:
            tail = stops.flush() + detok.flush()
            _finish(stats, generated, t_first, "eos")
            yield Chunk(tail, [], "stop", stats)
            return
        generated.append(token)
        history.append(token)
        text, hit = stops.push(detok.feed([token]))
        if hit:
            _finish(stats, generated, t_first, "stop_string")
            yield Chunk(text, [token], "stop", stats)
            return
        capped = cfg.max_tokens is not None and len(generated) >= cfg.max_tokens
        if capped or len(session) + 1 >= n_ctx:
            text += stops.push(detok.flush())[0] + stops.flush()
            _finish(stats, generated, t_first, "max_tokens" if capped else "context")
            yield Chunk(text, [token], "length", stats)
            return
        yield Chunk(text, [token], None, stats)
        logits = session.feed_last([token])


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
