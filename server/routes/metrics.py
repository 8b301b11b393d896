"""GET /metrics: the one registry (vLLM's), text exposition format, from memory (expert-routing counts as the
background refresher last gathered them). HTTP request metrics come from prometheus-fastapi-instrumentator, as
in vLLM's server (health/metrics/version excluded)."""

from __future__ import annotations

import prometheus_client
from fastapi import APIRouter, FastAPI, Request, Response

from vllm.v1.metrics.prometheus import get_prometheus_registry

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics():  # sync: rendered in a worker thread, so a scrape (~15 ms here) does not hold up the event loop
    registry = get_prometheus_registry()
    return Response(prometheus_client.generate_latest(registry), media_type=prometheus_client.CONTENT_TYPE_LATEST)


@router.get("/v1/moemix/routing")
async def routing(request: Request):
    """Per-expert routed-token counts of every moemix model since start, at most routing_refresh_s old: save one
    and pass it to `moemix plan --usage` as the usage profile."""
    return {eng.name: await eng.refresh_routing() for eng in request.app.state.pool.engines.values()}


def attach_router(app: FastAPI) -> None:
    app.include_router(router)


def instrument(app: FastAPI) -> None:
    """HTTP request metrics; call after adding every other middleware so it is outermost (401/413/429 count)."""
    import vllm.entrypoints.serve.instrumentator.metrics  # noqa: F401  (patches the instrumentator's route walk)
    from prometheus_fastapi_instrumentator import Instrumentator

    try:
        Instrumentator(excluded_handlers=["/metrics", "/health", "/version"],
                       registry=get_prometheus_registry()).add().instrument(app)
    except ValueError:  # a second app in the same process: the http_* metrics already exist
        pass
