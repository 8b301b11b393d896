"""build_app(pool, settings): the FastAPI application over a started EnginePool.

Errors are OpenAI JSON everywhere: vLLM's own exception handlers (validation -> 400, VLLMError subclasses to
their status, anything else -> 500 with a sanitized message) plus ours (middleware: 401, 413). No request can
take the process down: every exception ends as a JSON error for that request only.

Background tasks (lifespan): vLLM's periodic stats log lines, and the expert-routing counts gathered from the
workers every routing_refresh_s, so /metrics serves them from memory and a scrape never reaches a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from argparse import Namespace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import server
from server import metrics as metrics_mod
from server.engine import EnginePool
from server.errors import error_response
from server.middleware.admission import AdmissionReleaseMiddleware
from server.middleware.auth import APIKeyMiddleware
from server.middleware.body_limit import BodyLimitMiddleware
from server.routes import chat, completions, health, metrics, models, tokenize
from server.settings import ServerSettings

logger = logging.getLogger("moemix.server")


async def _every(interval_s: float, step) -> None:
    while True:
        await step()
        await asyncio.sleep(interval_s)


def _lifespan(pool: EnginePool, settings: ServerSettings, log_interval_s: float, shutdown_engines: bool):
    async def log_stats():  # vLLM's periodic throughput log lines, as its own server does
        for eng in pool.engines.values():
            with contextlib.suppress(Exception):
                await eng.client.do_log_stats()

    async def refresh_routing():
        for eng in pool.engines.values():
            await eng.refresh_routing()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [
            asyncio.create_task(_every(log_interval_s, log_stats)),
            asyncio.create_task(_every(settings.routing_refresh_s, refresh_routing)),
        ]
        try:
            yield
        finally:
            # Runs after uvicorn has drained in-flight requests (timeout_graceful_shutdown).
            for task in tasks:
                task.cancel()
            if shutdown_engines:
                logger.info("stopping engines")
                pool.shutdown()

    return lifespan


def build_app(pool: EnginePool, settings: ServerSettings, shutdown_engines: bool = True) -> FastAPI:
    import vllm.envs as envs
    from vllm.entrypoints.serve.exception_handling.handlers.validation import validation_exception_handler
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    lifespan = _lifespan(pool, settings, envs.VLLM_LOG_STATS_INTERVAL, shutdown_engines)
    app = FastAPI(title="moemix OpenAI-compatible server", version=server.__version__, lifespan=lifespan)
    app.state.pool = pool
    app.state.settings = settings
    app.state.args = Namespace(log_error_stack=False)  # read by vLLM's exception handlers

    for module in (completions, chat, models, tokenize, health, metrics):
        module.attach_router(app)
    init_exception_handler(app)

    @app.exception_handler(RequestValidationError)
    async def validation_error(req: Request, exc: RequestValidationError):
        # vLLM's handler (bounded, sanitized message; `param` = the offending field), with the same `type`
        # as every other 400 here.
        resp = await validation_exception_handler(req, exc)
        body = json.loads(resp.body)
        body["error"]["type"] = "BadRequestError"
        return JSONResponse(body, status_code=resp.status_code)

    @app.exception_handler(EngineGenerateError)
    @app.exception_handler(EngineDeadError)
    async def engine_error(_: Request, exc: EngineGenerateError | EngineDeadError):
        # vLLM's handler stops the whole server through app.state.server (absent here: an AttributeError, 500
        # again); one model's engine failing must not take the other models down.
        if isinstance(exc, EngineDeadError):
            return error_response(503, "The model's engine is dead; the server needs a restart.")
        return error_response(500, "The engine failed to process this request.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):  # unknown route 404, wrong method 405, ...
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    # Added later = further out: HTTP metrics see everything, then auth and the size check run before any
    # parsing; admission slots are released when the whole exchange is over.
    app.add_middleware(AdmissionReleaseMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    metrics.instrument(app, settings.metrics_max_age_s, settings.metrics_scrapes_per_s)
    metrics_mod.install(pool)
    return app
