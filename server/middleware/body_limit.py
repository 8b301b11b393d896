"""Refuse request bodies over `max_bytes` with 413: by Content-Length up front, and a chunked body (no length)
by reading it here, up to the limit, before the app sees any of it (a body parser would turn an error raised
mid-read into its own 400)."""

from __future__ import annotations

from server.errors import send_error


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.max_bytes:
            return await self.app(scope, receive, send)
        too_big = f"Request body over {self.max_bytes} bytes."
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                over = int(length) > self.max_bytes
            except ValueError:
                return await send_error(send, 400, "Invalid Content-Length header.")
            if over:
                return await send_error(send, 413, too_big)
            return await self.app(scope, receive, send)  # the server stops the body at Content-Length

        body, more = [], True
        seen = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body.append(message.get("body", b""))
            seen += len(body[-1])
            if seen > self.max_bytes:
                return await send_error(send, 413, too_big)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay_receive():  # the whole body once, then the server's own messages (disconnect)
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)
