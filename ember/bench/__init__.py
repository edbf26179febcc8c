"""The on-device benchmark, `ember bench`: prompt and decode speed, speculative verification's
cost, start-up time and memory, optionally against llama.cpp on the same model in the same run.

    run.py        the command: argument parsing, the driver, ``main(argv)``
    workers.py    one measurement per fresh process (``python -m ember.bench.workers``)
    scenarios.py  the tests' names and sizes, and the prompts they feed
    report.py     medians, ratios and the Markdown table
"""
