"""ExpertCache: a mixture-of-experts model's routed experts under a byte budget. A fixed number
of slots, shared by all layers, hold experts read from the pack cache file; the rest stay on
disk. An expert is read, when a token chooses it and it is not in a slot (a miss), in one
sequential read of its packed bytes (its matrices lie together in the file) into the slot of
the expert evicted for it, by the compute's thread and the background readers together; when a
prediction names it (`prefetch`), the same read runs ahead on a reader while the compute goes on.

Eviction takes, of the slots that are neither in use by the call under way nor being read:
`lru`, the expert used longest ago; `score` (HybriMoE's), the lowest running score of routing
weights (each routing of a layer decays its experts' scores and adds the weights of the ones
chosen: popular experts stay, whatever the order they come round in).

The plan (`plan`) gives the slots what the budget leaves after everything that must stay
resident: the process, every weight but the routed experts, the KV cache and activations, and
the page cache of the reads in flight.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import BudgetError, EmberError
from .plan import Needs, fmt
from .stream import ALIGN, IN_FLIGHT, SPAN_SLACK, FileReader

FREE, QUEUED, LOADING, READY = range(4)
DECAY = 0.9  # of a layer's scores, at each of its routings
READERS = 3  # background threads reading guessed experts and a layer's misses: the disk reads more
#   at once (docs/moe.md)
READS = 1 + READERS  # reads in flight at once: the readers' and the compute's own


@dataclass(frozen=True)
class ExpertPlan:
    budget: int
    needs: Needs  # `fixed`: every weight but the routed experts
    expert_bytes: int  # one slot: the largest expert's packed bytes
    n_layer: int
    n_expert: int  # routed experts per layer
    n_used: int
    slots: int  # == n_layer * n_expert: every expert resident
    rows: int  # rows a call takes: their experts fit in the slots at once

    @property
    def all_resident(self) -> bool:
        return self.slots >= self.n_layer * self.n_expert

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.expert_bytes

    def describe(self) -> str:
        total = self.n_layer * self.n_expert
        if self.all_resident:
            return f"all {total} experts fit in the budget of {fmt(self.budget)}"
        return (
            f"{self.slots} of {total} experts in memory ({fmt(self.cache_bytes)}), the others read from disk "
            f"as tokens choose them, within the budget of {fmt(self.budget)}"
        )


def plan(
    budget: int, needs: Needs, expert_bytes: int, n_layer: int, n_expert: int, n_used: int, max_rows: int, n_ctx=None
) -> ExpertPlan:
    """The slots `budget` leaves for experts; BudgetError stating the minimum when not even one
    token's experts fit."""
    total = n_layer * n_expert
    free = budget - needs.total
    if free >= total * expert_bytes:
        return ExpertPlan(budget, needs, expert_bytes, n_layer, n_expert, n_used, total, max_rows)
    slots = (free - READS * IN_FLIGHT) // expert_bytes
    if slots < n_used:
        minimum = needs.total + READS * IN_FLIGHT + n_used * expert_bytes
        ctx = f" at a context of {n_ctx} tokens (the KV cache takes {fmt(needs.kv_cache)}; -c sets it)" if n_ctx else ""
        raise BudgetError(
            f"a memory budget of {fmt(budget)} is too small: this model needs at least {fmt(minimum)}{ctx}: "
            f"{fmt(needs.process)} for the process, {fmt(needs.fixed)} of weights besides the routed experts, "
            f"{fmt(needs.kv_cache + needs.work)} of cache and activations, and "
            f"{fmt(n_used * expert_bytes + READS * IN_FLIGHT)} for the {n_used} experts a token uses and {READS} "
            "reads in flight"
        )
    return ExpertPlan(
        budget, needs, expert_bytes, n_layer, n_expert, n_used, int(slots), rows_for(slots, n_expert, n_used)
    )


