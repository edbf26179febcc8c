"""Where ember keeps its files ($EMBER_HOME, default ~/.cache/ember) and how it writes them:
always to a temporary name first, then renamed, so a crash never leaves a half-written file.

Like `errors`, this sits below every other module: anything may import it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

_unfinished: set[str] = set()  # temporary files and folders being written right now


def ember_home() -> Path:
    """$EMBER_HOME, or ~/.cache/ember."""
    return Path(os.environ.get("EMBER_HOME") or "~/.cache/ember").expanduser()


def cache_dir(kind: str) -> Path:
    """$EMBER_CACHE_DIR/<kind> (default $EMBER_HOME/cache/<kind>): derived data that can always be rebuilt."""
    root = os.environ.get("EMBER_CACHE_DIR")
    return (Path(root).expanduser() if root else ember_home() / "cache") / kind


def numba_cache_dir() -> Path | None:
    """cache_dir("numba")/<digest of ember's numba sources>: where numba keeps ember's compiled
    functions. numba keys its own cache on the one source file of each function, so a function
    that inlines code from another module (the fused step inlines the kernels' act buffers and
    calls) would keep running the old code after that module changed; a folder per version of
    all of them makes any change compile afresh. The 3 newest folders are kept. None when the
    folder cannot be written (numba then uses its own default places)."""
    import hashlib
    import shutil

    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        data = f.read_bytes()
        if b"numba" in data and "cuda" not in f.parts:  # CUDA kernels are compiled per process
            h.update(str(f.relative_to(pkg)).encode() + b"\0" + data + b"\0")
    root = cache_dir("numba")
    path = root / h.hexdigest()[:20]
    try:
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            old = sorted((p for p in root.iterdir() if p.is_dir() and p != path), key=lambda p: p.stat().st_mtime)
            for p in old[:-2]:
                shutil.rmtree(p, ignore_errors=True)
        if not os.access(path, os.W_OK | os.X_OK):
            return None
    except OSError:
        return None  # an unwritable cache only costs compile time
    return path


@contextmanager
def unfinished(path):
    """Marks `path` (a temporary file or folder) as being written while the block runs, so that
    `remove_unfinished` can delete it when the process must end at once (Ctrl-C during a long
    native call). The block itself still cleans up after itself on an exception."""
    key = os.fspath(path)
    _unfinished.add(key)
    try:
        yield path
    finally:
        _unfinished.discard(key)


def remove_unfinished() -> None:
    """Delete every temporary file or folder that is being written right now."""
    import shutil

    for p in list(_unfinished):
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


@contextmanager
def atomic_path(path: Path):
    """A temporary name in `path`'s folder to write to; renamed to `path` when the block ends
    without an exception, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    with unfinished(tmp):
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_atomic(path: Path, data, *, fsync: bool = True) -> None:
    """Write `data` (bytes, str, an iterable of bytes-like chunks, or a function that writes to
    the open binary file it is given) to `path` through a temporary file in the same folder and
    a rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            if isinstance(data, (bytes, bytearray, memoryview, str)):
                data = [data.encode("utf-8") if isinstance(data, str) else data]
            for chunk in data:
                f.write(chunk)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


FOLIO = 2 << 20  # the page cache's largest folio (x86-64: a huge page): dropped whole or not at all


def uncache_range(fd: int, lo: int, hi: int) -> None:
    """Drop the pages of the open file `fd` in [lo, hi) from the page cache, from the start of
    the folio holding `lo` (the kernel keeps a large folio that a range covers only in part; the
    caller is done with the bytes before `lo`). Nothing where there is no posix_fadvise."""
    if hasattr(os, "posix_fadvise"):
        lo -= lo % FOLIO
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)


def uncache(path) -> bool:
    """Drop the file's clean, unmapped pages from the page cache where the OS can; False
    where it cannot (no posix_fadvise, or the file cannot be opened)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    return True
