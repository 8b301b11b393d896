"""POST /tokenize (vLLM's TokenizeRequest: `prompt` or chat `messages`, routed by `model`; admitted like a
generation request, one slot, so tokenizing cannot bypass the bound)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.tokenize.protocol import TokenizeRequest
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from server.routes.common import admit, render, resolve
from server.routes.completions import _ERRORS

router = APIRouter()


@router.post("/tokenize", dependencies=[Depends(validate_json_request)], responses=_ERRORS)
async def tokenize(request: TokenizeRequest, raw_request: Request):
    eng = resolve(raw_request, request.model)
    if isinstance(eng, JSONResponse):
        return eng
    if (rejected := admit(raw_request, eng, request)) is not None:
        return rejected
    return render(await eng.tokenization.create_tokenize(request, raw_request), raw_request)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
