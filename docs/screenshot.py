"""Regenerates docs/chat.svg, the README's picture of `ember chat`: the real smollm2-135m
answering one question at temperature 0, with the live panel open.

    python docs/screenshot.py
"""

import asyncio
import sys
import time
from pathlib import Path

from ember import hub
from ember.tui.app import ChatApp
from ember.tui.conversation import Settings
from ember.tui.widgets import PromptInput

QUESTION = "Write a Python function that reverses a string, with a short explanation."


async def shoot(out: Path) -> None:
    hub.pull("smollm2-135m")
    app = ChatApp("smollm2-135m", settings=Settings(temperature=0), threads=2)
    async with app.run_test(size=(110, 34)) as pilot:
        end = time.monotonic() + 300
        while app.model is None:
            if app.query(".error") or time.monotonic() > end:
                sys.exit("the model did not load")
            await pilot.pause(0.1)
        app.query_one(PromptInput).text = QUESTION
        await pilot.press("enter")
        await pilot.pause(0.2)
        while app.generating:
            await pilot.pause(0.1)
        await pilot.pause(0.5)
        app.query_one(PromptInput).text = "/te"
        await pilot.pause(0.2)
        app.save_screenshot(filename=out.name, path=str(out.parent))


if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "chat.svg"
    asyncio.run(shoot(target))
    print(target)
