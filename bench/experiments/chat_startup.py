"""`ember chat` start-up in tmux: process start to the app on screen (the input takes text) and
to "ready" (the model loaded), 5 runs, medians.

    python bench/experiments/chat_startup.py [MODEL]
"""

import statistics
import subprocess
import sys
import time

MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
res = []
for i in range(5):
    tmux = ["tmux", "-L", f"ember-startup-{i}"]
    t0 = time.monotonic()
    subprocess.run([*tmux, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30", f"ember chat {MODEL} -t 2"])
    mounted = ready = None
    while ready is None:
        screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True).stdout
        now = time.monotonic() - t0
        if mounted is None and "Quit" in screen:  # the footer: the app is up, the input takes text
            mounted = now
        if "ready (" in screen:
            ready = now
        time.sleep(0.01)
    subprocess.run([*tmux, "kill-server"])
    res.append((mounted, ready))
    print(f"run {i}: input usable {mounted:.2f} s, model ready {ready:.2f} s")
usable, ready = (statistics.median(r[k] for r in res) for k in (0, 1))
print(f"median: input usable {usable:.2f} s, model ready {ready:.2f} s")
