"""The probes, GET /health (liveness) and GET /ready (readiness), answered by the outermost ASGI layer; and
GET /version.

/health: 200 `{"status": "ok", "models": {name: "ok"}}` while every engine is alive, 503 (`"unhealthy"`, the
dead model named `"dead"`) once one died. /ready: 200 when every engine is alive and every model has a free
admission slot, else 503, each model with its status (`ok`, `dead`, `full`), requests in flight and limit; for
load balancers (take the replica out while it would answer 429/503), not for restarts.

A probe must answer however busy the server is: a liveness probe that times out restarts a healthy replica.
So `ProbeEndpoint` answers both before routing, middleware, auth and instrumentation, from memory (a flag and
two counters per model: no engine call), and the HTTP protocol (server/connection.py) exempts them from
uvicorn's concurrency limit.
"""

from __future__ import annotations

import json
import platform

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

import server

router = APIRouter()
HEALTH_PATH, READY_PATH = "/health", "/ready"


def health(pool) -> tuple[int, dict]:
    status = {name: "dead" if eng.dead else "ok" for name, eng in pool.engines.items()}
    ok = all(s == "ok" for s in status.values())
    return (200 if ok else 503), {"status": "ok" if ok else "unhealthy", "models": status}


def ready(pool) -> tuple[int, dict]:
    models = {}
    for name, eng in pool.engines.items():
        gate = eng.gate
        status = "dead" if eng.dead else "full" if gate.in_flight >= gate.limit else "ok"
        models[name] = {"status": status, "in_flight": gate.in_flight, "limit": gate.limit}
    ok = all(m["status"] == "ok" for m in models.values())
    return (200 if ok else 503), {"status": "ready" if ok else "not ready", "models": models}


class ProbeEndpoint:
    """Pure ASGI, outermost: answers GET/HEAD /health and /ready; everything else goes on to the app."""

    def __init__(self, app, pool):
        self.app = app
        self.pool = pool

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if scope["type"] != "http" or path not in (HEALTH_PATH, READY_PATH) or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        status, body = (health if path == HEALTH_PATH else ready)(self.pool)
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload if scope["method"] == "GET" else b""})


@router.get("/version")
async def version():
    from vllm import __version__ as vllm_version

    import vllm_moemix

    return JSONResponse(
        {
            "version": server.__version__,
            "vllm_moemix": vllm_moemix.__version__,
            "vllm": vllm_version,
            "python": platform.python_version(),
        }
    )


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
