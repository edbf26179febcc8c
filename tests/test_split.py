"""lut_kernels.split: the worker team behind the fused step and the batch path, and split()."""

import threading

import numpy as np
import pytest

from ember.lut_kernels.split import Team, split


def test_team_runs_one_call_per_thread_and_returns_results_in_order():
    team = Team(3, "test-team")
    try:
        names = team.run(lambda tid, base: (base + tid, threading.current_thread().name), (10,))
        assert [r[0] for r in names] == [10, 11, 12, 13]
        assert len({r[1] for r in names}) == 4
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("test-team"))
        assert team.run(lambda tid: tid * 2) == [0, 2, 4, 6]  # reusable
    finally:
        team.close()


def test_team_reports_a_worker_error_and_stays_usable():
    team = Team(2)
    calls = []
    try:
        out = team.run(lambda tid: 1 / (tid - 2), on_error=lambda: calls.append(1))
        assert isinstance(out[2], ZeroDivisionError) and out[:2] == [-0.5, -1.0] and calls == [1]
        assert team.run(lambda tid: tid) == [0, 1, 2]
    finally:
        team.close()


def test_team_waits_for_its_workers_when_the_caller_is_interrupted():
    """Ctrl-C while the caller waits: run() still waits for every worker, then raises, so the
    next job does not meet a late worker's leftovers."""
    team = Team(1)
    release = threading.Event()
    done = []

    def job(tid):
        if tid == 0:
            raise KeyboardInterrupt
        release.wait(5)
        done.append(tid)

    threading.Timer(0.2, release.set).start()
    with pytest.raises(KeyboardInterrupt):
        team.run(job)
    assert done == [1]
    assert team.run(lambda tid: tid) == [0, 1]
    team.close()


@pytest.mark.parametrize("n, threads", [(1, 2), (7, 2), (100, 3), (5, 8)])
def test_split_covers_the_range_once(n, threads):
    hits = np.zeros(n, np.int64)

    def fn(a, b):
        hits[a:b] += 1

    split(n, threads, fn)
    assert hits.tolist() == [1] * n


def test_split_reraises_and_nested_calls_run_inline():
    def bad(a, b):
        if a > 0:
            raise ValueError("share failed")

    with pytest.raises(ValueError, match="share failed"):
        split(10, 2, bad)
    seen = []
    split(4, 2, lambda a, b: split(2, 2, lambda c, d: seen.append((a, c, d))))
    assert sorted(seen) == [(0, 0, 2), (2, 0, 2)]
