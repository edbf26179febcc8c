"""ember.bench's pure parts: test names, option checks, the shipped prompt text, the report; and
that bad options end in one line and status 2 before anything is measured."""

from __future__ import annotations

import pytest

from ember.bench import report, scenarios
from ember.bench.run import main
from ember.bench.scenarios import BenchError
from ember.errors import EmberError


def test_parse_test():
    assert scenarios.parse_test("pp128") == ("pp", 128)
    assert scenarios.parse_test("tg32") == ("tg", 32)
    assert scenarios.parse_test("k8") == ("k", 8)
    for bad in ("xx", "pp", "tg0", "k-1", "pp128x", "PP128", f"pp{scenarios.MAX_TOKENS + 1}"):
        with pytest.raises(BenchError, match="unknown test"):
            scenarios.parse_test(bad)
    assert issubclass(BenchError, EmberError)


def test_parse_tests_and_threads():
    assert scenarios.parse_tests("pp128, tg32,pp128,") == ["pp128", "tg32"]
    assert scenarios.parse_tests(",".join(scenarios.TESTS)) == list(scenarios.TESTS)
    assert scenarios.parse_threads("1,2,2") == [1, 2]
    for bad in ("", ",", "0", "1,a", "-1"):
        with pytest.raises(BenchError):
            scenarios.parse_threads(bad)
    with pytest.raises(BenchError, match="empty"):
        scenarios.parse_tests(" , ")


def test_prompt_ids_repeat_the_english_text():
    text = scenarios.english_text()
    assert text.startswith("How People Learned to Keep Time") and len(text) > 5000
    words = lambda t: [len(w) for w in t.split()]  # noqa: E731  a stand-in tokenizer
    ids = scenarios.prompt_ids(5000, words)
    assert len(ids) == 5000 and ids[:10] == words(text)[:10]
    assert scenarios.prompt_ids(3, words) == words(text)[:3]


def _results(engines, tests, threads):
    runs = {}
    for e in engines:
        speed = 100.0 if e == "ember" else 50.0
        for test in tests:
            for t in threads:
                r = {"tokens_per_s": speed * t, "peak_rss_bytes": 300_000_000}
                if test.startswith("k"):
                    r["k_cost_ratio"] = 1.5
                if test.startswith("tg") and e == "ember":
                    r["weight_bytes_per_token"] = 100_000_000
                runs[f"{e}|{test}|{t}"] = [r, dict(r, tokens_per_s=r["tokens_per_s"] * 3)]
    return {
        "model": "m",
        "quick": False,
        "load_cores_at_start": 0.0,
        "warnings": ["noisy"],
        "runs": runs,
        "bandwidth_bytes_per_s": {t: 20e9 for t in threads},
        "ttft_warm_s": 0.5,
        "ttft_cold_s": None,
        "ttft_bytecode": True,
    }


def test_summary_and_markdown():
    engines, tests, threads = ["ember", "llama.cpp"], ["pp128", "tg32", "k8"], [1, 2]
    res = _results(engines, tests, threads)
    res["summary"] = s = report.summarize(res, engines, tests, threads)
    assert s["pp128|2"]["ember"]["tokens_per_s"] == 400.0  # median of 200 and 600
    assert s["pp128|2"]["ratio"] == 2.0
    assert s["k8|1"]["llama.cpp"]["k_cost_ratio"] == 1.5
    assert s["tg32|1"]["ember"]["roofline_share"] == pytest.approx(100e6 * 200 / 20e9)
    md = report.markdown(res, engines, tests, threads)
    assert "| tg32 | 2 | 400.0 | 200.0 | 2.00x |" in md
    assert "- 8 new tokens cost (vs 1 new token) at 2 thread(s): ember 1.50x, llama.cpp 1.50x" in md
    assert "warm 0.50 s" in md and "cold" not in md and "- warning: noisy" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tests", "pp128,xx"], "unknown test 'xx'"),
        (["--threads", "0"], "--threads '0'"),
        (["--reps", "0"], "--reps 0"),
        (["--quick", "--model", "no-such-model"], "unknown model"),
    ],
)
def test_bad_options_one_line_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ember bench: error: ") and message in err and err.count("\n") == 1


def test_usage_errors_are_argparse_exits(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2 and "usage: ember bench" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
