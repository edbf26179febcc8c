"""The `ember` command line: pull, list, info, tokenize, run, chat, perplexity, bench.

Every command that prints data takes `--json`. Errors print one line and exit with status 2;
`--debug` shows the traceback instead. Ctrl-C ends any command within a second with status 130
(`interrupt_watchdog`), leaving no half-written file behind.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import hub
from .errors import EmberError

EXIT_ERROR = 2


def _json_text(obj: Any, depth: int = 0) -> str:
    """JSON indented by object, with lists of plain values (token ids) on one line."""
    pad = "  " * depth
    if isinstance(obj, dict) and obj:
        items = (f"{pad}  {json.dumps(str(k), ensure_ascii=False)}: {_json_text(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        items = (f"{pad}  {_json_text(v, depth + 1)}" for v in obj)
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(obj, ensure_ascii=False, default=str)


def _print_json(obj: Any) -> None:
    print(_json_text(obj))


def _warn(message: str) -> None:
    print(f"ember: warning: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"ember: {message}", file=sys.stderr)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def cmd_pull(args) -> int:
    path = hub.pull(args.model, progress=not args.quiet)
    print(path)
    return 0


def cmd_list(args) -> int:
    rows = hub.list_models()
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        mark = "*" if r["default"] else " "
        state = "pulled" if r["present"] else "not pulled"
        print(
            f"{mark} {r['name']:<20} {r['arch']:<8} {r['params']:>5}  {r['kind']:<8}  "
            f"{_human_bytes(r['size']):>9}  {state:<10}  {r['description']}"
        )
    print(f"(* default; models live in {hub.models_dir()})")
    return 0


def _load(model: str, **options):
    from .api import load

    return load(model, **options)


def _check_threads(threads: int | None) -> None:
    import psutil

    cpus = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    if threads is not None and threads > cpus:
        _warn(
            f"-t {threads} is more threads than this machine's {cpus} CPUs; decoding is "
            f"fastest at one thread per physical core (the default)"
        )


def cmd_info(args) -> int:
    if args.devices:
        from .api import list_devices
        from .devices import auto_choice

        found = list_devices()
        name, why = auto_choice(found)
        if args.json:
            _print_json({"devices": found, "auto": {"device": name, "why": why}})
            return 0
        for d in found:
            rest = ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("name", "what", "missing"))
            print(f"{d['name']:<10} " + (f"missing: {d['missing']}" if "missing" in d else f"{d['what']} ({rest})"))
        print(f"{'auto':<10} {name}: {why}")
        return 0
    info = _load(args.model).info()
    if args.json:
        _print_json(info)
        return 0
    tok = info.pop("tokenizer")
    types = info.pop("tensor_types")
    kv = info.pop("kv_cache")
    for k, v in info.items():
        if v is not None:
            print(f"{k:<22} {_human_bytes(v) if k in ('file_bytes', 'bytes_per_token') else v}")
    print(f"{'tensor types':<22} " + ", ".join(f"{k} x{v}" for k, v in types.items()))
    print(f"{'tokenizer':<22} " + ", ".join(f"{k}={v}" for k, v in tok.items()))
    if kv:
        print(f"{'kv cache':<22} {kv['type']}, {_human_bytes(kv['bytes'])} at {kv['context']} tokens")
    return 0


def cmd_tokenize(args) -> int:
    m = _load(args.model)
    ids = m.tokenize(args.text, special=not args.no_special)
    if args.json:
        _print_json({"ids": ids, "pieces": [m.tokenizer.token_bytes(i).decode("utf-8", "replace") for i in ids]})
    elif args.pieces:
        for i in ids:
            print(f"{i:>8}  {m.tokenizer.token_bytes(i).decode('utf-8', 'replace')!r}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def _is_model(arg: str) -> bool:
    """Whether a lone positional of `run` names a model (a catalog name or a .gguf file)."""
    return arg in hub.CATALOG or arg.endswith(".gguf") or os.path.isfile(os.path.expanduser(arg))


def _model_and_prompt(args) -> tuple[str, str | None]:
    """(model, prompt): the prompt from the arguments, else from stdin when it is not a
    terminal; None on a terminal (a conversation)."""
    model, prompt = args.model, args.prompt
    if prompt is None and model is not None and not _is_model(model):
        model, prompt = None, model  # one positional that is no model: the prompt
    model = model or hub.DEFAULT_MODEL
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().rstrip("\n")  # echo's newline is not part of the prompt
        if not prompt.strip():
            raise EmberError("no prompt: give one as an argument, or pipe it in on stdin")
    if prompt is None and args.json:
        raise EmberError("--json needs a prompt (an argument or stdin)")
    return model, prompt


def _unescape(s: str) -> str:
    """The usual backslash escapes of a command-line string (\\n, \\t, \\\\, \\xNN, \\uNNNN)."""
    try:
        return s.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise EmberError(f"bad escape in {s!r}: {e.reason}") from None


def _generation_options(args) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        seed=None if args.seed < 0 else args.seed,
        stop=[_unescape(s) for s in getattr(args, "stop", None) or ()],  # run's, not chat's
        ignore_eos=getattr(args, "ignore_eos", False),
    )


def _limit_note(m, stats: dict) -> None:
    if stats.get("stopped_by") == "max_tokens":
        _note(
            f"[the reply was cut at {stats['tokens_generated']} tokens by -n; raise it or leave "
            "it out to let the reply finish]"
        )
    elif stats.get("stopped_by") == "context":
        _note(f"[the reply was cut: the context window of {m.n_ctx} tokens is full (-c)]")


def cmd_run(args) -> int:
    model, prompt = _model_and_prompt(args)
    opts = _generation_options(args)
    _check_threads(args.threads)
    draft = "lookup" if args.lookup else args.draft
    if prompt is None:  # a terminal: the chat app, as `ember chat`
        return _chat_app(model, args, draft)
    m = _load(
        model,
        n_ctx=args.ctx_size,
        threads=args.threads,
        device=args.device,
        draft=draft,
        draft_k=args.draft_k,
        draft_schedule=args.schedule,
        draft_device=args.draft_device,
        draft_quant=args.draft_quant,
        memory_budget=args.memory_budget,
        kv_cache=args.kv_cache,
    )
    trained = m.gguf.arch_get("context_length")
    if args.ctx_size and trained and args.ctx_size > trained:
        _warn(
            f"-c {args.ctx_size} is past the {trained} tokens {m.path.name} was trained on; replies degrade beyond that"
        )
    raw = args.raw or not m.has_chat_template
    if raw and not args.raw:
        _note(f"{m.path.name} has no chat template (a base model): the prompt is continued as plain text")
    m.prepare(load_code=False)  # the first token loads the code
    stream = m.generate(prompt, **opts) if raw else m.chat([{"role": "user", "content": prompt}], **opts)
    ids, parts, finish = [], [], None
    for chunk in stream:
        ids += chunk.token_ids
        parts.append(chunk.text)
        finish = chunk.finish_reason
        if not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    stats = dict(m.stats, finish_reason=finish)
    if args.json:
        _print_json({"ids": ids, "text": "".join(parts), "stats": stats})
        return 0
    print()
    _limit_note(m, stats)
    if args.verbose:
        print(_stats_line(stats), file=sys.stderr)
    return 0


def _chat_app(model: str, args, draft: str | None) -> int:
    """The chat app (ember.tui) on this terminal, with the command's sampling settings. Ctrl-C
    reaches the app as a key; a SIGINT from elsewhere ends the app too, restoring the terminal."""
    import signal

    if not sys.stdout.isatty():
        raise EmberError("no prompt: give one as an argument or on stdin (the chat app needs a terminal)")
    from .tui.app import ChatApp
    from .tui.conversation import Settings

    names = {f.name for f in dataclasses.fields(Settings)}
    settings = Settings(**{k: v for k, v in _generation_options(args).items() if k in names})
    app = ChatApp(
        model,
        system=getattr(args, "system", None),
        draft=draft,
        draft_k=args.draft_k,
        draft_schedule=args.schedule,
        draft_device=args.draft_device,
        draft_quant=args.draft_quant,
        threads=args.threads,
        n_ctx=args.ctx_size,
        device=args.device,
        memory_budget=args.memory_budget,
        kv_cache=args.kv_cache,
        settings=settings,
    )
    signal.set_wakeup_fd(-1)  # the app, not interrupt_watchdog, ends this process on SIGINT
    signal.signal(signal.SIGINT, lambda signum, frame: app.exit(return_code=130))
    app.run()
    return app.return_code or 0


def cmd_chat(args) -> int:
    _check_threads(args.threads)
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise EmberError("ember chat needs a terminal; elsewhere use `ember run MODEL PROMPT` (or the prompt on stdin)")
    return _chat_app(args.model, args, "lookup" if args.lookup else args.draft)


def _stats_line(st: dict) -> str:
    """--stats' line; under a memory budget also what was read from disk and the wait for it."""
    budget = ""
    if st.get("stream_bytes"):
        budget = f"streamed {st['stream_bytes'] / 1e6:.0f} MB, waited {st['stream_stall_s']:.1f} s; "
    used = st.get("expert_hits", 0) + st.get("expert_misses", 0)
    if used:
        budget = (
            f"experts {st['expert_hits'] / used:.0%} in memory, {st['expert_bytes'] / 1e6:.0f} MB read, "
            f"waited {st['expert_stall_s']:.1f} s"
        )
        if st.get("predict_guessed"):
            guessed, chosen, right = st["predict_guessed"], st["predict_chosen"], st["predict_right"]
            budget += f", guesses {right / guessed:.0%} right, {right / max(chosen, 1):.0%} of choices"
        budget += "; "
    return (
        f"[{st['prompt_tokens']} prompt tokens, {st['prefill_tokens_per_s']:.1f} tok/s; "
        f"{st['tokens_generated']} generated, {st['decode_tokens_per_s']:.1f} tok/s; "
        f"first token {st['ttft_s']:.2f} s; peak RSS {st['peak_rss_bytes'] / 1e6:.0f} MB; {budget}"
        f"seed {st['seed']}]"
    )


