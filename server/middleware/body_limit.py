"""Refuse request bodies over `max_body_bytes` with 413, by Content-Length or while the body streams in."""

from __future__ import annotations

from server.errors import send_error


class BodyTooLarge(Exception):
    """Raised from `receive` once a chunked body passes the limit; app.py maps it to 413."""


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.max_bytes:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await send_error(send, 400, "Invalid Content-Length header.")
            if too_big:
                return await send_error(send, 413, f"Request body over {self.max_bytes} bytes.")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"Request body over {self.max_bytes} bytes.")
            return message

        return await self.app(scope, limited_receive, send)
