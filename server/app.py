"""build_app(pool, settings): the FastAPI application over a started EnginePool.

Errors are OpenAI JSON everywhere: vLLM's own exception handlers (validation -> 400, VLLMError subclasses to
their status, anything else -> 500 with a sanitized message) plus ours (middleware: 401, 413). No request can
take the process down: every exception ends as a JSON error for that request only.

Background tasks (lifespan): vLLM's periodic stats log lines, the expert-routing counts gathered from the
workers every routing_refresh_s (so /metrics serves them from memory and a scrape never reaches a worker), and
the engine watcher: when an engine dies it logs one ERROR line and, with `on_engine_death: exit` (the default),
asks the HTTP server to stop (app.state.request_shutdown, set by cli.serve): no new connections, the other
models' in-flight streams finish (up to drain_timeout_s), and the process exits with ENGINE_DEATH_EXIT_CODE so a
supervisor (Docker, Kubernetes, systemd) restarts it. With `stay` the server goes on answering 503 for it.
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
from server.middleware.auth import APIKeyMiddleware, open_paths
from server.middleware.body_limit import BodyLimitMiddleware
from server.middleware.shed import ShedMiddleware
from server.routes import chat, completions, health, metrics, models, tokenize
from server.settings import ServerSettings

logger = logging.getLogger("moemix.server")
ENGINE_DEATH_EXIT_CODE = 3  # the process's exit status after an engine died (on_engine_death: exit)
ENGINE_WATCH_S = 0.5  # how often the watcher looks at the engines (a flag read each)


async def _every(interval_s: float, step) -> None:
    while True:
        await step()
        await asyncio.sleep(interval_s)


def engine_died(app: FastAPI, eng) -> None:
    """One ERROR line for the dead engine; with on_engine_death=exit, stop serving (drain) and exit non-zero."""
    settings: ServerSettings = app.state.settings
    eng.death_reported = True
    others = [name for name, e in app.state.pool.engines.items() if not e.dead]
    if settings.on_engine_death == "exit":
        app.state.exit_code = ENGINE_DEATH_EXIT_CODE
        then = (
            f"exiting with status {ENGINE_DEATH_EXIT_CODE} once the in-flight requests of {', '.join(others)} "
            f"have finished (at most {settings.drain_timeout_s:g} s; --on-engine-death exit)"
            if others
            else f"exiting with status {ENGINE_DEATH_EXIT_CODE} (--on-engine-death exit)"
        )
    else:
        then = "staying up, answering 503 for this model (--on-engine-death stay); restart the server to recover it"
    logger.error("ENGINE DEAD: model %s: %s; %s", eng.name, eng.how_it_died(), then)
    if settings.on_engine_death == "exit":
        app.state.request_shutdown()


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
        async def watch_engines():
            for eng in pool.engines.values():
                if eng.dead and not eng.death_reported and not eng.stopped:
                    engine_died(app, eng)

        tasks = [
            asyncio.create_task(_every(log_interval_s, log_stats)),
            asyncio.create_task(_every(settings.routing_refresh_s, refresh_routing)),
            asyncio.create_task(_every(ENGINE_WATCH_S, watch_engines)),
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
    app.state.exit_code = 0  # ENGINE_DEATH_EXIT_CODE once an engine died under on_engine_death=exit
    app.state.request_shutdown = lambda: None  # cli.serve: tell uvicorn to stop (graceful, drains)
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

    # Added later = further out: the probes first, then /metrics, HTTP metrics see everything else, then auth and
    # the size check run before any parsing; admission slots are released when the whole exchange is over.
    app.add_middleware(AdmissionReleaseMiddleware)
    app.add_middleware(ShedMiddleware, pool=pool, retry_after_s=settings.retry_after_s)  # 429 before parsing
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, open_paths=open_paths(settings.auth_metrics))
    metrics_key = settings.api_key if settings.auth_metrics else None
    metrics.instrument(app, settings.metrics_max_age_s, settings.metrics_scrapes_per_s, api_key=metrics_key)
    app.add_middleware(health.ProbeEndpoint, pool=pool)
    metrics_mod.install(pool)
    return app
