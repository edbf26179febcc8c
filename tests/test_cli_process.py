"""The installed `ember` command as users run it: a real process, its exit status, what it prints,
and that it ends within a second of its last line (a finished command once hung on a thread)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import opencl_compiler_problem

EXIT_GRACE_S = 1.0  # a finished command ends this soon after its last output
BIN = Path(sys.executable).parent


def ember_exe() -> str:
    exe = shutil.which("ember", path=str(BIN)) or shutil.which("ember")
    assert exe, "the `ember` console script is not installed (pip install -e '.[test]')"
    return exe


class Result:
    def __init__(self, code: int, out: str, err: str, tail_s: float):
        self.code, self.out, self.err, self.tail_s = code, out, err, tail_s

    def __repr__(self) -> str:
        return f"<exit {self.code}, {self.tail_s:.2f} s after the last output\n{self.out}\n{self.err}>"


class Process:
    """A running `ember` whose output is read as it comes, with the time of the last byte."""

    def __init__(self, *args, stdin=subprocess.DEVNULL, env=None, **kw):
        self.p = subprocess.Popen(
            [ember_exe(), *map(str, args)], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw
        )
        self.last = time.monotonic()
        self.buf = {1: bytearray(), 2: bytearray()}
        self.pumps = [
            threading.Thread(target=self._pump, args=(f, n), daemon=True)
            for f, n in ((self.p.stdout, 1), (self.p.stderr, 2))
        ]
        for t in self.pumps:
            t.start()

    def _pump(self, stream, n: int) -> None:
        while data := os.read(stream.fileno(), 65536):
            self.buf[n] += data
            self.last = time.monotonic()

    def wait_for(self, text: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while text.encode() not in self.buf[1] + self.buf[2]:
            assert self.p.poll() is None, f"exited before printing {text!r}: {self.finish(1)}"
            assert time.monotonic() < end, f"{text!r} not printed in {timeout} s"
            time.sleep(0.02)

    def finish(self, timeout: float) -> Result:
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            pytest.fail(
                f"ember did not exit within {timeout} s; it printed:\n{self.buf[1].decode()}\n{self.buf[2].decode()}"
            )
        ended = time.monotonic()
        for t in self.pumps:
            t.join(5)
        return Result(
            self.p.returncode,
            self.buf[1].decode("utf-8", "replace"),
            self.buf[2].decode("utf-8", "replace"),
            ended - self.last,
        )


def ember(*args, input: str | None = None, timeout: float = 300, env=None) -> Result:
    proc = Process(*args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, env=env)
    if input is not None:
        proc.p.stdin.write(input.encode())
        proc.p.stdin.close()
    res = proc.finish(timeout)
    assert res.tail_s < EXIT_GRACE_S, f"exited {res.tail_s:.2f} s after its last output: {res!r}"
    assert "Traceback" not in res.err, res.err
    return res


@pytest.fixture(scope="module")
def smol(catalog_path) -> str:
    return str(catalog_path("smollm2-135m"))


@pytest.fixture(scope="module")
def long_text(ppl_text) -> str:
    return ppl_text[:3000]


# ---- the hang: commands that ran the batch path on 2 threads never exited ----------------------


def test_perplexity_exits(smol, long_text, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(long_text)
    res = ember("perplexity", smol, text, "-t", "2")
    assert res.code == 0 and res.out.startswith("perplexity ") and "tokens" in res.out
    res = ember("perplexity", smol, text, "-t", "2", "--json")
    assert res.code == 0 and json.loads(res.out)["tokens"] > 500


LONG_PROMPT_MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LONG_PROMPT_MODELS)
def test_run_long_prompt_exits(name, catalog_path, ppl_text):
    """A prompt of ~1,000 tokens (the batch path, both threads) on every catalog model."""
    res = ember(
        "run",
        catalog_path(name),
        "Summarize this text:\n" + ppl_text[:4500],
        "-n",
        "4",
        "-t",
        "2",
        "--temp",
        "0",
        "--json",
    )
    assert res.code == 0, res
    out = json.loads(res.out)
    assert out["stats"]["prompt_tokens"] >= 900 and len(out["ids"]) == 4


# ---- run -------------------------------------------------------------------------------------


def test_run_short_prompt(smol):
    res = ember("run", smol, "The capital of France is", "--raw", "-n", "4", "--temp", "0")
    assert res.code == 0 and "Paris" in res.out
    assert "cut at 4 tokens by -n" in res.err  # the cap is said, not silent


def test_run_one_positional_is_the_prompt_unless_it_names_a_model(smol):
    res = ember("run", "The capital of France is", "--raw", "-n", "4", "--temp", "0", "--json")
    assert res.code == 0 and json.loads(res.out)["text"].strip().startswith("Paris")
    res = ember("run", smol, "--raw", "-n", "4", "--temp", "0", "--json", input="The capital of France is")
    assert res.code == 0 and "Paris" in json.loads(res.out)["text"]


def test_run_prompt_from_stdin(smol):
    piped = ember("run", smol, "-n", "12", "--temp", "0", input="What is the capital of France?\n")
    given = ember("run", smol, "What is the capital of France?", "-n", "12", "--temp", "0")
    assert piped.code == 0 and piped.out == given.out and len(piped.out) > 10
    res = ember("run", smol, input="  \n")
    assert res.code == 2 and "no prompt" in res.err and res.err.count("\n") == 1


def test_run_json_one_object_ids_on_one_line(smol):
    res = ember("run", smol, "Count: one, two, three,", "--raw", "-n", "6", "--temp", "0", "--ignore-eos", "--json")
    obj = json.loads(res.out)
    assert res.code == 0 and len(obj["ids"]) == 6
    assert f'"ids": {json.dumps(obj["ids"])}' in res.out  # ids on one line, not one per line
    st = obj["stats"]
    assert st["finish_reason"] == "length" and st["stopped_by"] == "max_tokens"
    assert st["tokens_generated"] == 6 and isinstance(st["seed"], int)


def test_run_stop_string_escapes(smol):
    prompt = "Shopping list:\n1. apples\n2. pears\n3."
    res = ember("run", smol, prompt, "--raw", "-n", "30", "--temp", "0", "--ignore-eos", "--stop", r"\n", "--json")
    obj = json.loads(res.out)
    assert res.code == 0 and obj["text"] and "\n" not in obj["text"]
    assert obj["stats"]["stopped_by"] == "stop_string"
    res = ember("run", smol, "hi", "--stop", "trailing\\")
    assert res.code == 2 and "bad escape" in res.err


def test_run_samples_by_default_with_a_reported_seed(smol):
    args = ("run", smol, "Write one sentence about the sea.", "-n", "16", "--json")
    runs = [json.loads(ember(*args).out) for _ in range(2)]
    seeds = [r["stats"]["seed"] for r in runs]
    assert seeds[0] != seeds[1]  # a fresh seed per run
    again = json.loads(ember(*args, "--seed", str(seeds[0])).out)
    assert again["ids"] == runs[0]["ids"]  # ... that reproduces the run
    res = ember("run", smol, "Write one sentence about the sea.", "-n", "4", "-v", "--seed", "7")
    assert res.code == 0 and "seed 7" in res.err
    greedy = [json.loads(ember(*args, "--temp", "0", "--seed", str(s)).out)["ids"] for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_run_base_model_continues_plain_text(catalog_path):
    args = ("run", catalog_path("gemma3-270m"), "The capital of France is", "-n", "6", "--temp", "0")
    res, raw = ember(*args), ember(*args, "--raw")
    assert res.code == 0 and res.out == raw.out and len(res.out) > 10
    assert "no chat template" in res.err and "plain text" in res.err
    assert "no chat template" not in raw.err


def test_run_warnings_and_context_error(smol):
    res = ember("run", smol, "hi", "-n", "2", "-t", "64", "-c", "100000")
    assert res.code == 0
    assert "warning: -t 64 is more threads" in res.err and "warning: -c 100000 is past the 8192" in res.err
    res = ember("run", smol, "word " * 40, "--raw", "-c", "16")
    assert res.code == 2 and "-c" in res.err and "context window" in res.err


def test_run_with_a_float32_or_8bit_kv_cache(smol):
    args = ("run", smol, "The capital of France is", "--raw", "-n", "4", "--temp", "0", "--json")
    half, full = json.loads(ember(*args).out), json.loads(ember(*args, "--kv-cache", "f32").out)
    assert len(full["ids"]) == 4 and full["ids"] == half["ids"]
    assert json.loads(ember(*args, "--kv-cache", "q8_0").out)["ids"] == half["ids"]
    res = ember("run", smol, "hi", "--kv-cache", "q8")
    assert res.code == 2 and "--kv-cache" in res.err


def test_run_under_a_memory_budget_gives_the_same_reply(smol):
    """Half of SmolLM2's layers streamed from disk: the greedy reply is the resident one."""
    free = ember("run", smol, "Name three colors.", "--temp", "0", "-n", "24", "-c", "512")
    res = ember("run", smol, "Name three colors.", "--temp", "0", "-n", "24", "-c", "512", "--memory-budget", "100GB")
    assert res.out == free.out and "all 30 layers fit" in res.err
    needs = re.search(r"at least (\d+) MB", ember("run", smol, "hi", "--memory-budget", "1MB", "-c", "512").err)
    budget = f"{int(needs.group(1)) + 20}MB"  # the minimum (with 16 MB of reads in flight) + 20 MB: about
    #   half of the layers' ~70 MB stream
    res = ember("run", smol, "Name three colors.", "--temp", "0", "-n", "24", "-c", "512", "--memory-budget", budget)
    assert res.code == 0 and res.out == free.out, res
    assert re.search(r"\d+ of 30 layers in memory, \d+ streamed from disk", res.err), res.err