def cmd_perplexity(args) -> int:
    _check_threads(args.threads)
    m = _load(args.model, threads=args.threads, memory_budget=args.memory_budget, kv_cache=args.kv_cache)
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise EmberError(f"cannot read {args.file}: {e}") from None
    import time

    t = time.perf_counter()
    ppl = m.perplexity(text)
    n = len(m.tokenize(text, special=False))
    out = {"model": str(m.path), "file": args.file, "tokens": n, "perplexity": ppl, "seconds": time.perf_counter() - t}
    if args.json:
        _print_json(out)
    else:
        print(f"perplexity {ppl:.4f} over {n} tokens ({out['seconds']:.1f} s)")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from .bench.run import main as bench_main

    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="ember", description="Run GGUF language models locally.")
    p.add_argument("--version", action="version", version=f"ember {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    def add_threads(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-t",
            "--threads",
            type=int,
            default=None,
            metavar="N",
            help="CPU threads (default: $EMBER_THREADS or the physical cores)",
        )

    def add_sampling(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-n",
            "--max-tokens",
            type=int,
            default=None,
            metavar="N",
            help="cap the reply at N tokens (default: until the end of the turn or the context)",
        )
        sp.add_argument("--temp", type=float, default=0.8, metavar="T", help="temperature (default 0.8; 0 = greedy)")
        sp.add_argument(
            "--top-k", type=int, default=40, metavar="K", help="keep the K likeliest tokens (default 40; 0 = off)"
        )
        sp.add_argument(
            "--top-p",
            type=float,
            default=0.95,
            metavar="P",
            help="keep the likeliest tokens up to probability P (default 0.95; 1 = off)",
        )
        sp.add_argument(
            "--min-p",
            type=float,
            default=0.05,
            metavar="P",
            help="drop tokens less likely than P times the likeliest (default 0.05; 0 = off)",
        )
        sp.add_argument(
            "--repeat-penalty",
            type=float,
            default=1.1,
            metavar="R",
            help="penalize tokens seen in the last --repeat-last-n (default 1.1; 1 = off)",
        )
        sp.add_argument(
            "--repeat-last-n",
            type=int,
            default=64,
            metavar="N",
            help="how many recent tokens the repeat penalty looks at (default 64; -1 = all)",
        )
        sp.add_argument(
            "--seed",
            type=int,
            default=-1,
            metavar="S",
            help="random seed (default -1: a fresh one, shown by -v and --json)",
        )

    def add_budget(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--memory-budget",
            metavar="SIZE",
            default="auto",
            help="run within SIZE of memory (e.g. 600MB), streaming the layers that do not fit from disk; "
            "'none': never; default 'auto': a budget only when the model does not fit in the available memory",
        )

    def add_kv_cache(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--kv-cache",
            default="auto",
            choices=["auto", "f16", "f32", "q8_0"],
            help="the KV cache's type: f16 (the default, as llama.cpp's: half the memory and reads), f32, "
            "or q8_0 (8 bits a value and a scale per 32, as llama.cpp's -ctk/-ctv q8_0: about half "
            "of f16's memory and reads at long contexts, at a small cost in accuracy)",
        )

    def add_model_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-c",
            "--ctx-size",
            type=int,
            default=None,
            metavar="CTX",
            help="context window in tokens (default: the model's)",
        )
        add_threads(sp)
        add_budget(sp)
        add_kv_cache(sp)
        sp.add_argument(
            "--device",
            default="auto",
            help="where the model runs: auto (the CPU, so far), cpu, opencl, opencl:N, cuda or cuda:N (the "
            "whole model on an OpenCL device or a CUDA GPU; `ember info --devices` lists them), or cpu+ one "
            "of those (the CPU's kernels, the attention and KV cache on that device)",
        )
        spec = sp.add_mutually_exclusive_group()
        spec.add_argument(
            "--draft",
            metavar="MODEL",
            default=None,
            help="speculative decoding with this draft model (catalog name or .gguf; the "
            "target's vocabulary), e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b",
        )
        spec.add_argument(
            "--lookup",
            action="store_true",
            help="speculative decoding with prompt lookup (drafts what followed the same "
            "tokens earlier in the prompt or reply; pays when the reply echoes the prompt)",
        )
        sp.add_argument(
            "--draft-k",
            metavar="K",
            type=int,
            default=None,
            help="with --draft or --lookup: K drafted tokens per step, 1-15 (default: chosen per "
            "step from the measured costs and acceptance)",
        )
        sp.add_argument(
            "--schedule",
            choices=["auto", "turns", "concurrent"],
            default="auto",
            help="with --draft: draft and verify in turns, or concurrently (the draft drafts the "
            "next block on its own threads while the target verifies this one); default auto: "
            "chosen per step from the measured costs",
        )
        sp.add_argument(
            "--draft-device",
            metavar="DEVICE",
            default="cpu",
            help="with --draft: where the draft model runs: cpu (default), or a GPU device (cuda, "
            "opencl:0, ...), beside the target on all of the CPU's threads",
        )
        sp.add_argument(
            "--draft-quant",
            choices=("q4_0", "file"),  # ember.speculative.QUANTS, without its imports
            default="q4_0",
            help="with --draft on the CPU: q4_0 (default): draft from a copy of the draft model "
            "with its heavier matrices requantized to Q4_0, made once (cheaper drafts, the same "
            "output); file: from the file as it is",
        )

    sp = add("pull", cmd_pull, "download a catalog model into $EMBER_HOME", json_flag=False)
    sp.add_argument("model", help=f"catalog name ({', '.join(hub.CATALOG)})")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    add("list", cmd_list, "list the catalog models and which are pulled")

    sp = add("info", cmd_info, "describe a model: architecture, sizes, tensor types, tokenizer")
    sp.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL, help="catalog name or path to a .gguf")
    sp.add_argument("--devices", action="store_true", help="list the devices ember can run on here instead")

    sp = add("tokenize", cmd_tokenize, "print the token ids of a text")
    sp.add_argument("model", help="catalog name or path to a .gguf")
    sp.add_argument("text")
    sp.add_argument("--no-special", action="store_true", help="treat special-token text as plain text")
    sp.add_argument("--pieces", action="store_true", help="one token per line with its text")

    sp = add(
        "run",
        cmd_run,
        "generate a reply (chat template applied unless --raw); with no "
        "prompt, read it from stdin, or chat on a terminal",
    )
    sp.add_argument(
        "model",
        nargs="?",
        help="catalog name or path to a .gguf (default: "
        f"{hub.DEFAULT_MODEL}); a lone argument that names no model is the prompt",
    )
    sp.add_argument("prompt", nargs="?", help="the prompt (default: stdin, or a chat on a terminal)")
    sp.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    add_sampling(sp)
    sp.add_argument(
        "--stop",
        action="append",
        metavar="STR",
        help="stop before this text (repeatable; escapes like \\n are understood)",
    )
    sp.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text tokens")
    add_model_options(sp)
    sp.add_argument("-v", "--verbose", action="store_true", help="print speed, memory and the seed after the reply")

    sp = add(
        "chat",
        cmd_chat,
        "the chat app on this terminal: Markdown replies, slash commands (/help), a live panel (F2)",
        json_flag=False,
    )
    sp.add_argument(
        "model",
        nargs="?",
        default=hub.DEFAULT_MODEL,
        help=f"catalog name or path to a .gguf (default: {hub.DEFAULT_MODEL})",
    )
    sp.add_argument("--system", metavar="TEXT", default=None, help="the system prompt")
    add_sampling(sp)
    add_model_options(sp)

    sp = add("perplexity", cmd_perplexity, "perplexity of a text file (one causal pass)")
    sp.add_argument("model", help="catalog name or path to a .gguf")
    sp.add_argument("file", help="a UTF-8 text file")
    add_threads(sp)
    add_budget(sp)
    add_kv_cache(sp)

    sub.add_parser(
        "bench",
        help="on-device benchmark: speed against llama.cpp, TTFT, memory (`ember bench --help` for its options)",
        add_help=False,
    )
    return p


