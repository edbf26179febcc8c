"""A mixture-of-experts model under a memory budget on the CPU: every weight but the routed
experts stays resident (memory-mapped from the pack cache), the experts live in an
`offload.experts.ExpertCache`, and the fused step runs in pieces that meet at each MoE layer's
routing (`FusedDecoder.step_rows(route_last=, ffn_first=)`): a piece ends with layer l's
attention and routing; the experts it chose are brought into the cache; the next piece runs
layer l's experts and layer l + 1's attention. Before it starts, layer l + 1's router applied to
layer l's hidden state (`offload.predict`) names the experts to read ahead while it computes.

The descriptors the step reads are a copy of the model's (`live`), whose rows of an expert in a
slot point into the slot; the others keep pointing into the mapped file, so they stay right
even if read (they are not: a piece reads only the experts its routing chose, all in slots).
Rows go through in chunks of `plan.rows` (their experts must fit the slots at once), every
chunk through a layer before the next layer. The output is bit for bit the resident model's.
"""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np

from ...errors import UnsupportedError
from ...home import uncache
from ...lut_kernels import fused, pack_cache
from ...offload import experts as xc
from ...offload.plan import Needs
from ...offload.predict import Predictor
from .placement import cache_name
from .step import _EXPERTS, M_GATE, MAX_ROWS, V_FFN_NORM, V_ROUTER, FusedDecoder
from .streaming import _drop_pages, needs_of

_RANGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> `_ranges`


def _ranges(dec: FusedDecoder) -> tuple[object, dict, dict]:
    """The pack cache file, {(layer, expert): [(file offset, nbytes), ...]} of the routed
    experts' arrays in it, and {(layer, expert): [(matrix name, class tag, {array: (dtype,
    shape)}), ...]}; UnsupportedError for experts of a type read in place from the model file.
    Read once per decoder: a budgeted load plans and builds twice each, reading the pack index."""
    got = _RANGES.get(dec)
    if got is None:
        got = _RANGES[dec] = _read_ranges(dec)
    return got


def _read_ranges(dec: FusedDecoder) -> tuple[object, dict, dict]:
    c = dec.model.cfg
    path, recs = pack_cache.records(dec.model.store.gguf.path)
    ranges, specs = {}, {}
    for il in range(c.n_layer):
        for e in range(c.n_expert):
            rs, sp = [], []
            for part in _EXPERTS:
                name = f"blk.{il}.{part}.weight"
                if cache_name(name, e) not in recs:
                    raise UnsupportedError(f"memory_budget: {name} is read in place from the file; not cached yet")
                tag, arrays = recs[cache_name(name, e)]
                rs += [(off, nb) for (_, _, off, nb) in arrays.values()]
                sp.append((name, tag, {an: (dt, shape) for an, (dt, shape, _, _) in arrays.items()}))
            ranges[il, e], specs[il, e] = rs, sp
    return path, ranges, specs


def plan_for(dec: FusedDecoder, budget: int, n_ctx: int) -> xc.ExpertPlan:
    """The expert plan of `dec.model` under `budget` bytes at a context of `n_ctx` tokens (the
    process's own share as `streaming.plan_for` counts it)."""
    c, st = dec.model.cfg, dec.model.store
    _, ranges, _ = _ranges(dec)
    expert_bytes = max(xc.layout(rs)[2] for rs in ranges.values())
    routed = sum(st.matrix(f"blk.{il}.{p}.weight", e).nbytes for (il, e) in ranges for p in _EXPERTS)
    weights = sum(m.nbytes for m in dec._mats)  # every layer's matrices and the output matrix
    needs = needs_of(dec, budget, n_ctx, fixed=weights - routed)
    return xc.plan(budget, needs, expert_bytes, c.n_layer, c.n_expert, c.n_expert_used, MAX_ROWS, n_ctx)


def minimal_plan(dec: FusedDecoder) -> xc.ExpertPlan:
    """The fewest slots, one row at a time: how a budgeted model's first token runs (loading
    the machine code) before its plan is made."""
    c = dec.model.cfg
    _, ranges, _ = _ranges(dec)
    expert_bytes = max(xc.layout(rs)[2] for rs in ranges.values())
    return xc.ExpertPlan(0, Needs(0, 0, 0, 0), expert_bytes, c.n_layer, c.n_expert, c.n_expert_used, c.n_expert_used, 1)