def test_run_an_moe_model_under_a_memory_budget(tmp_path):
    """A budget the experts fit in: the resident reply; below one token's experts: one line."""
    import tiny_gguf as tg

    path = str(tg.write_family(tmp_path / "moe.gguf", "qwen3moe", qtype="Q8_0", n_ctx=128, n_expert=8))
    args = ("run", path, "hello there", "--raw", "--temp", "0", "-n", "8", "-c", "128")
    free = ember(*args)
    res = ember(*args, "--memory-budget", "100GB")
    assert res.code == 0 and res.out == free.out and "all 16 experts fit" in res.err, res
    res = ember(*args, "--memory-budget", "1MB")
    assert res.code == 2 and "the 2 experts a token uses" in res.err and res.err.count("\n") == 1, res


def test_run_on_the_opencl_device(smol):
    """The whole model on PoCL's OpenCL device, and its attention alone there beside the CPU's
    kernels: the CPU's greedy reply (its first tokens, before any close call), the device named
    in the stats and by `info --devices`; a missing device is one clear line."""
    args = ("run", smol, "The capital of France is", "--raw", "-n", "6", "--temp", "0", "--json")
    cpu = json.loads(ember(*args).out)
    assert cpu["stats"]["device"].startswith("cpu (")
    if opencl_compiler_problem():  # PoCL's compiler does not know this CPU: one clear line
        res = ember(*args, "--device", "opencl")
        assert res.code == 2 and "does not know this CPU" in res.err and res.err.count("\n") == 1, res
    else:
        ocl = json.loads(ember(*args, "--device", "opencl").out)
        assert ocl["ids"] == cpu["ids"] and ocl["stats"]["device"].startswith("opencl: ")
        hyb = json.loads(ember(*args, "--device", "cpu+opencl").out)  # the attention alone there
        assert hyb["ids"] == cpu["ids"] and hyb["stats"]["device"].startswith("cpu+opencl: matmuls on cpu")
    res = ember("info", "--devices")
    assert res.code == 0 and re.search(r"^opencl:0 +\S", res.out, re.M) and "cuda" in res.out
    assert re.search(r"^auto +cpu: ", res.out, re.M), res.out  # what auto chooses here, and why
    res = ember("run", smol, "hi", "--device", "opencl:7")
    assert res.code == 2 and "the OpenCL devices here are opencl:0" in res.err and res.err.count("\n") == 1
    if not re.search(r"^cuda:0 ", ember("info", "--devices").out, re.M):  # no GPU: one clear line
        res = ember("run", smol, "hi", "--device", "cuda")
        assert res.code == 2 and "no usable CUDA GPU" in res.err and res.err.count("\n") == 1, res


