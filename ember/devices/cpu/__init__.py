"""The CPU device: where the weights live (`placement`: kernel layouts, the pack cache), ember's
quantized kernels (`lut_kernels`), the fused step over the whole model or a layer range (`step`),
the batch attention (`attention`), and the policy of which runs when.

New tokens run the fused step (`FusedDecoder.step_rows`), MAX_ROWS at a time: all of them when
every matrix is a K-quant (their kernels read each weight once for the 16 rows), up to
N_FUSED_STEPS otherwise (the one-row kernels re-read each weight group from L2 per row; past
that the batch forward's dequantized BLAS wins for the q8-heavy models), for the whole model or
a range of its layers. Other inputs run the batch forward (`Transformer.forward` with
`CpuOps`), BLAS on one thread: `ops.matmul` splits a batch between ember's threads itself.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import ThreadpoolController

from ...errors import UnsupportedError
from ...lut_kernels.ops import matmul
from ...runtime.threads import default_threads
from .allocator import keep_large_blocks
from .attention import attention_batch
from .placement import CpuPlacement
from .step import MAX_ROWS, FusedDecoder, NotFusable

# Up to this many new tokens go through the fused step (in steps of MAX_ROWS) when some matrix
# has only a one-row kernel; the timings behind it are in docs/kernels.md.
N_FUSED_STEPS = 48
_BLAS = None  # one ThreadpoolController: creating one scans the loaded libraries (~2 ms)


def blas_threads(n: int):
    """A context in which BLAS runs on n threads."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=n, user_api="blas")


class CpuOps:
    """A Transformer's math on the CPU: any weight through `lut_kernels.ops.matmul` (kernels on
    the packed layouts, tiles + BLAS otherwise), attention over the cache's whole arrays
    (C-contiguous; the causal mask bounds the keys)."""

    def matmul(self, x: np.ndarray, w, threads: int = 1) -> np.ndarray:
        return matmul(x, w, threads)

    def attention(self, q, cache, il: int, pos: np.ndarray, scale: float, window: int, threads: int = 1) -> np.ndarray:
        return attention_batch(q, cache.k[il], cache.v[il], pos, scale, window, threads)


OPS = CpuOps()


