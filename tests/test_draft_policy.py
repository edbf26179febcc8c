"""The speculative draft length chosen per step (`DraftPolicy`): the cost model it fits from
measured step times, draft costs and acceptance, and the choices it makes from them."""

from __future__ import annotations

import numpy as np
import pytest

from ember.runtime.draft_policy import (
    EMA,
    EXPLORE_EVERY,
    EXPLORE_K,
    OUTLIER,
    PRIOR_ROW_COST,
    PROBE_STEPS,
    RECHECK_EVERY,
    DraftPolicy,
)


def _policy(row_cost: float, acceptance: float, draft_s: float = 0.0, overhead: int = 0) -> DraftPolicy:
    """A policy that has measured steps of 1..16 rows costing 1 + row_cost per extra row (ms),
    and seen `acceptance` over many drafted tokens."""
    p = DraftPolicy(15, draft_overhead=overhead)
    for n in range(1, 17):
        p.observe_step(n, 1e-3 * (1 + row_cost * (n - 1)))
    if draft_s:
        p.observe_draft(4, draft_s * (4 + overhead))
    rng = np.random.default_rng(0)
    for _ in range(200):
        drafted = 8
        ok = rng.random(drafted) < acceptance
        p.observe_accept("k", drafted, int(np.argmin(ok)) if not ok.all() else drafted)
    return p


def test_verify_cost_follows_the_measured_sizes_made_non_decreasing():
    p = DraftPolicy(15)
    assert p.verify_cost(4) is None  # nothing measured
    p.observe_step(1, 1.0)
    assert p.verify_cost(9) == pytest.approx(1 + 8 * PRIOR_ROW_COST)  # the prior slope
    p.observe_step(5, 2.0)
    assert p.verify_cost(3) == pytest.approx(1.5)  # between 1 and 5
    assert p.verify_cost(9) == pytest.approx(3.0)  # beyond: the last two's slope
    p.observe_step(5, 4.0)  # a moving average, not the last figure
    assert 2.0 < p.verify_cost(5) < 4.0
    for n, t in ((2, 1.1), (3, 1.2), (4, 9.0), (8, 1.7), (16, 6.0)):  # one slow step at 4 rows
        p.observe_step(n, t)
    assert p.verify_cost(1) == 1.0  # a convex curve's end does not move its start
    assert p.verify_cost(4) < 6.0 and p.verify_cost(3) <= p.verify_cost(4) <= p.verify_cost(8)


def test_acceptance_counts_successes_then_the_rejection():
    p = DraftPolicy(15)
    assert p.acceptance("x") == 0.8  # the prior
    for _ in range(50):
        p.observe_accept("x", 4, 4)  # all kept: four successes, no rejection
        p.observe_accept("y", 4, 1)  # one kept, then a rejection; the two after it unjudged
    assert p.acceptance("x") > 0.95
    assert p.acceptance("y") == pytest.approx(0.5, abs=0.05)


def test_cheap_rows_and_good_drafts_take_long_drafts_and_the_reverse_plain_steps():
    assert _policy(row_cost=0.05, acceptance=0.9).choose("k", 15) >= 8
    assert _policy(row_cost=0.35, acceptance=0.1).choose("k", 15) == 0
    mid = _policy(row_cost=0.05, acceptance=0.6).choose("k", 15)
    assert 1 <= mid < 8
    # a draft model's own cost shortens the draft
    free = _policy(row_cost=0.05, acceptance=0.8).choose("k", 15)
    costly = _policy(row_cost=0.05, acceptance=0.8, draft_s=0.4e-3, overhead=1).choose("k", 15)
    assert costly < free
    assert _policy(row_cost=0.05, acceptance=0.9).choose("k", 3) == 3  # at most the limit


def test_first_step_is_plain_then_a_rejected_kind_is_retried_now_and_then():
    p = DraftPolicy(15)
    assert p.choose("k", 10) == 0 and "plain step first" in p.reason
    p = _policy(row_cost=0.35, acceptance=0.05)
    ks = [p.choose("k", 10) for _ in range(7 * EXPLORE_EVERY + 3)]  # re-tries after 16, 32 and 64 steps
    assert [i for i, k in enumerate(ks) if k] == [EXPLORE_EVERY, 3 * EXPLORE_EVERY + 1, 7 * EXPLORE_EVERY + 2]
    assert set(ks) == {0, EXPLORE_K}
    st = p.stats()
    assert st["k_policy"] == "adaptive" and st["plain_steps"] == len(ks) - 3 and st["verify_s"]["1"] == 1e-3


def test_fixed_k():
    p = DraftPolicy(15, fixed=4)
    assert p.choose("k", 10) == 4 and p.choose("k", 2) == 2 and p.stats()["k_policy"] == "fixed"


