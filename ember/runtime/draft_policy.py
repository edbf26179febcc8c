"""How many drafted tokens each speculative verify step takes: chosen per step from a cost model
measured on the spot, so speculation pays where it can and falls back to plain decoding where
it cannot.

The model: a verify step of n rows costs v(n) seconds (the step times measured per n, once per
model at the start and then at every step, made non-decreasing, linear in between); drafting k
tokens costs f + (k - 1) c seconds (measured: f, the first token, whose step also feeds the draft
model what it lacks of the context, one or two tokens after a verify; c, each further token's
step); a drafted token is accepted with probability a (counted per kind of proposal: prompt
lookup's matched n-gram length, or the draft model), independently, so k drafted tokens emit on
average E(k) = 1 + a + ... + a^k tokens. The chosen k maximizes E(k) / (f + (k - 1) c + v(k + 1));
k = 0 is a plain step, one token for v(1). A kind whose acceptance looks too low to pay is
re-tried with a short draft every EXPLORE_EVERY steps, so a change in the text (an echo of the prompt starts)
is noticed, twice as long after each re-try that did not make it pay (up to EXPLORE_MAX). A
draft model is not re-tried: it would first read every token it missed (Qwen2.5-0.5B, whose Q8_0
matrices run row by row: ~15 ms a token on a 2-core Zen 4, 0.25-0.5 s a re-try), which costs as
much as drafting all along. While a kind has little evidence, the choice assumes one acceptance
more than seen.

Two schedules, each with costs of its own (`StepCosts`): taking turns (draft, then verify, each
on all threads), and concurrent: the target verifies a block on its share of the threads while
the drafter, on the rest, drafts the next block on the guess that this one is fully accepted
(its first token guesses the target's own). A step then costs the slower of the two,
max(v(k + 1), f + k c), plus, when the guess fails (probability 1 - a^(k+1)), a draft of k
tokens in turns. With more than one schedule allowed, each step takes the schedule and the k
with the most tokens a second.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Hashable

EMA = 0.3  # weight of the newest timing
OUTLIER = 1.5  # a timing counts at most this many times the average so far
DECAY = 0.95  # per observation, of the acceptance counts: recent text counts more
# accepted, rejected before any evidence: a = 0.8, so a new kind is drafted and learned about
# (decayed away within a few dozen drafted tokens); a pessimistic prior left a draft model that
# paid (1.19x at k = 4) idle, re-tried only every EXPLORE_EVERY steps
PRIOR = (4.0, 1.0)
PRIOR_ROW_COST = 0.15  # an extra verified row's cost, in one-row steps, until one is measured
PRIOR_DRAFT_COST = 0.25  # a draft model's token, in one-row target steps, when not timed
EXPLORE_EVERY = 16
EXPLORE_MAX = 128
PROBE_STEPS = 8  # auto: steps a schedule is tried for
RECHECK_EVERY = 48  # auto: steps the best schedule runs before the others are tried again
PROBE_MARGIN = 0.15  # auto: a schedule the cost model expects to lose by more is not probed
OUTCOME_DECAY = 0.9  # per step, of a schedule's measured tokens and seconds
EXPLORE_K = 2
CALIBRATE_ROWS = (1, 2, 4, 8, 16)
SCHEDULES = ("turns", "concurrent")
# model -> {threads: {rows: seconds}}
_calibrated: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibrate(session, history, room: int, sizes=CALIBRATE_ROWS) -> dict[int, float]:
    """Seconds of a step of n rows for n in `sizes` (up to room + 1), measured once per model
    and thread count on `session` (rows of the history's own tokens, rolled back at once) and
    kept: the verify costs the policy starts from (a draft model's: one row)."""
    per_threads = _calibrated.setdefault(session.model, {})
    known = per_threads.get((session.threads, tuple(sizes)))
    if known is None:
        known = {}
        base = len(session)
        for n in sizes:
            if n > room + 1 or n > len(history):
                break
            t = time.perf_counter()
            session.feed(list(history[-n:]))
            known[n] = time.perf_counter() - t
            session.truncate(base)
        if len(known) == len(sizes):
            per_threads[(session.threads, tuple(sizes))] = known
    return known


def _average(old: float, new: float) -> float:
    """The moving average with `new` clipped to OUTLIER x `old`: one stall (a page fault storm,
    another process) moves it little, a lasting change within a few steps."""
    return (1 - EMA) * old + EMA * min(new, OUTLIER * old)


class StepCosts:
    """The costs measured under one schedule: seconds of a verify step per number of rows, and
    of one drafted token (moving averages)."""

    def __init__(self, timed: bool, overhead: int):
        self.timed, self.overhead = timed, overhead
        self.step_s: dict[int, float] = {}  # rows -> seconds (moving average)
        self.draft_s: float | None = None  # seconds per drafted token after the first (moving average)
        self.first_s: float | None = None  # seconds of a proposal's first token, its catch-up feed included
        if not timed:
            self.step_s[1] = 1.0
            self.draft_s = PRIOR_DRAFT_COST if overhead else 0.0
            self.first_s = (1 + overhead) * self.draft_s

    def observe_step(self, rows: int, seconds: float) -> None:
        if not self.timed:
            return
        old = self.step_s.get(rows)
        self.step_s[rows] = seconds if old is None else _average(old, seconds)

    def observe_draft(self, tokens: int, seconds: float, per_token: float | None = None) -> None:
        """A proposal of `tokens` tokens took `seconds`; `per_token`: the drafter's own figure
        for one drafted token (a draft model's, without feeding what it lacked of the context),
        the rest being its first token's."""
        if tokens > 0 and self.timed:
            per = per_token if per_token is not None else seconds / (tokens + self.overhead)
            first = max(seconds - (tokens - 1) * per, 0.0) if per_token is not None else (1 + self.overhead) * per
            self.draft_s = per if self.draft_s is None else _average(self.draft_s, per)
            self.first_s = first if self.first_s is None else _average(self.first_s, first)

    def draft_cost(self, k: int) -> float:
        """Seconds of drafting k >= 1 tokens (0 before a proposal is measured)."""
        return (self.first_s or 0.0) + (k - 1) * (self.draft_s or 0.0)

    def verify_costs(self, max_rows: int) -> list[float] | None:
        """Seconds of a verify step of 1..max_rows rows: the measured (and calibrated) sizes made
        non-decreasing (adjacent violators pooled, so one slow step moves little), linear between
        them and beyond the nearest two; a prior slope while only one row has been measured; None
        before that."""
        s = self.step_s
        if 1 not in s:
            return None
        if len(s) == 1:
            return [s[1] * (1 + PRIOR_ROW_COST * r) for r in range(max_rows)]
        pools: list[tuple[list[int], float]] = []  # (sizes, their mean time)
        for n in sorted(s):
            sizes, t = [n], s[n]
            while pools and pools[-1][1] > t:  # a violator: pooled with the one before
                prev, pt = pools.pop()
                t = (pt * len(prev) + t * len(sizes)) / (len(prev) + len(sizes))
                sizes = prev + sizes
            pools.append((sizes, t))
        pts = [(n, t) for sizes, t in pools for n in sizes]
        out = []
        for rows in range(1, max_rows + 1):
            i = next((j for j, p in enumerate(pts) if p[0] >= rows), len(pts) - 1)
            i = min(max(i, 1), len(pts) - 1)  # the segment around rows, or the nearest two
            (n0, t0), (n1, t1) = pts[i - 1], pts[i]
            out.append(max(t0 + (t1 - t0) / (n1 - n0) * (rows - n0), 1e-9))
        return out


class DraftPolicy:
    """The per-step schedule and draft length (`choose`), from what `observe_*` reports;
    `fixed` pins k, `schedules` lists the schedules allowed (the first is taken when costs
    cannot tell)."""

    def __init__(
        self,
        max_k: int,
        fixed: int | None = None,
        draft_overhead: int = 0,
        timed: bool = True,
        schedules: tuple[str, ...] = ("turns",),
    ):
        # draft_overhead: drafting k tokens costs k + draft_overhead token-costs (a draft model
        # first feeds what it lacks of the context: about one more token's step). timed=False:
        # the costs stay the priors (a one-row step costs 1, each more row PRIOR_ROW_COST, a
        # drafted token PRIOR_DRAFT_COST with an overhead, else 0), so the choices depend on the
        # accepted tokens alone: under sampling, a seed then repeats a run.
        if not schedules or any(x not in SCHEDULES for x in schedules):
            raise ValueError(f"schedules must be some of {SCHEDULES}, got {schedules!r}")
        self.max_k, self.fixed, self.overhead, self.timed = max_k, fixed, draft_overhead, timed
        self.schedules = tuple(schedules)
        self.costs = {x: StepCosts(timed, draft_overhead) for x in SCHEDULES}
        self.counts: dict[Hashable, list[float]] = {}
        self.idle: dict[Hashable, int] = {}  # steps since a kind was last drafted
        self.explore_every: dict[Hashable, int] = {}  # per kind; doubles after each re-try
        self.chosen: list[int] = []
        self.schedule = self.schedules[0]  # the last step's
        self.steps_by_schedule = {x: 0 for x in self.schedules}
        self.measured = {x: [0.0, 0.0, 0] for x in self.schedules}  # decayed tokens, seconds; steps
        self.phase, self.phase_left, self.probing = self.schedules[0], 0, True
        self.unprobed = ""  # auto: the schedules the cost model spared a probe, and why
        self.reason = ""

    # what happened
    def observe_step(self, rows: int, seconds: float, schedule: str = "turns") -> None:
        self.costs[schedule].observe_step(rows, seconds)

    def observe_draft(
        self, tokens: int, seconds: float, per_token: float | None = None, schedule: str = "turns"
    ) -> None:
        self.costs[schedule].observe_draft(tokens, seconds, per_token)

    def observe_accept(self, kind: Hashable, drafted: int, accepted: int) -> None:
        """`accepted` of `drafted` kept: that many successes, then one rejection unless all were."""
        c = self.counts.setdefault(kind, list(PRIOR))
        for _ in range(drafted):
            c[0] *= DECAY
            c[1] *= DECAY
        c[0] += accepted
        c[1] += 1 if accepted < drafted else 0

    # the model
    def acceptance(self, kind: Hashable) -> float:
        a, r = self.counts.get(kind, PRIOR)
        return a / (a + r)

    def hopeful(self, kind: Hashable) -> float:
        """The acceptance the choice assumes: one success more than seen, which matters while
        there is little evidence (a new kind gets tried) and fades as it accumulates."""
        a, r = self.counts.get(kind, PRIOR)
        return (a + 1) / (a + r + 1)

    def verify_costs(self, max_rows: int, schedule: str = "turns") -> list[float] | None:
        return self.costs[schedule].verify_costs(max_rows)

    def verify_cost(self, rows: int, schedule: str = "turns") -> float | None:
        costs = self.verify_costs(rows, schedule)
        return None if costs is None else costs[-1]

    def _rates(self, limit: int, a: float, schedule: str = "turns") -> list[float] | None:
        """Expected tokens a second of a step with k = 0..limit drafted tokens at acceptance a
        (k = 0: a plain step, on all threads); None before the costs are known."""
        turns, mine = self.costs["turns"], self.costs[schedule]
        v, vm = turns.verify_costs(limit + 1), mine.verify_costs(limit + 1)
        if v is None or vm is None or (schedule != "turns" and (mine.draft_s is None or turns.draft_s is None)):
            return None
        rates = [1 / v[0]]
        for k in range(1, limit + 1):
            emitted = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
            if schedule == "turns":
                cost = turns.draft_cost(k) + v[k]
            else:  # the next block drafted beside the verify; in turns when the guess fails
                cost = max(vm[k], mine.draft_cost(k + 1)) + (1 - a ** (k + 1)) * turns.draft_cost(k)
            rates.append(emitted / cost)
        return rates

    def choose(self, kind: Hashable, limit: int) -> int:
        """The draft length for the next step, at most `limit` (what the drafter offers, or the
        tokens still wanted and the room in the context); 0: a plain step. Sets `schedule`."""
        limit = min(limit, self.max_k)
        first = self.schedules[0]
        if limit <= 0:
            k, schedule = 0, first
        elif self.fixed is not None and len(self.schedules) == 1:
            k, schedule = min(self.fixed, limit), first
            self.reason = f"fixed k={self.fixed}, {first}"
        elif 1 not in self.costs["turns"].step_s:
            k, schedule = (0 if self.fixed is None else min(self.fixed, limit)), first
            self.reason = "a plain step first: it measures one row's cost" if not k else f"fixed k={k}, {first}"
        else:
            a = self.hopeful(kind)
            ks = [min(self.fixed, limit)] if self.fixed is not None else range(limit + 1)
            by_schedule = {}  # schedule -> [(rate, k, schedule)]
            for x in self.schedules:
                rates = self._rates(limit, a, x)
                if rates is not None:
                    by_schedule[x] = [(rates[j], j, x) for j in ks]
            predicted = {x: max(o[0] for o in opts) for x, opts in by_schedule.items()}
            options = [o for x in self._phase(predicted) for o in by_schedule.get(x, [])]
            if not options:
                k, schedule = (min(self.fixed, limit) if self.fixed is not None else 0), first
                self.reason = f"k={k}, {first}: no costs measured yet"
            else:
                plain = max(r for r, j, _ in options if j == 0) if any(j == 0 for _, j, _ in options) else None
                rate, k, schedule = max(options, key=lambda o: o[0])
                every = self.explore_every.get(kind, EXPLORE_EVERY)
                if k:
                    self.explore_every[kind] = EXPLORE_EVERY
                if k == 0 and self.idle.get(kind, 0) >= every and not self.overhead:
                    k, schedule, why = min(EXPLORE_K, limit), "turns", "a short draft to re-check acceptance"
                    self.explore_every[kind] = min(2 * every, EXPLORE_MAX)
                else:
                    why = f"{rate:.1f} tok/s expected" + (f" vs {plain:.1f} plain" if plain else "")
                    others = [o for o in options if o[2] != schedule]
                    if others:
                        best = max(others, key=lambda o: o[0])
                        why += f", {best[0]:.1f} {best[2]} (k={best[1]})"
                self.reason = f"k={k} {schedule} at acceptance {a:.2f} ({kind}): {why}"
                if len(self.schedules) > 1:
                    rates = ", ".join(f"{x} {self.measured_rate(x):.1f}" for x in self.schedules)
                    self.reason += f"; measured tok/s: {rates}"
                    if self.unprobed:
                        self.reason += f"; {self.unprobed}"
        if k == 0:
            schedule = "turns" if "turns" in self.schedules else first
        self.idle[kind] = 0 if k else self.idle.get(kind, 0) + 1
        self.chosen.append(k)
        self.schedule = schedule
        self.steps_by_schedule[schedule] = self.steps_by_schedule.get(schedule, 0) + 1
        return k

    def observe_outcome(self, tokens: int, seconds: float) -> None:
        """The last step, whole (drafting, waiting, verifying), emitted `tokens`: counted for the
        schedule being tried or run (its plain steps too: they are part of what it gives)."""
        m = self.measured[self.phase]
        m[0] = OUTCOME_DECAY * m[0] + tokens
        m[1] = OUTCOME_DECAY * m[1] + seconds
        m[2] += 1

    def measured_rate(self, schedule: str) -> float:
        tokens, seconds, _ = self.measured[schedule]
        return tokens / seconds if seconds > 0 else 0.0

    def _phase(self, predicted: dict[str, float]) -> tuple[str, ...]:
        """The schedules this step may take. With several (auto, timed), one at a time, chosen by
        the tokens a second each measured over whole steps: each is probed for PROBE_STEPS steps
        at first, then the best runs RECHECK_EVERY steps and the others are probed again. The
        cost model alone mispredicted which schedule wins (by 10% on a 2-core Zen 4), so it only
        spares the probes of a schedule it expects to lose by more than PROBE_MARGIN
        (`predicted`: each schedule's best tokens a second under the model)."""
        if len(self.schedules) == 1 or not self.timed:
            return self.schedules
        if self.phase_left <= 0:
            top = max(predicted.values(), default=0.0)
            hopeless = {x for x, r in predicted.items() if r < (1 - PROBE_MARGIN) * top}
            self.unprobed = ", ".join(
                f"{x} not tried: {predicted[x]:.1f} tok/s expected vs {top:.1f}" for x in sorted(hopeless)
            )
            worth = [x for x in self.schedules if x not in hopeless]  # never empty: the top one is in
            new = [x for x in worth if self.measured[x][2] == 0]
            best = max(worth, key=self.measured_rate)
            others = [x for x in worth if x != best]
            if new:
                self.phase, self.phase_left, self.probing = new[0], PROBE_STEPS, True
            elif not self.probing and others:  # the best has run its turn: probe the least tried other
                self.phase = min(others, key=lambda x: self.measured[x][2])
                self.phase_left, self.probing = PROBE_STEPS, True
            else:
                self.phase, self.phase_left, self.probing = best, RECHECK_EVERY, False
        self.phase_left -= 1
        return (self.phase,)

    def stats(self) -> dict:
        n = len(self.chosen)
        turns = self.costs["turns"]
        out = {
            "k_policy": "fixed" if self.fixed is not None else "adaptive" if self.timed else "adaptive (cost priors)",
            "draft_k_mean": sum(self.chosen) / n if n else 0.0,
            "plain_steps": sum(1 for k in self.chosen if k == 0),
            "verify_s": {str(r): round(t, 6) for r, t in sorted(turns.step_s.items())},
            "draft_s_per_token": turns.draft_s,
            "acceptance_by_kind": {str(k): round(self.acceptance(k), 3) for k in self.counts},
            "k_reason": self.reason,
            "steps_by_schedule": dict(self.steps_by_schedule),
        }
        if len(self.schedules) > 1 and self.timed:
            out["measured_tok_s"] = {x: round(self.measured_rate(x), 2) for x in self.schedules}
        if "concurrent" in self.schedules:
            c = self.costs["concurrent"]
            out["verify_s_concurrent"] = {str(r): round(t, 6) for r, t in sorted(c.step_s.items())}
            out["draft_s_per_token_concurrent"] = c.draft_s
        return out
