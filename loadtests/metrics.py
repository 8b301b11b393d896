"""Per-request serving metrics and the run summary, as `vllm bench serve` defines them.

No Locust (or gevent) import here: the Locust users, the runner and the unit tests share this module.

Per streamed request (client clock, seconds):
    TTFT  time from sending the request to the first chunk carrying non-empty text
    ITL   the gaps between consecutive non-empty chunks after the first (a request contributes n_chunks-1 gaps)
    E2E   time from sending the request to the end of the response (`data: [DONE]`)
    TPOT  (E2E - TTFT) / (output_tokens - 1), only for output_tokens > 1
A non-streamed request has only E2E (its body arrives at once); TTFT/ITL/TPOT percentiles are over streamed
requests only, as in `vllm bench serve`.

Run level (duration = first request sent to last response ended):
    request throughput  completed requests / duration
    output throughput   generated tokens (server `usage`) / duration
    goodput             completed requests meeting every SLO / duration (`vllm bench serve --goodput`): a request
                        is good when TTFT <= slo_ttft, TPOT <= slo_tpot (0 for one-token outputs, as there) and
                        E2E <= slo_e2el. A non-streamed request's TTFT is its E2E (the client sees its first
                        token only then) and its TPOT is not judged.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2el", "e2e": "e2el"}
DEFAULT_PERCENTILES = (50, 90, 99)


# ------------------------------------------------------------------------------------------- one request


@dataclass
class RequestRecord:
    """What one request measured; written as one JSON line by the Locust users."""

    kind: str  # "completion" | "chat"
    stream: bool
    model: str
    start: float  # wall clock (time.time()) when the request was sent
    e2e: float | None = None  # seconds
    ttft: float | None = None  # seconds, streamed only
    itl: list[float] = field(default_factory=list)  # seconds, streamed only
    prompt_tokens: int | None = None  # server usage
    output_tokens: int | None = None  # server usage (chunk count when the server sent no usage)
    ok: bool = True
    status: int | None = None
    error: str | None = None
    users: int | None = None  # Locust users when it was sent (the concurrency level)

    @property
    def end(self) -> float:
        return self.start + (self.e2e or 0.0)

    @property
    def tpot(self) -> float | None:
        return tpot(self.e2e, self.ttft, self.output_tokens)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def tpot(e2e: float | None, ttft: float | None, output_tokens: int | None) -> float | None:
    """Time per output token after the first: (E2E - TTFT) / (n - 1); None when undefined (n <= 1, not streamed)."""
    if e2e is None or ttft is None or output_tokens is None or output_tokens <= 1:
        return None
    return (e2e - ttft) / (output_tokens - 1)


class StreamTimer:
    """Feed it (timestamp, text) per SSE chunk; it keeps TTFT (first non-empty chunk) and the ITL gaps."""

    def __init__(self, start: float):
        self.start = start
        self.first: float | None = None
        self.last: float | None = None
        self.itl: list[float] = []
        self.chunks = 0  # non-empty chunks

    def feed(self, timestamp: float, text: str | None) -> None:
        if not text:
            return  # role-only first delta, usage chunk, empty keep-alive text: not a token for the client
        self.chunks += 1
        if self.first is None:
            self.first = timestamp
        else:
            self.itl.append(timestamp - self.last)
        self.last = timestamp

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start


def iter_sse_data(lines: Iterable[bytes | str]) -> Iterator[str]:
    """The `data:` payloads of a server-sent-events stream, in order, the final `[DONE]` included (so a caller
    can tell a finished stream from a cut one). Comments and other fields are skipped; a payload split over
    several `data:` lines is joined (SSE spec)."""
    buf: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            if buf:
                payload = "\n".join(buf)
                buf = []
                yield payload
                if payload.strip() == DONE:
                    return
            continue
        if line.startswith(":"):
            continue
        if line.startswith("data:"):
            value = line[5:]
            buf.append(value[1:] if value.startswith(" ") else value)
    if buf:
        yield "\n".join(buf)


DONE = "[DONE]"


def chunk_text(event: dict[str, Any], kind: str) -> str:
    """Generated text carried by one streamed chunk (completion `text`, chat `delta.content` or reasoning)."""
    parts = []
    for choice in event.get("choices") or []:
        if kind == "chat":
            delta = choice.get("delta") or {}
            parts.append(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)


# ------------------------------------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile, as numpy.percentile's default (what `vllm bench serve` reports)."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (k - lo))


def describe(values: list[float], percentiles: Iterable[float] = DEFAULT_PERCENTILES, scale: float = 1000.0) -> dict:
    """count, mean, std, min, max and the percentiles of `values` (seconds) in ms (scale=1000)."""
    if not values:
        return {"count": 0}
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    out = {"count": n, "mean": mean * scale, "std": std * scale, "min": min(values) * scale, "max": max(values) * scale}
    for p in percentiles:
        out[f"p{_pname(p)}"] = percentile(values, p) * scale
    return out


def _pname(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p).replace(".", "_")


def parse_slo(text: str) -> tuple[str, float]:
    """`ttft=0.5` (seconds) -> ("ttft", 0.5). Keys: ttft, tpot, e2el (alias e2e)."""
    key, sep, value = text.partition("=")
    key = key.strip().lower()
    if not sep or key not in SLO_KEYS:
        raise ValueError(f"SLO {text!r}: expected KEY=SECONDS with KEY one of ttft, tpot, e2el")
    try:
        seconds = float(value)
    except ValueError as e:
        raise ValueError(f"SLO {text!r}: {value!r} is not a number of seconds") from e
    if not seconds > 0:
        raise ValueError(f"SLO {text!r}: must be > 0 seconds")
    return SLO_KEYS[key], seconds


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a request is 'good' under the SLOs (see the module docstring)."""
    if not rec.ok or rec.e2e is None:
        return False
    if "ttft" in slos:
        ttft = rec.ttft if rec.stream else rec.e2e
        if ttft is None or ttft > slos["ttft"]:
            return False
    if "tpot" in slos and rec.stream:
        t = rec.tpot if rec.tpot is not None else 0.0  # one-token outputs: 0, as vllm bench serve
        if t > slos["tpot"]:
            return False
    if "e2el" in slos and rec.e2e > slos["e2el"]:
        return False
    return True


