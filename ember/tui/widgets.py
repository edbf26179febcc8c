"""The chat app's widgets: the prompt (multi-line, Enter sends, history, slash-command
completion), one message of the conversation, and the live panel of the runtime's figures."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, Markdown, ProgressBar, Sparkline, Static, TextArea

from .conversation import COMMANDS, complete


class PromptInput(TextArea):
    """The message being written. Enter sends it; Shift+Enter or Ctrl+J starts a new line; Up on
    the first line and Down on the last walk the history of sent messages; Tab completes a
    slash command."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.sent: list[str] = []
        self._back = 0  # how far back in the history the shown text is (0: a new message)
        self._draft = ""  # the unsent text while walking the history

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text.strip()
            if text:
                if not self.sent or self.sent[-1] != text:
                    self.sent.append(text)
                self._back = 0
                self.clear()
                self.post_message(self.Submitted(text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key == "tab" and self.text.startswith("/"):
            event.stop()
            event.prevent_default()
            self.complete_command()
            return
        await super()._on_key(event)

    def complete_command(self) -> None:
        """Complete the slash command typed so far: to the one that matches, or to the longest
        common start of several (listed in the hint)."""
        found = complete(self.text.strip())
        if not found:
            return
        common = found[0]
        for f in found[1:]:
            while not f.startswith(common):
                common = common[:-1]
        text = common + " " if len(found) == 1 else common
        self.text = text
        self.move_cursor((0, len(text)))

    def _walk(self, step: int) -> None:
        if self._back == 0:
            self._draft = self.text
        self._back = max(0, min(len(self.sent), self._back + step))
        self.text = self._draft if self._back == 0 else self.sent[-self._back]
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0 and self.sent:
            self._walk(+1)
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == self.document.line_count - 1 and self._back:
            self._walk(-1)
        else:
            super().action_cursor_down(select)


def command_hint(text: str) -> str:
    """The line under the prompt while a slash command is typed: the commands it could be."""
    found = complete(text.strip()) if "\n" not in text else []
    return "   ".join(f"{c} {COMMANDS[c[1:]][0]}".rstrip() for c in found[:8])


class MessageView(Vertical):
    """One message: who says it, then its text (Markdown for the model's replies, so that code
    blocks render; plain for the person's and for notes)."""

    def __init__(self, role: str, text: str = ""):
        super().__init__(classes=f"message {role}")
        self.role = role
        self.body = Markdown(text) if role == "assistant" else Static(text, markup=False)

    def compose(self) -> ComposeResult:
        yield self.body

    def mark(self, note: str) -> None:
        """A dimmed note under the message (e.g. "stopped")."""
        self.mount(Label(note, classes="mark"))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


class LivePanel(Vertical):
    """What the runtime is doing: speed of the current reply and over the conversation, time to
    first token, tokens, the context window's use, memory, the device, speculation. Fields the
    runtime does not report stay hidden."""

    def compose(self) -> ComposeResult:
        yield Label("speed", classes="title")
        yield Label("", id="speed")
        yield Sparkline([], id="spark")
        yield Label("", id="ttft")
        yield Label("", id="tokens")
        yield Label("context", classes="title")
        yield ProgressBar(total=1, show_eta=False, id="ctx")
        yield Label("", id="ctx-text")
        yield Label("memory", classes="title")
        yield Label("", id="rss")
        yield Label("device", classes="title")
        yield Label("", id="device")
        yield Label("", id="spec")

    def show(self, **fields) -> None:
        """Update the fields given: speed (tok/s), speeds (one per reply), ttft_s, prompt,
        reused, reply (tokens), ctx_used, ctx_total, rss (bytes), device (text), acceptance."""
        q = self.query_one
        if "speed" in fields:
            q("#speed", Label).update(f"{fields['speed']:.1f} tok/s" if fields["speed"] else "-")
        if "speeds" in fields:
            q("#spark", Sparkline).data = list(fields["speeds"])
        if "ttft_s" in fields:
            q("#ttft", Label).update(f"first token {1000 * fields['ttft_s']:.0f} ms")
        if "prompt" in fields:
            reused = fields.get("reused") or 0
            text = f"prompt {fields['prompt']} tokens" + (f" ({reused} reused)" if reused else "")
            q("#tokens", Label).update(f"{text}\nreply {fields.get('reply', 0)} tokens")
        if "ctx_used" in fields:
            used, total = fields["ctx_used"], fields["ctx_total"]
            q("#ctx", ProgressBar).update(total=total, progress=used)
            q("#ctx-text", Label).update(f"{used} / {total} tokens")
        if "rss" in fields:
            q("#rss", Label).update(f"{_fmt_bytes(fields['rss'])} resident")
        if "device" in fields:
            q("#device", Label).update(fields["device"])
        if "acceptance" in fields:
            a = fields["acceptance"]
            spec = q("#spec", Label)
            spec.display = a is not None
            if a is not None:
                spec.update(f"draft accepted {100 * a:.0f}%")
