"""On-disk cache of a model's packed weights, memory-mapped back on the next start.

One file per model and layout: ``cache_dir("packed") / <key>.pack``. The key hashes the model's
identity (the catalog sha256 recorded at pull time when there is one; always the resolved path,
size, modification time and a sha256 of the file's first and last MiB) with ``LAYOUT``, which
changes whenever a packed format does. A changed model file therefore gets a new key: the old file
is stale and never read.

File layout: ``MAGIC``, a little-endian u64 index length, the index (JSON; written last, into
room reserved for it, and padded with spaces), zero padding to a multiple of 64, then the
arrays' bytes, each at a 64-byte aligned offset from there. The index
names, per matrix, its packed class and arrays (dtype,
shape, offset, byte count, checksum). Loading checks the magic, the layout, the key, that every
array lies inside the file with a known dtype and a consistent shape, and every checksum; a file
failing any check is deleted and rebuilt, never used. The checksum (``checksum``) is a 64-bit
sum of the array's 8-byte words plus a position-weighted sum (so swapped or shifted words count
too), at memory speed: zlib's crc32 took 42 ms of SmolLM2's 0.9 s to the first token and
~0.45 s of Qwen2.5-1.5B's. Arrays are zero-copy views of
one read-only mapping. Files are written to a temporary name and renamed (`home.write_atomic`);
writing one deletes the older files made from the same model path.

Huge pages: the decode streams every weight once a token, and through 4 KB pages that is a
TLB miss every 4 KB. The mapping is advised ``MADV_HUGEPAGE`` (Linux), so the pages the kernel
reads in come as 2 MB folios, mapped with one entry each; pages already cached stay as they
were read. A freshly written file's pages are cached as they were written, mostly small, so
`save` writes the file through to disk (fsync) and drops it from the page cache
(``home.uncache``): the next start reads it back once, in 2 MB folios, and every start after that
maps them. Qwen2.5-1.5B's one-token
step, 2 threads, the file cached as written (243 of its 1104 MB in 2 MB folios) -> read back
this way (1104 MB): 50-52 -> 43-45 ms; 1 thread 98-99 -> 84-89 (a timing script, alternating
processes; not bench/). Kernels that cannot do this (no ``MADV_HUGEPAGE``, or a filesystem
without large folios) keep 4 KB pages: slower, the same results.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np
from numba import njit

from ..home import FOLIO, cache_dir, uncache, uncache_range, write_atomic
from .kquant_layout import PackedKQ
from .pack import PackedQ4
from .q8 import PackedQ5, PackedQ8

__all__ = ["LAYOUT", "build", "cache_path", "load", "records", "save"]

log = logging.getLogger("ember")

MAGIC = b"EMBERPK\x01"
LAYOUT = "q4f16-tile64.q8f16.q5p.kq3.tq2k.v11"  # kq3: Q2_K..Q6_K in kquant (row pairs); q5p: PackedQ5;
#   tq2k: TQ1_0, TQ2_0 as Q2_K; v10: the layers in their order in the file (`_file_order`); v11: an
#   expert's matrices together
ALIGN = 64
_CLASSES = {"q4": PackedQ4, "q8": PackedQ8, "q5": PackedQ5, "kq": PackedKQ}
_DTYPES = {"uint8", "uint16", "int8", "float32", "int64"}
_SAMPLE = 1 << 20


@njit(cache=True, nogil=True)
def _sums(words, tail):
    a = np.uint64(0)
    b = np.uint64(0)
    for i in range(words.size):
        w = words[i]
        a += w
        b += w * np.uint64(i + 1)
    for i in range(tail.size):
        a += np.uint64(tail[i]) << np.uint64(8 * i)
    return a, b


def checksum(arr: np.ndarray) -> int:
    """A 64-bit checksum of an array's bytes: (sum of its little-endian u64 words, the tail
    bytes as one more) mixed with the sum of word * (index + 1), both modulo 2^64. Every
    single-bit error, a zeroed or shifted run of words changes it; ~10 GB/s."""
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    n = raw.size // 8 * 8
    a, b = _sums(raw[:n].view("<u8"), raw[n:])
    return (int(a) ^ (int(b) * 0x9E3779B97F4A7C15 + raw.size)) & (2**64 - 1)


def _tag(p) -> str:
    for tag, cls in _CLASSES.items():
        if isinstance(p, cls):
            return tag
    raise TypeError(f"no cache format for {type(p).__name__}")


def model_key(path: Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    h = hashlib.sha256(f"{LAYOUT}|{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    marker = path.with_name(path.name + ".sha256")
    if marker.is_file():
        h.update(marker.read_bytes()[:256])
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE))
        f.seek(max(0, st.st_size - _SAMPLE))
        h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def cache_path(model_path: Path) -> Path:
    return cache_dir("packed") / f"{model_key(model_path)}.pack"


def _file_order(name: str) -> tuple[int, int, str]:
    """Matrices outside the layers first, then layer by layer in the order the compute uses them
    (blk.2 before blk.10): streaming reads a layer's span and the kernel's readahead runs on into
    the next one, which it reads next. In a layer, its matrices, then expert by expert ("#e",
    `devices.cpu.placement.cache_name`): an expert cache reads an expert in one piece."""
    m = re.match(r"blk\.(\d+)\.", name)
    e = re.search(r"#(\d+)$", name)
    return (int(m.group(1)) if m else -1, int(e.group(1)) if e else -1, name)


ENTRY_ROOM = 2048  # index bytes reserved per matrix (an entry takes ~600: its name, 3-4 arrays)
FLUSH = 64 << 20  # bytes written between a sync and a drop of the written pages


def save(model_path: Path, packed: dict) -> Path:
    """Write {matrix name: packed object, or a function that packs it} for the model at
    model_path; returns the file. The matrices are packed (when given as functions) and written
    one at a time, in file order (`_file_order`), each dropped once written, and the written
    pages leave the page cache as they go: a model bigger than the memory packs in the memory
    of its largest matrix. The index goes first, in room reserved for it (padded with spaces)."""
    path = cache_path(model_path)
    names = sorted(packed, key=_file_order)
    room = len(MAGIC) + 8 + 4096 + ENTRY_ROOM * len(names)
    room += -room % ALIGN  # the arrays' base: the index and its padding end there
    source = str(Path(model_path).resolve())
    entries: dict = {}

    def write(f) -> None:
        offset, flushed = 0, 0
        f.seek(room)
        for name in names:
            p = packed[name]
            p = p() if callable(p) else p
            arrays = {}
            for an, a in p.arrays().items():
                a = np.ascontiguousarray(a)
                pad = -offset % ALIGN
                f.write(bytes(pad))
                offset += pad
                arrays[an] = {
                    "dtype": a.dtype.name,
                    "shape": list(a.shape),
                    "offset": offset,
                    "nbytes": a.nbytes,
                    "sum64": checksum(a),
                }
                f.write(memoryview(a).cast("B"))
                offset += a.nbytes
            entries[name] = {"class": _tag(p), "arrays": arrays}
            p = a = None  # gone before the next matrix is packed
            if offset - flushed >= FLUSH:  # written through, so the pages can leave the cache
                f.flush()
                os.fdatasync(f.fileno())
                uncache_range(f.fileno(), room + flushed, room + offset)
                flushed = offset
        index = json.dumps({"layout": LAYOUT, "key": path.stem, "source": source, "entries": entries})
        n = room - len(MAGIC) - 8
        if len(index) > n:
            raise OSError(f"the index of {len(names)} matrices takes {len(index)} bytes, over the {n} reserved")
        f.seek(0)
        f.write(MAGIC + struct.pack("<Q", n) + index.encode().ljust(n))

    write_atomic(path, write)  # fsynced: the page cache can drop only clean pages
    if not uncache(path):  # only the speed of later loads depends on it
        log.debug("could not drop %s from the page cache", path)
    _remove_older(path, source)
    log.debug("packed weights cached in %s (%d matrices)", path, len(entries))
    return path


def _source(path: Path) -> str | None:
    """The model path recorded in a cache file's index (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                return None
            (n,) = struct.unpack_from("<Q", head, len(MAGIC))
            return json.loads(f.read(min(n, 1 << 26))).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_older(keep: Path, source: str) -> None:
    """Delete the cache files of earlier versions of the same model file, and of model files
    that ember made in its cache folder and has removed (a draft's replaced 4-bit copy): they
    can never match again, so the cache does not grow with every re-download or edit. (A model
    elsewhere that is missing may be on a drive not mounted now: its cache stays.)"""
    ours = str(keep.parent.parent.resolve()) + os.sep
    for other in keep.parent.glob("*.pack"):
        if other == keep:
            continue
        was = _source(other)
        if was == source or (was is not None and was.startswith(ours) and not os.path.exists(was)):
            try:
                other.unlink()
            except OSError:
                pass


