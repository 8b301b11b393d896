"""Load tests (loadtests/): the metric math and summary (fast, no server), the Locust path end to end against a
tiny fake OpenAI server with known timings (a few seconds, no vLLM), and (marked `vllm`) a short bounded run
against the real `moemix serve` on the moemix-quantized demo model, whose counts must agree with the server's own
Prometheus counters."""

from __future__ import annotations

import json
import math
import random
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtests import run as lt_run
from loadtests.metrics import (
    DONE,
    Distribution,
    RequestRecord,
    StreamTimer,
    chunk_text,
    describe,
    iter_sse_data,
    meets_slos,
    parse_mix,
    parse_slo,
    percentile,
    read_records,
    summarize,
    tpot,
)
from tests.conftest import free_port

# ----------------------------------------------------------------------------------------------- metric math


def test_tpot_definition():
    assert tpot(e2e=2.0, ttft=0.5, output_tokens=16) == pytest.approx(1.5 / 15)
    assert tpot(2.0, 0.5, 1) is None  # undefined for one token
    assert tpot(2.0, None, 16) is None  # not streamed
    assert tpot(None, 0.5, 16) is None


def test_stream_timer_ttft_is_first_non_empty_chunk_and_itl_the_gaps():
    t = StreamTimer(start=10.0)
    t.feed(10.1, "")  # role-only delta: not a token
    t.feed(10.3, "Hello")
    t.feed(10.35, None)
    t.feed(10.5, " world")
    t.feed(10.9, "!")
    assert t.ttft == pytest.approx(0.3)
    assert t.itl == pytest.approx([0.2, 0.4])
    assert t.chunks == 3
    assert StreamTimer(0.0).ttft is None


def test_sse_parsing_done_comments_and_multiline():
    lines = [
        b": keep-alive",
        b"",
        b'data: {"a": 1}',
        b"",
        b'data: {"b":',
        b"data: 2}",
        b"",
        b"event: x",
        b"data: [DONE]",
        b"",
        b'data: {"after": 1}',
        b"",
    ]
    assert list(iter_sse_data(lines)) == ['{"a": 1}', '{"b":\n2}', DONE]
    assert list(iter_sse_data(["data: x"])) == ["x"]  # a stream cut before its blank line / [DONE]


