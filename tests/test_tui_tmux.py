"""The installed `ember chat` in a real terminal (tmux): it starts, takes a prompt, shows the
reply and no traceback, and quits on Ctrl+Q, leaving the shell's screen as it was. Skipped where
tmux is not installed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
import uuid

import pytest
from test_cli_process import ember_exe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


class Tmux:
    """One tmux server of its own (-L), one window running a command."""

    def __init__(self, command: list[str], width: int = 110, height: int = 36):
        self.sock = f"ember-test-{uuid.uuid4().hex[:8]}"
        self.run("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), *command)

    def run(self, *args: str) -> str:
        res = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def wait_for(self, text: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while True:
            screen = self.screen()
            assert "Traceback" not in screen, screen
            if text in screen:
                return screen
            assert time.monotonic() < end, f"{text!r} not on the screen after {timeout} s:\n{screen}"
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.parametrize("how", ["chat", "run"])
def test_ember_chat_in_a_terminal(catalog_path, how):
    smol = str(catalog_path("smollm2-135m"))
    command = f"{shlex.quote(ember_exe())} {how} {shlex.quote(smol)} --temp 0 -t 2; echo ember exited $?; sleep 60"
    t = Tmux(["env", "TERM=xterm-256color", "sh", "-c", command])
    try:
        t.wait_for("ready", 120)
        t.keys("What is the capital of France? One sentence.", "Enter")
        screen = t.wait_for("Paris", 60)
        t.wait_for("tokens, ", 60)  # the reply finished: the status line says "N tokens, X tok/s"
        t.keys("C-q")
        after = t.wait_for("ember exited", 10)
        assert "ember exited 0" in after, after
        assert "Traceback" not in after and "Paris" not in after, after  # the app's screen is gone
        assert "ember" in screen
    finally:
        t.close()


@pytest.mark.parametrize("when", ["loading", "writing"])
def test_ctrl_c_quits_at_once(catalog_path, when):
    """Ctrl+C leaves the app at any moment, the model still loading or a reply being written,
    and gives the terminal back."""
    smol = str(catalog_path("smollm2-135m"))
    command = f"{shlex.quote(ember_exe())} chat {shlex.quote(smol)} -t 2; echo ember exited $?; sleep 60"
    t = Tmux(["env", "TERM=xterm-256color", "sh", "-c", command])
    try:
        if when == "loading":
            t.wait_for("Quit", 30)  # the footer: the app is up; the model is not ready yet
        else:
            t.wait_for("ready", 120)
            t.keys("Write a very long story about a dragon.", "Enter")
            t.wait_for("writing...", 30)
            time.sleep(0.5)
        sent = time.monotonic()
        t.keys("C-c")
        after = t.wait_for("ember exited", 5)
        assert time.monotonic() - sent < 2.0
        assert "ember exited 0" in after and "Traceback" not in after, after
    finally:
        t.close()
