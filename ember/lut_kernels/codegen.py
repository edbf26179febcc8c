"""Public helpers for the kernels' LLVM IR and their compilation, shared by every kernel module.

- The host: which kernel paths it can run (``host_isas``, ``best_isa``, ``select_kernel``,
  ``resolve_isa``, ``host_features``) and the cache and prefetch facts the kernels are tuned by
  (``is_zen``, ``splits_zmm``, ``l1d_bytes``, ``prefetch_locality``, ``prefetch_bytes``).
- IR text: constants (``splat``, ``vec``, ``mask``, ``flt``), emitted fragments that several
  kernels share (``emit_hsum``, ``emit_prefetch``, ``emit_row_end``, ``emit_tile_end``,
  ``fold``, ``fold_pair``, ``transpose_reduce``), and ``finish_module`` (function attributes, the prefetch
  helper, the ``!invariant.load`` node). Emitters append lines through a callable ``a``.
- Compilation: ``jit(make_ir, isa)`` (MCJIT for this host, machine code cached on disk keyed by
  the IR, target and LLVM version, checked by its sha256 before use), ``host_asm``,
  ``parsed``/``optimize``/``target_for``, and ``once(key, build)`` (per-process, thread-safe).
- Calls from numba: ``emit_call``/``call_codegen`` lower a call through a runtime int64
  address (arrays pass their data pointers), so numba code that calls an IR kernel stays
  cacheable; ``check_types`` is the typing check of such intrinsics.

Contract: the IR a module emits depends only on its arguments and on the host facts above
(read once per process); compiled code lives as long as the process (``once``, ``jit``'s
owners), because numba code holds raw addresses into it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time

import llvmlite
import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import errors

__all__ = [
    "ISAS",
    "host_features",
    "host_isas",
    "best_isa",
    "select_kernel",
    "resolve_isa",
    "is_zen",
    "splits_zmm",
    "l1d_bytes",
    "prefetch_locality",
    "prefetch_bytes",
    "splat",
    "vec",
    "mask",
    "flt",
    "emit_hsum",
    "emit_row_end",
    "emit_tile_end",
    "emit_prefetch",
    "fold",
    "fold_pair",
    "transpose_reduce",
    "finish_module",
    "init_llvm",
    "optimize",
    "target_for",
    "parsed",
    "read_object",
    "jit",
    "host_asm",
    "once",
    "as_i64",
    "check_types",
    "call_codegen",
    "emit_call",
]

ISAS = ("avx512", "avx512-novnni", "avx2", "neon")

_lock = threading.Lock()
_initialized = False
_cache: dict = {}


def init_llvm() -> None:
    global _initialized
    if not _initialized:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        _initialized = True


def host_features() -> dict:
    init_llvm()
    try:
        return dict(llvm.get_host_cpu_features())
    except RuntimeError:  # some hosts cannot report features
        return {}


def host_isas() -> list[str]:
    """The kernel paths this host can execute, best first (``portable`` always last)."""
    f = host_features()
    triple = llvm.get_default_triple()
    out = []
    if triple.startswith(("x86_64", "amd64")):
        if f.get("avx512f") and f.get("avx512bw"):
            out += ["avx512", "avx512-novnni"]
        if f.get("avx2") and f.get("fma"):
            out.append("avx2")
    elif triple.startswith(("aarch64", "arm64")) and f.get("neon", True) and f.get("dotprod"):
        out.append("neon")  # never executed in this project's tests
    out.append("portable")
    return out


def best_isa() -> str:
    """The fastest path for this host (``neon`` is opt-in only, see ``select_kernel``)."""
    for isa in host_isas():
        if isa != "neon":
            return isa
    return "portable"


def select_kernel(kernel: str | None = None) -> str:
    """Resolve a kernel name: an explicit name, else ``$EMBER_KERNEL``, else ``best_isa()``."""
    name = kernel or os.environ.get("EMBER_KERNEL", "").strip().lower() or best_isa()
    if name not in host_isas():
        raise ValueError(f"kernel {name!r} is not available on this host (available: {', '.join(host_isas())})")
    return name


def resolve_isa(isa: str) -> str:
    """The IR variant to emit for `isa` on this host (AVX-512 without VNNI uses vpmaddubsw)."""
    return "avx512-novnni" if isa == "avx512" and not host_features().get("avx512vnni") else isa


def is_zen() -> bool:
    """Whether this host is an AMD Zen core (its LLVM cpu name)."""
    return llvm.get_host_cpu_name().startswith("znver")


def splits_zmm() -> bool:
    """Whether this host runs a 512-bit op as two 256-bit halves: AMD Zen 4. Zen 5 has whole
    512-bit pipes (docs/kernels.md, "AMD Zen: ymm for the row-pair kernels")."""
    return llvm.get_host_cpu_name() == "znver4"


@functools.cache
def l1d_bytes(default: int = 48 << 10, root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """This host's L1 data cache per core, in bytes (Linux sysfs; `default` where it cannot be
    read: the 48 KB of the Intel hosts the kernels were first tuned on)."""
    try:
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            with open(os.path.join(d, "level")) as f1, open(os.path.join(d, "type")) as f2:
                if f1.read().strip() != "1" or f2.read().strip() != "Data":
                    continue
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip().upper()
            shift = {"K": 10, "M": 20}.get(size[-1:], 0)
            n = int(size.rstrip("KM")) << shift
            return n if n > 0 else default
    except (OSError, ValueError):
        pass
    return default


def prefetch_locality() -> int:
    """The llvm.prefetch locality of the kernels' weight streams on this host: 3 (``prefetcht0``,
    into L1) except on AMD Zen, 2 (``prefetcht1``, into L2), whatever ISA a module is compiled
    for (measured: docs/kernels.md, "Prefetch")."""
    return 2 if is_zen() else 3


def prefetch_bytes(default: int) -> int:
    """A module's prefetch distance on this host: its `default` (tuned with t0 on Intel hosts),
    at least 8 KiB on AMD Zen, where the lines go to the 1 MB L2 (prefetch_locality; measured:
    docs/kernels.md, "Prefetch")."""
    return max(default, 8192) if default and is_zen() else default


# ---------------------------------------------------------------------------------------------
# IR text


def splat(elem: str, n: int, val) -> str:
    return "<" + ", ".join([f"{elem} {val}"] * n) + ">"


def vec(elem: str, vals) -> str:
    return "<" + ", ".join(f"{elem} {v}" for v in vals) + ">"


def mask(idx) -> str:
    idx = list(idx)
    return f"<{len(idx)} x i32> <" + ", ".join(f"i32 {i}" for i in idx) + ">"


def flt(v: float) -> str:
    """An LLVM float literal (a double that is exactly representable as float)."""
    import struct

    return f"0x{struct.unpack('<Q', struct.pack('<d', float(v)))[0]:016X}"


def emit_hsum(a, src: str, n: int, out: str, op: str = "fadd") -> None:
    """Emit `out` = the sum (op "fadd") or the largest (op "maxnum") of the lanes of the float
    vector `src` (<n x float>, n a power of two), as a tree. "maxnum" needs the module to
    declare llvm.maxnum.v{h}f32 for h = n / 2 .. 1."""
    prev = src
    while n > 1:
        h = n // 2
        V = f"<{h} x float>"
        a(f"  {out}.{h}a = shufflevector <{n} x float> {prev}, <{n} x float> poison, {mask(range(h))}")
        a(f"  {out}.{h}b = shufflevector <{n} x float> {prev}, <{n} x float> poison, {mask(range(h, n))}")
        if op == "fadd":
            a(f"  {out}.{h} = fadd {V} {out}.{h}a, {out}.{h}b")
        else:
            a(f"  {out}.{h} = call {V} @llvm.{op}.v{h}f32({V} {out}.{h}a, {V} {out}.{h}b)")
        prev, n = f"{out}.{h}", h
    a(f"  {out} = extractelement <1 x float> {prev}, i32 0")


def emit_row_end(a, val: str) -> None:
    """The end of a row loop over ``%r`` (to ``%r1``, from block ``%row``): ``y[r] = val``, the
    next row or the function's return."""
    a("  %yp = getelementptr float, ptr %y, i64 %r")
    a(f"  store float {val}, ptr %yp, align 4")
    a("  %r.next = add i64 %r, 1")
    a("  %rdone = icmp eq i64 %r.next, %r1")
    a("  br i1 %rdone, label %exit, label %row")
    a("exit:")
    a("  ret void")
    a("}")


