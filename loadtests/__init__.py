"""Load tests for the moemix OpenAI-compatible server (Locust).

    loadtests/locustfile.py   Locust users: /v1/completions and /v1/chat/completions, streamed and not
    loadtests/metrics.py      per-request metric math and the run summary (TTFT, ITL, TPOT, E2E, goodput);
                              no Locust import, so it is unit-testable and reusable
    loadtests/run.py          `python -m loadtests.run ...`: bounded headless Locust runs, CSV/HTML, JSON
                              summary, plots, two-model comparison

Definitions follow `vllm bench serve`; see docs/operations.md.
"""
