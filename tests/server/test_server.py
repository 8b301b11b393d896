"""The OpenAI-compatible server, end to end: a real `python -m server serve` process (uvicorn on 127.0.0.1,
a free port) serving the trained tiny-mixtral twice, bf16 and moemix-quantized (plans/tiny-mixtral-mixed.json),
from a YAML config; spoken to with the official `openai` client and raw HTTP.

One server for the whole module (two engines start in ~45 s on 2 cores); the graceful-shutdown test stops
it and therefore runs last.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, TRAINED_MIXTRAL, free_port, launch_server, stop_server, wait_healthy

pytestmark = pytest.mark.vllm

API_KEY = "test-key"
BF16, MOEMIX = "tiny-bf16", "tiny-moemix"
BF16_MAX_NUM_SEQS = 2  # with max_queue 0: the 3rd concurrent request to tiny-bf16 gets 429
PROMPT = "The Python interpreter"
ROUTING_REFRESH_S = 1  # the server gathers expert-routing counts this often
SSE_KEEP_ALIVE_S = 0.25  # a stream silent this long gets `: keep-alive`
METRICS_MAX_AGE_S = 0.25  # /metrics serves one rendering this long (default 1 s)
START_UP_STOP_S = 20  # SIGTERM during start-up to no process left: ~5 s here (it used to wait for the engine, ~30 s)


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.auth = {"Authorization": f"Bearer {API_KEY}"}

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(
            **{"base_url": f"{self.url}/v1", "api_key": API_KEY, "max_retries": 0, "timeout": 60, **kwargs}
        )

    def post(self, path: str, body, headers=None, timeout=60, **kwargs) -> httpx.Response:
        headers = {**self.auth, **(headers or {})}
        if isinstance(body, (bytes, str)):
            return httpx.post(
                self.url + path,
                content=body,
                headers={"content-type": "application/json", **headers},
                timeout=timeout,
                **kwargs,
            )
        return httpx.post(self.url + path, json=body, headers=headers, timeout=timeout, **kwargs)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """/metrics as rendered after this call began (a scrape may get a rendering up to METRICS_MAX_AGE_S old)."""
        from prometheus_client.parser import text_string_to_metric_families

        time.sleep(METRICS_MAX_AGE_S)
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def tokens(self, **body) -> list[int]:
        r = self.post("/tokenize", body)
        assert r.status_code == 200, r.text
        return r.json()["tokens"]


def metric(samples, name: str, **labels) -> float | None:
    want = set(labels.items())
    for (n, lab), value in samples.items():
        if n == name and want <= lab:
            return value
    return None


@pytest.fixture(scope="module")
def moemix_ckpt(tmp_path_factory) -> Path:
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.config.plan import Plan

    if not (TRAINED_MIXTRAL / "config.json").exists():
        pytest.fail(f"{TRAINED_MIXTRAL} is missing: the embedded models ship in the repo (rebuild: make models)")
    out = tmp_path_factory.mktemp("server") / "tiny-mixtral-moemix"
    quantize_checkpoint(TRAINED_MIXTRAL, Plan.load(REPO / "plans" / "tiny-mixtral-mixed.json"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def server(moemix_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "server.yaml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "max_queue": 8,
                "retry_after_s": 2,
                "drain_timeout_s": 60,
                "on_engine_death": "stay",  # test_dead_engine_is_503... kills one; the others go on here
                "routing_refresh_s": ROUTING_REFRESH_S,
                "sse_keep_alive_s": SSE_KEEP_ALIVE_S,
                "metrics_max_age_s": METRICS_MAX_AGE_S,
                "vllm_args": {"max_model_len": 256, "max_num_seqs": 4, "enforce_eager": True},
                "models": [
                    {
                        "name": BF16,
                        "path": str(TRAINED_MIXTRAL),
                        "max_queue": 0,
                        # accepted by vLLM's parser, applied by vLLM's own HTTP server only: start-up says so
                        "vllm_args": {"max_num_seqs": BF16_MAX_NUM_SEQS, "sse_keep_alive_interval": 15},
                    },
                    {"name": MOEMIX, "path": str(moemix_ckpt)},
                ],
            }
        )
    )
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    proc, port, log = launch_server(["--config", str(config), "--api-key-file", str(key_file)], tmp)
    srv = Server(proc, port, log)
    wait_healthy(proc, srv.url, log, timeout=300)
    yield srv
    stop_server(proc)


# ----------------------------------------------------------------------------------------------- the API


def test_models_list_moemix_facts(server, moemix_ckpt):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {BF16, MOEMIX}
    summary = json.loads((moemix_ckpt / "config.json").read_text())["quantization_config"]["summary"]
    facts = models[MOEMIX].model_extra["moemix"]
    assert facts["avg_bits"] == summary["avg_bits"] and facts["avg_payload_bits"] == summary["avg_payload_bits"]
    assert facts["bytes_by_width"] == summary["bytes_by_width"] and set(facts["bytes_by_width"]) == {"2", "3", "4", "8"}
    assert models[BF16].model_extra["moemix"] is None
    bf16_w, moemix_w = models[BF16].model_extra["weights"], models[MOEMIX].model_extra["weights"]
    assert bf16_w["avg_bits"] == 16.0 and set(bf16_w["weight_bytes_by_component"]["experts"]) == {"bf16"}
    assert set(moemix_w["weight_bytes_by_component"]["experts"]) == {"2", "3", "4", "8"}
    assert moemix_w["weight_bytes"] < bf16_w["weight_bytes"] / 2
    assert models[MOEMIX].max_model_len == 256
    assert server.client().models.retrieve(MOEMIX).id == MOEMIX
    assert models[MOEMIX].model_extra["kernels"] == expected_kernels() and models[BF16].model_extra["kernels"] is None


def expected_kernels() -> dict[str, dict[str, int]]:
    """tiny-mixtral with plans/tiny-mixtral-mixed.json: 4 MoE layers, qkv + o quantized in each, native kernels."""
    from vllm_moemix.layers.kernels.cpu import choose_variant

    variant, why = choose_variant()
    assert variant is not None, why
    return {
        "experts": {f"NativeCpuExpertsKernel ({variant.name})": 4},
        "linears": {f"NativeCpuLinearKernel ({variant.name})": 8},
    }


@pytest.mark.parametrize("model", [BF16, MOEMIX])
def test_completion_usage_and_streaming(server, model):
    client = server.client()
    prompt_tokens = len(server.tokens(model=model, prompt=PROMPT))
    args = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.completions.create(**args)
    assert full.model == model and full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (
        prompt_tokens,
        12,
        prompt_tokens + 12,
    )

    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text  # greedy: streaming and not give the same tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage  # include_usage: one last chunk with usage and no choices
    assert not chunks[-1].choices and usage.completion_tokens == 12 and usage.prompt_tokens == prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_uses_the_models_template(server):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "What is a list?"}]
    template_tokens = server.tokens(model=MOEMIX, messages=messages, add_generation_prompt=True)
    hf = AutoTokenizer.from_pretrained(TRAINED_MIXTRAL).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert template_tokens == hf["input_ids"]  # models/tiny-mixtral/chat_template.jinja, as transformers applies it

    client = server.client()
    args = dict(model=MOEMIX, messages=messages, max_tokens=10, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**args)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(template_tokens), 10)

    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == len(template_tokens)


def test_sse_wire_format(server):
    body = {
        "model": MOEMIX,
        "prompt": PROMPT,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.auth, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e != ": keep-alive"]  # if the first token took > SSE_KEEP_ALIVE_S
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] == 4


def test_sse_keep_alive_while_queued(server):
    """A stream queued behind a full batch (max_num_seqs 4 streams of 250 tokens) sends `: keep-alive` comments
    every SSE_KEEP_ALIVE_S until its first token, then its tokens as usual."""
    client = server.client()
    batch = [
        client.completions.create(
            model=MOEMIX, prompt=f"{PROMPT} {i}", max_tokens=250, stream=True, extra_body={"ignore_eos": True}
        )
        for i in range(4)
    ]
    try:
        for s in batch:
            next(iter(s))  # all four generating: the next request waits for a free sequence
        body = {"model": MOEMIX, "prompt": PROMPT, "max_tokens": 4, "stream": True}
        t0, before_first = time.monotonic(), []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.auth, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        for line in lines:
            if line.startswith("data: "):
                break
            before_first.append(line)
        took = time.monotonic() - t0
    finally:
        for s in batch:
            s.close()
    assert set(before_first) == {": keep-alive"} and len(before_first) >= 2, (took, lines[:8])
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and json.loads(data[-2].removeprefix("data: "))["choices"][0]["finish_reason"]


def test_parallel_streams_all_complete(server):
    """More concurrent streams than the engine batch (max_num_seqs 4): the rest wait, none is lost."""
    client = server.client()
    n, max_tokens = 8, 16

    def one(i: int):
        stream = client.completions.create(
            model=MOEMIX,
            prompt=f"{PROMPT} {i}",
            max_tokens=max_tokens,
            temperature=0.8,
            seed=i,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        return chunks[-1].usage.completion_tokens, [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert results == [(max_tokens, "length")] * n


# -------------------------------------------------------------------------------------------------- errors


def assert_openai_error(r: httpx.Response, status: int, err_type: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == err_type and err["code"] == status and err["message"]
    return err


def test_bad_requests_are_400(server):
    assert_openai_error(server.post("/v1/completions", b'{"model": "tiny-moemix", "prompt": '), 400, "BadRequestError")
    assert_openai_error(server.post("/v1/completions", b"[1, 2]"), 400, "BadRequestError")
    err = assert_openai_error(
        server.post("/v1/completions", {"model": MOEMIX, "prompt": "x", "max_tokens": -1}), 400, "BadRequestError"
    )
    assert err["param"] == "max_tokens"
    err = assert_openai_error(
        server.post("/v1/completions", {"model": MOEMIX, "prompt": "x", "temperature": "hot"}), 400, "BadRequestError"
    )
    assert "temperature" in err["param"]
    long_prompt = "import os " * 300
    err = assert_openai_error(
        server.post("/v1/completions", {"model": MOEMIX, "prompt": long_prompt}), 400, "BadRequestError"
    )
    assert "context length" in err["message"]
    assert_openai_error(
        server.post("/v1/chat/completions", {"model": MOEMIX, "messages": "hi"}), 400, "BadRequestError"
    )
    r = httpx.post(server.url + "/v1/completions", content=b"x", headers={**server.auth, "content-type": "text/plain"})
    assert_openai_error(r, 400, "BadRequestError")

    import openai

    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=MOEMIX, prompt="x", max_tokens=100_000)
    # strict where vLLM's own server is lax (issue 21): each a 400 naming the field
    for body, param in (
        ({"max_tokens": "10"}, "max_tokens"),
        ({"best_of": 1e9}, "best_of"),
        ({"logit_bias": {"5": 1e308}}, "logit_bias"),
    ):
        r = server.post("/v1/completions", {"model": MOEMIX, "prompt": "x", **body})
        assert assert_openai_error(r, 400, "BadRequestError")["param"] == param
    wizard = {"model": MOEMIX, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}
    r = server.post("/v1/chat/completions", wizard)
    assert assert_openai_error(r, 400, "BadRequestError")["param"] == "messages[0].role"


def test_unknown_model_is_404(server):
    import openai

    err = assert_openai_error(server.post("/v1/completions", {"model": "gpt-5", "prompt": "x"}), 404, "NotFoundError")
    assert err["param"] == "model" and MOEMIX in err["message"]
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert_openai_error(httpx.get(server.url + "/v1/models/gpt-5", headers=server.auth), 404, "NotFoundError")


def test_api_key_is_required_on_v1(server):
    import openai

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/completions", json={"model": MOEMIX, "prompt": "x"}, headers=headers)
        assert_openai_error(r, 401, "AuthenticationError")
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    # probes and scrapers need no key
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_auth_scheme_case_and_path_probes(server):
    """`bearer KEY` is `Bearer KEY` (RFC 7235); no spelling of a protected path gets past the key. Raw paths through
    http.client: httpx would resolve the dot segments itself."""
    import http.client

    for scheme in ("bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} {API_KEY}"}
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 200
        r = httpx.post(
            server.url + "/v1/completions",
            json={"model": MOEMIX, "prompt": "x", "max_tokens": 1},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text

    def raw_get(path: str) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    for path in (
        "//v1/models",
        "/v1/../v1/models",
        "/health/../v1/models",
        "/v1/./models",
        "/%2E%2E/v1/models",
        "/v1//models",
        "//tokenize",
        "/v1/models/..%2F..%2Fv1%2Fmodels",
    ):
        status, body = raw_get(path)
        assert status == 401 and body["error"]["type"] == "AuthenticationError", (path, status, body)


def test_overload_is_429_and_disconnect_aborts(server):
    """tiny-bf16 admits max_num_seqs + max_queue = 2 requests; the 3rd gets 429 + Retry-After. Dropping the two
    streams aborts them in the engine: it stops generating long before their 2 x 250 tokens, and the slots
    are free again."""
    import openai

    client = server.client()
    m0 = server.metrics()
    tokens_before = metric(m0, "vllm:generation_tokens_total", model_name=BF16)
    incomplete_before = metric(m0, "moemix_requests_incomplete_total", model=BF16)
    streams = []
    for i in range(BF16_MAX_NUM_SEQS):
        s = client.completions.create(
            model=BF16, prompt=f"{PROMPT} {i}", max_tokens=250, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(s))  # admitted and generating
        streams.append(s)
    try:
        r = server.post("/v1/completions", {"model": BF16, "prompt": "x", "max_tokens": 2})
        assert_openai_error(r, 429, "RateLimitError")
        assert r.headers["retry-after"] == "2"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=BF16, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert_openai_error(server.post("/tokenize", {"model": BF16, "prompt": "x"}), 429, "RateLimitError")
    finally:
        for s in streams:
            s.close()  # client disconnect mid-stream

    deadline = time.monotonic() + 30
    while True:
        m = server.metrics()
        running = metric(m, "vllm:num_requests_running", model_name=BF16)
        in_flight = metric(m, "moemix_requests_in_flight", model=BF16)
        incomplete = metric(m, "moemix_requests_incomplete_total", model=BF16) - incomplete_before
        if running == 0 and in_flight == 0 and incomplete == BF16_MAX_NUM_SEQS:
            break
        assert time.monotonic() < deadline, (running, in_flight, incomplete)
        time.sleep(0.2)
    time.sleep(1)  # an engine that had not aborted would keep generating
    generated = metric(server.metrics(), "vllm:generation_tokens_total", model_name=BF16) - tokens_before
    assert generated < BF16_MAX_NUM_SEQS * 250 / 2, generated
    assert metric(m, "moemix_requests_rejected_total", model=BF16) >= 2
    # the other model was never limited, and this one admits again
    assert client.completions.create(model=MOEMIX, prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert client.completions.create(model=BF16, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_more_slots_than_the_limit_is_400(server):
    """tiny-bf16 admits 2 sequences: n=3 (or 3 prompts) can never run, so 400 says why instead of 429 forever."""
    for body in ({"n": 3, "prompt": "x"}, {"prompt": ["a", "b", "c"]}):
        err = assert_openai_error(
            server.post("/v1/completions", {"model": BF16, "max_tokens": 2, **body}), 400, "BadRequestError"
        )
        assert "needs 3 slots" in err["message"] and "admits at most 2" in err["message"]
    assert metric(server.metrics(), "moemix_requests_in_flight", model=BF16) == 0


def test_chunked_body_over_the_limit_is_413(server):
    """No Content-Length (Transfer-Encoding: chunked): the size is checked while the body arrives."""

    def body():  # just over max_body_bytes (8 MiB) in the last big chunk: the server has read nearly all of it
        yield b'{"model": "tiny-moemix", "prompt": "'
        for _ in range(8):
            yield b"x" * 2**20
        yield b'"}'

    r = httpx.post(
        server.url + "/v1/completions",
        content=body(),
        headers={**server.auth, "content-type": "application/json"},
        timeout=60,
    )
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, "BadRequestError")


def test_non_streaming_disconnect_aborts(server):
    """A client that gives up on a non-streaming request (timeout) frees its slot and stops the generation."""
    m0 = server.metrics()
    tokens_before = metric(m0, "vllm:generation_tokens_total", model_name=MOEMIX)
    with pytest.raises(httpx.ReadTimeout):
        server.post(
            "/v1/completions",
            {"model": MOEMIX, "prompt": PROMPT, "max_tokens": 250, "ignore_eos": True},
            timeout=httpx.Timeout(60, read=0.1),
        )  # 250 tokens take ~0.35 s even at 700 tok/s
    deadline = time.monotonic() + 30
    while metric(m := server.metrics(), "moemix_requests_in_flight", model=MOEMIX) or metric(
        m, "vllm:num_requests_running", model_name=MOEMIX
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)
    assert metric(server.metrics(), "vllm:generation_tokens_total", model_name=MOEMIX) - tokens_before < 200


def _stream_timings(url: str, headers: dict, body: dict) -> tuple[httpx.Response, float | None, list[float], list[str]]:
    """(response, seconds to the first data event, gaps between data events, the data events) of one SSE request;
    an error response's body is its one event."""
    t0 = time.perf_counter()
    first, last, gaps, events = None, None, [], []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return r, None, [], [r.text]
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if last is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
            events.append(line.removeprefix("data: "))
    return r, first, gaps, events


