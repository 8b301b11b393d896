"""GET /v1/models and /v1/models/{id}: every served model with its weight facts (and moemix summary)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from server.engine import ModelEngine
from server.errors import error_response
from server.protocol import MoemixFacts, MoemixModelCard, MoemixModelList, WeightFactsCard
from server.routes.common import pool

router = APIRouter()


def model_card(eng: ModelEngine) -> MoemixModelCard:
    moemix = eng.facts.moemix_json()
    return MoemixModelCard(
        id=eng.name,
        created=eng.created,
        root=eng.path,
        max_model_len=eng.max_model_len,
        weights=WeightFactsCard(**eng.facts.to_json()),
        kernels=eng.kernels,
        moemix=MoemixFacts(**moemix) if moemix is not None else None,
    )


@router.get("/v1/models", response_model=MoemixModelList)
async def list_models(raw_request: Request):
    cards = [model_card(e) for e in pool(raw_request).engines.values()]
    return JSONResponse(MoemixModelList(data=cards).model_dump())


@router.get("/v1/models/{model_id:path}", response_model=MoemixModelCard)
async def retrieve_model(model_id: str, raw_request: Request):
    eng = pool(raw_request).engines.get(model_id)
    if eng is None:
        return error_response(404, f"The model `{model_id}` does not exist.", param="model")
    return JSONResponse(model_card(eng).model_dump())


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