def emit_prefetch(a, ptr: str) -> None:
    """Emit a software prefetch (for reading) of the cache line at `ptr`; finish_module defines
    the call for this host (``prefetch_locality``)."""
    a(f"  call void @ember.prefetch(ptr {ptr})")


def emit_tile_end(a, var: str, limit: str, loop: str, tile: int, nv: int, nl: int) -> None:
    """The ends of an inner loop over ``%<var>`` (to ``limit``, block ``%<loop>``) and of the
    tile loop around it over ``%t`` (``%t0`` to ``%t1``, block ``%tile``): the ``nv`` row sums
    ``%ynew<v>`` (<nl x float>) into ``y[(t - t0) * tile + v * nl]``, then the next tile or the
    function's return."""
    VF = f"<{nl} x float>"
    a(f"  %{var}.next = add i64 %{var}, 1")
    a(f"  %{var}done = icmp eq i64 %{var}.next, {limit}")
    a(f"  br i1 %{var}done, label %tile.end, label %{loop}")
    a("tile.end:")
    a("  %tr = sub i64 %t, %t0")
    a(f"  %yo = mul i64 %tr, {tile}")
    a("  %yb = getelementptr float, ptr %y, i64 %yo")
    for v in range(nv):
        a(f"  %yp{v} = getelementptr float, ptr %yb, i64 {v * nl}")
        a(f"  store {VF} %ynew{v}, ptr %yp{v}, align 4")
    a("  %t.next = add i64 %t, 1")
    a("  %tdone = icmp eq i64 %t.next, %t1")
    a("  br i1 %tdone, label %exit, label %tile")
    a("exit:")
    a("  ret void")
    a("}")


