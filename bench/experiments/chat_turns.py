"""Time to first token per turn of a 10-turn conversation in the chat app (Textual's pilot),
greedy, 48-token replies: a turn prefills only the new message.

    python bench/experiments/chat_turns.py [MODEL]
"""

import asyncio
import sys

from ember.tui.app import ChatApp
from ember.tui.conversation import Settings
from ember.tui.widgets import PromptInput

name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"


class A(ChatApp):
    ttfts = []

    def on_done(self, msg):  # Textual calls ChatApp.on_done after this one
        if msg.gen == self.gen and self.generating:
            st = msg.stats
            self.ttfts.append((st.get("prompt_tokens"), st.get("prompt_tokens_reused"), st.get("ttft_s")))


async def main():
    app = A(name, settings=Settings(temperature=0, max_tokens=48), threads=2)
    async with app.run_test() as pilot:
        while app.model is None:
            await pilot.pause(0.1)
        for i in range(10):
            app.query_one(PromptInput).text = f"Question {i + 1}: give one short fact about the number {i + 7}."
            await pilot.press("enter")
            await pilot.pause(0.1)
            while app.generating or app.gen_lock.locked():
                await pilot.pause(0.05)
    for i, (p, r, t) in enumerate(app.ttfts):
        print(f"turn {i + 1}: prompt {p} tokens, {r} reused, first token {1000 * t:.0f} ms")


asyncio.run(main())