def _drop(path: Path, why: str) -> None:
    log.warning("ember: ignoring the packed-weight cache %s (%s); rebuilding it", path, why)
    try:
        path.unlink()
    except OSError:
        pass


def load(model_path: Path, frugal: bool = False) -> dict | None:
    """{matrix name: packed object} from the cache, or None when there is no valid cache file.
    frugal: each array's pages leave memory and the page cache once its checksum is checked (a
    memory budget's load: what stays resident faults back in when used)."""
    path = cache_path(model_path)
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            fd = os.dup(f.fileno()) if frugal else -1
    except (FileNotFoundError, ValueError):  # absent, or empty (mmap of 0 bytes)
        if path.exists():
            _drop(path, "empty file")
        return None
    except OSError as e:
        log.warning("ember: cannot read %s (%s)", path, e)
        return None
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # no transparent huge pages here: 4 KB pages
            pass
    try:
        return _parse(mm, path, functools.partial(_forget, mm, fd) if fd >= 0 else None)
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as e:
        _drop(path, str(e) or type(e).__name__)
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _forget(mm: mmap.mmap, fd: int, off: int, n: int) -> None:
    """Unmap [off, off + n) of the file's mapping and drop it from the page cache, from the
    start of the folio holding `off` (the bytes before it were checked already)."""
    lo = off - off % FOLIO
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, min(off + n, len(mm)) - lo)
        uncache_range(fd, off, off + n)
    except (AttributeError, OSError):  # not Linux: the pages stay cached
        pass


