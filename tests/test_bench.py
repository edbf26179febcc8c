"""ember.bench's pure parts: test names, option checks, the shipped prompt text, the report; and
that bad options end in one line and status 2 before anything is measured."""

from __future__ import annotations

import os

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


def test_long_context_tests_and_scenarios():
    assert scenarios.parse_test("tg32@4096") == ("tg", 32)
    assert scenarios.test_context("tg32@4096") == 4096
    assert scenarios.test_context("tg32") == scenarios.PROMPT_TG
    assert scenarios.test_context("k8") == scenarios.K_CONTEXT
    for bad in ("pp128@512", "tg32@0", "tg32@", f"tg1@{scenarios.MAX_TOKENS + 1}"):
        with pytest.raises(BenchError, match="unknown test"):
            scenarios.parse_test(bad)
    assert scenarios.parse_scenarios("all") == list(scenarios.SCENARIOS)
    assert scenarios.parse_scenarios("offload, dense") == ["dense", "offload"]  # the suite's order
    for bad in ("", "dense,nope", "ALL"):
        with pytest.raises(BenchError, match="unknown scenario"):
            scenarios.parse_scenarios(bad)
    assert "def summary(rows, top=3):" in scenarios.rewrite_prompt()


def _results(peer: bool = True) -> dict:
    """A results.json as `ember bench` writes it, with made-up figures: ember twice llama.cpp's
    speed, two reps whose median is the mean, every scenario that can run here."""
    engines = ["ember", "llama.cpp"] if peer else ["ember"]
    tests, threads = ["pp128", "tg32", "k8"], [1, 2]
    dense = []
    for e in engines:
        speed = 100.0 if e == "ember" else 50.0
        for test in tests:
            for t in threads:
                for rep, f in enumerate((1, 3)):
                    r = {"tokens_per_s": speed * t * f, "peak_rss_bytes": 300_000_000, "busy": test == "k8"}
                    if test.startswith("k"):
                        r["k_cost_ratio"] = 1.5
                    if test.startswith("tg") and e == "ember":
                        r["weight_bytes_per_token"] = 100_000_000
                    dense.append(dict(r, engine=e, test=test, threads=t, rep=rep))
    lc = [
        {"engine": e, "context": c, "rep": 0, "tokens_per_s": (200.0 if e == "ember" else 100.0) * 512 / c}
        for c in (512, 2048)
        for e in engines
    ]
    off_common = {"stream_bytes": 4e9, "stream_read_s": 2.0, "stream_stall_s": 0.5, "plan": "8 resident, 20 streamed"}
    offload = [
        {"engine": "ember", "variant": "resident", "fraction": None, "budget": None, "tokens_per_s": 20.0,
         "memory_peak_bytes": 1.5e9, "streamed_bytes_per_token": 0, "same_tokens": True},
        {"engine": "ember", "variant": "budget", "fraction": 0.6, "budget": 600e6, "tokens_per_s": 2.0,
         "memory_peak_bytes": 620e6, "streamed_bytes_per_token": 500e6, "same_tokens": True, **off_common},
        {"engine": "ember", "variant": "budget", "fraction": 0.3, "budget": 300e6, "tokens_per_s": 1.0,
         "memory_peak_bytes": 290e6, "streamed_bytes_per_token": 800e6, "same_tokens": True,
         "prefill_tokens_per_s": 55.0, "disk_bytes_per_s": 1e9, **off_common},
        {"engine": "ember", "variant": "budget", "fraction": 0.15, "budget": 150e6, "error": "ember budget 15% "
         "failed: BudgetError: a memory budget of 150 MB is too small: this model needs at least 490 MB"},
        {"engine": "llama.cpp", "variant": "mmap", "fraction": 0.6, "budget": 600e6, "tokens_per_s": 0.5,
         "cgroup_peak_bytes": 599e6, "peak_rss_bytes": 7e8},
    ]  # fmt: skip
    spec = [
        {"engine": "ember", "drafter": "plain", "rep": 0, "tokens_per_s": 20.0, "same_tokens": True},
        {"engine": "ember", "drafter": "lookup", "rep": 0, "tokens_per_s": 30.0, "same_tokens": True,
         "acceptance_rate": 0.5, "mean_accepted_length": 4.0, "draft_k_mean": 6.0},
        {"engine": "ember", "drafter": "d", "rep": 0, "tokens_per_s": 25.0, "same_tokens": True,
         "acceptance_rate": 0.8, "mean_accepted_length": 2.0, "draft_k_mean": 2.5,
         "verify_s": {"1": 0.04, "8": 0.08}, "draft_s_per_token": 0.01,
         "steps_by_schedule": {"turns": 30, "concurrent": 10}},
        {"engine": "ember", "drafter": "plain", "request": "rename", "rep": 0, "tokens_per_s": 21.0,
         "same_tokens": True},
        {"engine": "ember", "drafter": "lookup", "request": "rename", "rep": 0, "tokens_per_s": 63.0,
         "same_tokens": True, "acceptance_rate": 0.9, "mean_accepted_length": 9.0, "draft_k_mean": 10.0},
        {"engine": "llama.cpp", "drafter": "plain", "rep": 0, "tokens_per_s": 15.0},
        {"engine": "llama.cpp", "drafter": "lookup", "rep": 0, "tokens_per_s": 10.0},
    ]  # fmt: skip
    return {
        "schema": "ember-bench/2",
        "created": "2026-12-06T08:00:00+00:00",
        "command": "ember bench --peer",
        "options": {"scenarios": ["dense"], "threads": threads, "tests": tests, "reps": 2, "quick": False,
                    "engines": engines, "draft": None},
        "model": {"name": "m", "path": "/m.gguf", "architecture": "llama", "bytes": 1e9, "sha256": "ab" * 32,
                  "context_length": 8192},
        "environment": {
            "machine": {"cpu": {"model": "Test CPU", "flags": ["avx2"], "l1d_bytes": 32768, "l2_bytes": None},
                        "cores": 2, "memory_bytes": 2**34, "os": "Linux"},
            "versions": {"python": "3.11", "ember": "0.1.0", "ember_commit": None, "numba": "0.60"},
            "load_cores_at_start": 0.0,
        },
        "warnings": ["noisy"],
        "scenarios": {
            "dense": {"status": "ok", "tests": tests, "threads": threads, "runs": dense,
                      "bandwidth_bytes_per_s": {"1": 20e9, "2": 20e9}},
            "ttft": {"status": "ok", "warm_s": [0.6, 0.5, 0.7], "cold_s": None, "bytecode": True},
            "memory": {"status": "ok", "test": "tg64@512", "threads": 2, "model_bytes": 1e9,
                       "runs": [{"engine": e, "peak_rss_bytes": 4e8} for e in engines]},
            "long-context": {"status": "ok", "contexts": [512, 2048], "decode": 32, "threads": 2, "runs": lc},
            "offload": {"status": "ok", "threads": 2, "decode": 24, "weight_bytes": 1e9, "cgroup": "available",
                        "disk_bytes_per_s": 2e9, "runs": offload},
            "speculative": {"status": "ok", "threads": 2, "decode": 128, "drafts": ["plain", "lookup"], "runs": spec},
            "moe": {"status": "ok", "tests": ["tg32"], "threads": [2], "bandwidth_bytes_per_s": {"2": 20e9},
                    "model": {"file": "s.gguf", "bytes": 5e9, "shape": {"n_layer": 12, "n_expert": 128,
                              "n_expert_used": 8, "n_embd": 2048, "n_ff_exp": 768}},
                    "runs": [{"engine": e, "test": "tg32", "threads": 2, "rep": 0, "peak_rss_bytes": 6e9,
                              "tokens_per_s": v, "weight_bytes_per_token": 700e6}
                             for e, v in zip(engines, (40.0, 32.0))]},
            "devices": {"status": "skipped", "reason": "not in ember yet"},
        },
    }  # fmt: skip


