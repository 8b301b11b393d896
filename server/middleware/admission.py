"""Releases the admission slots an engine route took, when the whole ASGI exchange is over.

The route appends its Slot to scope[SLOTS_SCOPE_KEY]; this middleware releases them in `finally`, after a
streamed body has been sent to the end, the client disconnected, or anything raised: slots cannot leak.
A response whose last body message was never sent counts as incomplete (moemix_requests_incomplete_total),
as does a stream that ended in an engine error (routes/common.py releases those slots itself).
"""

from __future__ import annotations

SLOTS_SCOPE_KEY = "moemix.admission_slots"


class AdmissionReleaseMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        slots = scope[SLOTS_SCOPE_KEY] = []
        completed = False

        async def tracking_send(message):
            nonlocal completed
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            for slot in slots:
                slot.release(completed)
