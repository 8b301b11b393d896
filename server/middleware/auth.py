"""Optional Bearer API key on /v1/* and /tokenize (health, metrics and version stay open for probes/scrapers)."""

from __future__ import annotations

import hmac

from server.errors import send_error

PROTECTED_PREFIXES = ("/v1/", "/tokenize")


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not scope["path"].startswith(
                PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            return await send_error(send, 401, "Invalid or missing API key (expected `Authorization: Bearer <key>`).",
                                    headers={"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)