def _quiet_startup() -> None:
    """Process-wide start-up settings of the command line tool (not of the library).

    numba's first compile or cache load imports scipy.linalg only to see whether numba's own
    np.dot/linalg bindings can work (0.4 s here), and cffi (with pycparser) for its cffi-function
    typing (0.05 s); no ember code uses either, so the CLI process hides both from numba.
    Progress notes ("packing weights...") go to stderr.
    """
    for name in ("scipy", "cffi"):
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
    log = logging.getLogger("ember")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)


def interrupt_watchdog(grace_s: float = 1.0) -> None:
    """Make Ctrl-C end the process within `grace_s` even while the main thread is inside one
    long native call (a compile, a big matrix), where Python cannot raise KeyboardInterrupt:
    a daemon thread wakes on the signal (signal.set_wakeup_fd writes to a pipe from C), and
    when the main thread has not started handling it after `grace_s` it deletes the files being
    written (home.remove_unfinished), says "interrupted" and exits with status 130."""
    import signal

    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: nothing to watch
        os.close(r)
        os.close(w)
        return
    seen = [0]

    def on_sigint(signum, frame):
        seen[0] += 1
        raise KeyboardInterrupt

    def watch() -> None:
        import time

        from .home import remove_unfinished

        while True:
            if os.read(r, 1) != bytes([signal.SIGINT]):
                continue
            before, deadline = seen[0], time.monotonic() + grace_s
            while seen[0] == before and time.monotonic() < deadline:
                time.sleep(0.02)
            if seen[0] == before:
                remove_unfinished()
                os.write(2, b"\nember: interrupted\n")
                os._exit(130)

    signal.signal(signal.SIGINT, on_sigint)
    threading.Thread(target=watch, daemon=True, name="ember-interrupt").start()


