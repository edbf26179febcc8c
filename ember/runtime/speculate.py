"""Speculative generation's steps: a drafter proposes tokens, the target verifies them in one
`Session.feed`, and what it accepts goes out through generation's emitter.

Each step feeds the last emitted token and the drafted ones (k) in one call, so the fused step
reads each weight once for all k + 1 rows; `verify_draft` keeps the drafted tokens the target
agrees with (greedy: its argmax; sampling: the rejection rule, which leaves the output
distribution exactly the target's) plus one token of the target's own, and the session is
truncated to drop the rejected rows.

Schedules (`schedule=`):
- "turns": the drafter drafts, then the target verifies, each on all the threads;
- "concurrent" (a draft model only): while the target verifies block t on its share of the
  threads, the drafter, on the rest, drafts block t + 1 on a worker thread, on the guess that
  block t is fully accepted: its first token guesses the target's own. When the guess holds the
  next step starts with its draft made; otherwise that draft is thrown away and the next one is
  drafted in turns. The numba calls release the GIL, so both run at once;
- "auto": each step takes the schedule and k with the most tokens a second under the costs
  measured on the spot (`DraftPolicy`); under sampling, turns (the costs are not timed there,
  so that a seed repeats a run).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import EmberError
from .draft_policy import DraftPolicy, calibrate
from .sampling import Sampler, draw

MAX_DRAFT = 15  # drafted tokens per verify step: with the last token, one fused step of 16 rows
SCHEDULE_CHOICES = ("auto", "turns", "concurrent")


def draft_threads(total: int) -> int:
    """The drafter's share of `total` threads under the concurrent schedule (the target's: the
    rest): a quarter, at least one."""
    return max(1, total // 4)


def _concurrent_blocker(session, drafter) -> str | None:
    """Why the concurrent schedule cannot run here, or None when it can."""
    if getattr(drafter, "cheap", False) or not hasattr(drafter, "use_threads"):
        return "a draft model (prompt lookup drafts for free, in turns)"
    if getattr(drafter, "separate", False):  # on a device of its own: no threads to share
        return None
    if session.threads < 2:
        return "at least 2 threads (one for the target, one for the draft)"
    share = draft_threads(session.threads)
    try:
        session.device.with_threads(session.threads - share, session.model)
        drafter.session.device.with_threads(share, drafter.session.model)
    except (AttributeError, EmberError) as e:
        return f"a device that can split its threads ({e})"
    return None


def _schedules(session, drafter, schedule: str, greedy: bool) -> tuple[tuple[str, ...], str]:
    """The schedules a generation may use, and why the others are left out ('' if none is)."""
    if schedule == "turns":
        return ("turns",), ""
    blocker = _concurrent_blocker(session, drafter)
    if schedule == "concurrent":
        if blocker:
            raise EmberError(f"the concurrent schedule needs {blocker}; use schedule 'turns' or 'auto'")
        return ("concurrent",), ""
    if blocker:
        return ("turns",), f"turns only: concurrent needs {blocker}"
    if not greedy:
        return ("turns",), "turns only: under sampling the costs are not timed (a seed repeats a run)"
    return ("turns", "concurrent"), ""


def _draft_ahead(drafter, context: list[int], n: int, greedy: bool):
    """On the worker thread: n tokens after `context` (the first guesses the target's own)."""
    t = time.perf_counter()
    tokens = [int(x) for x in drafter.propose(context, n)][:n]
    q = drafter.probs() if tokens and not greedy else None
    return tokens, q, getattr(drafter, "token_s", None), time.perf_counter() - t


def speculate(
    session,
    drafter,
    sampler: Sampler,
    out,
    cfg,
    stats: dict,
    t0: float,
    logits: np.ndarray,
    k: int | None = None,
    schedule: str = "auto",
) -> Iterator:
    """The chunks of a speculative generation whose prompt `session` has just read (`logits`:
    after its last token); `out` is generation's emitter, `stats` its figures."""
    params, n_ctx = sampler.params, session.n_ctx
    cheap = getattr(drafter, "cheap", False)  # proposes the most for free: the policy cuts it
    allowed, why = _schedules(session, drafter, schedule, params.greedy)
    # under sampling the costs stay priors: timings would steer the random draws, and a seed must
    # repeat a run
    policy = DraftPolicy(MAX_DRAFT, fixed=k, draft_overhead=0 if cheap else 1, timed=params.greedy, schedules=allowed)
    full = session.threads
    concurrent = "concurrent" in allowed
    separate = concurrent and getattr(drafter, "separate", False)  # a draft on a device of its own
    if concurrent:
        d_full = drafter.session.threads
        share = draft_threads(full)
        split = (full, d_full) if separate else (full - share, share)  # (the target's, the draft's)
    history = out.history
    if policy.timed and (k is None or len(allowed) > 1):  # costs measured once per model and threads
        room = min(MAX_DRAFT, n_ctx - len(history) - 1)
        alike = ("turns", "concurrent") if separate else ("turns",)  # apart, each runs as it does alone
        for rows, seconds in calibrate(session, history, room).items():
            for x in alike:
                policy.observe_step(rows, seconds, x)
        if separate:
            for _, seconds in calibrate(drafter.session, history, room, sizes=(1,)).items():
                for x in alike:
                    policy.observe_draft(1, seconds, seconds, x)
        elif concurrent:
            try:
                session.use_threads(split[0])
                for rows, seconds in calibrate(session, history, room).items():
                    policy.observe_step(rows, seconds, "concurrent")
                for threads, x in ((d_full, "turns"), (split[1], "concurrent")):
                    drafter.use_threads(threads)
                    for _, seconds in calibrate(drafter.session, history, room, sizes=(1,)).items():
                        policy.observe_draft(1, seconds, seconds, x)
            finally:
                session.use_threads(full)
                drafter.use_threads(d_full)
    spec: dict = dict(
        drafter=drafter.name,
        draft_k=k if k is not None else "auto",
        schedule=schedule,
        verify_steps=0,
        drafted_tokens=0,
        accepted_tokens=0,
        acceptance_rate=0.0,
        mean_accepted_length=0.0,
    )
    if why:
        spec["schedule_note"] = why
    if concurrent:
        spec.update(ahead_drafts=0, ahead_hits=0, ahead_wasted_tokens=0)
    stats.update(spec)
    pool = ThreadPoolExecutor(1, thread_name_prefix="ember-draft") if concurrent else None
    ahead: tuple[list[int], Future] | None = None  # (the context it drafts after, the work)
    kind = getattr(drafter, "kind", drafter.name)
    try:
        yield out.emit(sampler.sample(logits, history), t0)  # the first token: from the prefill
        while not out.done:
            t_step = time.perf_counter()
            base = len(session)  # == len(history) - 1: all but the last token
            left = MAX_DRAFT if cfg.max_tokens is None else cfg.max_tokens - len(out.generated) - 1
            room = max(0, min(MAX_DRAFT, left, n_ctx - len(history)))  # room + 1 rows fit the context
            made: tuple[list[int], list | None] | None = None  # a draft made beside the last verify
            if ahead is not None:
                context, work = ahead
                ahead = None
                tokens, q, per_token, seconds = work.result()
                drafter.use_threads(d_full)  # a draft in turns runs on all of its threads
                policy.observe_draft(len(tokens), seconds, per_token, "concurrent")
                if len(history) == len(context) + 1 and history[: len(context)] == context and tokens:
                    hit = history[-1] == tokens[0]  # every drafted token was accepted: the guess
                    policy.observe_accept(kind, 1, int(hit))
                    if hit:
                        made = tokens[1:], (q[1:] if q else None)
                        spec["ahead_hits"] += 1
                if made is None:
                    spec["ahead_wasted_tokens"] += len(tokens)
            if cheap:
                draft = [int(x) for x in drafter.propose(history, room)][:room] if room else []
                kind = getattr(drafter, "kind", drafter.name)
                draft = draft[: policy.choose(kind, len(draft))]
                q = None
            else:
                n = policy.choose(kind, room)
                if made is not None and n:
                    draft, q = made[0][:n], (made[1][:n] if made[1] else None)
                else:
                    if made is not None:
                        spec["ahead_wasted_tokens"] += len(made[0])
                    t = time.perf_counter()
                    draft = [int(x) for x in drafter.propose(history, n)][:n] if n else []
                    policy.observe_draft(len(draft), time.perf_counter() - t, getattr(drafter, "token_s", None))
                    q = drafter.probs() if draft and not params.greedy else None
            side = "turns"
            if draft and policy.schedule == "concurrent":
                # the next block, drafted beside this verify on the guess that all of it is kept
                left_next = left - len(draft) - 1
                n_next = min(len(draft), MAX_DRAFT, left_next, n_ctx - len(history) - len(draft) - 1)
                if n_next > 0:
                    context = history + draft
                    session.use_threads(split[0])
                    drafter.use_threads(split[1])
                    ahead = context, pool.submit(_draft_ahead, drafter, context, n_next + 1, params.greedy)
                    side = "concurrent"
                    spec["ahead_drafts"] += 1
            t = time.perf_counter()
            try:
                rows = session.feed([history[-1], *draft])
            finally:
                session.use_threads(full)
            policy.observe_step(len(draft) + 1, time.perf_counter() - t, side)
            tokens, accepted = verify_draft(sampler, rows, draft, q, history)
            session.truncate(base + 1 + accepted)
            policy.observe_outcome(len(tokens), time.perf_counter() - t_step)
            if draft:
                if ahead is None:  # (else the drafter is busy; its next proposal rolls back)
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
        if ahead is not None:
            ahead[1].exception()  # waits: the drafter's session must be idle before it is reused
        if pool is not None:
            pool.shutdown(wait=True)
            drafter.use_threads(d_full)
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