# GET /metrics as fast as THREADS keep-alive connections allow, until SIGTERM; prints how many were answered.
_FLOOD = """
import http.client, signal, sys, threading
port, threads = int(sys.argv[1]), int(sys.argv[2])
stop, done = threading.Event(), [0] * threads
def hammer(i):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        r.read()
        done[i] += r.status == 200
signal.signal(signal.SIGTERM, lambda *_: stop.set())
workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(sum(done))
"""
FLOOD_CLIENTS = 4
SCRAPES_PER_S = 20  # the server's default metrics_scrapes_per_s
FLOOD_ITL_BOUND = 1.5  # median inter-token latency under the flood / without it (measured ~1.0; 1.2-1.6 before)


def test_metrics_flood_does_not_slow_streaming(server):
    """Median inter-token latency of 200-token streams with FLOOD_CLIENTS connections hammering /metrics (a separate
    process) and without, interleaved twice. The flood is answered at the server's pace (metrics_scrapes_per_s,
    default 20) from a rendering at most METRICS_MAX_AGE_S old."""
    import statistics

    url, body = (
        server.url + "/v1/completions",
        {"model": MOEMIX, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0},
    )

    def gaps() -> list[float]:
        r, _, g, events = _stream_timings(url, server.auth, body)
        assert r.status_code == 200 and events[-1] == "[DONE]", events[-3:]
        return g

    gaps()  # warm
    quiet, flooded, scrapes, flood_s = [], [], 0, 0.0
    for _ in range(2):
        quiet += gaps() + gaps()
        flood = subprocess.Popen(
            [sys.executable, "-c", _FLOOD, str(server.port), str(FLOOD_CLIENTS)], stdout=subprocess.PIPE, text=True
        )
        t0 = time.monotonic()
        try:
            time.sleep(0.3)  # all connections hammering
            flooded += gaps() + gaps()
        finally:
            flood.send_signal(signal.SIGTERM)
            scrapes += int(flood.communicate(timeout=30)[0])
            flood_s += time.monotonic() - t0
    ratio = statistics.median(flooded) / statistics.median(quiet)
    print(
        f"\nITL median without flood {1e3 * statistics.median(quiet):.2f} ms, "
        f"with {scrapes} scrapes in {flood_s:.1f} s "
        f"{1e3 * statistics.median(flooded):.2f} ms: ratio {ratio:.2f} (mean ratio "
        f"{statistics.mean(flooded) / statistics.mean(quiet):.2f})"
    )
    assert SCRAPES_PER_S * flood_s / 2 <= scrapes <= SCRAPES_PER_S * (flood_s + 1), (scrapes, flood_s)
    assert ratio <= FLOOD_ITL_BOUND, ratio


