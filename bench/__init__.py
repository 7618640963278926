"""The Impuls benchmark harness: ``.venv/bin/python -m bench`` (or ``bench/run``).

One run measures, side by side and with one load generator (``wrk``): warm
invoke latency and throughput through the HTTP API per sandbox and runtime,
cold starts, and two baselines (spawn-per-call and the in-process floor). It
prints the tables and writes ``docs/benchmarks.md``. See ``--help``.
"""
