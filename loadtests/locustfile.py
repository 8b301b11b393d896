"""Locust users for an OpenAI-compatible server (moemix serve, vllm serve, ...).

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 -u 4 -r 4 -t 30s \
        --moemix-models tiny-moemix --moemix-mix completion_stream=1,chat_stream=1 --moemix-max-requests 200

(`python -m loadtests.run` wraps this with bounds, summaries and plots.) Every option below also reads an
environment variable (MOEMIX_LT_*), so a Locust web UI or a distributed run can be configured the same way.

Each request is one of four kinds, picked by weight (--moemix-mix): `completion`, `completion_stream`, `chat`,
`chat_stream`. Prompts are runs of words from a text file (the repository's held-out text by default) whose
length follows --moemix-prompt-len (in words: roughly tokens); max_tokens follows --moemix-output-len, and
`ignore_eos` (vLLM's extension, on by default) makes the server generate exactly that many tokens, so TPOT is
measured over full outputs as in `vllm bench serve`.

What Locust records:
- the HTTP request itself, named `/v1/completions [stream]` etc., with its response time set to the full
  end-to-end latency (Locust would otherwise stop the clock at the response headers of a stream) and its
  response length set to the generated tokens;
- custom events with request_type="METRIC" (see loadtests/metrics.py for the definitions): `TTFT`, `ITL` (one
  event per gap), `TPOT`, `E2E` in milliseconds, and `OUTPUT_TOKENS_PER_S` (tokens/E2E of that request, the
  value in the response-time column). The METRIC rows' Requests/s column is the request throughput;
- one JSON line per request in the file named by --moemix-records (or MOEMIX_LT_RECORDS), which the runner
  turns into exact percentiles and goodput.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `locust -f loadtests/locustfile.py` puts only loadtests/ on sys.path
    sys.path.insert(0, str(REPO))

from locust import HttpUser, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

from loadtests.metrics import (  # noqa: E402
    DONE,
    Distribution,
    RequestRecord,
    StreamTimer,
    chunk_text,
    iter_sse_data,
    parse_mix,
)

DEFAULT_PROMPT_FILE = REPO / "models" / "heldout.txt"
FALLBACK_TEXT = (
    "The Python interpreter reads a program as a sequence of statements and executes them one after another. "
    "A list is a mutable sequence; a tuple is an immutable one. Functions are objects, modules are namespaces, "
    "and the standard library covers files, processes, networking, text processing and data formats. "
) * 8
PATHS = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    g = parser  # (Locust's own add_argument: env_var, is_secret; argument groups lack them)
    g.add_argument(
        "--moemix-models",
        env_var="MOEMIX_LT_MODELS",
        default="",
        help="comma-separated model names to send requests to (round robin); default: the first of /v1/models",
    )
    g.add_argument(
        "--moemix-mix",
        env_var="MOEMIX_LT_MIX",
        default="completion_stream=1,chat_stream=1",
        help="request kinds and weights: completion, completion_stream, chat, chat_stream",
    )
    g.add_argument(
        "--moemix-prompt-len",
        env_var="MOEMIX_LT_PROMPT_LEN",
        default="uniform:8:32",
        help="prompt length in words: N, uniform:LO:HI, normal:MEAN:STD, choice:A,B",
    )
    g.add_argument(
        "--moemix-output-len",
        env_var="MOEMIX_LT_OUTPUT_LEN",
        default="uniform:16:48",
        help="max_tokens per request, same syntax",
    )
    g.add_argument(
        "--moemix-prompt-file",
        env_var="MOEMIX_LT_PROMPT_FILE",
        default=str(DEFAULT_PROMPT_FILE),
        help="text the prompts are cut from",
    )
    g.add_argument(
        "--moemix-ignore-eos",
        env_var="MOEMIX_LT_IGNORE_EOS",
        default="true",
        help="send vLLM's ignore_eos (true/false) so outputs have exactly max_tokens tokens",
    )
    g.add_argument("--moemix-temperature", env_var="MOEMIX_LT_TEMPERATURE", type=float, default=0.0)
    g.add_argument(
        "--moemix-api-key",
        env_var="MOEMIX_LT_API_KEY",
        default="",
        is_secret=True,
        help="Bearer token (the server's --api-key)",
    )
    g.add_argument(
        "--moemix-max-requests",
        env_var="MOEMIX_LT_MAX_REQUESTS",
        type=int,
        default=0,
        help="stop the run after this many requests have finished (0: no bound besides --run-time)",
    )
    g.add_argument(
        "--moemix-records",
        env_var="MOEMIX_LT_RECORDS",
        default="",
        help="append one JSON line per request to this file",
    )
    g.add_argument("--moemix-seed", env_var="MOEMIX_LT_SEED", type=int, default=0)
    g.add_argument(
        "--moemix-think-time",
        env_var="MOEMIX_LT_THINK_TIME",
        type=float,
        default=0.0,
        help="seconds a user waits between its requests (0: closed loop, concurrency = users)",
    )
    g.add_argument(
        "--moemix-timeout",
        env_var="MOEMIX_LT_TIMEOUT",
        type=float,
        default=300.0,
        help="per-request timeout in seconds",
    )


class _RunState:
    """Per-process state shared by all users (gevent: one OS thread, but keep it simple and safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.issued = 0
        self.finished = 0
        self.records_file = None
        self.words: list[str] = []
        self.models: list[str] = []
        self.next_model = 0
        self.next_user = 0
        self.quitting = False

    def reset(self):
        self.__init__()


STATE = _RunState()


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@events.test_start.add_listener
def _on_test_start(environment, **_):
    opts = environment.parsed_options
    if opts is None:
        return
    STATE.reset()
    path = Path(opts.moemix_prompt_file) if opts.moemix_prompt_file else None
    text = path.read_text(errors="replace") if path and path.is_file() else FALLBACK_TEXT
    STATE.words = text.split() or FALLBACK_TEXT.split()
    STATE.models = [m.strip() for m in opts.moemix_models.split(",") if m.strip()]
    if opts.moemix_records:
        STATE.records_file = open(opts.moemix_records, "a", buffering=1)
    # Validate the workload options at start (fail the run early with a clear message).
    Distribution.parse(opts.moemix_prompt_len)
    Distribution.parse(opts.moemix_output_len)
    parse_mix(opts.moemix_mix)


@events.test_stop.add_listener
def _on_test_stop(environment, **_):
    if STATE.records_file is not None:
        STATE.records_file.close()
        STATE.records_file = None


class OpenAIUser(HttpUser):
    """One simulated client: a closed loop of requests (think time --moemix-think-time)."""

    wait_time = constant(0)

    def on_start(self):
        opts = self.environment.parsed_options
        self.opts = opts
        with STATE.lock:
            index = STATE.next_user
            STATE.next_user += 1
        self.rng = random.Random((opts.moemix_seed if opts else 0) * 7919 + index)  # reproducible per user
        self.prompt_len = Distribution.parse(opts.moemix_prompt_len if opts else "uniform:8:32")
        self.output_len = Distribution.parse(opts.moemix_output_len if opts else "uniform:16:48")
        mix = parse_mix(opts.moemix_mix if opts else "completion_stream=1,chat_stream=1")
        self.kinds, self.weights = list(mix), list(mix.values())
        self.ignore_eos = _truthy(opts.moemix_ignore_eos) if opts else True
        self.headers = {"Content-Type": "application/json"}
        if opts and opts.moemix_api_key:
            self.headers["Authorization"] = f"Bearer {opts.moemix_api_key}"
        think = float(opts.moemix_think_time) if opts else 0.0
        self.wait_time = lambda: think
        self.timeout = float(opts.moemix_timeout) if opts else 300.0
        if not STATE.models:
            with self.client.get("/v1/models", headers=self.headers, name="/v1/models", catch_response=True) as r:
                try:
                    STATE.models = [m["id"] for m in r.json()["data"]][:1]
                except Exception as e:  # noqa: BLE001
                    r.failure(f"cannot list models: {e}")
                    raise StopUser() from e

    # ------------------------------------------------------------------ helpers

    def _model(self) -> str:
        with STATE.lock:
            model = STATE.models[STATE.next_model % len(STATE.models)]
            STATE.next_model += 1
        return model

    def _prompt(self) -> str:
        n = self.prompt_len.sample(self.rng)
        words = STATE.words
        start = self.rng.randrange(max(1, len(words) - n))
        out = words[start : start + n]
        while len(out) < n:  # short corpus: wrap around
            out += words[: n - len(out)]
        return " ".join(out)

    def _take_budget(self) -> bool:
        limit = self.opts.moemix_max_requests if self.opts else 0
        with STATE.lock:
            if limit and STATE.issued >= limit:
                return False
            STATE.issued += 1
        return True

    def _finish(self, rec: RequestRecord) -> None:
        if STATE.records_file is not None:
            STATE.records_file.write(rec.to_json() + "\n")
        limit = self.opts.moemix_max_requests if self.opts else 0
        with STATE.lock:
            STATE.finished += 1
            done = bool(limit) and STATE.finished >= limit and not STATE.quitting
            if done:
                STATE.quitting = True
        if done:
            import gevent
            from locust import stats

            # Locust writes its CSV files every CSV_STATS_INTERVAL_SEC and not again at quit: wait for one more
            # write so the last requests are in <prefix>_stats.csv.
            gevent.spawn_later(stats.CSV_STATS_INTERVAL_SEC + 0.5, self.environment.runner.quit)

    def _fire(self, name: str, value: float, length: int = 0, exception=None) -> None:
        self.environment.events.request.fire(
            request_type="METRIC",
            name=name,
            response_time=value,
            response_length=length,
            exception=exception,
            context={},
        )

    # ------------------------------------------------------------------ the task

    @task
    def one_request(self):
        if not self._take_budget():
            raise StopUser()
        kind = self.rng.choices(self.kinds, self.weights)[0]
        stream = kind.endswith("_stream")
        api = kind.removesuffix("_stream")
        model = self._model()
        max_tokens = self.output_len.sample(self.rng)
        prompt = self._prompt()
        body: dict = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": self.opts.moemix_temperature if self.opts else 0.0,
            "stream": stream,
        }
        if api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
        users = self.environment.runner.user_count if self.environment.runner else None
        rec = RequestRecord(kind=api, stream=stream, model=model, start=time.time(), users=users)
        name = PATHS[api] + (" [stream]" if stream else "")
        t0 = time.perf_counter()
        try:
            with self.client.post(
                PATHS[api],
                data=json.dumps(body),
                headers=self.headers,
                name=name,
                stream=stream,
                timeout=self.timeout,
                catch_response=True,
            ) as resp:
                rec.status = resp.status_code
                try:
                    if resp.status_code != 200:
                        raise RuntimeError(_error_message(resp))
                    if stream:
                        self._read_stream(resp, api, t0, rec)
                    else:
                        data = resp.json()
                        if "error" in data:
                            raise RuntimeError(str(data["error"].get("message", data["error"]))[:300])
                        rec.e2e = time.perf_counter() - t0
                        usage = data.get("usage") or {}
                        rec.prompt_tokens = usage.get("prompt_tokens")
                        rec.output_tokens = usage.get("completion_tokens")
                except Exception as e:  # noqa: BLE001  (any failure of this request, reported as such)
                    rec.ok, rec.error = False, f"{type(e).__name__}: {e}"[:300]
                    rec.e2e = rec.e2e if rec.e2e is not None else time.perf_counter() - t0
                    resp.failure(rec.error)
                else:
                    resp.request_meta["response_time"] = rec.e2e * 1000.0
                    resp.request_meta["response_length"] = rec.output_tokens or 0
                    resp.success()
        except Exception as e:  # noqa: BLE001  connection errors raised outside the response context
            if rec.ok:
                rec.ok, rec.error = False, f"{type(e).__name__}: {e}"[:300]
                rec.e2e = time.perf_counter() - t0
        if rec.ok:
            self._fire("E2E", rec.e2e * 1000.0, rec.output_tokens or 0)
            if rec.ttft is not None:
                self._fire("TTFT", rec.ttft * 1000.0, rec.prompt_tokens or 0)
            for gap in rec.itl:
                self._fire("ITL", gap * 1000.0)
            if rec.tpot is not None:
                self._fire("TPOT", rec.tpot * 1000.0)
            if rec.output_tokens and rec.e2e:
                self._fire("OUTPUT_TOKENS_PER_S", rec.output_tokens / rec.e2e, rec.output_tokens)
        self._finish(rec)

    def _read_stream(self, resp, api: str, t0: float, rec: RequestRecord) -> None:
        timer = StreamTimer(start=t0)
        usage = None
        done = False
        # chunk_size=None: yield data as it arrives (the default 512-byte chunks would delay timestamps).
        for payload in iter_sse_data(resp.iter_lines(chunk_size=None)):
            now = time.perf_counter()
            if payload.strip() == DONE:
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(str(event["error"].get("message", event["error"]))[:300])
            timer.feed(now, chunk_text(event, api))
            if event.get("usage"):
                usage = event["usage"]
        rec.e2e = time.perf_counter() - t0
        if not done:
            raise RuntimeError("stream ended without data: [DONE]")
        rec.ttft = timer.ttft
        rec.itl = timer.itl
        if usage:
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.output_tokens = usage.get("completion_tokens")
        else:
            rec.output_tokens = timer.chunks
        if timer.first is None and (rec.output_tokens or 0) > 0:
            raise RuntimeError("stream carried no text")


def _error_message(resp) -> str:
    try:
        err = resp.json().get("error") or {}
        msg = err.get("message") if isinstance(err, dict) else str(err)
    except Exception:  # noqa: BLE001
        msg = (resp.text or "")[:200]
    return f"HTTP {resp.status_code}: {msg}"[:300]