def records(model_path: Path) -> tuple[Path, dict]:
    """Where each packed matrix of a model lies in its (validated, see `load`) cache file: the
    file, and {matrix name: (class tag, {array name: (dtype, shape, file offset, nbytes)})}, for
    a reader that fetches some matrices itself (a layer streamer); `build` makes the packed
    object from the arrays it read. No file (no matrix of the model is packed): no records."""
    path = cache_path(model_path)
    if not path.exists():
        return path, {}
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 8)
        if head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a packed-weight file")
        (n,) = struct.unpack_from("<Q", head, len(MAGIC))
        index = json.loads(f.read(n))
    base = len(MAGIC) + 8 + n
    base += -base % ALIGN
    out = {}
    for name, e in index["entries"].items():
        arrays = {
            an: (a["dtype"], tuple(int(x) for x in a["shape"]), base + int(a["offset"]), int(a["nbytes"]))
            for an, a in e["arrays"].items()
        }
        out[name] = (e["class"], arrays)
    return path, out


def build(tag: str, arrays: dict):
    """The packed object of class `tag` (from `records`) over `arrays` (name: numpy array)."""
    return _CLASSES[tag].from_arrays(arrays)


def _parse(mm: mmap.mmap, path: Path, forget=None) -> dict:
    size = len(mm)
    if size < len(MAGIC) + 8 or mm[: len(MAGIC)] != MAGIC:
        raise ValueError("not a packed-weight file")
    (n,) = struct.unpack_from("<Q", mm, len(MAGIC))
    start = len(MAGIC) + 8
    if n > size - start:
        raise ValueError("truncated index")
    index = json.loads(bytes(mm[start : start + n]))
    if index.get("layout") != LAYOUT or index.get("key") != path.stem:
        raise ValueError("another layout or model")
    buf = np.frombuffer(mm, np.uint8)
    base = start + n + (-(start + n) % ALIGN)
    out = {}
    for name, e in index["entries"].items():
        arrays = {}
        for an, a in e["arrays"].items():
            off, nbytes, dt = base + int(a["offset"]), int(a["nbytes"]), a["dtype"]
            shape = tuple(int(s) for s in a["shape"])
            if (
                dt not in _DTYPES
                or min(shape, default=1) < 0
                or off % ALIGN
                or off < base
                or nbytes != int(np.prod(shape)) * np.dtype(dt).itemsize
                or off + nbytes > size
            ):
                raise ValueError(f"bad array record {name}/{an}")
            arr = buf[off : off + nbytes]
            if checksum(arr) != int(a["sum64"]):
                raise ValueError(f"checksum mismatch in {name}/{an}")
            if forget is not None:
                forget(off, nbytes)
            arrays[an] = arr.view(dt).reshape(shape)
        out[name] = _CLASSES[e["class"]].from_arrays(arrays)
    return out
