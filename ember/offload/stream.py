"""LayerStreamer: the streamed layers' bytes, read from disk into a ring of buffers by a background
thread, a window ahead of the compute.

The compute uses the streamed layers in the same order every pass (a token, or a batch of
tokens), so the reader needs no prediction beyond that cycle: while layer i is computed, layer
i + 1 (and, past the last, the first again, for the next token) is read. Each layer is one
buffer, read from one span (its arrays lie together in the file) or array by array, in pieces of
PIECE bytes; the pages of each piece are dropped from the page cache as soon as it is read
(`posix_fadvise(DONTNEED)`), so the budget holds (a stream keeps at most IN_FLIGHT bytes of
page cache) and the next pass really reads the disk again, as on a machine with that little memory.

The file is checked at every read: a short read, a changed size or modification time, or a file
replaced under its name is an `EmberError`, never garbage.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import EmberError
from ..home import FOLIO, uncache_range

ALIGN = 64
SPAN_SLACK = 1.05  # a layer's ranges are read in one piece when the gaps add at most this much
PIECE = 4 << 20  # bytes a read asks for before the pages it read leave the page cache
IN_FLIGHT = PIECE + FOLIO + (10 << 20)  # page cache a stream holds at most: a piece, the folio
#   before it, and the kernel's readahead past it (8 MB on the virtio disks measured: 12.6-16.8 MB
#   peaks with 4 MB pieces, 41.9 MB with a 32 MB layer read in one piece, at the same 2.1-2.6 GB/s)


@dataclass
class StreamStats:
    bytes_read: int = 0
    read_s: float = 0.0  # the reader's time in preadv
    stall_s: float = 0.0  # the compute's time waiting for a layer
    layers_read: int = 0

    def as_dict(self) -> dict:
        """The figures a generation's stats carry (their differences over the call)."""
        return {"stream_bytes": self.bytes_read, "stream_read_s": self.read_s, "stream_stall_s": self.stall_s}