class ExpertModel:
    """The fused step of MoE model `dec.model` with its routed experts in an expert cache of
    `plan.slots` slots; `predict`: read ahead the experts a guess names; `policy`: the cache's
    eviction ("score" or "lru")."""

    def __init__(self, dec: FusedDecoder, plan: xc.ExpertPlan, predict: bool = True, policy: str = "score"):
        model = self.model = dec.model
        c = model.cfg
        self.dec, self.plan = dec, plan
        path, ranges, self.specs = _ranges(dec)
        self.cache = xc.ExpertCache(path, ranges, plan.slots, c.n_layer, c.n_expert, policy)
        self.live = dec.desc.copy()
        self._bound: dict[tuple[int, int], int] = {}  # (layer, expert) -> the slot its live rows point into
        self.predictor = None
        if predict:
            d, v, o = c.n_embd, dec.vecs, dec.voff
            routers = [
                v[o[il, V_ROUTER] : o[il, V_ROUTER] + c.n_expert * d].reshape(c.n_expert, d) for il in range(c.n_layer)
            ]
            norms = [v[o[il, V_FFN_NORM] : o[il, V_FFN_NORM] + d] for il in range(c.n_layer)]
            self.predictor = Predictor(routers, norms, c.rms_eps, c.n_expert_used)
        st = model.store
        _drop_pages(
            a
            for (il, e) in ranges
            for p in _EXPERTS
            for a in st.matrix(f"blk.{il}.{p}.weight", e).packed.arrays().values()
        )
        uncache(path)
        uncache(st.gguf.path)

    def _row(self, il: int, e: int) -> int:
        return int(self.dec.lay[il]) + M_GATE + 3 * e

    def _bind(self, il: int, e: int, slot: int) -> None:
        """Point the live descriptors of expert e of layer il into its slot."""
        view, placed = self.cache.view(slot), self.cache.placed((il, e))
        i, r = 0, self._row(il, e)
        for j, (name, tag, arrays) in enumerate(self.specs[il, e]):
            got = {}
            for an, (dt, shape) in arrays.items():
                at, nb = placed[i][2], placed[i][1]
                got[an] = view[at : at + nb].view(dt).reshape(shape)
                i += 1
            m = self.model.store.matrix(name, e)
            self.live[r + j] = fused.describe(dataclasses.replace(m, packed=pack_cache.build(tag, got)))
        self._bound[il, e] = slot

    def _unbind(self, il: int, e: int) -> None:
        r = self._row(il, e)
        self.live[r : r + 3] = self.dec.desc[r : r + 3]
        self._bound.pop((il, e), None)

    def _fetch(self, il: int, top: np.ndarray, wts: np.ndarray, rows: int) -> None:
        """The experts layer il chose for the chunk at `rows` (top [k, n_used]) into the cache and
        the live descriptors."""
        cache = self.cache
        if self.predictor is not None:
            self.predictor.check(il, top, rows)
        cache.observe(il, top, wts)
        cache.ensure(il, top)
        for key in cache.take_evicted():
            self._unbind(*key)
        for e in np.unique(top):
            s = cache.where((il, int(e)))
            if self._bound.get((il, int(e))) != s:
                self._bind(il, int(e), s)

    def _run(self, x, cache, all_logits, layers, first, last, offset):
        desc = self.live[self.dec.rows(layers)]
        return self.dec.step_rows(
            x, cache, all_logits, layers, offset=offset, desc=desc, ffn_first=first, route_last=last, commit=False
        )

    def forward(self, ids, cache, all_logits: bool) -> np.ndarray:
        """Layer by layer, each chunk of `plan.rows` rows through a layer before the next chunk
        (the chunks share a layer's popular experts while they are in the cache); each chunk's
        routing kept between its pieces."""
        dec, n = self.dec, self.model.cfg.n_layer
        rows = self.plan.rows
        cache.reserve(len(ids))
        hs = [ids[c0 : c0 + rows] for c0 in range(0, len(ids), rows)]
        offs = list(range(0, len(ids), rows))
        routes = [None] * len(hs)
        for il in range(-1, n):
            for c, x in enumerate(hs):
                k = len(x)
                if il < 0:  # layer 0's attention and routing
                    hs[c] = self._run(x, cache, all_logits, range(0, 1), False, True, offs[c])
                else:
                    for mine, kept in zip(dec.routing, routes[c]):
                        mine[:k] = kept
                    self._fetch(il, dec.routing[0][:k], dec.routing[1][:k], offs[c])
                    if self.predictor is not None and il + 1 < n:
                        self.cache.prefetch(il + 1, self.predictor.predict(il + 1, x, offs[c]))
                    hs[c] = self._run(x, cache, all_logits, range(il, min(il + 2, n)), True, il + 1 < n, offs[c])
                if il + 1 < n:
                    routes[c] = [a[:k].copy() for a in dec.routing]
        cache.commit(len(ids))
        return np.concatenate(hs) if all_logits and len(hs) > 1 else hs[-1]

    def stats_dict(self) -> dict:
        d = self.cache.stats.as_dict()
        if self.predictor is not None:
            d |= self.predictor.stats.as_dict()
        return d

    def close(self) -> None:
        self.cache.close()
