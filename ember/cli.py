"""The `ember` command line: pull, list, info, tokenize, run, perplexity.

Every command that prints data takes `--json`. Errors print one line and exit with status 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import json
import os
import sys
import threading
from typing import Any, Callable

from . import hub
from .errors import EmberError

EXIT_ERROR = 2


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


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
        print(f"{mark} {r['name']:<20} {r['arch']:<8} {r['params']:>5}  {_human_bytes(r['size']):>9}  {state:<10}  {r['description']}")
    print(f"(* default; models live in {hub.models_dir()})")
    return 0


def _load(model: str, **options):
    from .api import load

    return load(model, **options)


def cmd_info(args) -> int:
    info = _load(args.model).info()
    if args.json:
        _print_json(info)
        return 0
    tok = info.pop("tokenizer")
    types = info.pop("tensor_types")
    for k, v in info.items():
        if v is not None:
            print(f"{k:<22} {_human_bytes(v) if k == 'file_bytes' else v}")
    print(f"{'tensor types':<22} " + ", ".join(f"{k} x{v}" for k, v in types.items()))
    print(f"{'tokenizer':<22} " + ", ".join(f"{k}={v}" for k, v in tok.items()))
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


def cmd_run(args) -> int:
    if args.prompt is None:  # one positional: it is the prompt, for the default model
        args.model, args.prompt = hub.DEFAULT_MODEL, args.model
    m = _load(args.model, n_ctx=args.ctx_size, threads=args.threads, device=args.device)
    from .runtime.decode import compiled

    if not compiled():
        logging.getLogger("ember").info("ember: compiling the kernels (first run only, ~30 s)...")
    opts = dict(
        max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop or (),
        ignore_eos=args.ignore_eos,
    )
    if args.raw:
        stream = m.generate(args.prompt, **opts)
    else:
        stream = m.chat([{"role": "user", "content": args.prompt}], **opts)
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
    else:
        print()
        if args.verbose:
            print(_stats_line(stats), file=sys.stderr)
    return 0


def _stats_line(st: dict) -> str:
    return (f"[{st['prompt_tokens']} prompt tokens, {st['prefill_tokens_per_s']:.1f} tok/s; "
            f"{st['tokens_generated']} generated, {st['decode_tokens_per_s']:.1f} tok/s; "
            f"first token {st['ttft_s']:.2f} s; peak RSS {st['peak_rss_bytes'] / 1e6:.0f} MB]")


def cmd_perplexity(args) -> int:
    m = _load(args.model, threads=args.threads)
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


def cmd_bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    if not script.exists():
        raise EmberError(f"the benchmark script is not installed ({script}); run it from a checkout: python bench/run.py")
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember", description="Run GGUF language models locally.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    sp = add("pull", cmd_pull, "download a catalog model into $EMBER_HOME", json_flag=False)
    sp.add_argument("model", help=f"catalog name ({', '.join(hub.CATALOG)})")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    add("list", cmd_list, "list the catalog models and which are pulled")

    sp = add("info", cmd_info, "describe a model: architecture, sizes, tensor types, tokenizer")
    sp.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL, help="catalog name or path to a .gguf")

    sp = add("tokenize", cmd_tokenize, "print the token ids of a text")
    sp.add_argument("model", help="catalog name or path to a .gguf")
    sp.add_argument("text")
    sp.add_argument("--no-special", action="store_true", help="treat special-token text as plain text")
    sp.add_argument("--pieces", action="store_true", help="one token per line with its text")

    sp = add("run", cmd_run, "generate a reply (chat template applied unless --raw)")
    sp.add_argument("model", help="catalog name or path; with one positional it is the prompt (default model)")
    sp.add_argument("prompt", nargs="?")
    sp.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    sp.add_argument("-n", "--max-tokens", type=int, default=128)
    sp.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--min-p", type=float, default=0.0)
    sp.add_argument("--repeat-penalty", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--stop", action="append", help="stop string (repeatable)")
    sp.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text tokens")
    sp.add_argument("-c", "--ctx-size", type=int, default=None, help="context window (default: the model's)")
    sp.add_argument("-t", "--threads", type=int, default=None)
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "opencl", "cuda"])
    sp.add_argument("-v", "--verbose", action="store_true", help="print speed and memory after the reply")

    sp = add("perplexity", cmd_perplexity, "perplexity of a text file (one causal pass)")
    sp.add_argument("model", help="catalog name or path to a .gguf")
    sp.add_argument("file")
    sp.add_argument("-t", "--threads", type=int, default=None)

    sp = add("bench", cmd_bench, "on-device benchmark (same as python bench/run.py)", json_flag=False)
    sp.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for bench/run.py (see --help there)")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    if argv is None:
        _quiet_startup()
    try:
        code = args.func(args)
    except EmberError as e:
        if args.debug:
            raise
        print(f"ember: error: {e}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 0
    if argv is None:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the command line process without the interpreter's teardown, which collects and
    frees every object one by one: with numba's registries loaded that took 0.1-0.2 s of
    `ember run`. What a normal exit does that matters still happens first: other non-daemon
    threads are joined, atexit handlers run (logging's flushes its handlers), the standard
    streams are flushed."""
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