def summarize(
    records: list[RequestRecord],
    slos: dict[str, float] | None = None,
    percentiles: Iterable[float] = DEFAULT_PERCENTILES,
    duration: float | None = None,
) -> dict[str, Any]:
    """The run summary: counts, throughputs, latency distributions (ms), goodput under `slos` (seconds)."""
    slos = dict(slos or {})
    percentiles = tuple(percentiles)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    if duration is None:
        duration = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    streamed = [r for r in ok if r.stream]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    good = [r for r in ok if meets_slos(r, slos)] if slos else ok

    def per_s(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    errors: dict[str, int] = {}
    for r in failed:
        key = f"{r.status or 'no-status'}: {(r.error or '')[:120]}"
        errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "streamed": len(streamed),
        "duration_s": duration,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "ttft_ms": describe([r.ttft for r in streamed if r.ttft is not None], percentiles),
        "tpot_ms": describe([r.tpot for r in streamed if r.tpot is not None], percentiles),
        "itl_ms": describe([g for r in streamed for g in r.itl], percentiles),
        "e2el_ms": describe([r.e2e for r in ok if r.e2e is not None], percentiles),
        "output_tokens_per_request": describe(
            [float(r.output_tokens) for r in ok if r.output_tokens is not None], percentiles, scale=1.0
        ),
        "slos_s": slos,
        "good_requests": len(good),
        "goodput": per_s(len(good)),
        "goodput_fraction": (len(good) / len(ok)) if ok else 0.0,
        "errors": errors,
    }


def read_records(path) -> list[RequestRecord]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(RequestRecord.from_dict(json.loads(line)))
    return out


# ------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Distribution:
    """A length distribution: `fixed:N` (or just `N`), `uniform:LO:HI` (inclusive), `normal:MEAN:STD`
    (rounded, clipped to >= 1), `choice:A,B,C`."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> Distribution:
        text = str(text).strip()
        kind, _, rest = text.partition(":")
        try:
            if not rest and kind.isdigit():
                return cls("fixed", (int(kind),))._checked(text)
            if kind == "fixed":
                return cls("fixed", (int(rest),))._checked(text)
            if kind == "uniform":
                lo, hi = (int(x) for x in rest.split(":"))
                return cls("uniform", (lo, hi))._checked(text)
            if kind == "normal":
                mean, std = (float(x) for x in rest.split(":"))
                return cls("normal", (mean, std))._checked(text)
            if kind == "choice":
                return cls("choice", tuple(int(x) for x in rest.split(",")))._checked(text)
        except ValueError as e:
            raise ValueError(f"length distribution {text!r}: {e}") from e
        raise ValueError(
            f"length distribution {text!r}: expected N, fixed:N, uniform:LO:HI, normal:MEAN:STD or choice:A,B,..."
        )

    def _checked(self, text: str) -> Distribution:
        if self.kind == "uniform" and not 1 <= self.params[0] <= self.params[1]:
            raise ValueError(f"length distribution {text!r}: need 1 <= LO <= HI")
        if self.kind == "normal" and (self.params[0] < 1 or self.params[1] < 0):
            raise ValueError(f"length distribution {text!r}: need MEAN >= 1, STD >= 0")
        if self.kind in ("fixed", "choice") and (not self.params or min(self.params) < 1):
            raise ValueError(f"length distribution {text!r}: lengths must be >= 1")
        return self

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.params[0])
        if self.kind == "uniform":
            return rng.randint(int(self.params[0]), int(self.params[1]))
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.params[0], self.params[1])))
        return int(rng.choice(self.params))

    @property
    def mean(self) -> float:
        if self.kind == "fixed":
            return self.params[0]
        if self.kind == "uniform":
            return (self.params[0] + self.params[1]) / 2
        if self.kind == "normal":
            return self.params[0]
        return sum(self.params) / len(self.params)


def parse_mix(text: str) -> dict[str, float]:
    """`completion_stream=4,chat_stream=4,completion=1,chat=1` -> weights per request kind."""
    kinds = {"completion", "completion_stream", "chat", "chat_stream"}
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if key not in kinds:
            raise ValueError(f"request mix {text!r}: unknown kind {key!r} (known: {sorted(kinds)})")
        w = float(value) if sep else 1.0
        if w < 0:
            raise ValueError(f"request mix {text!r}: negative weight for {key}")
        out[key] = w
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"request mix {text!r}: no positive weight")
    return out
