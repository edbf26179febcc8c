"""Open and validate a GGUF file: metadata, the tensor table, and zero-copy tensor views.

The file is memory-mapped once. The header is parsed by hand (the `gguf` package's reader parses
every vocabulary string into its own numpy view, which takes 5-25 s on real models); type ids and
block sizes come from the `gguf` package. String arrays (vocabularies, merges) are only walked
at open time and decoded when first used, so opening a model takes milliseconds.

Every length, count and offset read from the file is checked against the file's size before it is
used, so a corrupt or hostile file raises `FormatError` and never makes us allocate or hang.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Names and keys longer than this are corrupt, not merely long.
MAX_KEY_BYTES = 1 << 16

# GGUF metadata value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALARS = {
    _U8: np.dtype("<u1"),
    _I8: np.dtype("<i1"),
    _U16: np.dtype("<u2"),
    _I16: np.dtype("<i2"),
    _U32: np.dtype("<u4"),
    _I32: np.dtype("<i4"),
    _F32: np.dtype("<f4"),
    _BOOL: np.dtype("<u1"),
    _U64: np.dtype("<u8"),
    _I64: np.dtype("<i8"),
    _F64: np.dtype("<f8"),
}
_U64S = struct.Struct("<Q")
_U32S = struct.Struct("<I")

# Keys every language model must have, formatted with its architecture.
REQUIRED_ARCH_KEYS = ("{arch}.block_count", "{arch}.embedding_length", "{arch}.attention.head_count")


def type_name(qtype: int) -> str:
    """ggml name of a type id ("Q4_K"), or "type 99" for an id gguf does not know."""
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order: outermost first (the reverse of GGUF's dims)
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class LazyStrings(Sequence):
    """A GGUF array of strings, decoded on first use. `raw(i)` gives the undecoded bytes."""

    def __init__(self, buf: mmap.mmap, offsets: np.ndarray, lengths: np.ndarray):
        self._buf = buf
        self._offsets = offsets
        self._lengths = lengths
        self._decoded: list[str] | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def raw(self, i: int) -> bytes:
        o = int(self._offsets[i])
        return self._buf[o : o + int(self._lengths[i])]

    def raw_region(self) -> bytes:
        """All of the array's bytes as stored (lengths and data), e.g. to hash it."""
        if not len(self):
            return b""
        return self._buf[int(self._offsets[0]) - 8 : int(self._offsets[-1] + self._lengths[-1])]

    def tolist(self) -> list[str]:
        if self._decoded is None:
            self._decoded = self._decode_all()
        return self._decoded

    def _decode_all(self) -> list[str]:
        """Each string decoded as UTF-8 (invalid bytes -> U+FFFD). Fast path: the strings joined
        by NUL bytes (each length field's first byte, the other 7 dropped), decoded at once and
        split; a vocabulary where that is not exact (a string with a NUL, or invalid UTF-8)
        takes the string-by-string path."""
        n = len(self)
        if n:
            region = np.frombuffer(self.raw_region(), np.uint8).copy()
            fields = self._offsets - self._offsets[0]  # each length field's first byte
            region[fields] = 0
            keep = np.ones(region.size, bool)
            keep[(fields[:, None] + np.arange(1, 8)).ravel()] = False
            joined = region[keep].tobytes()
            if joined.count(b"\0") == n:
                try:
                    return joined.decode("utf-8").split("\0")[1:]
                except UnicodeDecodeError:
                    pass
        buf = self._buf
        return [
            buf[o : o + k].decode("utf-8", errors="replace")
            for o, k in zip(self._offsets.tolist(), self._lengths.tolist())
        ]

    def __getitem__(self, i):
        return self.tolist()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    def __repr__(self) -> str:
        return f"<{len(self)} strings>"


