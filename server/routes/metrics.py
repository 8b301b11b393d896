"""GET /metrics: the one registry (vLLM's), text exposition format, from memory (expert-routing counts as the
background refresher last gathered them). HTTP request metrics come from prometheus-fastapi-instrumentator, as
in vLLM's server (health/metrics/version excluded).

A scrape must not slow generation, however many arrive (the endpoint needs no key): the exposition is rendered
at most once per `metrics_max_age_s` (in a worker thread; concurrent scrapes share that one rendering), every
other scrape is answered from that cached body by the outermost ASGI layer, before routing, auth or
instrumentation, and at most `metrics_scrapes_per_s` scrapes are answered per second. Even a cached answer costs
the event loop ~0.1 ms, so a few clients in a tight loop (thousands a second) would take a core from token
streaming; past the rate a scrape waits its turn, idle.
"""

from __future__ import annotations

import asyncio
import time

import prometheus_client
from fastapi import APIRouter, FastAPI, Request
from vllm.v1.metrics.prometheus import get_prometheus_registry

from server.middleware.auth import has_key, send_unauthorized

router = APIRouter()
METRICS_PATH = "/metrics"


class CachedExposition:
    """The registry's text exposition, rendered again only once it is older than max_age_s."""

    def __init__(self, registry: prometheus_client.CollectorRegistry, max_age_s: float):
        self.registry = registry
        self.max_age_s = max_age_s
        self.renders = 0
        self._body = b""
        self._rendered_at = float("-inf")
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return time.monotonic() - self._rendered_at < self.max_age_s

    async def body(self) -> bytes:
        if self._fresh():
            return self._body
        async with self._lock:  # the scrapes that arrive meanwhile wait for this rendering, not their own
            if not self._fresh():
                self._body = await asyncio.to_thread(prometheus_client.generate_latest, self.registry)
                self._rendered_at = time.monotonic()
                self.renders += 1
        return self._body


class Pacer:
    """Lets callers through at most `per_s` a second, in arrival order; the others sleep until their turn."""

    def __init__(self, per_s: float):
        self.interval = 1 / per_s if per_s else 0.0
        self._next_turn = float("-inf")

    async def turn(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        turn = max(now, self._next_turn)
        self._next_turn = turn + self.interval
        if turn > now:
            await asyncio.sleep(turn - now)


class MetricsEndpoint:
    """Pure ASGI: answers GET /metrics from the cache, paced; everything else goes on to the app. With `api_key`
    (auth_metrics) a scrape without that bearer key gets 401 before it costs anything."""

    def __init__(self, app, max_age_s: float, scrapes_per_s: float, api_key: str | None = None):
        self.app = app
        self.exposition = CachedExposition(get_prometheus_registry(), max_age_s)
        self.pacer = Pacer(scrapes_per_s)
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != METRICS_PATH or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if self.expected is not None and not has_key(scope, self.expected):
            return await send_unauthorized(send)
        await self.pacer.turn()
        body = await self.exposition.body()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", prometheus_client.CONTENT_TYPE_LATEST.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})


@router.get("/v1/moemix/routing")
async def routing(request: Request):
    """Per-expert routed-token counts of every moemix model since start, at most routing_refresh_s old: save one
    and pass it to `moemix plan --usage` as the usage profile."""
    return {eng.name: await eng.refresh_routing() for eng in request.app.state.pool.engines.values()}


def attach_router(app: FastAPI) -> None:
    app.include_router(router)


def instrument(app: FastAPI, max_age_s: float, scrapes_per_s: float, api_key: str | None = None) -> None:
    """HTTP request metrics, then /metrics itself; call after adding every other middleware so both are outermost
    (401/413/429 count; a scrape skips everything)."""
    import vllm.entrypoints.serve.instrumentator.metrics  # noqa: F401  (patches the instrumentator's route walk)
    from prometheus_fastapi_instrumentator import Instrumentator

    try:
        Instrumentator(
            excluded_handlers=[METRICS_PATH, "/health", "/ready", "/version"], registry=get_prometheus_registry()
        ).add().instrument(app)
    except ValueError:  # a second app in the same process: the http_* metrics already exist
        pass
    app.add_middleware(MetricsEndpoint, max_age_s=max_age_s, scrapes_per_s=scrapes_per_s, api_key=api_key)