class CpuDevice:
    """`threads` CPU threads (default: EMBER_THREADS or the physical cores); `fused=False` runs
    every token through the batch forward (the tests' op-by-op baseline)."""

    name = "cpu"
    ops = OPS

    def __init__(self, threads: int | None = None, fused: bool = True):
        self.threads = threads or default_threads()
        self.fused = fused
        self.placement = CpuPlacement()
        self._decoders: dict[int, tuple[object, FusedDecoder | None]] = {}
        self._streamed: dict[int, tuple[object, object]] = {}  # id(model) -> (model, StreamedModel)
        self._siblings: dict[int, CpuDevice] = {}  # threads -> this device on that many (shared)

    def describe(self) -> str:
        from ...lut_kernels.codegen import select_kernel

        return f"cpu ({self.threads} threads, {select_kernel()} kernels)"

    def decoder(self, model) -> FusedDecoder | None:
        """The fused step for `model` on this device's threads, or None where the model or the
        host has none."""
        got = self._decoders.get(id(model))
        if got is None or got[0] is not model:
            dec = None
            if self.fused:
                try:
                    dec = FusedDecoder(model, self.threads)
                except NotFusable:
                    pass
            got = self._decoders[id(model)] = (model, dec)
        return got[1]

    def with_threads(self, threads: int, model=None) -> CpuDevice:
        """This device on `threads` of its threads (the same placement; for running two models
        side by side). UnsupportedError when `model` streams under a memory budget here."""
        if threads == self.threads:
            return self
        if model is not None and self.streamed(model) is not None:
            raise UnsupportedError("a model under a memory budget runs on all of its threads")
        self._siblings.setdefault(self.threads, self)
        sibling = self._siblings.get(threads)
        if sibling is None:
            sibling = self._siblings[threads] = CpuDevice(threads, self.fused)
            sibling.placement, sibling._siblings = self.placement, self._siblings
        return sibling

    def set_budget(self, model, budget: int, n_ctx: int, predict: bool = True, policy: str = "score"):
        """Run `model` within `budget` bytes at contexts up to `n_ctx`: the layers that do not
        fit stream from disk (`streaming`); an MoE model's routed experts that do not fit are
        read as tokens choose them (`experts`; `predict`: and ahead, as a guess names them;
        `policy`: the expert cache's eviction, "score" or "lru").
        Returns the plan; BudgetError when even streaming does not fit, UnsupportedError for a
        model without the fused step."""
        from . import experts, streaming

        dec = self._budget_decoder(model)
        self._drop_streamed(model)  # its buffers are not the process's own
        plan = (experts if model.cfg.is_moe else streaming).plan_for(dec, budget, n_ctx)
        if model.cfg.is_moe and not plan.all_resident:
            self._streamed[id(model)] = (model, experts.ExpertModel(dec, plan, predict, policy))
        elif not model.cfg.is_moe and plan.streams:
            self._streamed[id(model)] = (model, streaming.StreamedModel(dec, plan))
        return plan

    def cache_experts(self, model, slots: int, predict: bool = True, policy: str = "score") -> None:
        """Keep MoE `model`'s routed experts in an expert cache of `slots` slots, whatever the
        memory (a model too small for a budget to leave some experts out: tests, a quick bench)."""
        import dataclasses

        from . import experts

        dec = self._budget_decoder(model)
        plan = experts.minimal_plan(dec)
        plan = dataclasses.replace(plan, slots=slots, rows=experts.xc.rows_for(slots, plan.n_expert, plan.n_used))
        self._drop_streamed(model)
        self._streamed[id(model)] = (model, experts.ExpertModel(dec, plan, predict, policy))

    def stream_everything(self, model) -> None:
        """Stream every layer (every expert) of `model` until `set_budget` plans it: its first
        token (loading the machine code) then reads the weights through the streamer's ring or
        the fewest expert slots, dropped from the page cache as they go, not through memory."""
        from . import experts, streaming

        dec = self._budget_decoder(model)
        self._drop_streamed(model)
        if model.cfg.is_moe:
            sm = experts.ExpertModel(dec, experts.minimal_plan(dec), predict=False)
        else:
            sm = streaming.StreamedModel(dec, streaming.streaming_everything(dec))
        self._streamed[id(model)] = (model, sm)

    def _drop_streamed(self, model) -> None:
        """Close `model`'s streamed form, if any, and give its buffers back to the OS."""
        import gc

        from ...offload.memory import trim_heap

        old = self._streamed.pop(id(model), None)
        if old is not None:
            old[1].close()
            del old
            gc.collect()
            trim_heap()

    def _budget_decoder(self, model):
        dec = self.decoder(model)
        if dec is None:
            raise UnsupportedError(
                "memory_budget needs the fused CPU step, which this model or host lacks (no native kernels)"
            )
        return dec

    def streamed(self, model):
        """The model's StreamedModel (ExpertModel) under a budget, or None."""
        got = self._streamed.get(id(model))
        return got[1] if got is not None and got[0] is model else None

    def new_cache(self, model, n_ctx: int | None = None):
        return model.new_cache(n_ctx)

    def forward(self, model, ids, cache, *, all_logits: bool = True, layers: range | None = None) -> np.ndarray:
        layers = model.check_layers(layers)
        streamed = self.streamed(model)
        if streamed is not None:
            if layers != range(model.cfg.n_layer):
                raise ValueError("a model under a memory budget runs whole, not by layer ranges")
            return streamed.forward(ids, cache, all_logits)
        dec = self.decoder(model)
        if dec is not None and (dec.multi_row or len(ids) <= N_FUSED_STEPS):
            parts = [
                dec.step_rows(ids[i : i + MAX_ROWS], cache, all_logits, layers) for i in range(0, len(ids), MAX_ROWS)
            ]
            if layers.stop < model.cfg.n_layer:  # hidden states
                return np.concatenate(parts) if len(parts) > 1 else parts[0]
            return np.concatenate(parts) if all_logits and len(parts) > 1 else parts[-1]
        keep_large_blocks()  # from the first batch on (decode alone allocates little)
        with blas_threads(1):  # ops.matmul splits a batch between ember's threads
            return model.forward(ids, cache, all_logits=all_logits, threads=self.threads, layers=layers)