def test_untimed_policy_ignores_timings():
    """Under sampling the choices must not depend on timings (a seed repeats a run)."""
    a, b = DraftPolicy(15, timed=False), DraftPolicy(15, timed=False)
    a.observe_step(1, 0.001)
    a.observe_step(8, 5.0)  # a slow step: ignored
    a.observe_draft(4, 9.0)
    for p in (a, b):
        for _ in range(20):
            p.observe_accept("k", 6, 5)
    assert [a.choose("k", 15) for _ in range(5)] == [b.choose("k", 15) for _ in range(5)]
    assert a.chosen[0] > 0 and a.stats()["k_policy"] == "adaptive (cost priors)"


def test_one_stalled_step_moves_the_cost_little():
    """A stall (the KV cache growing, another process) must not make plain steps look dear for
    the rest of a generation: a timing counts at most OUTLIER x the average so far."""
    p = DraftPolicy(15)
    p.observe_step(1, 0.030)
    p.observe_step(1, 0.150)
    assert p.verify_cost(1) <= 0.030 * (1 + EMA * (OUTLIER - 1)) + 1e-12
    for _ in range(12):  # a lasting change is followed
        p.observe_step(1, 0.060)
    assert p.verify_cost(1) == pytest.approx(0.060, rel=0.02)


def test_auto_schedule_runs_the_faster_of_turns_and_concurrent_as_measured():
    """Each schedule is tried for PROBE_STEPS steps, then the one that gave more tokens a second
    runs RECHECK_EVERY steps and the other is tried again; a change is followed."""
    p = DraftPolicy(15, draft_overhead=1, schedules=("turns", "concurrent"))
    for n in range(1, 17):
        p.observe_step(n, 0.030 * (1 + 0.2 * (n - 1)), "turns")
        p.observe_step(n, 0.050 * (1 + 0.2 * (n - 1)), "concurrent")
    p.observe_draft(1, 0.012, 0.012, "turns")
    p.observe_draft(1, 0.020, 0.020, "concurrent")
    for _ in range(50):
        p.observe_accept("d", 4, 4)
    rate = {"turns": 30.0, "concurrent": 40.0}  # what each gives, measured over whole steps

    def steps(n: int) -> list[str]:
        out = []
        for _ in range(n):
            assert p.choose("d", 15) > 0
            out.append(p.schedule)
            p.observe_outcome(3, 3 / rate[p.schedule])
        return out

    first = steps(2 * PROBE_STEPS + RECHECK_EVERY)
    assert first == ["turns"] * PROBE_STEPS + ["concurrent"] * (PROBE_STEPS + RECHECK_EVERY)
    assert "measured tok/s: turns 30.0, concurrent 40.0" in p.reason
    rate["turns"] = 50.0  # the other one got faster: noticed at its next try
    assert steps(PROBE_STEPS + 2) == ["turns"] * (PROBE_STEPS + 2)
    assert p.stats()["measured_tok_s"]["turns"] > 40


def test_auto_schedule_spares_the_probes_of_a_schedule_the_costs_say_loses():
    """A schedule the cost model expects to lose by more than PROBE_MARGIN is not run at all
    (its probes cost ~10% of a 128-token run on 2 cores), and the reason says so; once its
    costs make it competitive it is probed."""
    p = DraftPolicy(15, draft_overhead=1, schedules=("turns", "concurrent"))
    for n in range(1, 17):
        p.observe_step(n, 0.030 * (1 + 0.1 * (n - 1)), "turns")
        p.observe_step(n, 0.055 * (1 + 0.1 * (n - 1)), "concurrent")  # the target on 1 of 2 threads
    p.observe_draft(1, 0.010, 0.010, "turns")
    p.observe_draft(1, 0.018, 0.018, "concurrent")
    for _ in range(50):
        p.observe_accept("d", 4, 3)
    seen = []
    for _ in range(2 * PROBE_STEPS + RECHECK_EVERY):
        assert p.choose("d", 15) > 0
        seen.append(p.schedule)
        p.observe_outcome(3, 0.1)
    assert seen == ["turns"] * len(seen)
    assert "concurrent not tried" in p.reason and p.stats()["steps_by_schedule"]["concurrent"] == 0
    for n in range(1, 17):  # e.g. the draft moved to a device of its own
        for _ in range(20):
            p.observe_step(n, 0.030 * (1 + 0.1 * (n - 1)), "concurrent")
    for _ in range(20):
        p.observe_draft(2, 0.020, 0.010, "concurrent")
    seen = []
    for _ in range(RECHECK_EVERY + 1):
        p.choose("d", 15)
        seen.append(p.schedule)
        p.observe_outcome(3, 0.1)
    assert "concurrent" in seen
