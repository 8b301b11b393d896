"""Overload run: more streaming clients than a model admits, back to back, with a separate liveness prober.

    python -m loadtests.overload --host http://127.0.0.1:8000 --model tiny-moemix --clients 64 --duration 45 \
        [--max-tokens 32] [--retry-pause 0.05] [--probe-interval 0.1] [--api-key K] [--out overload.json]

Each client holds one keep-alive HTTP/1.1 connection (as a pooled client does) and sends streaming completions
back to back; after a 429 or 503 it pauses --retry-pause seconds (deliberately shorter than Retry-After: an
impatient client). Every request sent ends in exactly one of: an HTTP status (200, 429, 503, anything else), or
**no status** — the connection closed, reset or timed out before a status line arrived, so the client cannot know
whether the request ran. A connection the server closed while it was idle is not a lost request: the client
reconnects before sending, as pooled clients do.

Meanwhile a separate process probes GET --probe-path (default /health) every --probe-interval seconds on a new
connection each time, as the kubelet does, so its latencies measure the server and not this process's own loop.

Prints one JSON summary (and writes it to --out): requests sent, per status, no-status (with examples),
incomplete 200 streams (no `[DONE]`, or an error event), 429s without Retry-After, 5xx other than 503, probe
latency p50/p99/max, and of the admitted streams TTFT, ITL (gaps between text chunks; events that arrive in one
read count as gaps of ~0) and TPOT (per stream: first to last text chunk over the gaps), in ms. Loopback hosts
only, plain HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from loadtests.metrics import percentile

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # a status line or a chunk slower than this ends the request (counted as no status / broken)


class NoStatus(Exception):
    """The connection ended (closed, reset, timed out) before a status line arrived."""


@dataclass
class Outcome:
    status: int | None  # None: no status
    elapsed_s: float
    error: str | None = None  # no status: why; 200: why the stream is incomplete
    retry_after: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0  # text-bearing events


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened only when the server closed it while idle."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def ensure_open(self) -> None:
        idle_closed = self.reader is not None and (self.reader.at_eof() or self.writer.is_closing())
        if self.reader is None or idle_closed:
            if idle_closed:
                self.reconnects += 1
                self.close()
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT_S
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def _line(self) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), READ_TIMEOUT_S)
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed")
        return line

    async def request(self, path: str, body: bytes, headers: dict[str, str]):
        """Send one POST; return (status, headers, async iterator over body bytes). NoStatus if none arrived."""
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        try:
            self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await self.writer.drain()
            status_line = await self._line()
        except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            self.close()
            raise NoStatus(type(e).__name__ + (f": {e}" if str(e) else "")) from None
        status = int(status_line.split()[1])
        response_headers = {}
        while (line := await self._line()) not in (b"\r\n", b"\n"):
            name, _, value = line.decode("latin-1").partition(":")
            response_headers[name.strip().lower()] = value.strip()
        return status, response_headers, self._body(response_headers)

    async def _body(self, headers: dict[str, str]):
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self._line()).split(b";")[0], 16)
                if size == 0:
                    await self._line()  # no trailers
                    break
                data = await asyncio.wait_for(self.reader.readexactly(size + 2), READ_TIMEOUT_S)
                yield data[:-2]
        else:
            length = int(headers.get("content-length", 0))
            if length:
                yield await asyncio.wait_for(self.reader.readexactly(length), READ_TIMEOUT_S)
        if headers.get("connection", "").lower() == "close":
            self.close()


async def one_request(conn: Connection, path: str, body: bytes, headers: dict[str, str]) -> Outcome:
    t0 = time.perf_counter()
    try:
        await conn.ensure_open()
    except (OSError, asyncio.TimeoutError) as e:
        return Outcome(None, time.perf_counter() - t0, f"connect: {type(e).__name__}")
    try:
        status, response_headers, chunks = await conn.request(path, body, headers)
    except NoStatus as e:
        return Outcome(None, time.perf_counter() - t0, str(e))
    out = Outcome(status, 0.0, retry_after=response_headers.get("retry-after"))
    buf, last, done = b"", None, False
    try:
        async for data in chunks:
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue  # an SSE comment (keep-alive)
                payload = event[6:]
                if payload == b"[DONE]":
                    done = True
                    continue
                if status != 200:
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    out.error = f"error event: {chunk['error'].get('message', '')[:200]}"
                    continue
                if any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                    now = time.perf_counter()
                    if last is None:
                        out.ttft_s = now - t0
                    else:
                        out.itl_s.append(now - last)
                    last = now
                    out.tokens += 1
    except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        conn.close()
        out.error = out.error or f"body: {type(e).__name__}"
    if status == 200 and not done and out.error is None:
        out.error = "stream ended without [DONE]"
    out.elapsed_s = time.perf_counter() - t0
    return out


async def run_clients(
    url: str,
    model: str,
    clients: int,
    duration_s: float,
    max_tokens: int,
    retry_pause_s: float,
    api_key: str | None,
) -> list[Outcome]:
    parsed = urlparse(url)
    body = json.dumps(
        {
            "model": model,
            "prompt": "The Python interpreter",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = time.monotonic() + duration_s
    outcomes: list[Outcome] = []

    async def client() -> None:
        conn = Connection(parsed.hostname, parsed.port or 80)
        try:
            while time.monotonic() < deadline:
                out = await one_request(conn, "/v1/completions", body, headers)
                outcomes.append(out)
                if out.status != 200:
                    await asyncio.sleep(retry_pause_s)
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes


# ------------------------------------------------------------------------------------------- the prober

PROBE_SCRIPT = r"""
import http.client, json, signal, sys, time
host, port, path, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
out = []
while not stop:
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", path, headers={"Connection": "close"})
        r = conn.getresponse()
        r.read()
        status = r.status
        conn.close()
    except Exception as e:
        status = None
    out.append((time.perf_counter() - t0, status))
    time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