def rows_for(slots: int, n_expert: int, n_used: int, max_rows: int = 16) -> int:
    """The rows one call can take with `slots` slots: all the experts they choose fit at once."""
    return max_rows if slots >= n_expert else max(1, min(max_rows, slots // n_used))


def layout(ranges) -> tuple[list, list, int]:
    """An expert's [(file offset, nbytes), ...] in a slot: ([(offset, nbytes, offset in the
    slot), ...], the reads [(offset, nbytes, offset in the slot), ...], the slot bytes it
    takes). One read when its arrays lie together in the file (`pack_cache` keeps them so)."""
    lo, hi = min(o for o, _ in ranges), max(o + n for o, n in ranges)
    if lo % ALIGN == 0 and hi - lo <= SPAN_SLACK * sum(n for _, n in ranges):
        placed, reads, size = [(o, n, o - lo) for o, n in ranges], [(lo, hi - lo, 0)], hi - lo
    else:
        at, placed = 0, []
        for o, n in ranges:
            at += -at % ALIGN
            placed.append((o, n, at))
            at += n
        reads, size = placed, at
    return placed, reads, size + -size % ALIGN


@dataclass
class CacheStats:
    hits: int = 0  # chosen experts found in a slot, kept or read (or being read) ahead
    misses: int = 0  # read when chosen (a guessed one whose read had not started too)
    prefetched: int = 0  # reads started on a prediction
    prefetch_used: int = 0  # of those, chosen before they were evicted or dropped
    bytes_read: int = 0
    read_s: float = 0.0
    stall_s: float = 0.0  # the compute's time waiting for experts
    evictions: int = 0

    def as_dict(self) -> dict:
        return {
            "expert_hits": self.hits,
            "expert_misses": self.misses,
            "expert_prefetched": self.prefetched,
            "expert_prefetch_used": self.prefetch_used,
            "expert_bytes": self.bytes_read,
            "expert_read_s": self.read_s,
            "expert_stall_s": self.stall_s,
        }


@dataclass
class _Slot:
    key: tuple[int, int] | None = None
    state: int = FREE
    used: int = 0  # tick of its last use
    prefetched: bool = False  # read on a prediction, not chosen yet
    error: BaseException | None = field(default=None, repr=False)


class ExpertCache:
    """`ranges`: {(layer, expert): [(file offset, nbytes), ...]} of the routed experts' packed
    arrays in the file at `path`; `slots` of them in memory. `ensure(layer, experts)` returns
    once all of them are in slots (pinned until the next `ensure`); `where(key)` their slot,
    `view(slot)` its bytes, `placed(key)` each range's offset in them."""

    def __init__(self, path, ranges: dict, slots: int, n_layer: int, n_expert: int, policy: str = "score"):
        if policy not in ("score", "lru"):
            raise ValueError(f"eviction policy {policy!r}: 'score' or 'lru'")
        self.policy = policy
        self.file = FileReader(path, "its experts", scattered=True)
        self._placed, self._reads, size = {}, {}, 0
        for key, rs in ranges.items():
            self._placed[key], self._reads[key], n = layout(rs)
            size = max(size, n)
        self.slot_bytes = size
        raw = np.empty(slots * self.slot_bytes + ALIGN, np.uint8)
        self.buf = raw[-raw.ctypes.data % ALIGN :][: slots * self.slot_bytes]
        self.slots = [_Slot() for _ in range(slots)]
        self._where: dict[tuple[int, int], int] = {}
        self.score = np.zeros((n_layer, n_expert), np.float64)
        self.stats = CacheStats()
        self.evicted: list[tuple[int, int]] = []  # since the owner last looked (`take_evicted`)
        self._tick = 0
        self._pinned: set[int] = set()
        self._lock = threading.Condition()
        self._queue: collections.deque = collections.deque()  # slots QUEUED for the reader
        self._closed = False
        self._threads = [
            threading.Thread(target=self._read_loop, daemon=True, name="ember-experts") for _ in range(READERS)
        ]
        for t in self._threads:
            t.start()

    # ---- what the owner reads ---------------------------------------------------------------
    def where(self, key) -> int | None:
        s = self._where.get(key)
        return s if s is not None and self.slots[s].state == READY else None

    def view(self, slot: int) -> np.ndarray:
        return self.buf[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def placed(self, key) -> list[tuple[int, int, int]]:
        return self._placed[key]

    def take_evicted(self) -> list[tuple[int, int]]:
        with self._lock:
            out, self.evicted = self.evicted, []
        return out

    # ---- the compute's side ------------------------------------------------------------------
    def observe(self, layer: int, experts, weights) -> None:
        """A routing of `layer`: its experts' scores decay, the chosen ones gain their weights."""
        self.score[layer] *= DECAY
        np.add.at(self.score[layer], np.asarray(experts).reshape(-1), np.asarray(weights, np.float64).reshape(-1))

    def ensure(self, layer: int, experts) -> None:
        """Have every expert of `layer` in `experts` in a slot; they stay until the next call.
        The missing ones (and the guessed ones whose reads have not started) go to the front of
        the readers' queue, and this thread reads them too: several reads at once keep the disk
        busier than one after another. Drops the guesses of `layer` that were not chosen."""
        need = sorted({int(e) for e in np.asarray(experts).reshape(-1)})
        t0 = time.perf_counter()
        with self._lock:
            self._tick += 1
            self._pinned = {self._where[layer, e] for e in need if (layer, e) in self._where}
            ours = []
            for e in need:
                key = (layer, e)
                s = self._where.get(key)
                if s is None:
                    s = self._allocate(key, demand=True)
                    self._queue.appendleft(s)
                    self.stats.misses += 1
                else:
                    slot = self.slots[s]
                    if slot.prefetched:
                        self.stats.prefetch_used += 1
                        slot.prefetched = False
                    if slot.state == QUEUED:  # guessed, not started: a miss all the same
                        self._queue.remove(s)
                        self._queue.appendleft(s)
                        self.stats.misses += 1
                    else:
                        self.stats.hits += 1
                self.slots[s].used = self._tick
                self._pinned.add(s)
                ours.append(s)
            for s in [s for s in self._queue if s not in self._pinned and self.slots[s].key[0] == layer]:
                self._queue.remove(s)  # guessed for this layer, not chosen: never read
                self._free(s)
            self._lock.notify_all()
            while True:
                s = next((s for s in self._queue if s in self._pinned), None)
                if s is None:
                    if all(self.slots[s].state not in (QUEUED, LOADING) for s in ours):
                        break
                    self._lock.wait()  # a reader has the last of them
                    continue
                self._queue.remove(s)
                self.slots[s].state = LOADING
                self._lock.release()
                try:
                    self._read(s)
                finally:
                    self._lock.acquire()
                self._finish(s)
            failed = [s for s in ours if self.slots[s].error is not None]
            err = self.slots[failed[0]].error if failed else None
            for s in failed:
                self._free(s)
            self.stats.stall_s += time.perf_counter() - t0
        if err is not None:
            if isinstance(err, KeyboardInterrupt):
                raise err
            if isinstance(err, EmberError):
                raise EmberError(str(err)) from None
            raise EmberError(f"reading experts from {self.file.path} failed: {err}") from err

    def prefetch(self, layer: int, experts) -> None:
        """Start reading the experts of `layer` in `experts` that are not in a slot, on the
        background thread, into slots free or evicted for them; those that find no slot to
        take (all in use or being read) are skipped."""
        with self._lock:
            for e in experts:
                key = (layer, int(e))
                if key in self._where:
                    continue
                s = self._allocate(key, demand=False)
                if s is None:
                    break
                self.slots[s].prefetched = True
                self.stats.prefetched += 1
                self._queue.append(s)
            self._lock.notify_all()

    # ---- slots ---------------------------------------------------------------------------------
    def _allocate(self, key, demand: bool) -> int | None:
        """A slot for `key` (lock held), QUEUED for a read the caller puts in the queue: a free
        one, else an evicted one; a demand waits for a read under way to end when every other
        slot is pinned or being read."""
        while True:
            best, rank = None, None
            for s, slot in enumerate(self.slots):
                if slot.state == FREE:
                    best = s
                    break
                if slot.state != READY or s in self._pinned:
                    continue
                r = (slot.used,) if self.policy == "lru" else (self.score[slot.key], slot.used)
                if rank is None or r < rank:
                    best, rank = s, r
            if best is not None:
                break
            if not demand:
                return None
            if not self._queue and not any(sl.state == LOADING for sl in self.slots):
                raise EmberError(f"the expert cache's {len(self.slots)} slots are all in use by one call")
            self._lock.wait()
        slot = self.slots[best]
        if slot.key is not None:
            self._where.pop(slot.key, None)
            self.evicted.append(slot.key)
            self.stats.evictions += 1
        slot.key, slot.state, slot.prefetched, slot.error = key, QUEUED, False, None
        self._where[key] = best
        return best

    def _free(self, s: int) -> None:
        slot = self.slots[s]
        if slot.key is not None and self._where.get(slot.key) == s:
            del self._where[slot.key]
        slot.key, slot.state, slot.prefetched = None, FREE, False

    def _read(self, s: int) -> None:
        slot = self.slots[s]
        reads = self._reads[slot.key]
        try:
            dt = self.file.read(reads, self.view(s), f"expert {slot.key[1]} of layer {slot.key[0]}")
        except BaseException as e:  # raised by `ensure`, in the compute's thread
            slot.error = e
            return
        with self._lock:
            self.stats.read_s += dt
            self.stats.bytes_read += sum(n for _, n, _ in reads)

    def _read_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                s = self._queue.popleft()
                self.slots[s].state = LOADING
            self._read(s)
            with self._lock:
                self._finish(s)

    def _finish(self, s: int) -> None:
        """A read is over (lock held): the slot is ready, or its error waits for `ensure` to
        raise it (a guess no call chose yet just gives its slot back)."""
        slot = self.slots[s]
        if slot.error is not None and slot.prefetched:
            self._free(s)
        else:
            slot.state = READY
        self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for t in self._threads:
            t.join(5)
        self.file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
