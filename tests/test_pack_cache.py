"""The on-disk caches of derived data: packed weights (pack_cache.py) and JIT object code."""

import hashlib
import mmap
import os

import numpy as np
import pytest
import tiny_gguf as tg
from gguf import GGML_QUANT_SIZES
from test_quants import F16_FIELDS

import ember
from ember.lut_kernels import codegen, ops, pack_cache


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model(tmp_path, qtype="Q4_1", **kw):
    return tg.write_family(tmp_path / "m.gguf", "llama", qtype=qtype, embd_qtype="Q8_0", n_embd=96, n_ff=160, **kw)


def _logits(path):
    m = ember.load(path)
    s = m.session()
    s.feed([1, 2, 3])
    return m, s.feed([4])[0]


def test_second_load_uses_the_cache_and_gives_the_same_logits(tmp_path, cache_env):
    path = _model(tmp_path)
    m1, a = _logits(path)
    assert m1.transformer.store.prepare() == "none"  # everything is prepared already
    files = list((cache_env / "packed").glob("*.pack"))
    assert len(files) == 1
    st = ember.load(path).transformer.store
    assert st.prepare() == "none"
    m2, b = _logits(path)
    assert np.array_equal(a, b)
    from ember.devices.cpu.placement import CpuPlacement
    from ember.formats.gguf import GGUFFile
    from ember.offload.store import WeightStore

    assert WeightStore(GGUFFile(path)).prepare() == "none"  # no placement: float32, nothing packed
    assert WeightStore(GGUFFile(path), placement=CpuPlacement()).prepare() == "cached"


def _corrupt(f, how):
    data = bytearray(f.read_bytes())
    if how == "flip":
        data[-100] ^= 0x55
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "magic":
        data[:8] = b"NOTEMBER"
    elif how == "index":
        data[20:40] = b"{" * 20
    elif how == "empty":
        data = b""
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "magic", "index", "empty"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, cache_env, how, caplog):
    path = _model(tmp_path)
    _, a = _logits(path)
    (f,) = (cache_env / "packed").glob("*.pack")
    _corrupt(f, how)
    assert pack_cache.load(path) is None
    assert not f.exists()  # dropped, never used
    _, b = _logits(path)  # packs again and rewrites it
    assert np.array_equal(a, b)
    assert pack_cache.load(path) is not None


def test_changed_model_gets_a_new_key(tmp_path, cache_env):
    path = _model(tmp_path)
    k1 = pack_cache.cache_path(path)
    _logits(path)
    _model(tmp_path, seed=5)  # same path, other weights
    os.utime(path, ns=(1, 1))
    assert pack_cache.cache_path(path) != k1
    assert pack_cache.load(path) is None
    _logits(path)  # writes the new file and removes the stale one
    assert [f.name for f in (cache_env / "packed").glob("*.pack")] == [pack_cache.cache_path(path).name]