def test_chunk_text_completion_and_chat():
    assert chunk_text({"choices": [{"text": "ab"}]}, "completion") == "ab"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}, "chat") == ""
    assert chunk_text({"choices": [{"delta": {"content": "hi"}}]}, "chat") == "hi"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}, "chat") == ""


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 5, 37):
        xs = [rng.random() for _ in range(n)]
        for p in (0, 50, 90, 99, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert percentile([], 50) is None


def test_describe_in_ms():
    d = describe([0.1, 0.2, 0.3, 0.4])
    assert d["count"] == 4 and d["mean"] == pytest.approx(250.0)
    assert d["p50"] == pytest.approx(250.0) and d["max"] == pytest.approx(400.0)
    assert describe([]) == {"count": 0}


def _rec(**kw) -> RequestRecord:
    base = dict(
        kind="completion",
        stream=True,
        model="m",
        start=0.0,
        e2e=1.0,
        ttft=0.1,
        itl=[0.1] * 9,
        prompt_tokens=10,
        output_tokens=10,
    )
    base.update(kw)
    return RequestRecord(**base)


def test_slo_parsing():
    assert parse_slo("ttft=0.5") == ("ttft", 0.5)
    assert parse_slo("E2E=3") == ("e2el", 3.0)
    for bad in ("ttft", "latency=1", "tpot=x", "ttft=0", "ttft=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_goodput_counts_requests_meeting_every_slo():
    slos = {"ttft": 0.5, "tpot": 0.05}
    good = _rec(e2e=1.0, ttft=0.1, output_tokens=19)  # tpot = 0.9/18 = 0.05 -> exactly at the bound: good
    slow_first = _rec(ttft=0.6)
    slow_decode = _rec(e2e=2.0, ttft=0.1, output_tokens=10)  # tpot 0.211
    one_token = _rec(e2e=0.2, ttft=0.2, output_tokens=1, itl=[])  # tpot counts as 0 (vllm bench serve)
    non_stream_fast = _rec(stream=False, ttft=None, itl=[], e2e=0.4)  # its TTFT is its E2E: 0.4 <= 0.5
    non_stream_slow = _rec(stream=False, ttft=None, itl=[], e2e=0.9)
    failed = _rec(ok=False, error="HTTP 500")
    assert meets_slos(good, slos) and meets_slos(one_token, slos) and meets_slos(non_stream_fast, slos)
    for r in (slow_first, slow_decode, non_stream_slow, failed):
        assert not meets_slos(r, slos)
    assert meets_slos(slow_decode, {"e2el": 2.0}) and not meets_slos(slow_decode, {"e2el": 1.9})


def test_summary_throughputs_percentiles_and_goodput():
    recs = [
        _rec(start=0.0, e2e=1.0, ttft=0.1, output_tokens=10, prompt_tokens=5, itl=[0.1] * 9),
        _rec(start=0.5, e2e=1.5, ttft=0.3, output_tokens=13, prompt_tokens=7, itl=[0.1] * 12),
        _rec(start=1.0, e2e=1.0, stream=False, ttft=None, itl=[], output_tokens=8, prompt_tokens=3),
        _rec(start=1.0, e2e=0.2, ok=False, status=500, error="boom", output_tokens=None, prompt_tokens=None),
    ]
    s = summarize(recs, {"ttft": 0.2})
    assert s["requests"] == 4 and s["completed"] == 3 and s["failed"] == 1 and s["streamed"] == 2
    assert s["duration_s"] == pytest.approx(2.0)  # first start 0.0 -> last end 2.0
    assert s["output_tokens"] == 31 and s["prompt_tokens"] == 15
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(15.5)
    assert s["total_token_throughput"] == pytest.approx(23.0)
    assert s["ttft_ms"]["count"] == 2 and s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["tpot_ms"]["count"] == 2
    assert s["tpot_ms"]["mean"] == pytest.approx(1000 * (0.9 / 9 + 1.2 / 12) / 2)
    assert s["itl_ms"]["count"] == 21 and s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert s["e2el_ms"]["count"] == 3
    # good: only the first (ttft 0.1); the second has ttft 0.3, the non-streamed one waits 1.0 s for its tokens
    assert s["good_requests"] == 1 and s["goodput"] == pytest.approx(0.5)
    assert s["goodput_fraction"] == pytest.approx(1 / 3)
    assert s["errors"] == {"500: boom": 1}
    assert summarize([], {})["completed"] == 0


def test_record_roundtrip(tmp_path):
    recs = [_rec(), _rec(stream=False, ttft=None, itl=[])]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in recs))
    assert read_records(path) == recs


def test_length_distributions():
    rng = random.Random(1)
    assert Distribution.parse("32").sample(rng) == 32
    assert Distribution.parse("fixed:7").sample(rng) == 7
    u = Distribution.parse("uniform:4:9")
    assert {u.sample(rng) for _ in range(300)} == set(range(4, 10))
    n = Distribution.parse("normal:20:5")
    xs = [n.sample(rng) for _ in range(2000)]
    assert min(xs) >= 1 and abs(sum(xs) / len(xs) - 20) < 1
    assert {Distribution.parse("choice:3,5").sample(rng) for _ in range(50)} == {3, 5}
    for bad in ("uniform:9:4", "uniform:0:3", "zipf:1", "fixed:0", "normal:0:1", "choice:", "x"):
        with pytest.raises(ValueError):
            Distribution.parse(bad)


def test_request_mix():
    assert parse_mix("completion_stream=3,chat=1") == {"completion_stream": 3.0, "chat": 1.0}
    for bad in ("", "embeddings=1", "chat=0", "chat=-1"):
        with pytest.raises(ValueError):
            parse_mix(bad)


# ----------------------------------------------------------------------------------------------- the runner


def test_timespans_and_user_levels():
    assert lt_run.parse_timespan("30s") == 30 and lt_run.parse_timespan("2m") == 120
    assert lt_run.parse_timespan("1h30m") == 5400 and lt_run.parse_timespan("45") == 45
    assert lt_run.parse_users("4,1,2,2") == [1, 2, 4]
    for bad in ("", "0", "-1", "a", str(lt_run.MAX_USERS + 1)):
        with pytest.raises(lt_run.UsageError):
            lt_run.parse_users(bad)
    for bad in ("", "soon", "5x"):
        with pytest.raises(lt_run.UsageError):
            lt_run.parse_timespan(bad)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://127.8.9.10:1", "http://[::1]:8000", "http://localhost:8000"]
)
def test_loopback_hosts_are_accepted(url):
    assert lt_run.check_host(url, allow_remote=False) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000",
        "http://192.168.1.5",
        "http://8.8.8.8:80",
        "http://172.16.0.1:8000",
        "http://[2001:db8::1]:8000",
        "ftp://127.0.0.1",
        "http://no-such-host.invalid:8000",
    ],
)
def test_other_hosts_are_refused(url):
    with pytest.raises(lt_run.UsageError):
        lt_run.check_host(url, allow_remote=False)