def test_summaries():
    res = _results()
    report.summarize(res)
    sc = res["scenarios"]
    d = sc["dense"]["summary"]
    assert d["pp128|2"]["ember"]["median"] == 400.0  # of 200 and 600
    assert (d["pp128|2"]["ember"]["min"], d["pp128|2"]["ember"]["max"]) == (200.0, 600.0)
    assert d["pp128|2"]["ratio"] == 2.0 and not d["pp128|2"]["busy"] and d["k8|1"]["busy"]
    assert d["k8|1"]["llama.cpp"]["k_cost_ratio"] == 1.5
    assert d["tg32|1"]["ember"]["roofline_share"] == pytest.approx(100e6 * 200 / 20e9)
    assert sc["ttft"]["summary"] == {"warm_s": 0.6, "cold_s": None}
    lc = sc["long-context"]["summary"]
    assert lc["2048|2"]["ratio"] == 2.0 and lc["kept|ember|2"] == 0.25
    rows = sc["offload"]["summary"]["rows"]
    assert rows[1]["disk_roofline_tokens_per_s"] == 4.0 and rows[1]["roofline_share"] == 0.5
    assert rows[1]["peak_over_budget"] == pytest.approx(620 / 600) and rows[1]["read_bytes_per_s"] == 2e9
    assert rows[2]["disk_roofline_tokens_per_s"] == 1.25  # the disk's rate measured around the run
    assert rows[4]["memory_peak_bytes"] == 599e6  # a cgroup's peak, page cache included, not RSS
    sp = sc["speculative"]["summary"]
    hints = sp["ember|type hints|lookup"]
    assert hints["speedup"] == 1.5 and sp["llama.cpp|type hints|lookup"]["speedup"] == pytest.approx(2 / 3)
    assert hints["same_tokens"] and "same_tokens" not in sp["llama.cpp|type hints|plain"]
    assert sp["ember|rename|lookup"]["speedup"] == 3.0  # against the rename request's plain run
    d = sp["ember|type hints|d"]
    assert (d["draft_cost"], d["verify8_cost"], d["concurrent_share"]) == (0.25, 2.0, 0.25)


