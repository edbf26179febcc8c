"""A chat's state without a screen: the messages, the system prompt, the sampling settings, the
slash commands that change them, fitting the conversation into the context window, and saving
and loading it as JSON under $EMBER_HOME/chats/.

The app (`ember.tui.app`) shows this state and sends it to `Model.chat`; everything here can be
tested without Textual.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EmberError
from ..home import ember_home, write_atomic

FORMAT = "ember-chat/1"  # the "format" field of a saved chat


class ChatFileError(EmberError):
    """A saved chat that cannot be read: missing, not JSON, or not an ember chat."""


class CommandError(EmberError):
    """A slash command with a wrong name or argument; the message says what is expected."""


# name: (argument, what it does); the order is /help's
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("", "this list"),
    "clear": ("", "start a new conversation (the system prompt stays)"),
    "retry": ("", "answer the last message again"),
    "copy": ("", "copy the last reply to the clipboard"),
    "system": ("TEXT", "set the system prompt (empty: none)"),
    "temp": ("T", "temperature, 0 = greedy (deterministic)"),
    "top-p": ("P", "nucleus sampling threshold, 0 < P <= 1"),
    "max-tokens": ("N", "reply length limit (0: until the end of the turn)"),
    "model": ("NAME", "switch model (a catalog name is pulled if missing, or a .gguf path)"),
    "draft": ("MODEL|lookup|off", "speculative decoding: a draft model, prompt lookup, or off (reloads)"),
    "save": ("[NAME]", "save the conversation to $EMBER_HOME/chats/NAME.json"),
    "load": ("NAME", "load a saved conversation"),
    "chats": ("", "list the saved conversations"),
    "quit": ("", "leave (also Ctrl+Q)"),
}


def complete(text: str) -> list[str]:
    """The commands that `text` ("/te") could be completed to, as "/name"."""
    if not text.startswith("/") or " " in text:
        return []
    return [f"/{name}" for name in COMMANDS if name.startswith(text[1:])]


def parse(text: str) -> tuple[str, str]:
    """("name", "argument") of a slash command line; CommandError for an unknown name."""
    name, _, arg = text[1:].partition(" ")
    name = name.strip().lower()
    if name in ("bye", "exit"):
        name = "quit"
    if name not in COMMANDS:
        near = complete("/" + name)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise CommandError(f"unknown command /{name}{hint}; /help lists them")
    return name, arg.strip()


@dataclass
class Settings:
    """Sampling as the command line does it by default (ember run)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int | None = None  # None: until the end of the turn or the context
    seed: int | None = None  # None: a fresh seed per reply

    def options(self) -> dict:
        """Keyword arguments of Model.chat (the fields have their names)."""
        return dict(dataclasses.asdict(self), seed=0 if self.temperature == 0 else self.seed)

    def set(self, name: str, arg: str) -> str:
        """Apply /temp, /top-p or /max-tokens; returns what changed, in words."""
        try:
            value = float(arg)
        except ValueError:
            raise CommandError(f"/{name} takes a number, e.g. /{name} {COMMANDS[name][0]}") from None
        if name == "temp":
            if not 0 <= value <= 10:
                raise CommandError("/temp takes a temperature from 0 (greedy) to 10")
            self.temperature = value
            return "temperature 0: greedy, replies are deterministic" if value == 0 else f"temperature {value:g}"
        if name == "top-p":
            if not 0 < value <= 1:
                raise CommandError("/top-p takes a value in (0, 1]")
            self.top_p = value
            return f"top-p {value:g}"
        if value != int(value) or value < 0:
            raise CommandError("/max-tokens takes a whole number (0: no limit)")
        self.max_tokens = int(value) or None
        return f"replies up to {int(value)} tokens" if value else "replies until the end of the turn"


@dataclass
class Conversation:
    """The messages of one chat ({"role", "content"}; "stopped": True on a reply cut by Esc) and
    its system prompt, kept apart so that dropping old turns never drops it."""

    system: str = ""
    messages: list[dict] = field(default_factory=list)

    def for_model(self) -> list[dict]:
        """The messages as `Model.chat` takes them: the system prompt first, if any."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def last_reply(self) -> str | None:
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return m["content"]
        return None

    def drop_reply(self) -> str | None:
        """For /retry: removes the last reply (and anything after the last user message);
        returns that user message's text, or None when there is none."""
        while self.messages and self.messages[-1]["role"] != "user":
            self.messages.pop()
        return self.messages[-1]["content"] if self.messages else None

    def fit(self, count_tokens, limit: int) -> int:
        """Drop the oldest turns (a user message and what answered it) until `count_tokens(
        self.for_model())` <= limit, keeping the system prompt and the last message; returns how
        many messages were dropped. CommandError when even that does not fit."""
        dropped = 0
        while count_tokens(self.for_model()) > limit:
            if len(self.messages) <= 1:
                raise CommandError(
                    f"the message does not fit in the context window ({limit} tokens left for it "
                    "and the system prompt); shorten it, or start ember chat with a larger -c"
                )
            self.messages.pop(0)
            dropped += 1
            while len(self.messages) > 1 and self.messages[0]["role"] != "user":
                self.messages.pop(0)
                dropped += 1
        return dropped

    # ---- files ---------------------------------------------------------------------------
    def to_json(self, model: str) -> str:
        return json.dumps(
            {"format": FORMAT, "model": model, "system": self.system, "messages": self.messages},
            ensure_ascii=False,
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> tuple[Conversation, str | None]:
        """(the conversation, the model it was saved with) from a saved chat's text."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatFileError(f"{where} is not a saved chat (not JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ChatFileError(f'{where} is not an ember chat (no "format": "{FORMAT}")')
        messages, system = data.get("messages"), data.get("system", "")
        ok = isinstance(messages, list) and isinstance(system, str)
        ok = ok and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise ChatFileError(f"{where} is damaged: its messages are not a list of user/assistant texts")
        model = data.get("model")
        return cls(system, [dict(m) for m in messages]), model if isinstance(model, str) else None


def chats_dir() -> Path:
    return ember_home() / "chats"


_NAME = re.compile(r"[\w][\w.-]{0,99}")


def chat_path(name: str) -> Path:
    """$EMBER_HOME/chats/NAME.json; CommandError for a name that is not a plain file name."""
    name = name.removesuffix(".json")
    if not _NAME.fullmatch(name):
        raise CommandError(f"a chat's name is letters, digits, '.', '-' and '_' (up to 100), not {name!r}")
    return chats_dir() / f"{name}.json"


def save(conv: Conversation, name: str, model: str) -> Path:
    path = chat_path(name)
    try:
        write_atomic(path, conv.to_json(model) + "\n")
    except OSError as e:
        raise ChatFileError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def load(name: str) -> tuple[Conversation, str | None]:
    path = chat_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        have = saved()
        raise ChatFileError(f"no saved chat {name!r}" + (f"; saved: {', '.join(have)}" if have else "")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatFileError(f"cannot read {path}: {e}") from None
    return Conversation.from_json(text, str(path))


def saved() -> list[str]:
    """Names of the saved chats, newest first."""
    try:
        files = sorted(chats_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []
    return [p.stem for p in files]