def test_allow_remote_lifts_the_loopback_rule():
    assert lt_run.check_host("http://10.0.0.1:8000/", allow_remote=True) == "http://10.0.0.1:8000"


def test_cli_refuses_remote_before_sending_anything(tmp_path, capsys):
    assert lt_run.main(["--host", "http://10.1.2.3:8000", "--out", str(tmp_path / "o")]) == 2
    assert "not a loopback" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert lt_run.main(["--host", "http://127.0.0.1:9", "--out", str(tmp_path / "o"), "--max-requests", "0"]) == 2
    assert lt_run.main(["--host", "http://127.0.0.1:9", "--out", str(tmp_path / "o"), "--compare", "a", "a"]) == 2


def _fake_result(compare: bool) -> dict:
    runs = []
    models = ["a", "b"] if compare else ["a"]
    for mi, m in enumerate(models):
        for users in (1, 2, 4):
            recs = [
                _rec(start=i * 0.1, e2e=0.5 + 0.1 * users + 0.05 * mi, ttft=0.05 * users, itl=[0.02] * 9)
                for i in range(10)
            ]
            runs.append(
                {"tag": f"{m}_u{users}", "models": [m], "users": users, "summary": summarize(recs, {"ttft": 0.1})}
            )
    return {
        "runs": runs,
        "config": {"percentiles": [50, 90, 99]},
        "slos_s": {"ttft": 0.1},
        "compare": models if compare else None,
    }


