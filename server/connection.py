"""uvicorn's HTTP protocol (httptools) with two fixes for a server under load.

1. **No request is dropped by the keep-alive timer.** uvicorn closes a keep-alive connection when its idle timer
   fires. Under uvloop (libuv) each loop iteration runs the due timers *before* it polls the sockets, so when
   the loop is busy for a while (seconds under overload on a small machine) a client that sent its next request
   on that connection just before the timer fired has the request closed unanswered: the client gets no status
   and cannot know whether it ran. Here the timer first asks the kernel whether the connection has unread bytes
   (FIONREAD) and, if so, leaves it open: the request is read in the same iteration and answered.
2. **Probes are never refused.** Past `limit_concurrency` uvicorn answers 503 without reading the request; for
   GET /health and /ready that would fail liveness probes exactly when the server is busiest, so they are
   exempt (server.routes.health answers them from memory).
"""

from __future__ import annotations

import fcntl
import struct
import termios

PROBE_TARGETS = (b"/health", b"/ready")


def unread_bytes(transport) -> int:
    """Bytes the kernel holds for this connection that the loop has not read yet (0 if unknown)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


def http_protocol():
    """The protocol class for uvicorn.Config(http=...): ours over httptools, or uvicorn's choice without it."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn's h11 protocol, unpatched
        return "auto"

    class MoemixHttpProtocol(HttpToolsProtocol):
        def timeout_keep_alive_handler(self) -> None:
            if not self.transport.is_closing() and unread_bytes(self.transport):
                # a request arrived and waits to be read (a busy loop ran this timer first): keep the connection
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
                return
            super().timeout_keep_alive_handler()

        def on_headers_complete(self) -> None:
            if self.limit_concurrency is None or self.url.split(b"?", 1)[0] not in PROBE_TARGETS:
                return super().on_headers_complete()
            limit, self.limit_concurrency = self.limit_concurrency, None
            try:
                super().on_headers_complete()
            finally:
                self.limit_concurrency = limit

    return MoemixHttpProtocol