def fold_pair(a, x: str, y: str, elem: str, seg: int, lanes: int, out: str, op) -> str:
    """One step of `fold`: the two halves of x's and y's segments of seg lanes combined with
    ``op``: out holds x's segments, then y's, seg / 2 lanes each."""
    V = f"<{lanes} x {elem}>"
    half = seg // 2
    lo = [s0 * seg + t for s0 in range(lanes // seg) for t in range(half)]
    a(f"  {out}l = shufflevector {V} {x}, {V} {y}, {mask(lo + [lanes + j for j in lo])}")
    a(f"  {out}h = shufflevector {V} {x}, {V} {y}, {mask([j + half for j in lo] + [lanes + j + half for j in lo])}")
    a(op(f"{out}l", f"{out}h", out))
    return out


def fold(a, vecs: list[str], elem: str, tag: str, op, min_seg: int = 1, seg0: int = 16):
    """Fold n (a power of two, <= 16) 16-lane vectors of segments of seg0 lanes pairwise with
    ``op`` (emits ``o = x op y``) while segments are longer than ``min_seg`` lanes: each level
    pairs neighbours and combines the two halves of every segment (n - 1 ops in all instead of
    n reductions; `fold_pair` is one). Returns (vectors, seg): vector j holds the input segments
    j * (16 / seg) .. in order (vector-major), seg lanes each, whose lanes are still to be
    combined when seg > 1."""
    level, seg = list(vecs), seg0
    k = 0
    while len(level) > 1 and seg > min_seg:
        nxt = []
        for i in range(0, len(level), 2):
            nxt.append(fold_pair(a, level[i], level[i + 1], elem, seg, 16, f"%{tag}{k}", op))
            k += 1
        level, seg = nxt, seg // 2
    return level, seg


def transpose_reduce(a, vecs: list[str], elem: str, tag: str, op) -> str:
    """``fold`` to one 16-lane vector: vector i's result in lanes i * (16 / n) .. (the lanes
    of one input are still to be combined when n < 16)."""
    return fold(a, vecs, elem, tag, op)[0][0]


def finish_module(lines: list[str], cpu: str | None, features: str | None) -> str:
    """IR text of `lines` plus the function attributes #0 (nounwind, target cpu and features)
    and, where `lines` use it, ``@ember.prefetch`` (emit_prefetch)."""
    attrs = ["nounwind"]
    if cpu:
        attrs.append(f'"target-cpu"="{cpu}"')
    if features:
        attrs.append(f'"target-features"="{features}"')
    extra = []
    if any("@ember.prefetch(" in ln for ln in lines):
        extra += [
            "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)",
            "define internal void @ember.prefetch(ptr %p) alwaysinline nounwind {",
            f"  call void @llvm.prefetch.p0(ptr %p, i32 0, i32 {prefetch_locality()}, i32 1)",
            "  ret void",
            "}",
        ]
    return "\n".join(lines + extra + ["attributes #0 = { " + " ".join(attrs) + " }", "!0 = !{}"]) + "\n"


def optimize(mod, tm) -> None:
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)


def target_for(isa: str) -> tuple[str, str]:
    """(cpu, features) to compile an x86 ISA's module with on this host."""
    if isa == "avx2":
        return "x86-64-v3", ""  # honest AVX2 code: no EVEX, no AVX-512 registers
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


# ---------------------------------------------------------------------------------------------
# compilation


def parsed(make_ir, isa: str):
    """(module, target machine) for the host, from make_ir(cpu, features) -> IR text, optimized."""
    init_llvm()
    cpu, feat = target_for(isa)
    mod = llvm.parse_assembly(make_ir(cpu, feat))
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=feat, opt=3)
    optimize(mod, tm)
    return mod, tm


