"""The command line: data commands with --json, generation, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from ember.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json(capsys):
    code, out, _ = run_cli(capsys, "list", "--json")
    rows = json.loads(out)
    assert code == 0 and {r["name"] for r in rows} >= {
        "smollm2-135m",
        "gemma3-270m",
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-1.5b",
    }


def test_info_json(capsys, catalog_path):
    code, out, _ = run_cli(capsys, "info", str(catalog_path("smollm2-135m")), "--json")
    info = json.loads(out)
    assert code == 0
    assert info["architecture"] == "llama" and info["block_count"] == 30 and info["context_length"] == 8192
    assert info["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert info["tokenizer"]["model"] == "gpt2" and info["tokenizer"]["vocab_size"] == 49152
    # 30 layers x 3 kv heads x 8192 positions x (64 + 64) halves
    assert info["kv_cache"] == {"type": "f16", "context": 8192, "bytes": 30 * 3 * 8192 * 128 * 2}
    code, out, _ = run_cli(capsys, "info", str(catalog_path("smollm2-135m")))
    assert code == 0 and "kv cache               f16, 188.7 MB at 8192 tokens" in out


def test_info_of_an_moe_model_gives_experts_and_bytes_per_token(capsys, tmp_path):
    import tiny_gguf as tg

    from ember.formats.gguf import GGUFFile

    path = tg.write_family(tmp_path / "moe.gguf", "mixtral")  # 4 experts, 2 used a token
    code, out, _ = run_cli(capsys, "info", str(path), "--json")
    info = json.loads(out)
    assert code == 0 and (info["expert_count"], info["expert_used_count"]) == (4, 2)
    g = GGUFFile(path)
    experts = sum(t.nbytes for n, t in g.tensors.items() if "_exps." in n)
    embd = g.info("token_embd.weight")
    # the used half of the experts; the embedding is the output matrix too: read whole
    assert embd.nbytes < info["bytes_per_token"] == sum(t.nbytes for t in g.tensors.values()) - experts // 2
    code, out, _ = run_cli(capsys, "info", str(path))
    assert "expert_used_count      2" in out and "bytes_per_token" in out


def test_tokenize(capsys, catalog_path):
    path = str(catalog_path("smollm2-135m"))
    code, out, _ = run_cli(capsys, "tokenize", path, "<|im_start|>user", "--json")
    assert code == 0 and json.loads(out)["ids"] == [1, 4093]
    code, out, _ = run_cli(capsys, "tokenize", path, "<|im_start|>", "--no-special")
    assert code == 0 and out.split() != ["1"] and len(out.split()) > 1


def test_run_json_greedy(capsys, catalog_path):
    code, out, _ = run_cli(
        capsys,
        "run",
        str(catalog_path("smollm2-135m")),
        "The capital of France is",
        "--raw",
        "-n",
        "4",
        "--temp",
        "0",
        "--json",
    )
    res = json.loads(out)
    assert code == 0 and len(res["ids"]) == 4 and "Paris" in res["text"]
    for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "tokens_generated", "peak_rss_bytes"):
        assert key in res["stats"]
    assert res["stats"]["finish_reason"] == "length"


def test_commands_leave_no_thread_that_keeps_a_process_alive(capsys, catalog_path, tmp_path):
    """Every thread ember starts (the decode and batch teams) is a daemon: a finished command
    never waits on one (the batch path's pool once kept `ember perplexity` alive forever)."""
    import threading

    from ember.bench.scenarios import english_text

    text = tmp_path / "t.txt"
    text.write_text(english_text()[:3000])
    path = str(catalog_path("smollm2-135m"))
    assert run_cli(capsys, "perplexity", path, str(text), "-t", "2")[0] == 0
    assert run_cli(capsys, "run", path, "hi " * 100, "-n", "2", "-t", "2")[0] == 0
    ember_threads = [t for t in threading.enumerate() if t.name.startswith("ember-")]
    assert {t.name.rsplit("-", 1)[0] for t in ember_threads} >= {"ember-split", "ember-decode"}
    assert all(t.daemon for t in ember_threads)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/nonexistent/model.gguf"], "does not exist"),
        (["info", "no-such-model"], "unknown model"),
        (["pull", "no-such-model"], "unknown model"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_not_gguf_file(capsys, tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    code, _, err = run_cli(capsys, "info", str(bad))
    assert code == 2 and "not a GGUF file" in err


def test_bad_generation_args(capsys, catalog_path):
    path = str(catalog_path("smollm2-135m"))
    code, _, err = run_cli(capsys, "run", path, "hi", "-n", "0")
    assert code == 2 and "max_tokens" in err
    code, _, err = run_cli(capsys, "run", path, "hi", "--temp", "-1")
    assert code == 2 and "temperature" in err
    code, _, err = run_cli(capsys, "run", path, "word " * 40, "--raw", "-c", "16")
    assert code == 2 and "context window" in err and "-c" in err


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "ember.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "perplexity" in res.stdout


@pytest.mark.parametrize(
    "given, meant",
    [
        (r"\n", "\n"),
        (r"a\tb", "a\tb"),
        (r"\\n", "\\n"),
        (r"\x41\u00e9", "A\u00e9"),
        ("é\\n", "é\n"),
        ("plain", "plain"),
    ],
)
def test_stop_escapes(given, meant):
    from ember.cli import _unescape

    assert _unescape(given) == meant


def test_json_output_keeps_lists_of_values_on_one_line():
    from ember.cli import _json_text

    obj = {"ids": [1, 2, 3], "text": "a\nb", "stats": {"x": 1.5, "rows": [{"a": [4, 5]}]}, "empty": []}
    text = _json_text(obj)
    assert json.loads(text) == obj and '"ids": [1, 2, 3]' in text and '"a": [4, 5]' in text


def test_process_exit_keeps_output_and_status(catalog_path, tmp_path):
    """As a process the CLI ends with os._exit (no interpreter teardown): everything it wrote
    still arrives through the pipes, atexit handlers still run, and the status is kept."""
    path = str(catalog_path("smollm2-135m"))
    res = subprocess.run(
        [sys.executable, "-m", "ember.cli", "run", path, "The capital of France is", "--raw", "-n", "4", "--temp", "0"]
        + ["--json"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and len(json.loads(res.stdout)["ids"]) == 4
    res = subprocess.run(
        [sys.executable, "-m", "ember.cli", "info", str(tmp_path / "none.gguf")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "does not exist" in res.stderr
    flag = tmp_path / "atexit-ran"
    code = (
        "import atexit, pathlib, sys; atexit.register(pathlib.Path(sys.argv[1]).touch); "
        "from ember.cli import main; sys.argv[1:] = ['list']; main()"
    )
    res = subprocess.run([sys.executable, "-c", code, str(flag)], capture_output=True, text=True)
    assert res.returncode == 0 and "smollm2-135m" in res.stdout and flag.exists()


def test_perplexity_command(capsys, tmp_path):
    import math

    from tiny_gguf import write_tiny_model

    import ember

    model = write_tiny_model(tmp_path / "tiny.gguf")
    text = tmp_path / "t.txt"
    text.write_text("the thing in the thing is the thing that sings\n" * 3)
    code, out, _ = run_cli(capsys, "perplexity", str(model), str(text), "--json")
    res = json.loads(out)
    assert code == 0 and res["tokens"] > 10
    assert math.isclose(res["perplexity"], ember.load(model).perplexity(text.read_text()), rel_tol=1e-6)
    code, _, err = run_cli(capsys, "perplexity", str(model), str(tmp_path / "missing.txt"))
    assert code == 2 and "cannot read" in err


def test_stats_line_says_what_a_budget_read():
    from ember.cli import _stats_line

    base = dict(prompt_tokens=5, prefill_tokens_per_s=10.0, tokens_generated=3, decode_tokens_per_s=2.0, ttft_s=0.5)
    base |= dict(peak_rss_bytes=900e6, seed=7)
    assert "streamed" not in _stats_line(base) and "experts" not in _stats_line(base)
    line = _stats_line(base | dict(stream_bytes=2e9, stream_stall_s=1.25))
    assert "streamed 2000 MB, waited 1.2 s" in line
    moe = dict(expert_hits=30, expert_misses=10, expert_bytes=3e8, expert_stall_s=0.5)
    line = _stats_line(base | moe | dict(predict_guessed=40, predict_chosen=32, predict_right=28))
    assert "experts 75% in memory, 300 MB read, waited 0.5 s, guesses 70% right, 88% of choices" in line
