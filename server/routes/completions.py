"""POST /v1/completions (vLLM's CompletionRequest, shape-checked first: server.protocol.CheckedCompletionRequest;
streaming as SSE)."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import validate_json_request, with_cancellation

from server.protocol import CheckedCompletionRequest
from server.routes.common import admit, render, resolve

router = APIRouter()
_ERRORS = {
    s.value: {"model": ErrorResponse}
    for s in (
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.UNAUTHORIZED,
        HTTPStatus.NOT_FOUND,
        HTTPStatus.TOO_MANY_REQUESTS,
        HTTPStatus.SERVICE_UNAVAILABLE,
    )
}


@router.post(
    "/v1/completions",
    dependencies=[Depends(validate_json_request)],
    responses={HTTPStatus.OK.value: {"content": {"text/event-stream": {}}}, **_ERRORS},
)
@with_cancellation
async def create_completion(request: CheckedCompletionRequest, raw_request: Request):
    eng = resolve(raw_request, request.model)
    if isinstance(eng, JSONResponse):
        return eng
    if (rejected := admit(raw_request, eng, request)) is not None:
        return rejected
    return render(await eng.completion.create_completion(request, raw_request), raw_request)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
