"""A memory cgroup for one benchmark run: a real memory limit that charges the page cache too, as
a machine with that little memory has. cgroup v2 (`memory.max`, `memory.peak`) or v1 (`memory`
controller: `memory.limit_in_bytes`, `memory.max_usage_in_bytes`), made as a child of this
process's own group; root (or a delegated group) is needed to make one.

    with MemoryCgroup(600_000_000) as cg:
        subprocess.run(cmd, preexec_fn=cg.enter)
        cg.peak_bytes()
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ..offload.memory import own_cgroups


def unavailable() -> str | None:
    """Why no memory cgroup can be made here (a sentence), or None when one can."""
    if os.name != "posix" or not Path("/proc/self/cgroup").exists():
        return "memory cgroups are Linux's"
    v2, v1 = own_cgroups()
    parent = v2 if v2 is not None and "memory" in _read(v2 / "cgroup.controllers").split() else v1
    if parent is None:
        return "no cgroup memory controller is mounted"
    if not os.access(parent, os.W_OK):
        return f"cannot make a memory cgroup under {parent} (needs root or a delegated group)"
    return None


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


class MemoryCgroup:
    """A fresh memory cgroup limited to `limit` bytes (swap off where v1 allows); removed on exit."""

    def __init__(self, limit: int):
        why = unavailable()
        if why:
            raise OSError(why)
        self.limit = int(limit)
        v2, v1 = own_cgroups()
        self.v2 = v2 is not None and "memory" in _read(v2 / "cgroup.controllers").split()
        parent = v2 if self.v2 else v1
        self.path = parent / f"ember-bench-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        if self.v2:
            (self.path / "memory.max").write_text(str(self.limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            try:
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
            except OSError:
                pass  # no swap accounting: swap stays as the machine has it
        return self

    def enter(self) -> None:
        """Move the calling process into the group (a subprocess's preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        """The group's peak memory (process memory and charged page cache), None if not kept."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        text = _read(self.path / name).strip()
        return int(text) if text.isdigit() else None

    def __exit__(self, *exc) -> None:
        if not self.v2:
            try:
                (self.path / "memory.force_empty").write_text("0")
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass
