"""What every engine route does: pick the engine by `model`, admit (or 400/429), render vLLM's result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.sse_keep_alive import SSE_KEEP_ALIVE_COMMENT

from server.admission import request_slots
from server.engine import EnginePool, ModelEngine
from server.errors import error_body, error_response
from server.middleware.admission import SLOTS_SCOPE_KEY
from server.middleware.shed import rate_limited

logger = logging.getLogger("moemix.server")
SSE_ERROR_PREFIX = 'data: {"error"'  # how vLLM's stream generators report a failure (then `data: [DONE]`)
MAX_ECHOED_NAME = 200  # an unknown model name is quoted back at most this long (a body may be megabytes)


def pool(raw_request: Request) -> EnginePool:
    return raw_request.app.state.pool


def resolve(raw_request: Request, model: str | None) -> ModelEngine | JSONResponse:
    """The engine for `model`, or the OpenAI 404 (503 when that engine is dead)."""
    p = pool(raw_request)
    eng = p.get(model)
    if eng is None:
        names = ", ".join(p.engines)
        shown = str(model) if len(str(model)) <= MAX_ECHOED_NAME else f"{model[:MAX_ECHOED_NAME]}...[truncated]"
        return error_response(404, f"The model `{shown}` does not exist. Served models: {names}.", param="model")
    if eng.dead:
        return error_response(503, f"The engine of model `{eng.name}` is dead; the server needs a restart.")
    return eng


def admit(raw_request: Request, eng: ModelEngine, request) -> JSONResponse | None:
    """Take admission slots for this request (released by AdmissionReleaseMiddleware), or the 400/429."""
    n = request_slots(request)
    if n > eng.gate.limit:  # would wait forever: say so instead of 429 (retrying cannot help)
        return error_response(
            400,
            f"This request needs {n} slots (n × prompts); model `{eng.name}` admits at most "
            f"{eng.gate.limit}. Send fewer prompts or a smaller n per request.",
        )
    slot = eng.gate.try_acquire(n)
    if slot is None:
        return rate_limited(eng, raw_request.app.state.settings.retry_after_s)
    holder = raw_request.scope.get(SLOTS_SCOPE_KEY)
    if holder is None:  # not under the middleware (should not happen): release when the response is built
        slot.release()
    else:
        holder.append(slot)
    return None


def _fail(raw_request: Request) -> None:
    """The engine failed this request: free its slots now, counted incomplete (release is idempotent)."""
    for slot in raw_request.scope.get(SLOTS_SCOPE_KEY, ()):
        slot.release(completed=False)


async def _relay(chunks: AsyncIterator[str], raw_request: Request, keep_alive_s: float) -> AsyncIterator[str]:
    """vLLM's SSE chunks, relayed by one task per stream: the response sends, in one piece, everything that arrived
    since its last send (under load, the events of several engine steps leave in one write: one ASGI send and one
    syscall instead of one per event, and no task per event as vLLM's keep-alive wrapper creates), and a
    `: keep-alive` comment whenever nothing arrived for keep_alive_s (0: never). An error event (vLLM's, or ours
    if the generator raised: the engine died mid-stream) fails the request; the stream always ends with
    `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    pending: list[str] = []
    wake = asyncio.Event()
    ended: list[BaseException | None] = []  # [None] at the end, [exception] if the generator raised

    async def pump() -> None:
        try:
            async for chunk in chunks:
                pending.append(chunk)
                wake.set()
            ended.append(None)
        except Exception as e:
            ended.append(e)
        finally:
            wake.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            if not pending and not ended:
                timer = loop.call_later(keep_alive_s, wake.set) if keep_alive_s > 0 else None
                await wake.wait()
                if timer is not None:
                    timer.cancel()
            wake.clear()
            if pending:
                batch = "".join(pending)
                pending.clear()
                if SSE_ERROR_PREFIX in batch:
                    _fail(raw_request)
                yield batch
            elif ended:
                if ended[0] is not None:
                    logger.error("stream of %s failed", raw_request.url.path, exc_info=ended[0])
                    _fail(raw_request)
                    body = error_body(500, "The engine failed while generating this response.")
                    yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
                return
            else:
                yield SSE_KEEP_ALIVE_COMMENT
    finally:  # the client went away (or we are done): stop the generator, which aborts the request in the engine
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        with contextlib.suppress(BaseException):
            await chunks.aclose()


def render(result, raw_request: Request):
    """vLLM serving result -> response: ErrorResponse, a pydantic response, or an SSE string generator (with a
    `: keep-alive` comment whenever it is silent for sse_keep_alive_s: queued, or a long prefill)."""
    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    keep_alive_s = raw_request.app.state.settings.sse_keep_alive_s
    return StreamingResponse(_relay(result, raw_request, keep_alive_s), media_type="text/event-stream")