def test_chat_needs_a_terminal(smol):
    """The chat app on a terminal is tested in test_tui_tmux.py; off one, a clear error."""
    res = ember("chat", smol)
    assert res.code == 2 and "needs a terminal" in res.err


# ---- Ctrl-C ----------------------------------------------------------------------------------


def test_ctrl_c_stops_a_reply(smol):
    proc = Process("run", smol, "Tell me a very long story.", "--ignore-eos", "-n", "2000")
    proc.wait_for(" ", timeout=120)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.p.send_signal(signal.SIGINT)
    res = proc.finish(10)
    assert res.code == 130 and "interrupted" in res.err and "Traceback" not in res.err
    assert time.monotonic() - sent < 1.0 + EXIT_GRACE_S


def test_ctrl_c_during_a_long_native_call(tmp_path):
    """The watchdog ends a process whose main thread is stuck in native code (a compile, a big
    matrix) within ~1 s of Ctrl-C, and deletes the file it was writing."""
    script = tmp_path / "spin.py"
    script.write_text(
        "import sys, time\n"
        "from numba import njit\n"
        "from ember.cli import interrupt_watchdog\n"
        "from ember.home import unfinished\n"
        "@njit(nogil=True)\n"
        "def spin(n):\n"
        "    x = 1.0\n"
        "    for i in range(n):\n"
        "        x = x * 1.0000001 + 1e-9\n"
        "    return x\n"
        "spin(10)\n"
        "interrupt_watchdog()\n"
        "with unfinished(sys.argv[1]):\n"
        "    open(sys.argv[1], 'w').write('half')\n"
        "    print('spinning', flush=True)\n"
        "    spin(10**11)\n"
    )
    partial = tmp_path / "file.partial"
    p = subprocess.Popen(
        [sys.executable, str(script), str(partial)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert p.stdout.readline() == "spinning\n"
    time.sleep(0.2)
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    code = p.wait(10)
    assert code == 130 and time.monotonic() - sent < 2.0
    assert "interrupted" in p.stderr.read() and not partial.exists()


# ---- the other commands ----------------------------------------------------------------------


def test_info_names_the_file_type_and_kind(smol, catalog_path):
    res = ember("info", smol)
    assert res.code == 0 and "Q4_1" in res.out and "instruct" in res.out
    info = json.loads(ember("info", catalog_path("gemma3-270m"), "--json").out)
    assert info["file_type"] == "Q4_K_M" and info["kind"] == "base"


def test_tokenize_list_pull_version(smol):
    res = ember("tokenize", smol, "<|im_start|>user", "--json")
    assert res.code == 0 and json.loads(res.out)["ids"] == [1, 4093]
    res = ember("list")
    assert res.code == 0 and "smollm2-135m" in res.out and "base" in res.out
    res = ember("pull", "smollm2-135m")
    assert res.code == 0 and res.out.strip().endswith(".gguf") and Path(res.out.strip()).is_file()
    res = ember("--version")
    assert res.code == 0 and res.out.startswith("ember ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/nonexistent/model.gguf"], "does not exist"),
        (["run", "no-such-model.gguf", "hi"], "does not exist"),
        (["pull", "no-such-model"], "unknown model"),
        (["perplexity", "smollm2-135m", "/nonexistent.txt"], "cannot read"),
        (["run", "smollm2-135m", "hi", "--memory-budget", "20MB"], "too small: this model needs at least"),
        (["run", "smollm2-135m", "hi", "--memory-budget", "lots"], "memory_budget must be a size"),
    ],
)
def test_errors_are_one_line_exit_2(argv, message, smol):
    res = ember(*argv)
    assert res.code == 2 and message in res.err and res.err.count("\n") == 1


