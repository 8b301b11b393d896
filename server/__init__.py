"""OpenAI-compatible HTTP server for moemix (and plain) checkpoints, over vLLM's AsyncLLM.

Layout (one concern per module):
    settings.py      flags / YAML -> ServerSettings (no vLLM import)
    facts.py         what a checkpoint holds: bytes by component and bit width, moemix summary (no vLLM import)
    engine.py        the only module that builds vLLM engines and vLLM's OpenAI serving objects
    admission.py     per-model in-flight bound (429 + Retry-After; 400 for a request that can never fit)
    metrics.py       one Prometheus registry: vLLM's `vllm:` metrics per model + ours (`moemix_`)
    errors.py        OpenAI error JSON
    middleware/      auth, body size limit, admission release
    routes/          thin FastAPI routers; handlers take the model's engine from app.state.pool; the probes
                     (/health, /ready) and /metrics are answered by outermost ASGI layers
    app.py           build_app(pool, settings); the engine watcher (one line and exit status 3 on a death)
    connection.py    uvicorn's HTTP protocol, fixed: no request dropped by the keep-alive timer, probes past the
                     concurrency limit
    cli.py           `moemix serve` (add_serve_parser) and `python -m server serve`; uvicorn settings

Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