print(json.dumps(out))
"""


def start_prober(url: str, path: str, interval_s: float) -> subprocess.Popen:
    parsed = urlparse(url)
    argv = [sys.executable, "-c", PROBE_SCRIPT, parsed.hostname, str(parsed.port or 80), path, str(interval_s)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def stop_prober(proc: subprocess.Popen) -> list[tuple[float, int | None]]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return []
    return [tuple(x) for x in json.loads(out or "[]")]


# ------------------------------------------------------------------------------------------- summary


def _ms(values: list[float]) -> dict[str, float | None]:
    def q(p):
        v = percentile(values, p)
        return None if v is None else round(1e3 * v, 1)

    return {"n": len(values), "p50": q(50), "p99": q(99), "max": round(1e3 * max(values), 1) if values else None}


def summarize(outcomes: list[Outcome], probes: list[tuple[float, int | None]], **config: Any) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = "no_status" if o.status is None else str(o.status)
        statuses[key] = statuses.get(key, 0) + 1
    ok = [o for o in outcomes if o.status == 200]
    complete = [o for o in ok if o.error is None]
    lost = [o for o in outcomes if o.status is None]
    return {
        **config,
        "sent": len(outcomes),
        "statuses": dict(sorted(statuses.items())),
        "no_status": len(lost),
        "no_status_examples": [{"after_s": round(o.elapsed_s, 2), "error": o.error} for o in lost[:10]],
        "incomplete_streams": len(ok) - len(complete),
        "incomplete_examples": [o.error for o in ok if o.error is not None][:10],
        "429_without_retry_after": sum(o.status == 429 and not o.retry_after for o in outcomes),
        "server_errors": sum(o.status is not None and o.status >= 500 and o.status != 503 for o in outcomes),
        "probe": {
            **_ms([latency for latency, _ in probes]),
            "non_200": sum(status != 200 for _, status in probes),
        },
        "ttft_ms": _ms([o.ttft_s for o in complete if o.ttft_s is not None]),
        "itl_ms": _ms([gap for o in complete for gap in o.itl_s]),
        "tpot_ms": _ms([sum(o.itl_s) / len(o.itl_s) for o in complete if o.itl_s]),
        "text_events": sum(o.tokens for o in complete),  # several tokens may share one event
    }


def overload(
    url: str,
    model: str,
    clients: int,
    duration_s: float,
    max_tokens: int = 32,
    retry_pause_s: float = 0.05,
    probe_path: str = "/health",
    probe_interval_s: float = 0.1,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Run the clients and the prober; the summary (see the module docstring)."""
    check_loopback(url)
    prober = start_prober(url, probe_path, probe_interval_s)
    try:
        outcomes = asyncio.run(run_clients(url, model, clients, duration_s, max_tokens, retry_pause_s, api_key))
    finally:
        probes = stop_prober(prober)
    return summarize(
        outcomes,
        probes,
        model=model,
        clients=clients,
        duration_s=duration_s,
        max_tokens=max_tokens,
        retry_pause_s=retry_pause_s,
        probe_path=probe_path,
    )


def check_loopback(url: str) -> None:
    from loadtests.run import is_loopback_url

    parsed = urlparse(url)
    if parsed.scheme != "http" or not is_loopback_url(url):
        raise SystemExit(f"--host {url!r}: the overload run only targets http:// on a loopback address")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", required=True, help="http://127.0.0.1:PORT (loopback only)")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, required=True, help="concurrent streaming clients (4x the admission limit)")
    p.add_argument("--duration", type=float, default=45.0, help="seconds the clients keep sending")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--retry-pause", type=float, default=0.05, help="seconds a client waits after a 429/503")
    p.add_argument("--probe-path", default="/health")
    p.add_argument("--probe-interval", type=float, default=0.1)
    p.add_argument("--api-key", default=os.environ.get("MOEMIX_API_KEY"))
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args(argv)
    summary = overload(
        args.host,
        args.model,
        args.clients,
        args.duration,
        args.max_tokens,
        args.retry_pause,
        args.probe_path,
        args.probe_interval,
        args.api_key,
    )
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if summary["no_status"] == 0 and summary["server_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