def main(argv: list[str] | None = None) -> int:
    as_process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if as_process:
        _quiet_startup()
        interrupt_watchdog()
    try:
        if argv[:1] == ["bench"]:  # every argument, --help included, is the benchmark's
            code = _run(lambda: cmd_bench(argv[1:]), "--debug" in argv)
        else:
            args = build_parser().parse_args(argv)
            if not getattr(args, "func", None):
                build_parser().print_help()
                return EXIT_ERROR
            code = _run(lambda: args.func(args), args.debug)
    except KeyboardInterrupt:  # during the parsing or the imports
        print("\nember: interrupted", file=sys.stderr)
        code = 130
    if as_process:
        _exit_now(code)
    return code


def _run(command: Callable[[], int], debug: bool) -> int:
    try:
        return command()
    except EmberError as e:
        if debug:
            raise
        print(f"ember: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nember: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _exit_now(code: int) -> None:
    """End the command line process without the interpreter's teardown, which collects and
    frees every object one by one: with numba's registries loaded that took 0.1-0.2 s of
    `ember run`. What a normal exit does that matters still happens first: atexit handlers
    run (logging's flushes its handlers) and the standard streams are flushed. Threads are
    not waited for: every thread ember starts is a daemon that holds no unfinished output,
    so a finished command never waits on one. A second Ctrl-C from here on is ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