def test_markdown_report():
    res = _results()
    report.summarize(res)
    res["plots"] = [{"scenario": "dense", "file": "dense.png"}]
    md = report.markdown(res)
    assert md.startswith("# ember benchmark: m")
    assert "| tg32 | 2 | 400.0 (200.0-600.0) | 200.0 (100.0-300.0) | 2.00x |" in md
    assert "| k8 (busy) | 1 |" in md
    assert "8 new tokens cost (vs 1) at 2 thread(s): ember 1.50x, llama.cpp 1.50x" in md
    assert "| warm | 0.60 s |" in md and "cold" not in md
    assert "![dense](dense.png)" in md and "- devices: skipped: not in ember yet" in md and "- noisy" in md
    assert "## Mixture-of-experts prompt and decode" in md and "| tg32 | 2 | 40.0 | 32.0 | 1.25x |" in md
    assert "12 layers of 128 experts, 8 used a token" in md and "700.0 MB of weights a token, 140%" in md
    assert "| ember budget | 60% 600 MB | 2.00 | 4.00 (50% at 2.00 GB/s) | - | 620 MB (1.03x) | yes |" in md
    assert "| ember budget | 30% 300 MB | 1.00 | 1.25 (80% at 1.00 GB/s) | 55.0 | 290 MB (0.97x) | yes |" in md
    assert "BudgetError: a memory budget of 150 MB is too small" in md
    assert "| ember | type hints | lookup | 30.0 | 1.50x | 6.0 | 50% | 4.00 | - | yes |" in md
    assert "| ember | type hints | d | 25.0 | 1.25x | 2.5 | 80% | 2.00 | 25% | yes |" in md
    assert "a drafted token costs 0.25 of a one-row target step, a verify step of 8 rows 2.00x" in md
    assert "CPU: Test CPU, 2 cores (avx2; L1D 32 KiB)" in md
    one = _results(peer=False)
    report.summarize(one)
    assert "ember/llama.cpp" not in report.markdown(one)


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    res = _results()
    report.summarize(res)
    made = report.plots(res, tmp_path, warn=pytest.fail)
    assert {p["scenario"] for p in made} == {"dense", "long-context", "offload", "speculative"}
    for p in made:
        assert (tmp_path / p["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_environment_facts(tmp_path):
    from ember.bench import cgroup, environment

    cpu = environment.cpu()
    assert cpu["model"] and set(cpu["flags"]) <= set(environment.CPU_FLAGS)
    v = environment.versions()
    assert v["numba"] and v["llvmlite"] and v["ember"]
    f = tmp_path / "x.bin"
    f.write_bytes(b"\x01" * (3 << 20))
    assert environment.sha256(str(f)) == __import__("hashlib").sha256(f.read_bytes()).hexdigest()
    assert environment.disk_bandwidth(str(f)) > 0
    meter = environment.LoadMeter()
    assert 0.0 <= meter.others() < 64
    why = cgroup.unavailable()
    assert why is None or isinstance(why, str)


def _filesystem(path) -> str:
    import psutil

    parts = [p for p in psutil.disk_partitions(all=True) if str(path).startswith(p.mountpoint)]
    return max(parts, key=lambda p: len(p.mountpoint)).fstype if parts else ""


def test_page_cache_bytes(tmp_path):
    from ember.home import uncache
    from ember.offload.memory import cached_bytes

    f = tmp_path / "x.bin"
    with open(f, "wb") as fh:
        fh.write(b"\x02" * (1 << 20))
        fh.flush()
        os.fsync(fh.fileno())  # dirty pages stay cached until written back
    assert cached_bytes(f) == 1 << 20  # just written: in the cache
    if uncache(f) and _filesystem(tmp_path) != "tmpfs":  # tmpfs pages are the file: they stay
        assert cached_bytes(f) < 1 << 20
    assert cached_bytes(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tests", "pp128,xx"], "unknown test 'xx'"),
        (["--threads", "0"], "--threads '0'"),
        (["--reps", "0"], "--reps 0"),
        (["--quick", "--model", "no-such-model"], "unknown model"),
        (["--scenario", "dense,gpu"], "unknown scenario 'gpu'"),
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


def test_synthetic_moe_routes_to_a_few_popular_experts(tmp_path):
    """synth_moe's routers: over isotropic hidden states a few experts are chosen far more often
    than the rest (a trained MoE's skew), and ember decodes the file through its fused step."""
    import numpy as np
    import tiny_gguf as tg

    import ember
    from ember.bench import synth_moe
    from ember.formats.gguf import GGUFFile

    shape = dict(n_layer=1, n_expert=32, n_expert_used=4, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=2, head_dim=64)
    path = synth_moe.write(tmp_path / "moe.gguf", tg.write_family(tmp_path / "donor.gguf", "llama"), **shape)
    router = GGUFFile(path).tensor_bytes("blk.0.ffn_gate_inp.weight").view(np.float32).reshape(32, 256)
    h = np.random.default_rng(0).standard_normal((4000, 256))
    top = np.argsort(-(h @ router.T), axis=1)[:, :4]
    share = np.bincount(top.ravel(), minlength=32) / top.size
    assert share.max() > 2.5 / 32 and np.sort(share)[-3:].sum() > 0.18  # even: ~1.2 / 32 and ~0.11
    m = ember.load(path)
    assert m.config.n_expert == 32 and m.device.decoder(m.transformer) is not None
    assert len(list(m.generate(m.tokenize("hello"), max_tokens=4, ignore_eos=True))) > 0


def test_synthetic_moe_hidden_states_drift_slowly_across_layers_not_tokens(tmp_path):
    """synth_moe's scales: each layer changes the residual stream a little (a trained model's
    slow drift, what makes routing guesses from the layer before work) while each token keeps
    its own (at 1 and 1 every token's stream was nearly the same)."""
    import numpy as np
    import tiny_gguf as tg

    import ember
    from ember.bench import synth_moe

    shape = dict(n_layer=5, n_expert=16, n_expert_used=4, n_embd=256, n_ff_exp=256, n_head=4, n_head_kv=2, head_dim=64)
    path = synth_moe.write(tmp_path / "moe.gguf", tg.write_family(tmp_path / "donor.gguf", "llama"), **shape)
    m = ember.load(path, threads=1, n_ctx=128)
    tr, dev = m.transformer, m.device
    ids = np.random.default_rng(0).integers(10, m.config.n_vocab, 24).tolist()
    cache = dev.new_cache(tr, 128)
    dev.forward(tr, ids[:8], cache)
    states = []  # [token][layer]: the hidden state entering each layer past the first
    for t in ids[8:]:
        x = tr.embed([t])
        row = []
        for il in range(shape["n_layer"]):
            x = dev.forward(tr, x if il else [t], cache, layers=range(il, il + 1))
            row.append(x[0])
        states.append(row[:-1])
        cache.truncate(8)  # each token alone after the same context

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    n = len(states)
    layers = np.mean([cos(s[i], s[i + 1]) for s in states for i in range(len(s) - 1)])
    tokens = np.mean([cos(states[j][i], states[j + 1][i]) for j in range(n - 1) for i in range(len(states[0]))])
    assert layers > 0.9 and tokens < 0.6, (layers, tokens)


def test_llama_runs_turn_repacking_off_where_a_repacking_load_dies(monkeypatch):
    """A Xeon VM lists AMX but llama.cpp's AMX repack dies there (SIGSEGV): the peer's runs then
    load with repacking off, once checked, and the report warns; elsewhere they repack."""
    import json

    from ember.bench.run import Bench, build_parser

    args = build_parser().parse_args(["--peer", "--threads", "2"])
    for dies in (True, False):
        b = Bench(args, "/m.gguf", "m", 2048)
        calls = []

        def command(cmd, what, memory_limit=None, timeout=None, **kw):
            kind, a = cmd[-2], json.loads(cmd[-1])
            calls.append((kind, a.get("repack")))
            if kind == "llama_probe" and dies:
                raise BenchError(f"{what} failed: killed by SIGSEGV")
            return {"wall_s": 1.0, "load_cores": 0.0, "busy": False, "stdout": '{"tokens_per_s": 1.0}'}

        monkeypatch.setattr(b, "command", command)
        b.worker("llama", "llama.cpp tg8", model="/m.gguf", test="tg8", threads=2)
        b.worker("llama_speculative", "llama.cpp lookup", model="/m.gguf", lookup=True, threads=2)
        b.worker("llama", "llama.cpp mmap", model="/m.gguf", test="tg8", threads=2, repack=False)
        assert calls == [("llama_probe", True), ("llama", not dies), ("llama_speculative", not dies), ("llama", False)]
        assert any("repacking off" in w and "SIGSEGV" in w for w in b.warnings) == dies


def test_kv_cache_option_reaches_both_engines_dense_runs(monkeypatch):
    """`--kv-cache q8_0`: ember's and llama.cpp's test runs get it (llama.cpp: its q8_0 types
    with flash attention); the other workers do not; the default passes nothing."""
    import json

    from ember.bench.run import Bench, build_parser
    from ember.bench.workers import worker_llama

    for argv, want in ((["--kv-cache", "q8_0"], "q8_0"), ([], None)):
        b = Bench(build_parser().parse_args(["--threads", "2", *argv]), "/m.gguf", "m", 2048)
        b._repack = True
        seen = {}

        def command(cmd, what, memory_limit=None, timeout=None, **kw):
            seen[cmd[-2]] = json.loads(cmd[-1]).get("kv_cache")
            return {"wall_s": 1.0, "load_cores": 0.0, "busy": False, "stdout": '{"tokens_per_s": 1.0}'}

        monkeypatch.setattr(b, "command", command)
        for kind in ("ember", "llama", "offload"):
            b.worker(kind, kind, model="/m.gguf", test="tg8", threads=2)
        assert seen == {"ember": want, "llama": want, "offload": None}

    made = {}
    monkeypatch.setattr("ember.bench.workers._llama", lambda *a, **kw: made.update(kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker_llama("/m.gguf", "tg8", 1, kv_cache="q8_0")
    assert made == {"type_k": 8, "type_v": 8, "flash_attn": True}