OVERLOAD_S = 4  # how long 4x the capacity keeps streaming at tiny-bf16


def test_overload_four_times_the_capacity(server):
    """4 x tiny-bf16's admission capacity (2) of clients streaming back to back for OVERLOAD_S: every answer is a
    complete stream or a 429 with Retry-After and OpenAI error JSON; no admitted stream fails."""
    from threading import Event

    capacity = BF16_MAX_NUM_SEQS  # max_queue 0
    url = server.url + "/v1/completions"
    body = {
        "model": BF16,
        "prompt": PROMPT,
        "max_tokens": 16,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stop = Event()

    def client() -> tuple[list[float], int, list]:
        ttfts, rejected, failures = [], 0, []
        while not stop.is_set():
            r, ttft, _, events = _stream_timings(url, server.auth, body)
            if r.status_code == 429:
                err = json.loads(events[0])["error"]
                if (err["type"], err["code"], r.headers.get("retry-after")) != ("RateLimitError", 429, "2"):
                    failures.append((429, dict(r.headers), events[0]))
                rejected += 1
                time.sleep(0.01)
                continue
            usage = json.loads(events[-2]).get("usage") if len(events) >= 2 else None
            if (
                r.status_code != 200
                or events[-1] != "[DONE]"
                or any('"error"' in e for e in events)
                or not usage
                or usage["completion_tokens"] != 16
            ):
                failures.append((r.status_code, events[-3:]))
            else:
                ttfts.append(ttft)
        return ttfts, rejected, failures

    with ThreadPoolExecutor(4 * capacity) as pool:
        futures = [pool.submit(client) for _ in range(4 * capacity)]
        time.sleep(OVERLOAD_S)
        stop.set()
        results = [f.result() for f in futures]
    ttfts = sorted(t for ttft, _, _ in results for t in ttft)
    rejected = sum(n for _, n, _ in results)
    failures = [f for _, _, fails in results for f in fails]
    p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None
    print(
        f"\n{4 * capacity} clients for {OVERLOAD_S} s at capacity {capacity}: {len(ttfts)} admitted, {rejected} "
        f"429, {len(failures)} failed; admitted TTFT p50 {1e3 * ttfts[len(ttfts) // 2]:.0f} ms, "
        f"p99 {1e3 * p99:.0f} ms"
    )
    assert not failures, failures[:5]
    assert len(ttfts) >= 4 and rejected > 0, (len(ttfts), rejected)
    assert metric(server.metrics(), "moemix_requests_in_flight", model=BF16) == 0


# ------------------------------------------------------------------------------- health, metrics, misc


def test_health_version_tokenize(server):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["models"] == {BF16: "ok", MOEMIX: "ok"}
    v = httpx.get(server.url + "/version").json()
    assert v["vllm"] == "0.32.0" and v["version"]
    tok = server.post("/tokenize", {"model": MOEMIX, "prompt": "import os"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 256
    assert server.post("/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.post(server.url + "/tokenize", json={"model": MOEMIX, "prompt": "x"}).status_code == 401


def test_metrics_vllm_per_model_and_moemix(server, moemix_ckpt):
    server.client().completions.create(model=MOEMIX, prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True})
    m = server.metrics()
    for model in (BF16, MOEMIX):  # vLLM's own metrics, one series per model in one registry
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            assert metric(m, name, model_name=model) is not None, (name, model)
        assert metric(m, "vllm:generation_tokens_total", model_name=model) > 0
        assert metric(m, "vllm:e2e_request_latency_seconds_count", model_name=model) > 0
        assert metric(m, "vllm:time_to_first_token_seconds_count", model_name=model) > 0
        assert metric(m, "moemix_engine_healthy", model=model) == 1
        assert metric(m, "moemix_engine_resident_memory_bytes", model=model) > 50 * 2**20
    summary = json.loads((moemix_ckpt / "config.json").read_text())["quantization_config"]["summary"]
    assert metric(m, "moemix_weight_average_bits", model=MOEMIX) == pytest.approx(summary["avg_bits"])
    assert metric(m, "moemix_weight_average_payload_bits", model=MOEMIX) == pytest.approx(summary["avg_payload_bits"])
    assert metric(m, "moemix_weight_average_bits", model=BF16) == 16
    for width, n in summary["bytes_by_width"].items():
        assert metric(m, "moemix_quantized_linear_bytes", model=MOEMIX, bits=width) == n
    experts = {
        dict(lab)["bits"]: v
        for (n, lab), v in m.items()
        if n == "moemix_weight_bytes" and ("model", MOEMIX) in lab and ("component", "experts") in lab
    }
    assert set(experts) == {"2", "3", "4", "8"}
    assert metric(m, "moemix_weight_bytes", model=BF16, component="experts", bits="bf16") > sum(experts.values())
    assert metric(m, "moemix_generation_tokens_per_second", model=MOEMIX) > 0
    assert metric(m, "moemix_server_resident_memory_bytes") > 0
    assert metric(m, "http_requests_total", handler="/v1/completions", status="2xx") > 0
    for role, counts in expected_kernels().items():
        for kernel, layers in counts.items():
            assert metric(m, "moemix_kernel_info", model=MOEMIX, role=role, kernel=kernel, layers=str(layers)) == 1
    log = server.log.read_text()  # said at start-up:
    assert "serving: experts: NativeCpuExpertsKernel" in log
    assert (
        f"model {BF16}: vllm_args `sse_keep_alive_interval` is a `vllm serve` HTTP-server option and is NOT applied"
    ) in log


def test_expert_routing_counts_by_layer_and_width(server, tmp_path):
    import httpx

    from vllm_moemix.config.routing_profile import load_profile

    def routed_per_layer() -> tuple[dict, dict[str, float]]:
        m = server.metrics()
        per_layer: dict[str, float] = {}
        for (name, labels), value in m.items():
            lab = dict(labels)
            if name == "moemix_expert_routed_tokens_total" and lab.get("model") == MOEMIX:
                assert lab["bits"] in {"2", "3", "4", "8"}
                per_layer[lab["layer"]] = per_layer.get(lab["layer"], 0) + value
        return m, per_layer

    before = sum(routed_per_layer()[1].values())
    server.client().completions.create(model=MOEMIX, prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True})
    # /metrics serves the counts the background refresher gathered (every ROUTING_REFRESH_S), never fresher
    deadline = time.monotonic() + 10 * ROUTING_REFRESH_S
    while sum((per_layer := routed_per_layer()[1]).values()) <= before:
        assert time.monotonic() < deadline, per_layer
        time.sleep(ROUTING_REFRESH_S / 4)
    time.sleep(1.5 * ROUTING_REFRESH_S)  # one more gathering, all of whose counts postdate the request
    m, per_layer = routed_per_layer()
    assert sorted(per_layer) == ["0", "1", "2", "3"]
    totals = set(per_layer.values())
    assert len(totals) == 1 and totals.pop() % 2 == 0 and min(per_layer.values()) >= 2 * 8  # top-2, same tokens
    r = httpx.get(server.url + "/v1/moemix/routing", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body[BF16] is None and len(body[MOEMIX]["experts"]) == 4 * 8
    profile = tmp_path / "routing.json"
    profile.write_text(json.dumps(body[MOEMIX]))
    usage = load_profile(profile)
    assert sum(usage[0].values()) >= per_layer["0"]
    assert not any(name == "moemix_expert_routed_tokens_total" and dict(lab).get("model") == BF16 for name, lab in m)


def test_prometheus_scrapes_the_server(server, tmp_path):
    """A real Prometheus (Debian package `prometheus`) scrapes /metrics; the value read back through its HTTP
    API is the checkpoint's average bits."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus not installed (apt-get install -y --no-install-recommends prometheus)")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: moemix\n    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        query = f'moemix_weight_average_bits{{model="{MOEMIX}"}}'
        expected = metric(server.metrics(), "moemix_weight_average_bits", model=MOEMIX)
        deadline, result = time.monotonic() + 60, []
        while not result:
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(1)
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
                result = r.json()["data"]["result"] if r.status_code == 200 else []
            except httpx.TransportError:
                continue
        assert float(result[0]["value"][1]) == pytest.approx(expected)
        r = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query",
            params={"query": "sum by (model_name) (vllm:generation_tokens_total)"},
            timeout=5,
        )
        assert {s["metric"]["model_name"] for s in r.json()["data"]["result"]} == {BF16, MOEMIX}
        targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        assert targets[0]["health"] == "up"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


FUZZ_EXAMPLES = 15  # per operation and mode: ~90 requests, ~10 s


@pytest.mark.parametrize("mode", ["negative", "positive"])
def test_fuzz_never_a_server_error(server, mode):
    """Schemathesis, from the server's own OpenAPI schema: bodies that violate it (negative) and bodies that fit
    it (positive) for the three POST endpoints. Every answer is < 500 and non-200 answers are OpenAI error
    JSON. Positive bodies get max_tokens <= 4 and n <= 2 so the engine work stays bounded."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_dict(httpx.get(server.url + "/openapi.json", timeout=30).json())
    generation_mode = schemathesis.GenerationMode(mode)
    seen: dict[int, int] = {}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):

        @given(case=schema[path]["POST"].as_strategy(generation_mode=generation_mode))
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            phases=[Phase.generate],
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            if generation_mode.is_positive and isinstance(case.body, dict):
                for key in ("max_tokens", "max_completion_tokens"):
                    value = case.body.get(key)
                    case.body[key] = min(value, 4) if isinstance(value, int) and not isinstance(value, bool) else 4
                if isinstance(case.body.get("n"), int):
                    case.body["n"] = min(case.body["n"], 2)
            r = case.call(base_url=server.url, headers=server.auth, timeout=60)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, case.body, r.text[:2000])  # noqa: B023 (check runs in this iteration)
            if r.status_code != 200:
                err = r.json()["error"]
                assert err["code"] == r.status_code and err["message"] and err["type"], r.text

        check()
    assert sum(seen.values()) >= 3 * FUZZ_EXAMPLES / 2 and 400 in seen, seen
    assert httpx.get(server.url + "/health").status_code == 200


def _sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def _chunked_over_the_limit():  # no Content-Length: the size is checked while the body arrives
    yield b'{"model": "tiny-moemix", "prompt": "'
    for _ in range(9):
        yield b"x" * 2**20
    yield b'"}'


_NO_AUTH = {"Authorization": None}
_HI = {"role": "user", "content": "hi"}
_NAMED_TOOL = {"type": "function", "function": {"name": "f"}}
_MISSHAPEN_CHAT = {
    "a message that is a number": {"messages": [1.5]},
    "a message that is null": {"messages": [None]},
    "content that is a number": {"messages": [{"role": "user", "content": 1.5}]},
    "content parts that are numbers": {"messages": [{"role": "user", "content": [1.5, 2]}]},
    "a text part whose text is a number": {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
    "tool_calls a number": {"messages": [_HI, {"role": "assistant", "tool_calls": 1.5}]},
    "a tool call whose function is a number": {
        "messages": [_HI, {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": 1.5}]}]
    },
    "structured_outputs a number": {"messages": [_HI], "structured_outputs": 1.5},
    "structured_outputs a string": {"messages": [_HI], "structured_outputs": "json"},
    "tools a number": {"messages": [_HI], "tools": 1.5},
    "a tool that is a number, named tool_choice": {"messages": [_HI], "tools": [1.5], "tool_choice": _NAMED_TOOL},
    "a tool without function, named tool_choice": {"messages": [_HI], "tools": [{}], "tool_choice": _NAMED_TOOL},
    "a tool function without name, named tool_choice": {
        "messages": [_HI],
        "tools": [{"type": "function", "function": {}}],
        "tool_choice": _NAMED_TOOL,
    },
    "a tool function that is a number": {"messages": [_HI], "tools": [{"type": "function", "function": 1.5}]},
    "tool_choice a number": {"messages": [_HI], "tools": [_NAMED_TOOL], "tool_choice": 1.5},
    "tool_choice function a number": {
        "messages": [_HI],
        "tools": [_NAMED_TOOL],
        "tool_choice": {"type": "function", "function": 1.5},
    },
    "response_format a number": {"messages": [_HI], "response_format": 1.5},
    "stream_options a number": {"messages": [_HI], "stream": True, "stream_options": 1.5},
    "chat_template_kwargs a number": {"messages": [_HI], "chat_template_kwargs": 1.5},
}
# (case, method, path, headers, body: dict/list -> JSON, bytes -> raw, callable -> chunked) -> (status, type).
# tiny-moemix admits 4 + 8 = 12 sequences, tiny-bf16 2; max_logprobs is vLLM's default, 20.
BAD_INPUTS = [
    ("huge n", "POST", "/v1/completions", {}, {"model": MOEMIX, "prompt": "x", "n": 10**6}, 400, "BadRequestError"),
    (
        "huge n, chat",
        "POST",
        "/v1/chat/completions",
        {},
        {"model": MOEMIX, "messages": [{"role": "user", "content": "hi"}], "n": 10**6},
        400,
        "BadRequestError",
    ),
    (
        "prompts x n over the limit",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": ["a"] * 5, "n": 3, "max_tokens": 2},
        400,
        "BadRequestError",
    ),
    (
        "1000 prompts x n 1000",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": ["a"] * 1000, "n": 1000},
        400,
        "BadRequestError",
    ),
    (
        "beam search, huge n",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": "x", "use_beam_search": True, "n": 10**6, "max_tokens": 2},
        400,
        "BadRequestError",
    ),
    (
        "beam search, n 11 (2n logprobs > 20)",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": "x", "use_beam_search": True, "n": 11, "max_tokens": 2},
        400,
        "BadRequestError",
    ),
    (
        "beam search, streamed",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": "x", "use_beam_search": True, "n": 2, "max_tokens": 2, "stream": True},
        400,
        "BadRequestError",
    ),
    (
        "logprobs 10**6",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": "x", "logprobs": 10**6, "max_tokens": 2},
        400,
        "BadRequestError",
    ),
    (
        "logprobs -5",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": "x", "logprobs": -5, "max_tokens": 2},
        400,
        "BadRequestError",
    ),
    (
        "top_logprobs 10**6, chat",
        "POST",
        "/v1/chat/completions",
        {},
        {
            "model": MOEMIX,
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": True,
            "top_logprobs": 10**6,
            "max_tokens": 2,
        },
        400,
        "BadRequestError",
    ),
    (
        "5000 stop strings",
        "POST",
        "/v1/completions",
        {},  # vLLM's protocol allows 4, as OpenAI does
        {"model": MOEMIX, "prompt": "x", "stop": [f"stop-{i}" for i in range(5000)], "max_tokens": 4},
        400,
        "BadRequestError",
    ),
    (
        "out-of-vocabulary token id",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": [1, 10**6], "max_tokens": 2},
        400,
        "BadRequestError",
    ),
    (
        "negative token id",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": [[1, -1]], "max_tokens": 2},
        400,
        "BadRequestError",
    ),
    (
        "token id 2**70",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": [2**70], "max_tokens": 2},
        400,
        "BadRequestError",
    ),
    (
        "max_tokens 1e400 (raw)",
        "POST",
        "/v1/completions",
        {},
        b'{"model": "tiny-moemix", "prompt": "x", "max_tokens": 1e400}',
        400,
        "BadRequestError",
    ),
    (
        "temperature NaN (raw)",
        "POST",
        "/v1/completions",
        {},
        b'{"model": "tiny-moemix", "prompt": "x", "max_tokens": 2, "temperature": NaN}',
        400,
        "BadRequestError",
    ),
    (
        "top_p NaN (raw)",
        "POST",
        "/v1/completions",
        {},
        b'{"model": "tiny-moemix", "prompt": "x", "max_tokens": 2, "top_p": NaN}',
        400,
        "BadRequestError",
    ),
    ("8 MB model name", "POST", "/v1/completions", {}, {"model": "m" * 8_000_000, "prompt": "x"}, 404, "NotFoundError"),
    ("chunked body over 8 MiB", "POST", "/v1/completions", {}, _chunked_over_the_limit, 413, "BadRequestError"),
    ("OPTIONS", "OPTIONS", "/v1/completions", _NO_AUTH, None, 405, "Method Not Allowed"),
    ("double slash", "POST", "//v1/completions", {}, {"model": MOEMIX, "prompt": "x"}, 404, "NotFoundError"),
    ("double slash, no key", "GET", "//v1/models", _NO_AUTH, None, 401, "AuthenticationError"),
    (
        "wrong key",
        "POST",
        "/v1/completions",
        {"Authorization": "Bearer wrong"},
        {"model": MOEMIX, "prompt": "x"},
        401,
        "AuthenticationError",
    ),
    ("no key", "POST", "/v1/completions", _NO_AUTH, {"model": MOEMIX, "prompt": "x"}, 401, "AuthenticationError"),
    (
        "wrong content-type",
        "POST",
        "/v1/completions",
        {"content-type": "text/plain"},
        json.dumps({"model": MOEMIX, "prompt": "x"}).encode(),
        400,
        "BadRequestError",
    ),
    ("empty body", "POST", "/v1/completions", {}, b"", 400, "BadRequestError"),
    ("JSON array body", "POST", "/v1/completions", {}, [{"model": MOEMIX, "prompt": "x"}], 400, "BadRequestError"),
    (
        "temperature -1",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": "x", "temperature": -1},
        400,
        "BadRequestError",
    ),
    ("unknown model", "POST", "/v1/completions", {}, {"model": "gpt-5", "prompt": "x"}, 404, "NotFoundError"),
    # JSON of the wrong shape where vLLM's own before-validators dereference it (they raised 500 before)
    *(
        (
            f"chat: {case}",
            "POST",
            "/v1/chat/completions",
            {},
            {"model": MOEMIX, "max_tokens": 2, **fields},
            400,
            "BadRequestError",
        )
        for case, fields in _MISSHAPEN_CHAT.items()
    ),
    (
        "top_k 2**70 (no bound in vLLM's protocol; the engine's msgpack has 64 bits)",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": "x", "max_tokens": 2, "top_k": 2**70},
        400,
        "BadRequestError",
    ),
    (
        "stream_interval 2**70, chat",
        "POST",
        "/v1/chat/completions",
        {},
        {"model": MOEMIX, "messages": [_HI], "max_tokens": 2, "stream_interval": 2**70},
        400,
        "BadRequestError",
    ),
    (
        "structured_outputs an array",
        "POST",
        "/v1/completions",
        {},
        {"model": MOEMIX, "prompt": "x", "max_tokens": 2, "structured_outputs": [1]},
        400,
        "BadRequestError",
    ),
]


def _engine_cores(server) -> list:
    import psutil

    return [p for p in psutil.Process(server.proc.pid).children() if "EngineCore" in " ".join([p.name(), *p.cmdline()])]


def test_bad_inputs_never_a_server_error(server):
    """Each hostile request gets its own 4xx as OpenAI error JSON (bounded in size), nothing is 5xx, no engine
    dies, and both models serve normally afterwards."""
    cores = {p.pid for p in _engine_cores(server)}
    assert len(cores) == 2
    results, wrong = [], []
    with httpx.Client(timeout=60) as http:
        for case, method, path, headers, body, status, err_type in BAD_INPUTS:
            headers = {
                k: v for k, v in {**server.auth, "content-type": "application/json", **headers}.items() if v is not None
            }
            content = (
                body() if callable(body) else json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            )
            try:
                r = http.request(method, server.url + path, content=content, headers=headers)
            except httpx.TransportError as e:  # the server hung up: as bad as a 5xx
                results.append((case, 599))
                wrong.append((case, repr(e)))
                continue
            results.append((case, r.status_code))
            got_type = None
            if r.status_code != 200:
                try:
                    err = r.json()["error"]
                    got_type = err["type"]
                    assert err["code"] == r.status_code and err["message"] and "param" in err
                except Exception:  # not OpenAI error JSON
                    wrong.append((case, r.status_code, r.text[:300]))
            if (r.status_code, got_type) != (status, err_type) or len(r.content) > 64 * 2**10:
                wrong.append((case, r.status_code, got_type, len(r.content), r.text[:300]))

    server_errors = [(case, s) for case, s in results if s >= 500]
    health = httpx.get(server.url + "/health", timeout=30)
    deaths = len(cores - {p.pid for p in _engine_cores(server)}) + sum(
        s != "ok" for s in health.json().get("models", {}).values()
    )
    print(f"\n{len(results)} bad inputs, {len(server_errors)} 5xx, {deaths} engine deaths")
    assert not server_errors and not wrong, (server_errors, wrong)
    assert health.status_code == 200 and health.json()["models"] == {BF16: "ok", MOEMIX: "ok"} and deaths == 0
    assert server.proc.poll() is None
    for model in (BF16, MOEMIX):
        done = server.client().completions.create(
            model=model, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert done.usage.completion_tokens == 4 and done.choices[0].finish_reason == "length"
    m = server.metrics()
    assert metric(m, "moemix_requests_in_flight", model=MOEMIX) == 0  # nothing above leaked a slot


def test_dead_engine_is_503_and_the_rest_keeps_serving(server):
    """SIGKILL one model's engine-core process while both models stream: the dead model's stream ends with an
    OpenAI error event and `data: [DONE]`, its slot is freed and counted incomplete; /health turns 503 naming
    it, its requests get 503, the other model's stream finishes and the server goes on."""
    import psutil

    cores = [
        p for p in psutil.Process(server.proc.pid).children() if "EngineCore" in " ".join([p.name(), *p.cmdline()])
    ]
    assert len(cores) == 2, [(p.pid, p.name(), p.cmdline()) for p in cores]
    victim = min(cores, key=lambda p: p.pid)
    m0 = server.metrics()
    incomplete_before = {m: metric(m0, "moemix_requests_incomplete_total", model=m) for m in (BF16, MOEMIX)}
    events: dict[str, list[str]] = {}
    with httpx.Client(headers=server.auth, timeout=60) as http:
        responses, iters = {}, {}
        for model in (BF16, MOEMIX):
            body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
            responses[model] = http.send(
                http.build_request("POST", server.url + "/v1/completions", json=body), stream=True
            )
            iters[model] = _sse_events(responses[model])
            events[model] = [next(iters[model])]  # generating
        victim.kill()
        for model in (BF16, MOEMIX):
            events[model] += list(iters[model])
            responses[model].close()
    deadline = time.monotonic() + 30
    while (r := httpx.get(server.url + "/health", timeout=10)).status_code != 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)
    status = r.json()["models"]
    assert sorted(status.values()) == ["dead", "ok"]
    dead = next(name for name, s in status.items() if s == "dead")
    alive = next(name for name, s in status.items() if s == "ok")

    assert events[dead][-1] == "[DONE]" and events[alive][-1] == "[DONE]"
    err = json.loads(events[dead][-2])["error"]
    assert err["code"] >= 500 and err["message"] and err["type"], err
    assert not any('"error"' in e for e in events[alive])
    assert json.loads(events[alive][-2])["choices"][0]["finish_reason"] == "length"  # all 200 tokens
    m = server.metrics()
    assert metric(m, "moemix_requests_incomplete_total", model=dead) == incomplete_before[dead] + 1
    assert metric(m, "moemix_requests_incomplete_total", model=alive) == incomplete_before[alive]
    assert metric(m, "moemix_requests_in_flight", model=dead) == 0

    assert_openai_error(
        server.post("/v1/completions", {"model": dead, "prompt": "x", "max_tokens": 2}), 503, "ServiceUnavailableError"
    )
    assert server.client().completions.create(model=alive, prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert metric(server.metrics(), "moemix_engine_healthy", model=dead) == 0
    ready = httpx.get(server.url + "/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["models"][dead]["status"] == "dead"
    assert ready.json()["models"][alive]["status"] == "ok"
    # on_engine_death: stay: one line says so, and the server keeps running
    lines = [ln for ln in server.log.read_text(errors="replace").splitlines() if "ENGINE DEAD" in ln]
    assert len(lines) == 1 and f"model {dead}:" in lines[0] and "staying up" in lines[0], lines
    assert "killed by SIGKILL" in lines[0], lines
    time.sleep(2 * 0.5)  # a few rounds of the engine watcher
    assert server.proc.poll() is None
    server.alive_model = alive


EXIT_STREAM_TOKENS = 400  # the surviving model's stream: seconds, still running when the server stops accepting


def test_engine_death_exits_after_the_other_models_streams(tmp_path):
    """Default --on-engine-death exit: SIGKILL one model's engine core while both models stream. The dead model's
    stream ends with an error event and [DONE]; the server logs one ENGINE DEAD line naming it and stops
    accepting connections while the other model's stream is still running; that stream finishes complete; then
    the process exits with status 3 and no engine process is left."""
    import threading

    import psutil

    args = [f"a={TRAINED_MIXTRAL}", f"b={TRAINED_MIXTRAL}", "--max-model-len", "1024", "--max-num-seqs", "2"]
    proc, port, log = launch_server([*args, "--enforce-eager"], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, timeout=240)
        tree = psutil.Process(proc.pid).children(recursive=True)
        cores = [p for p in tree if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
        assert len(cores) == 2, [(p.pid, p.name()) for p in tree]
        victim = min(cores, key=lambda p: p.pid)
        ended: dict[str, tuple[float, list[str]]] = {}

        def stream(model: str, started: threading.Event) -> None:
            body = {"model": model, "prompt": PROMPT, "max_tokens": EXIT_STREAM_TOKENS, "ignore_eos": True}
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            events = []
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        started.set()
            ended[model] = (time.monotonic(), events)

        threads = []
        for model in ("a", "b"):
            started = threading.Event()
            threads.append(threading.Thread(target=stream, args=(model, started)))
            threads[-1].start()
            assert started.wait(60), log.read_text()[-3000:]
        victim.kill()
        refused_at = None  # when the server stopped accepting connections
        deadline = time.monotonic() + 60
        while refused_at is None and time.monotonic() < deadline:
            try:
                httpx.get(url + "/health", timeout=5)
                time.sleep(0.05)
            except httpx.ConnectError:
                refused_at = time.monotonic()
        for t in threads:
            t.join(120)
        assert proc.wait(90) == 3, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    dead = next(m for m, (_, events) in ended.items() if any('"error"' in e for e in events))
    alive = "b" if dead == "a" else "a"
    assert ended[dead][1][-1] == "[DONE]" and json.loads(ended[dead][1][-2])["error"]["message"]
    alive_end, alive_events = ended[alive]
    assert alive_events[-1] == "[DONE]" and not any('"error"' in e for e in alive_events)
    assert json.loads(alive_events[-2])["usage"]["completion_tokens"] == EXIT_STREAM_TOKENS
    assert refused_at is not None and refused_at < alive_end, "the server stopped after the stream, not before"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "ENGINE DEAD" in ln]
    assert len(lines) == 1 and f"model {dead}: engine-core process {victim.pid} killed by SIGKILL" in lines[0], lines
    assert f"exiting with status 3 once the in-flight requests of {alive} have finished" in lines[0]
    # multiprocessing's resource tracker exits on its own once the last process holding its pipe is gone: a moment.
    _, left = psutil.wait_procs(tree, timeout=10)
    assert not [(p.pid, p.name()) for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(f"\nstopped accepting {alive_end - refused_at:.1f} s before the surviving stream ended; exit status 3")


def test_sigterm_during_engine_start_up_leaves_no_process(tmp_path):
    """SIGTERM while the engine core is loading: the engine processes are stopped at once (not after the engine
    finished starting) and the whole process tree is gone within START_UP_STOP_S; the exit is clean."""
    import psutil

    proc, _, log = launch_server([str(TRAINED_MIXTRAL), "--enforce-eager", "--max-model-len", "256"], tmp_path)
    root = psutil.Process(proc.pid)
    tree = {proc.pid: root}

    def grow_tree() -> list:
        try:
            tree.update((p.pid, p) for p in root.children(recursive=True))
        except psutil.Error:
            pass
        return [p for p in tree.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    try:
        deadline = time.monotonic() + 180
        while not any("EngineCore" in " ".join([p.name(), *p.cmdline()]) for p in grow_tree()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the engine core is starting: its workers are not even up yet
        stopped_at = time.monotonic()
        while alive := grow_tree():
            assert time.monotonic() - stopped_at < START_UP_STOP_S, (
                [(p.pid, p.name()) for p in alive],
                log.read_text()[-3000:],
            )
            time.sleep(0.1)
        print(f"\nprocess tree of {len(tree)} gone {time.monotonic() - stopped_at:.1f} s after SIGTERM")
        assert proc.wait(10) == 0
    finally:
        for p in grow_tree():
            p.kill()


# -------------------------------------------------------------------------------- graceful shutdown (last)


def test_sigterm_drains_in_flight_requests(server):
    """SIGTERM: new connections are refused, the stream already running finishes, the process exits 0."""
    client = server.client()
    model = getattr(server, "alive_model", MOEMIX)  # after test_dead_engine_is_503..., the surviving one
    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=60,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    it = iter(stream)
    first = next(it)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(it)
    chunks = [first, *rest]
    assert chunks[-1].usage.completion_tokens == 60
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
    assert server.proc.wait(60) == 0, server.log_tail()