def test_bench_quick(smol, tmp_path):
    """`ember bench --quick` runs every scenario it can here and writes results.json (every field
    the report reads), report.md and the plots; no thresholds: this is a smoke run."""
    res = ember("bench", "--help")
    assert res.code == 0 and "--quick" in res.out and "ember bench" in res.out
    t = time.monotonic()
    res = ember("bench", "--quick", "--json", "--out", tmp_path, timeout=600)
    took = time.monotonic() - t
    assert res.code == 0, res
    r = json.loads(res.out)
    assert r == json.loads((tmp_path / "results.json").read_text())
    assert r["schema"] == "ember-bench/2" and r["options"]["quick"] and r["options"]["engines"] == ["ember"]
    assert len(r["model"]["sha256"]) == 64 and r["model"]["bytes"] > 0
    env = r["environment"]
    assert env["machine"]["cpu"]["model"] and env["versions"]["numba"] and "load_cores_at_start" in env
    sc = r["scenarios"]
    assert list(sc) == [
        "dense",
        "ttft",
        "memory",
        "long-context",
        "offload",
        "moe",
        "moe-budget",
        "speculative",
        "devices",
    ]
    pocl = opencl_compiler_problem()
    for name in ("dense", "memory", "long-context", "offload", "moe", "moe-budget", "speculative", "devices"):
        if name == "devices" and pocl:  # PoCL's compiler does not know this CPU: the device is left out
            assert sc[name]["status"] == "skipped" and "does not know this CPU" in sc[name]["reason"], sc[name]
            continue
        assert sc[name]["status"] == "ok", (name, sc[name])
        assert sc[name]["summary"]
    for run in sc["dense"]["runs"] + sc["long-context"]["runs"]:
        assert run["tokens_per_s"] > 0 and isinstance(run["busy"], bool) and run["load_cores"] >= 0
    assert {f"{t}|{r['options']['threads'][0]}" for t in ("pp128", "tg32")} <= set(sc["dense"]["summary"])
    assert sc["ttft"]["status"] == "ok" and sc["ttft"]["summary"]["warm_s"] > 0
    rows = sc["offload"]["summary"]["rows"]
    resident, budget = rows[0], rows[1]
    assert resident["variant"] == "resident" and budget["variant"] == "budget"
    assert budget["same_tokens"] and budget["streamed_bytes_per_token"] > 0 and budget["memory_peak_bytes"] > 0
    moe = sc["moe-budget"]["summary"]["rows"]  # a quarter of a tiny MoE's experts in a cache
    assert [r["variant"] for r in moe][:2] == ["resident", "cache, prediction"]
    assert all(r["same_tokens"] for r in moe) and moe[1]["hit_rate"] > 0 and moe[1]["recall"] > 0
    if not pocl:
        dev = sc["devices"]["summary"]  # PoCL's OpenCL device beside the CPU, timing its own work
        assert dev["128|cpu"]["tok_s"]["median"] > 0 and dev["128|opencl:0"]["device_s"]["attention"] > 0
        assert dev["128|cpu+opencl:0"]["device_s"]["attention"] > 0  # the attention alone there
    spec = sc["speculative"]["summary"]
    assert spec["ember|type hints|lookup"]["same_tokens"] and "acceptance_rate" in spec["ember|type hints|lookup"]
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# ember benchmark: smollm2-135m (--quick)") and ("per device" in md or pocl)
    for p in r["plots"]:
        assert (tmp_path / p["file"]).stat().st_size > 1000 and f"]({p['file']})" in md
    plotted = {"dense", "long-context", "offload", "speculative"} | (set() if pocl else {"devices"})
    assert {p["scenario"] for p in r["plots"]} == plotted
    assert f"report: {tmp_path / 'report.md'}" in res.err
    print(f"ember bench --quick: {took:.0f} s")