_OBJ_MAGIC = b"EMBEROBJ1"


def object_path(key: str):
    from ..home import cache_dir

    return cache_dir("jit") / f"{key}.o"


def read_object(key: str) -> bytes | None:
    """A cached object file, only if its recorded sha256 matches (a bad one is deleted)."""
    path = object_path(key)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    n = len(_OBJ_MAGIC)
    if data[:n] == _OBJ_MAGIC and hashlib.sha256(data[n + 32 :]).digest() == data[n : n + 32]:
        return data[n + 32 :]
    path.unlink(missing_ok=True)
    return None


def write_object(key: str, obj: bytes) -> None:
    from ..home import write_atomic

    try:
        write_atomic(object_path(key), _OBJ_MAGIC + hashlib.sha256(obj).digest() + obj, fsync=False)
    except OSError:
        pass  # a read-only cache only costs the compile time next run


def jit(make_ir, isa: str):
    """MCJIT-compile make_ir(cpu, features) for this host: (engine, owners to keep alive, seconds).

    The machine code is cached on disk (``cache_dir("jit")``), keyed by the sha256 of the IR, the
    target and the LLVM version, and checked against its own sha256 before LLVM loads it; a hit
    skips optimization and code generation.
    """
    t0 = time.perf_counter()
    init_llvm()
    cpu, feat = target_for(isa)
    text = make_ir(cpu, feat)
    key = hashlib.sha256(
        "|".join((text, cpu, feat, llvm.__name__, str(llvm.llvm_version_info), llvmlite.__version__)).encode()
    ).hexdigest()[:40]
    cached = read_object(key)
    mod = llvm.parse_assembly(text)
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=feat, opt=3)
    if cached is None:
        optimize(mod, tm)
    ee = llvm.create_mcjit_compiler(mod, tm)
    ee.set_object_cache(lambda m, obj: write_object(key, obj) if cached is None else None, lambda m: cached)
    ee.finalize_object()
    return ee, (ee, mod, tm), time.perf_counter() - t0


def host_asm(make_ir, isa: str) -> str:
    """The host assembly of make_ir(cpu, features) (for inspection; runs nothing)."""
    mod, tm = parsed(make_ir, isa)
    return tm.emit_assembly(mod)


def once(key, build):
    """``build()``, run once per process and ``key`` (thread-safe) and kept for the life of the
    process: numba code holds raw addresses into what it compiled."""
    k = _cache.get(key)
    if k is None:
        with _lock:
            k = _cache.get(key)
            if k is None:
                k = _cache[key] = build()
    return k


# ---------------------------------------------------------------------------------------------
# calls from numba through runtime addresses (int64 values, so the caller stays cacheable)


def as_i64(context, builder, ty, val):
    """An intrinsic's argument as an i64: an array's data pointer, or an integer's value."""
    if isinstance(ty, types.Array):
        ary = context.make_array(ty)(context, builder, val)
        return builder.ptrtoint(ary.data, ir.IntType(64))
    return context.cast(builder, val, ty, types.int64)


def check_types(tys, dtypes):
    """Typing check of an intrinsic's arguments: per argument ``None`` (an integer), a numba
    dtype, or a tuple of them (a C-contiguous array of that dtype); TypingError otherwise."""
    for t, dt in zip(tys, dtypes):
        if dt is None:
            if not isinstance(t, types.Integer):
                raise errors.TypingError(f"expected an integer, got {t}")
        elif not (
            isinstance(t, types.Array)
            and t.layout == "C"
            and (t.dtype in dt if isinstance(dt, tuple) else t.dtype == dt)
        ):
            raise errors.TypingError(f"expected a C-contiguous {dt} array, got {t}")


def call_codegen(ret: bool):
    """The lowering of ``fn(args...)`` with ``fn`` a runtime address (the intrinsic's first
    argument) and every argument passed as an i64 (``as_i64``): returns the call's i64 when
    ``ret``, else nothing (a void function)."""

    def gen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64 if ret else ir.VoidType(), [i64] * (len(args) - 1))
        fp = builder.inttoptr(as_i64(context, builder, sig.args[0], args[0]), fnty.as_pointer())
        r = builder.call(fp, [as_i64(context, builder, t, v) for t, v in zip(sig.args[1:], args[1:])])
        return r if ret else context.get_dummy_value()

    return gen


emit_call = call_codegen(False)  # a void call: what every kernel's intrinsic lowers to
