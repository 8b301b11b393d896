"""POST /v1/chat/completions (vLLM's ChatCompletionRequest, checked strictly first:
server.protocol.CheckedChatCompletionRequest; roles checked against the model's chat template; SSE streaming)."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.utils.api_utils import validate_json_request, with_cancellation

from server.protocol import CheckedChatCompletionRequest, check_roles, roles_of_template
from server.routes.common import admit, render, resolve
from server.routes.completions import _ERRORS

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(validate_json_request)],
    responses={HTTPStatus.OK.value: {"content": {"text/event-stream": {}}}, **_ERRORS},
)
@with_cancellation
async def create_chat_completion(request: CheckedChatCompletionRequest, raw_request: Request):
    eng = resolve(raw_request, request.model)
    if isinstance(eng, JSONResponse):
        return eng
    roles = eng.chat_roles | roles_of_template(request.chat_template) if request.chat_template else eng.chat_roles
    check_roles(request.messages, roles)  # VLLMValidationError: vLLM's handler answers 400 naming the field
    if (rejected := admit(raw_request, eng, request)) is not None:
        return rejected
    return render(await eng.chat.create_chat_completion(request, raw_request), raw_request)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