def test_plots_and_comparison(tmp_path):
    res = _fake_result(compare=True)
    paths = lt_run.plot(res, tmp_path)
    assert {p.name for p in paths} == {"latency_vs_concurrency.png", "throughput_vs_concurrency.png", "compare.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    rows = lt_run.comparison(res["runs"], ["a", "b"])
    assert [r["users"] for r in rows] == [1, 2, 4]
    assert all(r["e2el_p50_ratio_b_over_a"] > 1 for r in rows)  # b is 50 ms slower by construction
    (tmp_path / "single").mkdir()
    single = lt_run.plot(_fake_result(compare=False), tmp_path / "single")
    assert "compare.png" not in {p.name for p in single}


# ------------------------------------------------------------------------ Locust end to end, fake server


FIRST_DELAY, TOKEN_GAP = 0.08, 0.02


class FakeOpenAI(BaseHTTPRequestHandler):
    """Streams `max_tokens` one-word chunks: the first after FIRST_DELAY, then one every TOKEN_GAP seconds.
    Keeps vLLM-named counters on /metrics so the runner's server-delta bookkeeping is exercised too."""

    protocol_version = "HTTP/1.1"
    counters = {"requests": 0, "gen": 0, "prompt": 0}
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, json.dumps({"data": [{"id": "fake"}]}).encode())
        if self.path == "/metrics":
            c = self.counters
            text = (
                f'vllm:request_success_total{{finished_reason="length",model_name="fake"}} {c["requests"]}\n'
                f'vllm:generation_tokens_total{{model_name="fake"}} {c["gen"]}\n'
                f'vllm:prompt_tokens_total{{model_name="fake"}} {c["prompt"]}\n'
            )
            return self._send(200, text.encode(), "text/plain; version=0.0.4")
        self._send(404, b'{"error": {"message": "no"}}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._send(404, b'{"error": {"message": "unknown route", "code": 404}}')
        chat = self.path == "/v1/chat/completions"
        n = int(body["max_tokens"])
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        p_tokens = len(prompt.split())
        usage = {"prompt_tokens": p_tokens, "completion_tokens": n, "total_tokens": p_tokens + n}
        if not body.get("stream"):
            time.sleep(FIRST_DELAY + TOKEN_GAP * (n - 1))
            self._count(n, p_tokens)
            msg = {"message": {"role": "assistant", "content": "w " * n}} if chat else {"text": "w " * n}
            return self._send(200, json.dumps({"choices": [msg], "usage": usage}).encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(obj):
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        if chat:
            chunk({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
        time.sleep(FIRST_DELAY)
        for i in range(n):
            if i:
                time.sleep(TOKEN_GAP)
            chunk({"choices": [{"delta": {"content": " w"}} if chat else {"text": " w"}]})
        self._count(n, p_tokens)
        chunk({"choices": [], "usage": usage})
        chunk(DONE)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _count(self, n, p):
        with self.lock:
            self.counters["requests"] += 1
            self.counters["gen"] += n
            self.counters["prompt"] += p


@pytest.fixture
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), FakeOpenAI)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_locust_run_against_fake_server_measures_known_timings(fake_server, tmp_path):
    """The whole path (runner -> Locust subprocess -> users -> records -> summary -> plots) on a server whose
    TTFT/TPOT are known: TTFT ~ 80 ms, TPOT = ITL ~ 20 ms."""
    out = tmp_path / "lt"
    t0 = time.monotonic()
    rc = lt_run.main(
        [
            "--host",
            fake_server,
            "--users",
            "2",
            "--run-time",
            "20s",
            "--max-requests",
            "8",
            "--out",
            str(out),
            "--mix",
            "completion_stream=2,chat_stream=2,chat=1",
            "--output-len",
            "fixed:6",
            "--prompt-len",
            "uniform:3:5",
            "--slo",
            "ttft=5",
            "--slo",
            "tpot=1",
            "--stop-timeout",
            "10s",
        ]
    )
    elapsed = time.monotonic() - t0
    assert rc == 0, (out / "fake_u2.locust.log").read_text()[-3000:]
    assert elapsed < 20, f"--max-requests should end the run early, took {elapsed:.1f} s"
    summary = json.loads((out / "summary.json").read_text())
    (run,) = summary["runs"]
    s = run["summary"]
    assert s["requests"] == 8 and s["completed"] == 8 and s["failed"] == 0
    assert s["output_tokens"] == 48  # server usage, 6 per request
    assert s["good_requests"] == 8
    if s["streamed"]:
        assert FIRST_DELAY * 1000 <= s["ttft_ms"]["p50"] < FIRST_DELAY * 1000 + 400
        assert TOKEN_GAP * 1000 * 0.9 <= s["tpot_ms"]["p50"] < TOKEN_GAP * 1000 + 150
        assert s["itl_ms"]["count"] == 5 * s["streamed"]
    assert run["server"]["fake"] == {
        "requests_finished": 8.0,
        "generation_tokens": 48.0,
        "prompt_tokens": float(s["prompt_tokens"]),
    }
    for name in (
        "fake_u2_stats.csv",
        "fake_u2.html",
        "fake_u2.records.jsonl",
        "latency_vs_concurrency.png",
        "throughput_vs_concurrency.png",
    ):
        assert (out / name).stat().st_size > 0, name
    stats = (out / "fake_u2_stats.csv").read_text()
    expected = ["METRIC,E2E", "METRIC,OUTPUT_TOKENS_PER_S"]
    if s["streamed"]:
        expected += ["METRIC,TTFT", "METRIC,ITL", "METRIC,TPOT"]
    for metric in expected:
        assert metric in stats, metric


def test_failed_requests_are_counted_and_exit_1(fake_server, tmp_path):
    bad = tmp_path / "bad"  # every request goes to /nope/v1/...: 404
    rc = lt_run.main(
        [
            "--host",
            fake_server + "/nope",
            "--users",
            "1",
            "--run-time",
            "15s",
            "--max-requests",
            "3",
            "--out",
            str(bad),
            "--model",
            "fake",
            "--no-plots",
            "--no-server-metrics",
        ]
    )
    s = json.loads((bad / "summary.json").read_text())["runs"][0]["summary"]
    assert rc == 1 and s["failed"] == 3 and s["completed"] == 0
    assert all(k.startswith("404") for k in s["errors"])


# ------------------------------------------------------------------------ the real server (vLLM engine)


@pytest.fixture(scope="module")
def real_server(demo_server):
    return demo_server[0]


def _counters(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.labels.get("model_name", s.labels.get("model")) == "tiny-moemix" or not s.labels:
                key = s.name + ("" if s.name != "vllm:request_success_total" else f":{s.labels['finished_reason']}")
                out[key] = out.get(key, 0.0) + s.value
    return out


@pytest.mark.vllm
def test_bounded_run_against_the_real_server(real_server, tmp_path):
    before = _counters(real_server)
    out = tmp_path / "lt"
    t0 = time.monotonic()
    rc = lt_run.main(
        [
            "--host",
            real_server,
            "--users",
            "1,3",
            "--spawn-rate",
            "3",
            "--run-time",
            "25s",
            "--max-requests",
            "6",
            "--out",
            str(out),
            "--model",
            "tiny-moemix",
            "--mix",
            "completion_stream=2,chat_stream=2,completion=1,chat=1",
            "--prompt-len",
            "uniform:4:16",
            "--output-len",
            "uniform:8:24",
            "--slo",
            "ttft=30",
            "--slo",
            "tpot=5",
            "--no-plots",
        ]
    )
    elapsed = time.monotonic() - t0
    after = _counters(real_server)
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary.get("broken_runs")
    assert elapsed < 75
    runs = summary["runs"]
    assert [r["users"] for r in runs] == [1, 3]
    total_ok = sum(r["summary"]["completed"] for r in runs)
    total_out = sum(r["summary"]["output_tokens"] for r in runs)
    total_in = sum(r["summary"]["prompt_tokens"] for r in runs)
    assert sum(r["summary"]["failed"] for r in runs) == 0
    assert total_ok == 12
    # The server's own counters moved by exactly what the clients saw (nobody else talks to this server).
    finished = sum(
        after.get(f"vllm:request_success_total:{k}", 0) - before.get(f"vllm:request_success_total:{k}", 0)
        for k in ("stop", "length", "abort", "error", "repetition")
    )
    assert finished == total_ok
    assert after["vllm:request_success_total:length"] - before["vllm:request_success_total:length"] == total_ok
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == total_out
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == total_in
    for r in runs:
        s = r["summary"]
        assert r["server"]["tiny-moemix"]["generation_tokens"] == s["output_tokens"]
        assert s["streamed"] == 0 or (s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["count"] > 0)
        assert s["goodput_fraction"] == 1.0
        assert not math.isnan(s["output_throughput"]) and s["output_throughput"] > 0


OVERLOAD_S = 10  # seconds of 4x overload
# /health p99 bound, generous for CI on 2 shared cores: measured 13 ms here (48 clients); the server before the
# fix (GC pauses over the start-up heap, 429s through the whole stack, asyncio's loop) had 0.8 s at 64 clients
OVERLOAD_HEALTH_P99_MS = 250


@pytest.mark.vllm
def test_overload_four_times_the_admission_limit(real_server):
    """4x the demo model's admission limit (4 x 12 = 48 streaming clients, back to back, retrying 429s after
    50 ms) for OVERLOAD_S, with /health probed on a new connection every 50 ms by another process: every request
    gets a status (200, 429 with Retry-After; 503 only by design), every admitted stream is complete, /health
    stays fast, and the server serves a normal request afterwards with nothing left in flight."""
    import httpx

    from loadtests.overload import overload

    limit = httpx.get(real_server + "/ready", timeout=10).json()["models"]["tiny-moemix"]["limit"]
    s = overload(
        real_server,
        "tiny-moemix",
        clients=4 * limit,
        duration_s=OVERLOAD_S,
        max_tokens=16,
        retry_pause_s=0.05,
        probe_interval_s=0.05,
    )
    print(f"\noverload at 4 x {limit}: " + json.dumps({k: v for k, v in s.items() if "examples" not in k}))
    assert s["no_status"] == 0, s["no_status_examples"]
    assert set(s["statuses"]) <= {"200", "429", "503"} and s["server_errors"] == 0, s["statuses"]
    assert s["statuses"].get("200", 0) >= limit and s["statuses"].get("429", 0) > 0, s["statuses"]
    assert s["incomplete_streams"] == 0 and s["429_without_retry_after"] == 0, s["incomplete_examples"]
    assert s["probe"]["non_200"] == 0 and s["probe"]["n"] >= OVERLOAD_S * 5, s["probe"]
    assert s["probe"]["p99"] <= OVERLOAD_HEALTH_P99_MS, s["probe"]
    done = httpx.post(
        real_server + "/v1/completions",
        json={"model": "tiny-moemix", "prompt": "x", "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
    deadline = time.monotonic() + 30
    while (ready := httpx.get(real_server + "/ready", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.2)
    assert ready.json()["models"]["tiny-moemix"]["in_flight"] == 0


def test_api_key_reaches_the_server_but_not_the_command_line(tmp_path, monkeypatch):
    seen: list[str | None] = []

    class Auth(FakeOpenAI):
        def do_POST(self):
            seen.append(self.headers.get("Authorization"))
            return super().do_POST()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Auth)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    commands = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(lt_run.subprocess, "Popen", lambda cmd, **kw: commands.append(cmd) or real_popen(cmd, **kw))
    try:
        rc = lt_run.main(
            [
                "--host",
                f"http://127.0.0.1:{srv.server_address[1]}",
                "--users",
                "1",
                "--max-requests",
                "2",
                "--run-time",
                "10s",
                "--out",
                str(tmp_path),
                "--api-key",
                "sekrit",
                "--no-plots",
                "--model",
                "fake",
                "--output-len",
                "fixed:2",
            ]
        )
    finally:
        srv.shutdown()
        srv.server_close()
    assert rc == 0 and seen == ["Bearer sekrit"] * 2
    assert commands and all("sekrit" not in " ".join(c) for c in commands)


# ------------------------------------------------------------------------------------- the overload harness


class ScriptedServer(BaseHTTPRequestHandler):
    """Completions in a fixed cycle of five: a 3-token stream, 429 (Retry-After), no answer at all (the connection
    closed after the request was read), 429, 503 (Retry-After); GET /health answers 200. Counts what it did."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # each event its own segment, sent when written
    lock = threading.Lock()
    done: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._reply(200 if self.path == "/health" else 404, b"{}", {"Content-Type": "application/json"})

    def _reply(self, status, body, headers):
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            turn = self.done.get("n", 0)
            self.done["n"] = turn + 1
            kind = ("200", "429", "none", "429", "503")[turn % 5]
            self.done[kind] = self.done.get(kind, 0) + 1
        if kind == "none":
            self.close_connection = True
            return
        if kind != "200":
            err = json.dumps({"error": {"message": "busy", "type": "RateLimitError", "param": None, "code": 429}})
            return self._reply(int(kind), err.encode(), {"Retry-After": "1", "Content-Type": "application/json"})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"choices": [{"text": " w"}]}] * 3 + [{"choices": [], "usage": {"completion_tokens": 3}}]
        for i, event in enumerate([*map(json.dumps, events), "[DONE]"]):
            if 0 < i < 3:
                time.sleep(0.01)
            data = f"data: {event}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def test_overload_harness_counts_every_outcome():
    """Every request the clients sent is counted once: by its status, or as no status when the connection closed
    before one arrived; streams are complete; the prober saw /health; ITL is the 10 ms the server waits."""
    from loadtests.overload import overload

    ScriptedServer.done = {}
    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), ScriptedServer)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        s = overload(
            f"http://127.0.0.1:{srv.server_address[1]}",
            "m",
            clients=3,
            duration_s=1.5,
            max_tokens=3,
            retry_pause_s=0.01,
            probe_interval_s=0.05,
        )
    finally:
        srv.shutdown()
        srv.server_close()
    done = ScriptedServer.done
    assert s["sent"] == done["n"] >= 10, (s, done)
    assert s["statuses"] == {"200": done["200"], "429": done["429"], "503": done["503"], "no_status": done["none"]}
    assert s["no_status"] == done["none"] and all(e["error"] for e in s["no_status_examples"])
    assert s["incomplete_streams"] == 0 and s["429_without_retry_after"] == 0 and s["server_errors"] == 0
    assert s["probe"]["n"] >= 5 and s["probe"]["non_200"] == 0 and s["probe"]["p99"] < 1000
    assert s["text_events"] == 3 * done["200"] and 5 <= s["itl_ms"]["p50"] < 200


def test_overload_refuses_other_hosts():
    from loadtests.overload import check_loopback

    with pytest.raises(SystemExit, match="loopback"):
        check_loopback("http://192.0.2.1:8000")
    with pytest.raises(SystemExit, match="loopback"):
        check_loopback("https://127.0.0.1:8000")
    check_loopback("http://127.0.0.1:8000")
