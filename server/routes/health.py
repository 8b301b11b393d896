"""GET /health (200, or 503 when any engine is dead; per-model status in the body) and GET /version."""

from __future__ import annotations

import platform

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

import server
from server.routes.common import pool

router = APIRouter()


@router.get("/health")
async def health(raw_request: Request):
    engines = pool(raw_request).engines
    status = {}
    for name, eng in engines.items():
        try:
            await eng.client.check_health()
            status[name] = "ok"
        except Exception:
            status[name] = "dead"
    ok = all(s == "ok" for s in status.values())
    return JSONResponse({"status": "ok" if ok else "unhealthy", "models": status}, status_code=200 if ok else 503)


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