class _Cursor:
    """Reads little-endian values from the mapped header, never past the end of the file."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what} (the file is corrupt or truncated; re-download it)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"{what} needs {n} bytes at offset {self.pos}, past the end of the file ({self.size} bytes)"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        v = _U32S.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        v = _U64S.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} claims {n} bytes (limit {limit})")
        self.need(n, what)
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_strings(self, count: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Walk `count` strings; return their data offsets and lengths."""
        # each string takes at least its 8-byte length
        self.need(8 * count, what)
        offsets = np.empty(count, dtype=np.int64)
        lengths = np.empty(count, dtype=np.int64)
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64S.unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"{what}: string {i} of {count} starts past the end of the file")
            n = unpack(buf, pos)[0]
            pos += 8
            if n > size - pos:  # also keeps n within int64 for `lengths`
                self.pos = pos
                raise self.fail(f"{what}: string {i} of {count} claims {n} bytes, past the end of the file")
            offsets[i] = pos
            lengths[i] = n
            pos += n
        if pos > size:
            raise self.fail(f"{what}: string data runs past the end of the file")
        self.pos = pos
        return offsets, lengths

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            dt = _SCALARS[vtype]
            self.need(dt.itemsize, f"value of {key!r}")
            v = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.pos)[0]
            self.pos += dt.itemsize
            return bool(v) if vtype == _BOOL else v.item()
        if vtype == _STR:
            return self.string(f"value of {key!r}")
        if vtype == _ARR:
            if depth > 2:
                raise self.fail(f"metadata {key!r} nests arrays too deeply")
            etype = self.u32(f"array type of {key!r}")
            count = self.u64(f"array length of {key!r}")
            if etype in _SCALARS:
                dt = _SCALARS[etype]
                self.need(count * dt.itemsize, f"array {key!r} of {count} elements")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.astype(bool) if etype == _BOOL else arr
            if etype == _STR:
                offsets, lengths = self.skip_strings(count, f"array {key!r}")
                return LazyStrings(self.buf, offsets, lengths)
            if etype == _ARR:
                self.need(12 * count, f"array {key!r} of {count} arrays")
                return [self.value(_ARR, key, depth + 1) for _ in range(count)]
            raise self.fail(f"metadata {key!r} has an array of unknown value type {etype}")
        raise self.fail(f"metadata {key!r} has unknown value type {vtype}")


