"""A draft model's lighter copy: its matrices stored with more than ~4.5 bits a weight (Q8_0,
Q5_0/Q5_1, Q5_K/Q6_K, F16/BF16/F32) requantized to Q4_0 with `gguf.quants`, written once beside
the pack cache and reused while the source file is unchanged.

A draft only proposes tokens: the target verifies every one, so a coarser draft changes how
many are accepted, never what comes out. Drafting is bandwidth-bound like decoding, so fewer
bytes a token make each drafted token cheaper (docs/speculative.md has the figures). The token
embedding stays as it is (one row is read a token) unless it is also the output matrix.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ..formats.gguf import GGUFFile
from ..home import atomic_path, cache_dir

log = logging.getLogger("ember")

RECIPE = 1  # of the copy's making: part of its name, so a changed recipe writes anew
LIGHT = T.Q4_0
HEAVY = {T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.F16, T.BF16, T.F32}
CHUNK_ROWS = 8192  # rows requantized at a time: a 151936 x 896 output matrix in ~30 MB pieces
QUANTS = ("q4_0", "file")  # draft_quant's values: the lighter copy, or the file as it is


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def light_path(path: Path) -> Path:
    """Where the lighter copy of the GGUF at `path` lives: named for the file's real path, then
    for its size and modification time and the recipe (a changed file gets a new copy)."""
    st = os.stat(path)
    where = _digest(os.path.realpath(path))
    what = _digest(f"{st.st_size}|{st.st_mtime_ns}|{RECIPE}")
    return cache_dir("drafts") / f"{Path(path).stem}.{where}.{what}.q4_0.gguf"


def _drop_stale(out: Path) -> None:
    """Removes the copies of earlier versions of the file whose copy `out` is (the pack cache
    drops theirs when it next saves one: their source is gone)."""
    parts = out.name.split(".")  # stem..., where, what, "q4_0", "gguf"
    for old in out.parent.glob(f"{glob.escape('.'.join(parts[:-3]))}.*.q4_0.gguf"):
        if old != out:
            old.unlink(missing_ok=True)


def _lighten(name: str, shape: tuple[int, ...], qtype: int, has_output: bool) -> bool:
    """Whether a tensor (`shape` in NumPy order) is requantized: a matrix of a heavy type whose
    rows are whole Q4_0 blocks, not the token embedding unless no output matrix exists."""
    if len(shape) != 2 or qtype not in HEAVY or shape[-1] % 32:
        return False
    return name != "token_embd.weight" or not has_output


def _requantized(t) -> np.ndarray:
    from gguf import quants

    qt = T(t.tensor_type)
    data = np.asarray(t.data)
    rows = data.shape[0]
    parts = []
    for r in range(0, rows, CHUNK_ROWS):
        block = data[r : r + CHUNK_ROWS]
        f = block.astype(np.float32) if qt in (T.F32, T.F16) else quants.dequantize(block, qt)
        parts.append(quants.quantize(np.asarray(f, np.float32).reshape(block.shape[0], -1), LIGHT))
    return np.concatenate(parts)


def write_light(path: Path, out: Path) -> int:
    """The lighter copy of the GGUF at `path`, written to `out`; returns the matrices requantized."""
    import gguf

    from ..formats.gguf_write import write_streamed

    r = gguf.GGUFReader(str(path))  # for its metadata's types, which the writer copies
    has_output = any(t.name == "output.weight" for t in r.tensors)
    plan, n = [], 0
    for t in r.tensors:
        data = t.data
        if _lighten(t.name, tuple(int(x) for x in reversed(t.shape)), int(t.tensor_type), has_output):
            rows, cols = int(t.shape[1]), int(t.shape[0])
            block_bytes = gguf.GGML_QUANT_SIZES[LIGHT][1]
            plan.append((t.name, LIGHT, (rows, cols // 32 * block_bytes), lambda t=t: _requantized(t)))
            n += 1
        else:
            plan.append((t.name, int(t.tensor_type), tuple(data.shape), lambda data=data: data))
    write_streamed(out, r, plan)
    return n


def light_copy(path: str | os.PathLike) -> Path:
    """The lighter copy of the draft model at `path`, made on first use; `path` itself when it
    has nothing to lighten or the copy cannot be written (a warning says why)."""
    path = Path(path)
    out = light_path(path)
    if out.exists():
        return out
    # ember's reader: gguf.GGUFReader turns the whole vocabulary into Python objects first
    tensors = GGUFFile(path).tensors
    has_output = "output.weight" in tensors
    if not any(_lighten(n, t.shape, t.qtype, has_output) for n, t in tensors.items()):
        return path
    log.info("ember: writing a 4-bit copy of the draft %s (once per model)", path.name)
    try:
        with atomic_path(out) as tmp:
            n = write_light(path, tmp)
    except (OSError, ValueError) as e:  # no room, no cache folder; metadata the writer refuses
        log.warning("ember: could not write the draft's 4-bit copy (%s); drafting with %s as it is", e, path.name)
        return path
    log.info("ember: %d matrices requantized to Q4_0 in %s", n, out)
    _drop_stale(out)
    return out
