"""OpenAI error bodies: {"error": {"message", "type", "param", "code"}} (vLLM's ErrorResponse; code = HTTP status).

`type` follows vLLM's convention, the `openai` client's exception class names: BadRequestError,
AuthenticationError, NotFoundError, RateLimitError, InternalServerError, ServiceUnavailableError.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    415: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_body(status: int, message: str, param: str | None = None, err_type: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": err_type or _TYPES.get(status, HTTPStatus(status).phrase),
            "param": param,
            "code": status,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    err_type: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, err_type), status_code=status, headers=headers)


async def send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Send an error from pure ASGI middleware (no Request object)."""
    await error_response(status, message, headers=headers)({"type": "http"}, None, send)