class GGUFFile:
    """A validated, memory-mapped GGUF file.

    `metadata` maps keys to Python values (numbers, str, bool), numpy arrays (numeric arrays) or
    `LazyStrings`. `tensors` maps names to `TensorInfo`. `tensor_bytes(name)` and `tensor(name)`
    are zero-copy views into the mapping.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a directory, not a GGUF file") from None
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):  # Linux opens directories read-only without complaint
                raise FormatError(f"{self.path}: is a directory, not a GGUF file")
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{self.path}: not a regular file")
            self.file_size = st.st_size
            if self.file_size < 24:
                raise FormatError(f"{self.path}: {self.file_size} bytes is too small to be a GGUF file")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # kept for pread: small reads that should not map pages (see read_rows)
        weakref.finalize(self, os.close, fd)
        self._bytes = np.frombuffer(self._mm, dtype=np.uint8)
        self._parse()

    # ---- parsing -------------------------------------------------------------------------
    def _parse(self) -> None:
        c = _Cursor(self._mm, self.file_size, self.path)
        magic = bytes(self._mm[:4])
        if magic != MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            raise FormatError(
                f"{self.path}: GGUF version {self.version} is not supported (ember reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}); convert the model with a current llama.cpp"
            )
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # every metadata entry takes >= 12 bytes and every tensor info >= 24: bound the counts
        if n_kv * 12 > self.file_size or n_tensors * 24 > self.file_size:
            raise c.fail(
                f"absurd counts: {n_tensors} tensors and {n_kv} metadata entries in a {self.file_size}-byte file"
            )

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key {i}", limit=MAX_KEY_BYTES)
            if key in self.metadata:
                raise c.fail(f"metadata key {key!r} appears twice")
            vtype = c.u32(f"value type of {key!r}")
            self.metadata[key] = c.value(vtype, key)

        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise c.fail(f"general.alignment = {align!r} is not a power of two")
        self.alignment = align

        raw_infos = []
        seen = set()
        for i in range(n_tensors):
            name = c.string(f"name of tensor {i}", limit=MAX_KEY_BYTES)
            if name in seen:
                raise c.fail(f"tensor {name!r} appears twice")
            seen.add(name)
            n_dims = c.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [c.u64(f"dimension of tensor {name!r}") for _ in range(n_dims)]
            qtype = c.u32(f"type of tensor {name!r}")
            offset = c.u64(f"offset of tensor {name!r}")
            raw_infos.append((name, dims, qtype, offset))

        self.data_offset = -(-c.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in raw_infos:
            self.tensors[name] = self._tensor_info(c, name, dims, qtype, offset)

    def _tensor_info(self, c: _Cursor, name: str, dims: list[int], qtype: int, offset: int) -> TensorInfo:
        try:
            qt = GGMLQuantizationType(qtype)
        except ValueError:
            raise c.fail(f"tensor {name!r} has unknown ggml type id {qtype}") from None
        if qt not in GGML_QUANT_SIZES:
            raise c.fail(f"tensor {name!r} has ggml type {qt.name} ({qtype}), which has no block size")
        block, block_bytes = GGML_QUANT_SIZES[qt]
        if any(d == 0 for d in dims):
            raise c.fail(f"tensor {name!r} has a zero dimension {dims}")
        n = 1
        for d in dims:
            n *= d
            if n > self.file_size * 64:  # more weights than any encoding of this file could hold
                raise c.fail(f"tensor {name!r} has absurd dimensions {dims}")
        if dims[0] % block:
            raise c.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qt.name} block size {block}")
        nbytes = n // block * block_bytes
        if offset % self.alignment:
            raise c.fail(f"tensor {name!r}: data offset {offset} is not aligned to {self.alignment} bytes")
        start = self.data_offset + offset
        if start + nbytes > self.file_size:
            raise FormatError(
                f"{self.path}: tensor {name!r} ({nbytes} bytes at offset {start}) runs past the end of "
                f"the file ({self.file_size} bytes): the file is truncated; re-download it"
            )
        return TensorInfo(name, tuple(reversed(dims)), int(qt), start, nbytes)

    # ---- access --------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.require("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        try:
            return self.metadata[key]
        except KeyError:
            raise FormatError(f"{self.path}: required metadata key {key!r} is missing") from None

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """Metadata key under the model's architecture, e.g. arch_get('block_count')."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def validate_model(self) -> None:
        """Check the keys every language model needs are present."""
        arch = self.architecture
        for key in REQUIRED_ARCH_KEYS:
            key = key.format(arch=arch)
            if key not in self.metadata:
                raise FormatError(f"{self.path}: required metadata key {key!r} for architecture {arch!r} is missing")

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor, a read-only uint8 view of the mapping."""
        t = self.info(name)
        return self._bytes[t.offset : t.offset + t.nbytes]

    def read_rows(self, name: str, rows) -> np.ndarray:
        """Copies of some rows of a tensor's bytes, uint8 [len(rows), row_bytes], read with pread.

        For scattered small reads (embedding rows, norm vectors): through the mapping, every
        fault maps up to 64 KiB of neighbouring weights too ("fault-around"), which all count in
        RSS; a 100-token generation of SmolLM2 gathered 25 MB that way."""
        t = self.info(name)
        n_rows = t.n_elements // t.shape[-1]
        rb = t.nbytes // n_rows
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise IndexError(f"{name}: row index out of range (0..{n_rows - 1})")
        out = np.empty((rows.size, rb), np.uint8)
        for i, r in enumerate(rows.tolist()):
            data = os.pread(self._fd, rb, t.offset + r * rb)
            if len(data) != rb:
                raise FormatError(f"{self.path}: short read in {name} (the file shrank?)")
            out[i] = np.frombuffer(data, np.uint8)
        return out

    def release(self, name: str) -> None:
        """Drop this process's resident pages of a tensor (after it was repacked elsewhere): they
        stop counting in RSS and come back from the page cache if the tensor is read again."""
        t = self.info(name)
        page = mmap.PAGESIZE
        lo, hi = -(-t.offset // page) * page, (t.offset + t.nbytes) // page * page
        if hi > lo and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def tensor(self, name: str) -> np.ndarray:
        """F32/F16 tensors as typed arrays of their shape; block-quantized ones as [rows, row_bytes] uint8."""
        t = self.info(name)
        raw = self.tensor_bytes(name)
        if t.qtype == GGMLQuantizationType.F32:
            return raw.view("<f4").reshape(t.shape)
        if t.qtype == GGMLQuantizationType.F16:
            return raw.view("<f2").reshape(t.shape)
        return self.tensor_rows(name)

    def tensor_rows(self, name: str) -> np.ndarray:
        """Any tensor as [rows, row_bytes] uint8 (rows: all dimensions but the innermost)."""
        t = self.info(name)
        rows = t.n_elements // t.shape[-1]
        return self.tensor_bytes(name).reshape(rows, t.nbytes // rows)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: tensor {name!r} is missing") from None

    def type_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for t in self.tensors.values():
            hist[t.type_name] = hist.get(t.type_name, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: -kv[1]))

    def __repr__(self) -> str:
        return f"<GGUFFile {self.path.name}: v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors>"


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