def _vm_flags(path) -> list[str]:
    """The VmFlags of this process's mappings of `path` (/proc/self/smaps)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                cur = head[-1] if len(head) >= 6 else None
            elif line.startswith("VmFlags:") and cur == str(path):
                out.append(line)
    return out


@pytest.mark.skipif(
    not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.exists("/proc/self/smaps"), reason="Linux madvise and smaps"
)
def test_the_mapping_is_advised_for_huge_pages(tmp_path, cache_env):
    path = _model(tmp_path)
    _logits(path)
    (f,) = (cache_env / "packed").glob("*.pack")
    back = pack_cache.load(path)
    assert back
    flags = _vm_flags(f.resolve())
    assert flags and all(" hg" in fl for fl in flags), flags  # MADV_HUGEPAGE


@pytest.mark.skipif(
    not hasattr(os, "posix_fadvise") or not os.path.exists("/proc/self/fd"), reason="posix_fadvise and /proc"
)
def test_a_written_file_is_dropped_from_the_page_cache(tmp_path, cache_env, monkeypatch):
    calls, real = [], os.posix_fadvise

    def spy(fd, offset, length, advice):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    path = _model(tmp_path)
    _logits(path)  # packs and writes the cache
    (f,) = (cache_env / "packed").glob("*.pack")
    assert (str(f.resolve()), os.POSIX_FADV_DONTNEED) in calls
    calls.clear()
    from ember.home import uncache

    assert uncache(tmp_path / "absent.pack") is False  # a missing file: not raised
    assert calls == []


def test_roundtrip_of_both_packed_classes(tmp_path, cache_env):
    path = _model(tmp_path)
    m = ember.load(path)
    st = m.transformer.store
    packed = {n: mat.packed for (n, _), mat in st._matrices.items() if mat.packed is not None}
    assert {type(p).__name__ for p in packed.values()} == {"PackedQ4", "PackedQ8"}
    back = pack_cache.load(path)
    assert set(back) == set(packed)
    for n, p in packed.items():
        for an, arr in p.arrays().items():
            assert np.array_equal(back[n].arrays()[an], arr), (n, an)


def test_matrices_are_packed_one_at_a_time_as_the_cache_is_written(tmp_path, cache_env, monkeypatch):
    """A first load packs each matrix as the cache file is written and drops it before the next
    (a model bigger than the memory packs in the memory of its largest matrix); the file is the
    one packing in memory gives, index padded into its reserved room."""
    import gc
    import weakref

    from ember.devices.cpu.placement import CpuPlacement

    path = _model(tmp_path, n_layer=3)
    alive, real = [], CpuPlacement._pack

    def pack(self, store, name, expert):
        gc.collect()
        assert not [r for r in alive if r() is not None], "a packed copy outlived its writing"
        p = real(self, store, name, expert)
        alive.append(weakref.ref(p))
        return p

    monkeypatch.setattr(CpuPlacement, "_pack", pack)
    m, _ = _logits(path)
    back = pack_cache.load(path)
    assert len(alive) == len(back) > 10
    store = m.transformer.store
    for name, p in back.items():  # the same bytes as packing in memory
        fresh = CpuPlacement().matrix(store, name, None).packed
        for an, arr in fresh.arrays().items():
            assert np.array_equal(p.arrays()[an], arr), (name, an)


def test_unwritable_cache_still_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("EMBER_CACHE_DIR", str(blocker / "sub"))  # cannot mkdir under a file
    path = _model(tmp_path)
    _, a = _logits(path)
    assert np.isfinite(a).all()


def test_jit_object_cache_is_verified(tmp_path, cache_env):
    ir = codegen.finish_module(["define i64 @f(i64 %x) #0 {", "  %y = add i64 %x, 7", "  ret i64 %y", "}"], "", "")
    isa = codegen.select_kernel(None)
    if isa not in ("avx512", "avx512-novnni", "avx2"):
        pytest.skip("no native JIT on this host")
    import ctypes

    def run():
        ee, owners, _ = codegen.jit(lambda cpu, feat: ir, isa)
        f = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(ee.get_function_address("f"))
        return f(5), owners

    assert run()[0] == 12
    (obj,) = (cache_env / "jit").glob("*.o")
    assert run()[0] == 12  # from the cache
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    assert run()[0] == 12  # the damaged object is refused and compiled again
    assert codegen.read_object(obj.stem) is not None


# The packed bytes of every kernel type on fixed inputs, for the current LAYOUT. Any change to a
# packed format must come with a new LAYOUT (else older cache files are read in the new format:
# garbage logits); record the new digest here when you bump it.
LAYOUT_DIGEST = {
    "q4f16-tile64.q8f16.q5p.kq3.tq2k.v11": "90802fc4ca5a1dee41e8252d864aa589c3482938501f720a403d0ce868c8f470"
}


def _fixed_rows(qt, n_out, n_in):
    """Deterministic GGUF rows (sha256 bytes, every f16 field finite), the same on any host."""
    bw, bb = GGML_QUANT_SIZES[qt]
    nb = n_out * n_in // bw
    stream = b"".join(hashlib.sha256(f"{qt}:{i}".encode()).digest() for i in range(-(-nb * bb // 32)))
    raw = np.frombuffer(stream[: nb * bb], np.uint8).copy().reshape(nb, bb)
    for off in F16_FIELDS[qt]:
        h = raw[:, off : off + 2].copy().view(np.uint16)
        h[(h & 0x7C00) == 0x7C00] ^= 0x4000
        raw[:, off : off + 2] = h.view(np.uint8)
    return raw.reshape(n_out, -1)


def test_layout_names_the_packed_bytes():
    h = hashlib.sha256()
    for qt in sorted(int(t) for t in ops._KERNEL_TYPES):
        p = ops.pack(_fixed_rows(qt, 7, 512), qt)
        for name, arr in sorted(p.arrays().items()):
            h.update(f"{qt}:{name}:{arr.dtype}:{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    assert LAYOUT_DIGEST.get(pack_cache.LAYOUT) == h.hexdigest(), (
        f"the packed bytes changed ({h.hexdigest()}): bump pack_cache.LAYOUT and record the digest in LAYOUT_DIGEST"
    )
