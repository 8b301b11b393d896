"""What every generation route does: pick the engine by `model`, admit (or 429), render vLLM's result."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from server.admission import request_slots
from server.engine import EnginePool, ModelEngine
from server.errors import error_response
from server.middleware.admission import SLOTS_SCOPE_KEY
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.sse_keep_alive import with_sse_keep_alive


def pool(raw_request: Request) -> EnginePool:
    return raw_request.app.state.pool


def resolve(raw_request: Request, model: str | None) -> ModelEngine | JSONResponse:
    """The engine for `model`, or the OpenAI 404 (503 when that engine is dead)."""
    p = pool(raw_request)
    eng = p.get(model)
    if eng is None:
        names = ", ".join(p.engines)
        return error_response(404, f"The model `{model}` does not exist. Served models: {names}.", param="model")
    if eng.dead:
        return error_response(503, f"The engine of model `{eng.name}` is dead; the server needs a restart.")
    return eng


def admit(raw_request: Request, eng: ModelEngine, request) -> JSONResponse | None:
    """Take admission slots for this request (released by AdmissionReleaseMiddleware), or the 429."""
    slot = eng.gate.try_acquire(request_slots(request))
    if slot is None:
        retry = str(raw_request.app.state.settings.retry_after_s)
        return error_response(429, f"Model `{eng.name}` is at its limit of {eng.gate.limit} requests in flight; "
                              f"retry after {retry} s.", headers={"Retry-After": retry})
    holder = raw_request.scope.get(SLOTS_SCOPE_KEY)
    if holder is None:  # not under the middleware (should not happen): release when the response is built
        slot.release()
    else:
        holder.append(slot)
    return None


def render(result, raw_request: Request):
    """vLLM serving result -> response: ErrorResponse, a pydantic response, or an SSE string generator."""
    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    interval = float(getattr(raw_request.app.state.args, "sse_keep_alive_interval", 0) or 0)
    return StreamingResponse(with_sse_keep_alive(result, interval), media_type="text/event-stream")
