"""The device protocol: what a session needs of the hardware that runs a model.

A device places a model's weights (`placement`: the form each matrix takes, given to the
`WeightStore`), supplies the model's math (`ops`, given to the `Transformer`), and turns token
ids (or the hidden state of a previous layer range) into logits over a KV cache it created:

    cache = device.new_cache(model, n_ctx)
    logits = device.forward(model, ids, cache, all_logits=True)       # all layers
    h = device.forward(model, ids, cache, layers=range(0, 12))       # a range: the hidden state
    logits = device.forward(model, h, cache, layers=range(12, 24))   # ... then the rest

A range that ends at the last layer commits the new positions to the cache. The cache keeps
`length`, `truncate(n)`, `reserve(n)` and `reset()` (speculation rolls back through them).
A device that can split its threads (`with_threads(n, model)`: the same device on n of them)
lets speculation run a draft model beside the target. Streaming and other
devices hook in at the layer ranges: weights for a range can be swapped in between calls, and a
range's attention can run elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ..runtime.kv_cache import KVCache
    from ..runtime.model import Transformer


@runtime_checkable
class Device(Protocol):
    name: str
    threads: int
    placement: object  # a WeightStore's placement: the form the device's matrices take
    ops: object  # a Transformer's ops: matmul and attention on the device

    def describe(self) -> str: ...  # what it is, in a few words (stats["device"])

    def new_cache(self, model: Transformer, n_ctx: int | None = None) -> KVCache: ...

    def forward(
        self, model: Transformer, ids, cache: KVCache, *, all_logits: bool = True, layers: range | None = None
    ) -> np.ndarray: ...

    def with_threads(self, threads: int, model: Transformer | None = None) -> Device: ...
