"""Bearer API key on every path but the open ones: the probes (/health, /ready) always; /metrics, /version and
the OpenAPI schema and its docs pages too unless `auth_metrics` puts them behind the key.

Fail closed: the open set is an allow-list of exact paths, compared after collapsing repeated slashes and
resolving dot segments, so `//v1/models` or `/health/../v1/models` needs the key like `/v1/models` does. The
scheme is case-insensitive (RFC 7235: `bearer KEY` is `Bearer KEY`); the key is compared in constant time.
"""

from __future__ import annotations

import hmac
import posixpath

from server.errors import send_error

PROBE_PATHS = frozenset({"/health", "/ready"})
DOC_PATHS = frozenset({"/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
OPEN_PATHS = PROBE_PATHS | DOC_PATHS  # the default (auth_metrics off)


def open_paths(auth_metrics: bool) -> frozenset[str]:
    return PROBE_PATHS if auth_metrics else OPEN_PATHS


def normalized_path(path: str) -> str:
    """The path as a router that collapsed `//` and resolved `.`/`..` would see it."""
    return posixpath.normpath("/" + path.lstrip("/"))


def bearer_token(authorization: bytes) -> bytes | None:
    scheme, _, token = authorization.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def has_key(scope, expected: bytes) -> bool:
    token = bearer_token(dict(scope["headers"]).get(b"authorization", b""))
    return token is not None and hmac.compare_digest(token, expected)


async def send_unauthorized(send) -> None:
    await send_error(
        send,
        401,
        "Invalid or missing API key (expected `Authorization: Bearer <key>`).",
        headers={"WWW-Authenticate": "Bearer"},
    )


class APIKeyMiddleware:
    def __init__(self, app, api_key: str, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.expected = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope.get("method") == "OPTIONS"
            or normalized_path(scope["path"]) in self.open_paths
        ):
            return await self.app(scope, receive, send)
        if not has_key(scope, self.expected):
            return await send_unauthorized(send)
        return await self.app(scope, receive, send)