class FileReader:
    """Reads ranges of a model file into buffers, checking the file at every read: a short
    read, a changed size or modification time, or a file replaced under its name is an
    `EmberError`, never garbage. Each piece's pages leave the page cache once read."""

    def __init__(self, path, what: str, scattered: bool = False):
        self.path, self.what = os.fspath(path), what  # what: "its layers", "its experts"
        self.fd = os.open(self.path, os.O_RDONLY)
        if scattered and hasattr(os, "posix_fadvise"):  # reads here and there: no readahead past
            #   each (its pages stayed in the page cache, 2.3 GB of them after 16 tokens of a 5 GB MoE)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        st = os.fstat(self.fd)
        self.ident = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)

    def check(self) -> None:
        st = os.fstat(self.fd)
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            raise EmberError(f"{self.path} vanished while {self.what} were being streamed") from None
        if (named.st_ino, named.st_dev) != self.ident[:2]:
            raise EmberError(f"{self.path} was replaced while {self.what} were being streamed; load the model again")
        if (st.st_size, st.st_mtime_ns) != self.ident[2:]:
            raise EmberError(
                f"{self.path} changed while {self.what} were being streamed (size {self.ident[2]} -> "
                f"{st.st_size} bytes); load the model again"
            )

    def read(self, reads, buf: np.ndarray, what: str) -> float:
        """Reads [(file offset, nbytes, offset in buf), ...] (of `what`, for the messages) in
        pieces that end at multiples of PIECE in the file; returns the seconds it took."""
        self.check()
        t0 = time.perf_counter()
        view = memoryview(buf)
        for off, n, at in reads:
            pos = off
            while pos < off + n:
                start, end = pos, min(off + n, (pos // PIECE + 1) * PIECE)
                while pos < end:
                    got = os.preadv(self.fd, [view[at + pos - off : at + end - off]], pos)
                    if got <= 0:
                        raise EmberError(
                            f"{self.path} is shorter than expected: reading {n} bytes at {off} for {what} "
                            f"got {pos - off}; was it truncated? Load the model again"
                        )
                    pos += got
                uncache_range(self.fd, start, end)  # so the budget holds and the next pass reads the disk
        self.check()  # changed during the read: what was read may be a mix
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _named(layer) -> str:
    """A streamed unit in messages: "layer 3", or its own name (a piece of the output matrix)."""
    return layer if isinstance(layer, str) else f"layer {layer}"


class LayerStreamer:
    """`layers`: {layer (a number, or a name): [(file offset, nbytes), ...]} in the order the
    compute uses them.
    `acquire(layer)` waits for that layer's buffer and returns it with each range's offset in
    it; `release(layer)` gives the buffer back for the next read."""

    def __init__(self, path, layers: dict[int, list[tuple[int, int]]], ring: int = 2):
        self.path = os.fspath(path)
        self.order = list(layers)
        self.ranges = {}
        size = 0
        self.spans = {}  # layer -> (file offset, bytes): one read, when its ranges lie close together
        for layer, ranges in layers.items():
            lo = min(off for off, _ in ranges)
            hi = max(off + n for off, n in ranges)
            if lo % ALIGN == 0 and hi - lo <= SPAN_SLACK * sum(n for _, n in ranges):
                placed, at = [(off, n, off - lo) for off, n in ranges], hi - lo
                self.spans[layer] = (lo, hi - lo)
            else:
                placed, at = [], 0
                for off, n in ranges:
                    at += -at % ALIGN
                    placed.append((off, n, at))
                    at += n
            self.ranges[layer] = placed
            size = max(size, at)
        self.ring = max(1, min(ring, len(self.order)))
        self.buffers = [np.empty(size + ALIGN, np.uint8) for _ in range(self.ring)]
        self.buffers = [b[-b.ctypes.data % ALIGN :][:size] for b in self.buffers]
        self.file = FileReader(self.path, "its layers")
        self.stats = StreamStats()
        self._empty: queue.Queue = queue.Queue()
        self._filled: queue.Queue = queue.Queue()
        self._held: dict[int, int] = {}  # layer -> slot, while the compute uses it
        for slot in range(self.ring):
            self._empty.put(slot)
        self._thread = threading.Thread(target=self._read_loop, daemon=True, name="ember-stream")
        self._thread.start()

    # ---- the reader thread ---------------------------------------------------------------
    def _read_loop(self) -> None:
        i = 0
        while True:
            slot = self._empty.get()
            if slot is None:
                return
            layer = self.order[i % len(self.order)]
            i += 1
            try:
                self._read(layer, self.buffers[slot])
                self._filled.put((layer, slot, None))
            except BaseException as e:  # handed to the compute, which raises it
                self._filled.put((layer, slot, e))

    def _read(self, layer: int, buf: np.ndarray) -> None:
        span = self.spans.get(layer)
        reads = [(span[0], span[1], 0)] if span else self.ranges[layer]
        self.stats.read_s += self.file.read(reads, buf, _named(layer))
        self.stats.bytes_read += sum(n for _, n, _ in reads)
        self.stats.layers_read += 1

    # ---- the compute's side ----------------------------------------------------------------
    def acquire(self, layer: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """(buffer, [(file offset, nbytes, offset in buffer), ...]) of `layer`, once read. Layers
        read for a pass that was cut short are skipped until `layer` comes round."""
        if layer in self._held:
            raise ValueError(f"{_named(layer)} is already held")
        t0 = time.perf_counter()
        try:
            while True:
                got, slot, err = self._filled.get()
                if got == layer:
                    break
                self._empty.put(slot)  # read for an earlier, interrupted pass
        finally:
            self.stats.stall_s += time.perf_counter() - t0
        if err is not None:
            self._empty.put(slot)
            if isinstance(err, EmberError):
                raise EmberError(str(err)) from None
            raise EmberError(f"reading {_named(layer)} from {self.path} failed: {err}") from err
        self._held[layer] = slot
        return self.buffers[slot], self.ranges[layer]

    def release(self, layer: int) -> None:
        self._empty.put(self._held.pop(layer))

    def close(self) -> None:
        if self.file.fd >= 0:
            self._empty.put(None)
            self._thread.join(5)
            self.file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
