"""Load shedding before parsing: a request to a model whose admission bound is reached gets its 429 here, from the
body's `model` alone, before FastAPI validates it with vLLM's request model and before the route spawns its
cancellation tasks.

Under overload most requests are rejected, and each one the full stack handles costs the event loop about as
much as a dozen streamed tokens; answered here it costs a JSON parse. The route still admits precisely (`n`,
prompts, 400 for requests that can never fit); this layer only answers what the route would answer 429 anyway:
a model with no free slot. Anything it cannot read (not JSON, no such model, a dead engine) goes on unchanged.
"""

from __future__ import annotations

import json

from server.errors import error_response

SHED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize"})


def rate_limited(eng, retry_after_s: int):
    retry = str(retry_after_s)
    return error_response(
        429,
        f"Model `{eng.name}` is at its limit of {eng.gate.limit} requests in flight; retry after {retry} s.",
        headers={"Retry-After": retry},
    )


class ShedMiddleware:
    def __init__(self, app, pool, retry_after_s: int):
        self.app = app
        self.pool = pool
        self.retry_after_s = retry_after_s

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in SHED_PATHS
            or not any(e.gate.in_flight >= e.gate.limit for e in self.pool.engines.values())
        ):  # nothing to shed: not even the body is touched
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        eng = self._full_engine(body)
        if eng is not None:
            eng.gate.rejected += 1
            return await rate_limited(eng, self.retry_after_s)(scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay_receive():  # the body once, then the server's own messages (disconnect)
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)

    def _full_engine(self, body: bytes):
        try:
            data = json.loads(body)
        except ValueError:
            return None
        model = data.get("model") if isinstance(data, dict) else None
        if model is not None and not isinstance(model, str):
            return None
        eng = self.pool.get(model)
        if eng is None or eng.dead or eng.gate.in_flight < eng.gate.limit:
            return None
        return eng
