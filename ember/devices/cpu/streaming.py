"""A model under a memory budget on the CPU: the first `plan.resident` layers run from the
memory-mapped pack cache as one fused call, the others are read from the same file by an
`offload.stream.LayerStreamer` and run one layer at a time over its buffers (`step_rows(mats=)`).

A batch (a prompt) goes through layer by layer, every chunk of MAX_ROWS rows of a layer before
the next layer, so each streamed layer is read once per batch, not once per token.

Under the smallest budgets the output matrix (a K-quant's) streams too, after the last layer:
that layer's call stops at the hidden state (`step_rows(head=False)`), and the logits are
computed a piece of the matrix's rows at a time, each piece a ring buffer's worth, by the same
kernels (the logits bit for bit the resident model's).
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
from contextlib import contextmanager

import numpy as np

from ...errors import UnsupportedError
from ...home import uncache
from ...lut_kernels import pack_cache
from ...lut_kernels.kquant import PackedKQ, kq_matmul
from ...offload.memory import process_bytes
from ...offload.plan import WORK_SHARE, Needs, Plan, make_plan
from ...offload.stream import LayerStreamer
from .step import MAX_ROWS, FusedDecoder

WORK_MARGIN = 32 << 20  # numpy temporaries, the sampler's arrays, the tokenizer's pieces, and WORK_SHARE
#   of the budget: Qwen2.5-1.5B's process grew by ~38 MB besides the ring and the KV cache over a
#   457-token prompt and 24 tokens, once its tokenizer (~70 MB) was built before the plan
_PAGE = mmap.PAGESIZE


def _mapped(a: np.ndarray) -> bool:
    """Whether `a` is a view of a memory-mapped file (not of heap memory)."""
    while isinstance(a, np.ndarray):
        a = a.base
    if isinstance(a, memoryview):
        a = a.obj
    return isinstance(a, mmap.mmap)


def _drop_pages(arrays) -> None:
    """Unmap the resident pages of file-mapped arrays (they fault back in from the file if
    touched again): the streamed layers' copies that loading the pack cache read."""
    libc = ctypes.CDLL(None, use_errno=True)
    for a in arrays:
        if not _mapped(a):
            continue
        lo = -(-a.ctypes.data // _PAGE) * _PAGE
        hi = (a.ctypes.data + a.nbytes) // _PAGE * _PAGE
        if hi > lo:
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


class StreamedModel:
    """The fused step of `dec.model` with the layers past `plan.resident` streamed."""

    def __init__(self, dec: FusedDecoder, plan: Plan):
        model = dec.model
        self.dec, self.plan, self.model = dec, plan, model
        path, recs = pack_cache.records(model.store.gguf.path)
        self.records = recs
        layers = {}
        for il in plan.streamed:
            names = [n for n in dec.matrix_names(range(il, il + 1)) if n != model.output_name]
            missing = [n for n in names if n not in recs]
            if missing:
                raise UnsupportedError(f"memory_budget: {missing[0]} is read in place from the file; not streamed yet")
            layers[il] = [(off, nb) for n in names for (_, _, off, nb) in recs[n][1].values()]
        self.names = {il: dec.matrix_names(range(il, il + 1)) for il in plan.streamed}
        # the output matrix's pieces, streamed after the last layer: name -> (first row, rows, arrays)
        self.pieces = _output_pieces(dec, recs, plan.ring_bytes) if plan.output else {}
        self.qtype = model.store.matrix(model.output_name).packed.qtype if plan.output else None
        for key, (_, _, arrays) in self.pieces.items():
            layers[key] = [(off, nb) for (_, _, off, nb) in arrays.values()]
        self.streamer = LayerStreamer(path, layers, ring=plan.ring) if layers else None
        keep = {n for n in dec.matrix_names(range(0, plan.resident))}
        if not plan.output:
            keep.add(model.output_name)
        unused = [model.store.matrix(n) for n in recs if n not in keep]  # streamed, or never read by the step
        _drop_pages(a for m in unused for a in m.packed.arrays().values())
        uncache(path)
        uncache(model.store.gguf.path)

    def _mats(self, il: int, buf: np.ndarray, placed: list[tuple[int, int, int]]) -> list:
        out, i = [], 0
        for name in self.names[il]:
            m = self.model.store.matrix(name)
            if name == self.model.output_name:  # resident: the last layer's call computes the logits
                out.append(m)
                continue
            tag, specs = self.records[name]
            arrays = {}
            for an, (dt, shape, _, nb) in specs.items():
                at = placed[i][2]
                arrays[an] = buf[at : at + nb].view(dt).reshape(shape)
                i += 1
            out.append(dataclasses.replace(m, packed=pack_cache.build(tag, arrays)))
        return out

    @contextmanager
    def _layer(self, il: int | None):
        """The matrices of streamed layer `il` over its buffer while the block runs (None: the
        resident prefix, the placed matrices)."""
        if il is None:
            yield None
            return
        buf, placed = self.streamer.acquire(il)
        try:
            yield self._mats(il, buf, placed)
        finally:
            self.streamer.release(il)

    def forward(self, ids, cache, all_logits: bool) -> np.ndarray:
        dec, plan = self.dec, self.plan
        chunks = [ids[i : i + MAX_ROWS] for i in range(0, len(ids), MAX_ROWS)]
        cache.reserve(len(ids))  # once, not as the chunks of the first layers go
        hs: list = list(chunks)
        segments = [(range(0, plan.resident), None)] if plan.resident else []
        segments += [(range(il, il + 1), il) for il in plan.streamed]
        head = not self.pieces  # the last layer's call computes the logits
        for layers, il in segments:
            with self._layer(il) as mats:
                off = 0
                for c, part in enumerate(chunks):
                    hs[c] = dec.step_rows(
                        hs[c], cache, all_logits, layers=layers, mats=mats, offset=off, commit=False, head=head
                    )
                    off += len(part)
        if not head:
            hs = self._logits(hs if all_logits else [hs[-1][-1:]])
        cache.commit(len(ids))
        return np.concatenate(hs) if all_logits and len(hs) > 1 else hs[-1]

    def _logits(self, hs: list) -> list:
        """The logits of the hidden state rows `hs` (a list of [k, n_embd]), the output matrix
        read piece by piece."""
        dec = self.dec
        hn = [dec.final_norm(h) for h in hs]
        out = [np.empty((h.shape[0], self.model.cfg.n_vocab), np.float32) for h in hs]
        for key, (r0, rows, arrays) in self.pieces.items():
            buf, placed = self.streamer.acquire(key)
            try:
                parts = {
                    an: buf[at : at + nb].view(dt).reshape(shape)
                    for (an, (dt, shape, _, nb)), (_, _, at) in zip(arrays.items(), placed)
                }
                w = PackedKQ.from_arrays(parts | {"meta": np.array([rows, dec.model.cfg.n_embd, self.qtype], np.int64)})
                for h, o in zip(hn, out):
                    o[:, r0 : r0 + rows] = kq_matmul(h, w, threads=dec.threads)
            finally:
                self.streamer.release(key)
        return out

    def stats_dict(self) -> dict:
        """The streaming figures so far (a generation's stats carry their differences)."""
        return self.streamer.stats.as_dict() if self.streamer is not None else {}

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()


def streamable_output(dec: FusedDecoder) -> int:
    """The bytes of the output matrix when it can stream (a K-quant's rows in the pack cache:
    pieces of rows are ranges of its arrays), else 0."""
    model = dec.model
    m = model.store.matrix(model.output_name)
    if not isinstance(m.packed, PackedKQ) or model.output_name not in pack_cache.records(model.store.gguf.path)[1]:
        return 0
    return m.nbytes


def _output_pieces(dec: FusedDecoder, recs: dict, piece_bytes: int) -> dict:
    """{streamer key (the piece's name): (first row, rows, {array: (dtype, shape, file offset,
    nbytes)})} of the output matrix's pieces of at most `piece_bytes` (whole blocks of 64 rows)."""
    model = dec.model
    n_out = model.store.matrix(model.output_name).n_out
    arrays = {an: spec for an, spec in recs[model.output_name][1].items() if an != "meta"}
    row_bytes = sum(nb // shape[0] for (_, shape, _, nb) in arrays.values())
    step = max(64, piece_bytes // row_bytes // 64 * 64)
    pieces = {}
    for r0 in range(0, n_out, step):
        rows = min(step, n_out - r0)
        part = {}
        for an, (dt, shape, off, nb) in arrays.items():
            rb = nb // shape[0]
            end = shape[0] if r0 + rows == n_out else r0 + rows  # Q4_K/Q5_K: a pair's padding row
            part[an] = (dt, (end - r0, *shape[1:]), off + r0 * rb, (end - r0) * rb)
        pieces[f"the output matrix's rows {r0}..{r0 + rows - 1}"] = (r0, rows, part)
    return pieces


def layer_bytes(dec: FusedDecoder) -> list[int]:
    """Bytes of each layer's matrices (the last one's without the output matrix)."""
    model = dec.model
    st = model.store
    sizes = [sum(st.matrix(n).nbytes for n in dec.matrix_names(range(il, il + 1))) for il in range(model.cfg.n_layer)]
    sizes[-1] -= st.matrix(model.output_name).nbytes
    return sizes


def streaming_everything(dec: FusedDecoder) -> Plan:
    """A plan that streams every layer (and the output matrix where it can), whatever the
    budget: how a budgeted model's first token runs (loading the machine code) without the
    weights passing through memory."""
    sizes = tuple(layer_bytes(dec))
    return Plan(budget=0, needs=Needs(0, 0, 0, 0), layer_bytes=sizes, resident=0, output=streamable_output(dec))


def plan_for(dec: FusedDecoder, budget: int, n_ctx: int) -> Plan:
    """The plan of `dec.model` under `budget` bytes at a context of `n_ctx` tokens; the process's
    own share is its anonymous memory now (the pack cache's pages are counted as weights) and
    the model file's header (metadata, the vocabulary: read in place)."""
    needs = needs_of(dec, budget, n_ctx, fixed=dec.model.store.matrix(dec.model.output_name).nbytes)
    return make_plan(budget, layer_bytes(dec), needs, n_ctx, output=streamable_output(dec))


def needs_of(dec: FusedDecoder, budget: int, n_ctx: int, fixed: int) -> Needs:
    """What `budget` must hold besides the streamed weights: the process (its anonymous memory
    now and the model file's header), `fixed` bytes of resident weights and the vectors, the KV
    cache at `n_ctx`, the step's buffers and a margin."""
    model = dec.model
    st = model.store
    return Needs(
        process=process_bytes([st.gguf.path, pack_cache.cache_path(st.gguf.path)]) + st.gguf.data_offset,
        fixed=fixed + dec.vecs.nbytes,
        kv_cache=model.cfg.kv_cache_bytes(n_ctx, model.kv_type),
        work=sum(b.nbytes for b in dec.bufs)
        + dec.parts_bytes(n_ctx)
        + MAX_ROWS * dec.logits_width * 4
        + WORK_MARGIN
        + int(budget * WORK_SHARE),
    )
