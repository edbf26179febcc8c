"""The `Model` object behind `ember.load()`: a GGUF file with its tokenizer, chat format and
transformer, and the calls people use: tokenize, generate, chat, logits, session, perplexity.

Opening is cheap (the file is memory-mapped and its header parsed); the tokenizer and the weights
are prepared on first use.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import hub
from .errors import DeviceError, EmberError, UnsupportedError
from .formats.chat import ChatFormat
from .formats.gguf import GGUFFile
from .formats.tokenizer import Tokenizer
from .offload.plan import parse_budget
from .runtime.config import ModelConfig, bytes_per_token
from .runtime.generate import Chunk, GenerationConfig, GenerationError, generate
from .runtime.kv_cache import KV_TYPES
from .runtime.speculate import SCHEDULE_CHOICES
from .runtime.threads import default_threads
from .speculative.light import QUANTS

GPU_KINDS = ("opencl", "cuda")  # the devices that run a whole model (devices.gpu)

if TYPE_CHECKING:
    from .runtime.model import Transformer
    from .runtime.session import Session


class Model:
    """A language model loaded from a GGUF file."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        device: str = "auto",
        memory_budget: str | int | None = "auto",
        draft: str | None = None,
        draft_k: int | None = None,
        draft_schedule: str = "auto",
        draft_device: str = "cpu",
        draft_quant: str = "q4_0",
        kernels: str = "auto",
        kv_cache: str = "auto",
    ):
        self.path = Path(path)
        self.gguf = GGUFFile(self.path)
        self.gguf.validate_model()
        if not isinstance(device, str) or not (
            device in ("auto", "cpu") or device.removeprefix("cpu+").split(":")[0] in GPU_KINDS
        ):
            raise DeviceError(
                f"device {device!r} is not one ember knows; use 'auto', 'cpu', 'opencl', 'opencl:N', 'cuda', "
                "'cuda:N', or 'cpu+' and one of those (the attention on it)"
            )
        self._device_spec = device
        # "auto": none when the model fits in the available memory, else one that leaves a margin
        self._auto_budget = isinstance(memory_budget, str) and memory_budget == "auto"
        off = memory_budget is None or (isinstance(memory_budget, str) and memory_budget.lower() in ("none", "off"))
        self.memory_budget = None if off or self._auto_budget else parse_budget(memory_budget)
        self.plan = None  # the offload plan under a memory budget, once the weights are placed
        self._code_loaded = False
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 2):
            raise EmberError(f"n_ctx must be an integer >= 2, got {n_ctx!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise EmberError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or default_threads()
        if kernels not in ("auto", "numpy"):
            raise EmberError(
                f"kernels must be 'auto' (fast CPU kernels) or 'numpy' (the float32 reference), got {kernels!r}"
            )
        self.kernels = kernels
        if self.on_gpu and (kernels == "numpy" or self.memory_budget is not None or kv_cache in ("f32", "q8_0")):
            raise UnsupportedError(
                f"device={device!r} runs its own kernels with a half-precision KV cache on the device: no "
                "kernels='numpy', memory_budget or kv_cache='f32' / 'q8_0' there"
            )
        if self.on_gpu:
            self._auto_budget = False
        if kv_cache != "auto" and kv_cache not in KV_TYPES:
            raise EmberError(f"kv_cache must be one of {', '.join(KV_TYPES)} or 'auto', got {kv_cache!r}")
        # "auto": halves, as llama.cpp's default; float32 on the reference path
        self.kv_cache = ("f32" if kernels == "numpy" else "f16") if kv_cache == "auto" else kv_cache
        self._n_ctx = n_ctx
        self.stats: dict[str, Any] = {}
        self._own_session: Session | None = None  # what generate() and chat() run on
        self._own_session_lock = threading.Lock()
        if draft_k is not None and (
            isinstance(draft_k, bool) or not isinstance(draft_k, int) or not 1 <= draft_k <= 15
        ):
            raise EmberError(f"draft_k must be an integer from 1 to 15 (None: chosen per step), got {draft_k!r}")
        self.draft_k = draft_k
        if draft_schedule not in SCHEDULE_CHOICES:
            raise EmberError(f"draft_schedule must be one of {', '.join(SCHEDULE_CHOICES)}, got {draft_schedule!r}")
        self.draft_schedule = draft_schedule
        if draft_quant not in QUANTS:
            raise EmberError(f"draft_quant must be one of {', '.join(QUANTS)}, got {draft_quant!r}")
        self.drafter = None if draft is None else self._drafter(draft, n_ctx, draft_device, draft_quant)
        if self.on_gpu:
            _ = self.device  # a device asked for and missing fails here, not at the first token

    def _drafter(self, draft, n_ctx: int | None, device: str, quant: str):
        """draft="lookup": prompt lookup; a catalog name or a .gguf path: that model drafts, on
        the same threads (or on `device`: a GPU of its own), after a check that its vocabulary
        is the target's; on the CPU from its 4-bit copy unless quant="file"."""
        from .speculative import ModelDrafter, PromptLookup, light_copy

        if isinstance(draft, str) and draft == "lookup":
            return PromptLookup()
        if not isinstance(draft, (str, os.PathLike)):
            raise EmberError(f"draft must be 'lookup', a catalog name or a .gguf path, got {draft!r}")
        on_cpu = device == "cpu"
        options = {"kernels": self.kernels, "kv_cache": self.kv_cache} if on_cpu else {"device": device}
        path = hub.resolve(draft)
        if on_cpu and quant == "q4_0":
            path = light_copy(path)
        drafter = load(path, n_ctx=n_ctx, threads=self.threads, **options)
        return ModelDrafter(drafter, self)

    @cached_property
    def config(self) -> ModelConfig:
        return ModelConfig.from_gguf(self.gguf, self.tokenizer.n_vocab)

    @cached_property
    def transformer(self) -> Transformer:
        # imported here: the compute stack (numba) is only loaded when a model runs
        from .offload.store import WeightStore
        from .runtime.model import Transformer

        # kernels="numpy": float32 weights and NumPy math (the reference); else the device's
        reference = self.kernels == "numpy"
        if self.memory_budget is not None and not reference:  # loading keeps the pack cache on disk
            self.device.placement.frugal = True
        store = WeightStore(self.gguf, placement=None if reference else self.device.placement)
        tr = Transformer(self.config, store, ops=None if reference else self.device.ops, kv_type=self.kv_cache)
        store.prepare()
        if self._auto_budget and not reference:
            self.memory_budget = self._default_budget(tr)
        if self.memory_budget is not None:
            if reference:
                raise UnsupportedError("memory_budget streams the fast kernels' weights; not with kernels='numpy'")
            self._place_within_budget(tr)
        return tr

    def _default_budget(self, tr) -> int | None:
        """None when the model (its weights, the KV cache at n_ctx, this process) fits in the
        available memory; else a budget that leaves a margin, with a one-line notice."""
        import logging

        import psutil

        from .lut_kernels import pack_cache
        from .offload.memory import available_bytes, process_bytes
        from .offload.plan import default_budget, fmt

        st = tr.store  # the embedding's rows are read on demand, unless it is the output matrix too
        weights = sum(st.nbytes(n) for n in st.gguf.tensors if n != "token_embd.weight" or n == tr.output_name)
        fixed = weights + self.config.kv_cache_bytes(self.n_ctx, self.kv_cache)
        available = available_bytes()
        # the whole RSS counts the model's mapped pages twice: if even that fits, it fits (one
        # cheap figure, instead of reading every mapping, ~40 ms, at each load)
        needed = psutil.Process().memory_info().rss + fixed
        if needed > available:
            needed = process_bytes([self.path, pack_cache.cache_path(self.path)]) + fixed
        budget = default_budget(needed, available)
        if budget is not None:
            logging.getLogger("ember").warning(
                "ember: %s needs about %s and %s of memory is available: streaming what does not fit "
                "within %s (--memory-budget / memory_budget= sets it)",
                self.path.name,
                fmt(needed),
                fmt(available),
                fmt(budget),
            )
        return budget

    def _place_within_budget(self, tr) -> None:
        """Plan which layers stay in memory and stream the others (`devices.cpu.streaming`);
        the machine code (its first token streaming every layer) and the tokenizer are loaded
        first, so the plan counts them as the process's own memory; LLVM's code pages, which the
        machine code does not need once loaded, are given back before it counts."""
        import logging

        from .errors import BudgetError
        from .offload.memory import page_out_compilers, trim_heap

        self.tokenizer.encode("ember")  # the encoder's tables (~70 MB for 150k tokens) are the process's
        if not self._code_loaded:
            from .devices.cpu.step import compiled

            if not compiled():
                self._compile_apart()
            self.device.stream_everything(tr)  # the first token's weights pass through the ring
        self._load_code(tr)
        page_out_compilers()
        trim_heap()
        try:
            self.plan = self.device.set_budget(tr, self.memory_budget, self.n_ctx)
        except BudgetError as e:
            if not self._auto_budget:
                raise
            raise BudgetError(f"not enough memory is available for this model: {e}") from None
        logging.getLogger("ember").info("ember: %s", self.plan.describe())

    def _compile_apart(self) -> None:
        """Compile the machine code into numba's on-disk cache in a child process, which this one
        then loads it from: a compile leaves ~500 MB in the process that compiles (measured
        with Qwen2.5-1.5B: 770 against 227 MB), which a small budget cannot hold."""
        import logging
        import subprocess
        import sys

        log = logging.getLogger("ember")
        log.info("ember: compiling the kernels in a child process (first run only, ~30 s)...")
        args = [str(self.path), str(self.threads), self.kv_cache]
        code = "import sys; from ember.api import compile_for_budget; compile_for_budget(*sys.argv[1:])"
        try:
            r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900)
            why = None if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
        if why:
            log.warning("ember: compiling apart failed (%s); compiling in this process", why)

    def _load_code(self, tr) -> None:
        """Run one token on a scratch cache, once: numba loads (or compiles) the machine code."""
        if self._code_loaded:
            return
        from .runtime.session import Session

        tok = self.tokenizer
        Session(tr, 2, device=self.device).feed([tok.bos_id if tok.bos_id is not None else 0])
        self._code_loaded = True

    @property
    def own_device(self) -> bool:
        """Whether the whole model runs on a device of its own (not the CPU's threads)."""
        return self.on_gpu and not self._device_spec.startswith("cpu+")

    @property
    def on_gpu(self) -> bool:
        """Whether the model, or its attention and KV cache, run on an OpenCL or CUDA device."""
        return self._device_spec.removeprefix("cpu+").split(":")[0] in GPU_KINDS

    @cached_property
    def device(self):
        """Where the model runs: the CPU ("auto" too, so far), an OpenCL or CUDA device, or the
        CPU with the attention on one of those ("cpu+opencl": `devices.hybrid`)."""
        if self._device_spec.startswith("cpu+"):
            from .devices.hybrid import HybridDevice

            return HybridDevice(self._device_spec, self.threads)
        if self.on_gpu:
            from .devices import gpu_device

            return gpu_device(self._device_spec, self.threads)
        from .devices.cpu import CpuDevice

        return CpuDevice(self.threads)

    @cached_property
    def device_choice(self) -> str:
        """Why the model runs where it does: what device="auto" chose here and why, or the
        device asked for."""
        if self._device_spec != "auto":
            return f"{self._device_spec}, as asked"
        if self.plan is not None:  # no look for GPUs: it would load their drivers past the budget
            return "cpu: under a memory budget the layers stream on the CPU"
        from .devices import auto_choice

        name, why = auto_choice()
        return f"{name}: {why}"

    @property
    def n_ctx(self) -> int:
        return self._n_ctx or self.config.context_length

    @property
    def architecture(self) -> str:
        return self.gguf.architecture

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.gguf)

    @property
    def has_chat_template(self) -> bool:
        """Whether the file carries a chat template: an instruct (chat) model. Base models have
        none; `chat()` then uses a built-in format, and the command line continues plain text."""
        return bool(self.gguf.get("tokenizer.chat_template"))

    @cached_property
    def chat_format(self) -> ChatFormat:
        tok = self.tokenizer
        return ChatFormat(
            self.gguf.get("tokenizer.chat_template"),
            bos_token=tok.tokens[tok.bos_id] if tok.bos_id is not None else "",
            eos_token=tok.tokens[tok.eos_id] if tok.eos_id is not None else "",
            architecture=self.architecture,
            vocab_has_chatml=tok.token_to_id("<|im_start|>") is not None,
        )

    # ---- text <-> ids --------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, ids, special: bool = False) -> str:
        return self.tokenizer.decode(ids, special=special)

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        return self.chat_format.render(messages, add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; BOS is added only if the template did not write it."""
        text = self.render_chat(messages, add_generation_prompt)
        tok = self.tokenizer
        bos_text = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
        add_bos = tok.add_bos and not (bos_text and text.startswith(bos_text))
        return tok.encode(text, special=True, add_bos=add_bos)

    # ---- running -----------------------------------------------------------------------
    def prepare(self, load_code: bool = True) -> None:
        """Do now what the first reply would otherwise wait for: pack the weights (a note on the
        first run) and, with `load_code`, load the machine code by running one token (compiled
        on the first run, ~30 s: a note says so first)."""
        import logging

        from .devices.cpu.step import compiled

        tr = self.transformer
        if self.kernels != "numpy" and not self.own_device and not compiled():
            logging.getLogger("ember").info("ember: compiling the kernels (first run only, ~30 s)...")
        if load_code:
            self._load_code(tr)

    def session(self) -> Session:
        """A fresh KV cache over this model: feed(ids) -> logits, truncate(n), reset()."""
        from .runtime.session import Session

        return Session(self.transformer, self.n_ctx, device=self.device)

    def logits(self, ids) -> np.ndarray:
        """Logits [len(ids), n_vocab] of one causal pass over `ids` from an empty cache."""
        return self.session().feed(ids)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return [int(i) for i in prompt]
        raise GenerationError(f"prompt must be text or a list of token ids, not {type(prompt).__name__}")

    def generate(self, prompt, **kwargs) -> Iterator[Chunk]:
        """Stream the continuation of `prompt` (raw text, no template, or token ids).
        kwargs: the fields of GenerationConfig. The library's defaults are reproducible: greedy
        (temperature=0.0, every filter off), seed=0, max_tokens=128 (None: until the end of the
        turn or the context). For sampling as the command line does it, pass e.g.
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=None
        (a fresh seed, recorded in `stats["seed"]`)."""
        cfg = GenerationConfig(**kwargs)
        return self._stream(self._prompt_ids(prompt), cfg)

    def chat(self, messages, **kwargs) -> Iterator[Chunk]:
        """Like generate(), on the messages rendered with the model's chat template. The next
        call with the conversation so far plus new messages prefills only the new ones."""
        cfg = GenerationConfig(**kwargs)
        return self._stream(self.chat_ids(messages), cfg)

    @property
    def _speculation(self) -> dict:
        return {"k": self.draft_k, "schedule": self.draft_schedule}

    def _stream(self, ids: list[int], cfg: GenerationConfig) -> Iterator[Chunk]:
        """generate() on the model's own session, which keeps the last call's tokens for the
        next to reuse; a call made while another one streams gets a fresh session. `stats` is
        the figures of the latest call (each chunk carries its own call's)."""
        self.stats = stats = {}
        streamed = self.plan is not None and self.device.streamed(self.transformer)
        before = streamed.stats_dict() if streamed else {}
        own = self._own_session_lock.acquire(blocking=False)
        try:
            if not own:
                drafter = self.drafter and self.drafter.fork()
                yield from generate(
                    self.session(), self.tokenizer, ids, cfg, stats, drafter=drafter, **self._speculation
                )
            else:
                if self._own_session is None:
                    self._own_session = self.session()
                yield from generate(
                    self._own_session, self.tokenizer, ids, cfg, stats, drafter=self.drafter, **self._speculation
                )
        finally:
            if own:
                self._own_session_lock.release()
            if streamed:  # this call's share of the streaming (the reader runs a layer ahead)
                after = streamed.stats_dict()
                stats.update({k: after[k] - before[k] for k in after})
            if self._device_spec == "auto":
                stats["device_choice"] = self.device_choice

    def perplexity(self, text: str, add_bos: bool | None = None) -> float:
        """exp(mean NLL) of every token after the first, in one causal pass (batches of 512 with the
        KV cache). BOS is added only if the model's metadata asks (or add_bos says)."""
        ids = self.tokenize(text, special=False, add_bos=add_bos)
        if len(ids) < 2:
            raise EmberError("perplexity needs a text of at least two tokens")
        from .runtime.session import Session

        s = Session(self.transformer, max(self.n_ctx, len(ids)), device=self.device)
        nll, pos = 0.0, 0
        for logits in s.feed_batches(ids):
            n = logits.shape[0]
            targets = np.asarray(ids[pos + 1 : pos + n + 1])
            lg = logits[: len(targets)].astype(np.float64)
            m = lg.max(axis=1)
            lse = m + np.log(np.exp(lg - m[:, None]).sum(axis=1))
            nll += float(np.sum(lse - lg[np.arange(len(targets)), targets]))
            pos += n
        return math.exp(nll / (len(ids) - 1))

    # ---- description ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        g = self.gguf
        n_params = sum(t.n_elements for t in g.tensors.values())
        tok_model = g.get("tokenizer.ggml.model")
        tokens = g.get("tokenizer.ggml.tokens")
        return {
            "path": str(self.path),
            "name": g.get("general.name"),
            "architecture": g.architecture,
            "file_bytes": g.file_size,
            "gguf_version": g.version,
            "parameters": n_params,
            "block_count": g.arch_get("block_count"),
            "embedding_length": g.arch_get("embedding_length"),
            "feed_forward_length": g.arch_get("feed_forward_length"),
            "head_count": g.arch_get("attention.head_count"),
            "head_count_kv": g.arch_get("attention.head_count_kv"),
            "expert_count": g.arch_get("expert_count"),
            "expert_used_count": g.arch_get("expert_used_count"),
            "context_length": g.arch_get("context_length"),
            "rope_freq_base": g.arch_get("rope.freq_base"),
            "file_type": file_type_name(g.get("general.file_type")),
            "kind": "instruct" if self.has_chat_template else "base",
            "tensor_count": len(g.tensors),
            "tensor_types": g.type_histogram(),
            "tokenizer": {
                "model": tok_model,
                "pre": g.get("tokenizer.ggml.pre"),
                "vocab_size": len(tokens) if tokens is not None else None,
                "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
                "add_bos_token": g.get("tokenizer.ggml.add_bos_token"),
            },
            "chat_template": "from the model" if g.get("tokenizer.chat_template") else "none (built-in fallback)",
            "kv_cache": self._kv_cache_info(),
            "bytes_per_token": bytes_per_token(
                g.tensors,
                lambda n: g.info(n).nbytes,
                g.arch_get("expert_used_count") or 0,
                g.arch_get("expert_count") or 0,
            ),
        }

    def _kv_cache_info(self) -> dict[str, Any] | None:
        """The KV cache's type and its bytes at the full context (None: an architecture ember
        does not run)."""
        try:
            return {
                "type": self.kv_cache,
                "context": self.n_ctx,
                "bytes": self.config.kv_cache_bytes(self.n_ctx, self.kv_cache),
            }
        except EmberError:
            return None

    def __repr__(self) -> str:
        return f"<ember.Model {self.path.name} ({self.architecture})>"


def file_type_name(code) -> str | None:
    """llama.cpp's name of a `general.file_type` code (3 -> "Q4_1", 15 -> "Q4_K_M")."""
    if code is None:
        return None
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(code)).name
    except ValueError:
        return f"unknown ({code})"
    return name.removeprefix("MOSTLY_").replace("ALL_F32", "F32")


def compile_for_budget(path: str, threads: str, kv_cache: str) -> None:
    """A budgeted model's first token on the CPU, in a child process (`Model._compile_apart`):
    numba compiles the machine code into its on-disk cache; the weights stream, not mapped."""
    m = Model(path, threads=int(threads), n_ctx=64, kv_cache=kv_cache, device="cpu", memory_budget=None)
    m.device.placement.frugal = True  # the pack cache checked without keeping its pages
    tr = m.transformer
    m.device.stream_everything(tr)
    m._load_code(tr)


def list_devices(check: bool = False) -> list[dict]:
    """The devices ember can run on here: for each, its name (the `device=` value), what it is
    and its figures; for a kind it cannot use, `missing` says why. With `check`, each OpenCL
    device also builds ember's kernels (seconds the first time), and one whose build fails
    is `missing` with the reason."""
    from .devices import available

    return available(check)


def load(model: str | os.PathLike = hub.DEFAULT_MODEL, *, pull: bool = True, **options) -> Model:
    """Open a catalog model by name (pulled on first use) or a local .gguf file by path.
    options: n_ctx, threads, device, memory_budget ("600MB" or bytes: stream what does not fit;
    "auto", the default: a budget only when the model does not fit in the available memory;
    None or "none": never), draft ("lookup", or a catalog name or .gguf path
    of a draft model with the target's vocabulary: speculative decoding, see docs/speculative.md),
    draft_k (drafted tokens per step, 1..15; None, the default: chosen per step from measured costs),
    draft_schedule ("turns", "concurrent": the draft drafts the next block while the target
    verifies this one, on separate threads, or "auto", the default: chosen per step),
    draft_device ("cpu", the default, or a GPU device such as "cuda" or "opencl:0": the draft
    model runs there, beside the target on all of the CPU's threads),
    draft_quant ("q4_0", the default: a CPU draft runs from a copy of its file with its heavier
    matrices requantized to Q4_0, made once, cheaper a token and lossless since the target
    verifies; "file": as the file is),
    kernels ("auto" or "numpy": the float32 reference path), kv_cache ("f16": keys and values
    stored as halves, as llama.cpp's default, half the memory and reads of "f32"; "auto", the
    default: f16, f32 with kernels="numpy")."""
    return Model(hub.resolve(model, pull_missing=pull), **options)
