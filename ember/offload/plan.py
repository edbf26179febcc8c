"""Which layers stay in memory and which stream from disk, under a byte budget.

Decoding reads the layers in the same order every token, a cycle that defeats LRU caching (the
page cache under memory pressure evicts exactly the layer needed next). So a fixed set stays
resident, the first layers (they then run as one call of the fused step), and the rest stream
through a ring of buffers, read a window ahead of the compute; the bytes streamed per token are
the weight bytes minus the resident ones.

What the budget must hold besides the layers (`Needs`): the process itself (Python, numba, the
compiled code: measured when the plan is made), the weights outside the layers (the output
matrix; norms), the KV cache at the full context, activations, and the ring's buffers. When
even that leaves no room for the ring, the output matrix streams too, in pieces no larger than a
layer (its output matrix is 17% of Qwen2.5-1.5B's file), and then the ring shrinks to one buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import BudgetError
from .stream import IN_FLIGHT

RING = 2  # streamed layers in memory at once: the one computed, the one being read
WORK_SHARE = 0.02  # of the budget, kept for the heap's growth during generation
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_budget(value: str | int | float) -> int:
    """Bytes from 600000000, "600MB", "0.6 GB", "512MiB"; BudgetError otherwise."""
    if isinstance(value, bool):
        raise BudgetError(f"memory_budget must be a size like '600MB' or a number of bytes, not {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise BudgetError(f"memory_budget must be a size like '600MB', '1.5GB' or '512MiB', not {value!r}")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n >= 1:
        raise BudgetError(f"memory_budget must be positive, got {value!r}")
    return int(n)


def fmt(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n < 1e10 else f"{n / 1e9:.1f} GB"


@dataclass(frozen=True)
class Needs:
    """The bytes a budget must hold besides the layers' weights."""

    process: int  # the process without any weights: interpreter, libraries, machine code
    fixed: int  # weights outside the layers (output matrix, norms)
    kv_cache: int  # at the full context
    work: int  # activations, logits, scratch

    @property
    def total(self) -> int:
        return self.process + self.fixed + self.kv_cache + self.work


@dataclass(frozen=True)
class Plan:
    budget: int
    needs: Needs
    layer_bytes: tuple[int, ...]
    resident: int  # layers 0..resident-1 stay in memory; the others stream
    output: int = 0  # bytes of the output matrix streamed after the last layer (0: it is resident)
    ring: int = RING  # buffers of streamed layers: 2, read one ahead; 1, read after the compute

    @property
    def streamed(self) -> range:
        return range(self.resident, len(self.layer_bytes))

    @property
    def streams(self) -> bool:
        return bool(self.streamed) or self.output > 0

    @property
    def ring_bytes(self) -> int:
        """One buffer of the ring: the largest streamed layer (the output matrix streams in
        pieces of the largest layer)."""
        if self.output:
            return max(self.layer_bytes)
        return max((self.layer_bytes[i] for i in self.streamed), default=0)

    @property
    def streamed_bytes(self) -> int:
        """Bytes read from disk per pass over the model (a token, or a batch of them)."""
        return sum(self.layer_bytes[i] for i in self.streamed) + self.output

    def describe(self) -> str:
        if not self.streams:
            return f"all {len(self.layer_bytes)} layers fit in the budget of {fmt(self.budget)}"
        out = " and the output matrix" if self.output else ""
        one = ", one at a time" if self.ring == 1 else ""
        return (
            f"{self.resident} of {len(self.layer_bytes)} layers in memory, {len(self.streamed)}{out} streamed "
            f"from disk{one} ({fmt(self.streamed_bytes)} a token) within the budget of {fmt(self.budget)}"
        )


def in_flight(layer_bytes, ring: int = RING) -> int:
    """Bytes streaming holds besides the resident layers: the ring's buffers and the page cache
    of the reads under way."""
    return ring * max(layer_bytes) + IN_FLIGHT


MARGIN = 0.10  # of the available memory, left free by a default budget


def default_budget(needed: int, available: int) -> int | None:
    """The budget a model loaded without one runs under: None (no budget) when the `needed`
    bytes fit in the `available` memory, else the available memory less a margin."""
    return None if needed <= available else int(available * (1 - MARGIN))


def make_plan(budget: int, layer_bytes: list[int], needs: Needs, n_ctx: int | None = None, output: int = 0) -> Plan:
    """The most layers that fit in `budget` resident, the rest streamed through a ring of RING
    buffers. When that ring does not fit beside the output matrix (`output`: its bytes, counted
    in `needs.fixed`, where it can stream; 0 where it cannot), that streams too (as many bytes
    read a token as it frees); when not even that fits, a ring of one buffer (the reads then
    wait for the compute: ~10% slower where the disk is the bound). BudgetError stating the
    minimum when nothing fits."""
    layer_bytes = tuple(int(b) for b in layer_bytes)
    free = budget - needs.total
    if free >= sum(layer_bytes):
        return Plan(budget, needs, layer_bytes, len(layer_bytes))
    for ring, streamed in dict.fromkeys(((RING, 0), (RING, output), (1, 0), (1, output))):
        room = free + streamed - in_flight(layer_bytes, ring)
        if room >= 0:
            resident = 0
            while resident < len(layer_bytes) and layer_bytes[resident] <= room:
                room -= layer_bytes[resident]
                resident += 1
            fixed = replace(needs, fixed=needs.fixed - streamed)
            return Plan(budget, fixed, layer_bytes, resident, output=streamed, ring=ring)
    needs = replace(needs, fixed=needs.fixed - output)  # the minimum: the output matrix streamed, one buffer
    ring = in_flight(layer_bytes, 1)
    ctx = f" at a context of {n_ctx} tokens (the KV cache takes {fmt(needs.kv_cache)}; -c sets it)" if n_ctx else ""
    raise BudgetError(
        f"a memory budget of {fmt(budget)} is too small: this model needs at least {fmt(needs.total + ring)}{ctx}: "
        f"{fmt(needs.process)} for the process, {fmt(needs.fixed)} of weights outside the layers, "
        f"{fmt(needs.kv_cache + needs.work)} of cache and activations, and {fmt(ring)} for a streamed "
        "layer and its reads"
    )
