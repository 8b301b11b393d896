"""Bearer API key on every path but the open ones (health, metrics and version for probes and scrapers; the
OpenAPI schema and its docs pages).

Fail closed: the open set is an allow-list of exact paths, compared after collapsing repeated slashes and
resolving dot segments, so `//v1/models` or `/health/../v1/models` needs the key like `/v1/models` does. The
scheme is case-insensitive (RFC 7235: `bearer KEY` is `Bearer KEY`); the key is compared in constant time.
"""

from __future__ import annotations

import hmac
import posixpath

from server.errors import send_error

OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def normalized_path(path: str) -> str:
    """The path as a router that collapsed `//` and resolved `.`/`..` would see it."""
    return posixpath.normpath("/" + path.lstrip("/"))


def bearer_token(authorization: bytes) -> bytes | None:
    scheme, _, token = authorization.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or normalized_path(scope["path"]) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        token = bearer_token(dict(scope["headers"]).get(b"authorization", b""))
        if token is None or not hmac.compare_digest(token, self.expected):
            return await send_error(
                send,
                401,
                "Invalid or missing API key (expected `Authorization: Bearer <key>`).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await self.app(scope, receive, send)
