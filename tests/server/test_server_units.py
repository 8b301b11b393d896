"""Server pieces that need no engine: settings, checkpoint facts, admission, auth/body-limit middleware, and the
whole app over fake engines (admission errors, streams whose engine dies, routing-count caching)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from server.admission import AdmissionGate, admission_limit, request_slots
from server.facts import read_weight_facts
from server.settings import SettingsError, build_settings, is_loopback, parse_model_arg, to_vllm_argv


def test_model_args():
    assert parse_model_arg("models/x").name == "models/x"
    m = parse_model_arg("tiny=models/x")
    assert (m.name, m.path) == ("tiny", "models/x")
    with pytest.raises(SettingsError):
        parse_model_arg("=models/x")


def test_yaml_and_flags(tmp_path, monkeypatch):
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    cfg = tmp_path / "server.yaml"
    cfg.write_text(
        "port: 9000\nmax_queue: 3\napi_key_env: TEST_KEY\nvllm_args: {max_model_len: 128}\n"
        "models:\n  - {name: a, path: a, max_queue: 0, vllm_args: {max_num_seqs: 2}}\n"
        f"  - {tmp_path / 'b'}\n"
    )
    monkeypatch.setenv("TEST_KEY", "s3cret")
    s = build_settings([f"c={tmp_path / 'c'}"], str(cfg), port=9100, override_vllm_args={"enforce_eager": True})
    assert [m.name for m in s.models] == ["a", str(tmp_path / "b"), "c"]
    assert s.models[0].path == str(tmp_path / "a")  # relative to the YAML file
    assert s.port == 9100 and s.api_key == "s3cret"  # flag wins over YAML; key from the env var
    assert [s.max_queue_for(m) for m in s.models] == [0, 3, 3]
    assert s.vllm_args_for(s.models[0]) == {"max_model_len": 128, "max_num_seqs": 2, "enforce_eager": True}


@pytest.mark.parametrize(
    "text, message",
    [
        ("models: [{path: a/b}, {path: a/b}]", "unique"),
        ("modles: [a/b]", "unknown keys"),
        ("models: [{name: x}]", "path"),
        ("models: [a/b]\nmax_queue: -1", "non-negative"),
        ("models: [{path: a/b, vllm_args: [1]}]", "mapping"),
        ("[1, 2]", "mapping"),
        ("models: [a/b]\nsse_keep_alive_s: -1", "sse_keep_alive_s must be a non-negative number"),
        ("models: [a/b]\nsse_keep_alive_s: .inf", "sse_keep_alive_s must be a non-negative number"),
        ("models: [a/b]\nsse_keep_alive_s: yes", "sse_keep_alive_s must be a non-negative number"),
        ("models: [a/b]\non_engine_death: restart", "on_engine_death must be one of"),
        ("models: [a/b]\nkeep_alive_s: 0", "keep_alive_s must be a positive number"),
        ("models: [a/b]\nauth_metrics: 1", "auth_metrics must be true or false"),
        ("models: [a/b]\nauth_metrics: true", "no key is configured"),
    ],
)
def test_yaml_mistakes_are_named(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SettingsError, match=message):
        build_settings([], str(cfg))


def test_no_model_is_an_error():
    with pytest.raises(SettingsError, match="no model"):
        build_settings([])
    with pytest.raises(SettingsError, match="does not exist"):
        build_settings(["/no/such/model"])
    assert build_settings(["org/some-model"]).models[0].path == "org/some-model"  # a hub id: vLLM's business


def test_vllm_argv():
    argv = to_vllm_argv(
        {
            "max_model_len": 256,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "compilation_config": {"mode": 0},
            "seed": None,
        }
    )
    assert argv == [
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--compilation-config",
        '{"mode": 0}',
    ]


def test_vllm_args_go_through_vllms_parser():
    from server.engine import vllm_serve_args
    from server.settings import ModelSettings

    args = vllm_serve_args(ModelSettings("m", "/m"), {"max_model_len": 128, "enforce_eager": True})
    assert (args.model, args.served_model_name, args.max_model_len, args.enforce_eager) == ("/m", ["m"], 128, True)
    with pytest.raises(SettingsError, match="bad vllm_args"):
        vllm_serve_args(ModelSettings("m", "/m"), {"no_such_option": 1})


def test_components_follow_the_architecture_roles(random_qwen2moe):
    """Every tensor counted once, under the role its linear has in the architecture table (biases with their
    linear; routers, the shared-expert gate, norms, embeddings and the LM head are "other")."""
    from safetensors import safe_open

    expected: dict[str, int] = {}
    for shard in random_qwen2moe.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if ".shared_expert." in name:
                    component = "shared"
                elif ".experts." in name:
                    component = "experts"
                elif ".self_attn." in name and "_proj." in name:
                    component = "attention"
                elif ".mlp." in name and "_proj." in name:  # a decoder layer with a dense MLP
                    component = "dense"
                else:
                    component = "other"
                expected[component] = expected.get(component, 0) + tensor.numel() * tensor.element_size()
    by = read_weight_facts(random_qwen2moe).by_component()
    assert {c: sum(widths.values()) for c, widths in by.items()} == expected
    assert set(expected) == {"experts", "shared", "attention", "dense", "other"}


def test_an_architecture_the_table_does_not_know_counts_as_other(random_mixtral, tmp_path):
    import shutil

    model = tmp_path / "unknown"
    shutil.copytree(random_mixtral, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["X"]}))
    facts = read_weight_facts(model)
    assert set(facts.by_component()) == {"other"} and facts.total_bytes == read_weight_facts(random_mixtral).total_bytes
    assert facts.avg_bits is None


def test_facts_of_a_moemix_checkpoint(random_mixtral, tmp_path):
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.config.plan import Plan

    plan = Plan.from_dict(
        {
            "default": {"bits": 4, "group_size": 64},
            "modules": {"model.layers.*.block_sparse_moe.experts.[01]": 2, "model.layers.*.self_attn": 8},
        }
    )
    out = tmp_path / "q"
    quantize_checkpoint(random_mixtral, plan, out, progress=False)
    facts = read_weight_facts(out)
    summary = json.loads((out / "config.json").read_text())["quantization_config"]["summary"]
    assert facts.is_moemix and facts.avg_bits == summary["avg_bits"]
    by = facts.by_component()
    assert set(by["experts"]) == {"2", "4"} and set(by["attention"]) == {"8"}
    # the quantized linears' bytes in the tensors equal the writer's accounting, width by width
    for width, n in summary["bytes_by_width"].items():
        assert by["experts"].get(width, 0) + by["attention"].get(width, 0) == n
    assert facts.moemix_json()["bytes_by_width"] == summary["bytes_by_width"]

    plain = read_weight_facts(random_mixtral)
    assert plain.quant_method is None and plain.moemix_json() is None
    assert plain.avg_bits == 16.0 and set(plain.by_component()["experts"]) == {"bf16"}


def test_facts_of_a_missing_dir(tmp_path):
    assert read_weight_facts(tmp_path / "nope").total_bytes == 0


@pytest.mark.parametrize(
    "qcfg",
    [
        "moemix",
        ["moemix"],
        {"quant_method": 4},
        {"quant_method": "moemix", "modules": [], "summary": "x"},
        {"quant_method": "moemix", "modules": {"model.embed_tokens": {"sym": True}}, "summary": {"avg_bits": "3"}},
    ],
)
def test_facts_never_raise_on_a_malformed_quantization_config(random_mixtral, tmp_path, qcfg):
    """Facts are best effort at start-up; refusing a malformed checkpoint is the loader's job (with its name)."""
    import shutil

    ckpt = tmp_path / "m"
    shutil.copytree(random_mixtral, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = qcfg
    (ckpt / "config.json").write_text(json.dumps(config))
    facts = read_weight_facts(ckpt)
    assert facts.total_bytes > 0 and facts.avg_bits is None or isinstance(facts.avg_bits, float)


def test_admission_gate():
    gate = AdmissionGate(limit=3)
    a, b = gate.try_acquire(2), gate.try_acquire(1)
    assert a and b and gate.in_flight == 3
    assert gate.try_acquire(1) is None and gate.rejected == 1
    a.release()
    a.release()  # idempotent
    assert gate.in_flight == 1
    b.release()
    assert gate.try_acquire(10) is None and gate.in_flight == 0  # larger than the limit: never admitted


def test_admission_limit_has_a_default_queue():
    assert admission_limit(4, None) == 8  # the queue defaults to one batch: never unbounded
    assert admission_limit(4, 0) == 4 and admission_limit(4, 10) == 14


def test_request_slots():
    class R:
        def __init__(self, n=None, prompt=None):
            self.n, self.prompt = n, prompt

    assert request_slots(R()) == 1
    assert request_slots(R(n=3, prompt="x")) == 3
    assert request_slots(R(n=2, prompt=["a", "b"])) == 4
    assert request_slots(R(prompt=[1, 2, 3])) == 1  # one prompt given as token ids


def _call(app, path, headers=(), body=b""):
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    payload = json.loads(sent[1]["body"]) if len(sent) > 1 and sent[1]["body"] else None
    return status, dict(sent[0]["headers"]), payload


async def _ok_app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_api_key_middleware():
    from server.middleware.auth import APIKeyMiddleware

    app = APIKeyMiddleware(_ok_app, "k")
    status, headers, body = _call(app, "/v1/completions")
    assert status == 401 and headers[b"www-authenticate"] == b"Bearer"
    assert body["error"]["type"] == "AuthenticationError" and body["error"]["code"] == 401
    assert _call(app, "/v1/completions", [(b"authorization", b"Bearer x")])[0] == 401
    assert _call(app, "/v1/completions", [(b"authorization", b"Bearer k")])[0] == 200
    assert _call(app, "/health")[0] == 200 and _call(app, "/metrics")[0] == 200


def test_api_key_scheme_is_case_insensitive_and_paths_cannot_bypass_it():
    from server.middleware.auth import APIKeyMiddleware

    app = APIKeyMiddleware(_ok_app, "k")
    for header in (b"bearer k", b"BEARER k", b"Bearer  k", b" Bearer k "):  # RFC 7235: the scheme has no case
        assert _call(app, "/v1/models", [(b"authorization", header)])[0] == 200, header
    for header in (b"Basic k", b"Bearerk", b"k", b"bearer", b"bearer K"):
        assert _call(app, "/v1/models", [(b"authorization", header)])[0] == 401, header
    for path in (
        "//v1/models",
        "/v1/../v1/models",
        "/health/../v1/models",
        "/./v1/models",
        "///tokenize",
        "/v1/models/",
        "/unknown",
        "/healthz",
    ):  # every path not exactly open needs the key
        assert _call(app, path)[0] == 401, path
    for path in ("/health", "/metrics", "/version", "/openapi.json", "//health", "/v1/../health"):
        assert _call(app, path)[0] == 200, path


def test_body_limit_middleware():
    from server.middleware.body_limit import BodyLimitMiddleware

    app = BodyLimitMiddleware(_ok_app, 10)
    status, _, body = _call(app, "/v1/completions", [(b"content-length", b"11")], b"x" * 11)
    assert status == 413 and body["error"]["code"] == 413
    assert _call(app, "/v1/completions", [(b"content-length", b"10")], b"x" * 10)[0] == 200


def _chunked_call(app, chunks: list[bytes]):
    """A POST whose body arrives in pieces without Content-Length (Transfer-Encoding: chunked)."""
    sent, messages = (
        [],
        [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)],
    )

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, send))
    return sent


def test_body_limit_middleware_chunked():
    from server.middleware.body_limit import BodyLimitMiddleware

    seen = []

    async def echo_app(scope, receive, send):
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = BodyLimitMiddleware(echo_app, 10)
    sent = _chunked_call(app, [b"x" * 6, b"x" * 6])
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == 413
    assert not seen  # refused before the app read anything
    assert _chunked_call(app, [b"x" * 5, b"y" * 5])[0]["status"] == 200
    assert seen == [{"type": "http.request", "body": b"x" * 5 + b"y" * 5, "more_body": False}]  # replayed whole


# ----------------------------------------------------------------------------------- auth and start-up


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_without_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEMIX_API_KEY", raising=False)
    model = str(tmp_path)
    with pytest.raises(SettingsError, match="refusing to serve 0.0.0.0 without an API key.*--insecure-no-auth"):
        build_settings([model], host="0.0.0.0")
    assert build_settings([model]).api_key is None  # loopback: fine without a key
    assert build_settings([model], host="0.0.0.0", insecure_no_auth=True).api_key is None
    monkeypatch.setenv("MOEMIX_API_KEY", "from-env")
    assert build_settings([model], host="0.0.0.0").api_key == "from-env"
    cfg = tmp_path / "s.yaml"
    cfg.write_text("insecure_no_auth: true\n")
    with pytest.raises(SettingsError, match="unknown keys"):  # a flag only: never silently from a file
        build_settings([model], str(cfg))


def test_api_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMIX_API_KEY", "from-env")
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert build_settings([str(tmp_path)], api_key_file=str(key), host="0.0.0.0").api_key == "s3cret"
    cfg = tmp_path / "s.yaml"
    cfg.write_text("api_key_file: key\n")  # relative to the YAML file
    assert build_settings([str(tmp_path)], str(cfg)).api_key == "s3cret"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match="is empty"):
        build_settings([str(tmp_path)], api_key_file=str(tmp_path / "empty"))
    with pytest.raises(SettingsError, match="cannot read the API key file"):
        build_settings([str(tmp_path)], api_key_file=str(tmp_path / "missing"))


def _serve_args(argv: list[str]) -> argparse.Namespace:
    from server.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="moemix")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_cli_refuses_an_open_host_with_one_line(tmp_path, monkeypatch, capsys):
    import server.cli

    monkeypatch.delenv("MOEMIX_API_KEY", raising=False)
    monkeypatch.setattr(server.cli, "bind_socket", lambda *a: pytest.fail("bound a port without an API key"))
    with pytest.raises(SystemExit) as e:
        server.cli.main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moemix serve: error: refusing to serve 0.0.0.0"), err
    with pytest.raises(SystemExit):  # the key itself and its file are alternatives
        _serve_args([str(tmp_path), "--api-key", "k", "--api-key-file", "f"])


def test_startup_warnings(tmp_path, monkeypatch):
    from server.cli import settings_from_args, startup_warnings

    monkeypatch.delenv("MOEMIX_API_KEY", raising=False)
    args = _serve_args([str(tmp_path), "--host", "0.0.0.0", "--insecure-no-auth"])
    (warning,) = startup_warnings(args, settings_from_args(args))
    assert warning.startswith("NO AUTHENTICATION") and "0.0.0.0:8000" in warning
    args = _serve_args([str(tmp_path), "--host", "0.0.0.0", "--api-key", "k"])
    (warning,) = startup_warnings(args, settings_from_args(args))
    assert "`ps`" in warning and "--api-key-file" in warning
    (tmp_path / "key").write_text("k")
    args = _serve_args([str(tmp_path), "--host", "0.0.0.0", "--api-key-file", str(tmp_path / "key")])
    assert startup_warnings(args, settings_from_args(args)) == []


def test_unapplied_vllm_http_options_are_named():
    from server.engine import unapplied_vllm_options, vllm_serve_args
    from server.settings import ModelSettings

    options = {
        "api_key": "k",
        "sse-keep-alive-interval": 5,
        "allowed_origins": '["*"]',
        "max_model_len": 128,
        "chat_template": "{{ x }}",
        "enable_auto_tool_choice": True,
    }
    vllm_serve_args(ModelSettings("m", "/m"), {k: v for k, v in options.items() if k != "enable_auto_tool_choice"})
    warnings = unapplied_vllm_options(options)  # accepted by vLLM's parser (above), applied by nobody here
    assert [w.split("`")[1] for w in warnings] == ["api_key", "sse_keep_alive_interval", "allowed_origins"]
    assert "NOT applied (use --api-key-file)" in warnings[0]


def test_uvicorn_concurrency_limit(tmp_path):
    from server.cli import CONCURRENCY_HEADROOM, uvicorn_config

    pool = SimpleNamespace(
        engines={"a": SimpleNamespace(gate=AdmissionGate(2)), "b": SimpleNamespace(gate=AdmissionGate(12))}
    )
    settings = build_settings([str(tmp_path)])
    config = uvicorn_config(None, settings, pool)
    assert config.limit_concurrency == 14 + CONCURRENCY_HEADROOM
    assert config.timeout_keep_alive == 75 and config.http.__name__ == "MoemixHttpProtocol"
    settings.limit_concurrency = 50
    assert uvicorn_config(None, settings, pool).limit_concurrency == 50


# ------------------------------------------------------------------------------- the app over fake engines


def _routing_rank(tokens: int) -> list[dict]:
    return [{"layer": "model.layers.0.block_sparse_moe", "experts": [0, 1], "tokens": [tokens, 1], "bits": [2, 4]}]


class FakeClient:
    """What the server asks of an AsyncLLM; collective_rpc("moemix_routing") counts its calls."""

    errored = False
    model_config = SimpleNamespace(max_model_len=64)

    def __init__(self):
        self.rpc_calls = 0

    async def collective_rpc(self, method, timeout=None, kwargs=None):
        assert method == "moemix_routing"
        self.rpc_calls += 1
        return [_routing_rank(self.rpc_calls)]

    async def check_health(self):
        pass

    async def do_log_stats(self):
        pass

    def shutdown(self):
        pass


class FakeCompletions:
    """Streams two chunks; prompt "die" raises mid-stream (the engine died), "vllm-error" ends the way vLLM's own
    generator does when the engine dies (an error event, then [DONE])."""

    async def create_completion(self, request, raw_request):
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if request.prompt == "raise-generate-error":  # what a non-streaming request sees when add_request fails
            raise EngineGenerateError()
        if request.prompt == "raise-engine-dead":
            raise EngineDeadError()

        async def chunks():
            yield 'data: {"choices": [{"text": "a"}]}\n\n'
            if request.prompt == "die":
                raise EngineDeadError()
            if request.prompt == "vllm-error":
                yield f"data: {json.dumps(create_error_response(EngineDeadError()).model_dump())}\n\n"
            yield "data: [DONE]\n\n"

        return chunks()


class FakeChat:
    async def create_chat_completion(self, request, raw_request):
        from vllm.entrypoints.serve.tokenize.protocol import TokenizeResponse

        return TokenizeResponse(tokens=[len(request.messages)], count=1, max_model_len=64)  # any JSON will do


class FakeTokenization:
    async def create_tokenize(self, request, raw_request):
        from vllm.entrypoints.serve.tokenize.protocol import TokenizeResponse

        return TokenizeResponse(tokens=[1, 2], count=2, max_model_len=64)


@pytest.fixture
def fake_app(tmp_path):
    """(TestClient, ModelEngine): build_app over one fake moemix engine admitting 2 sequences."""
    from starlette.datastructures import State
    from starlette.testclient import TestClient

    from server.app import build_app
    from server.engine import EnginePool, ModelEngine
    from server.facts import WeightFacts
    from server.stats import Throughput
    from vllm_moemix.layers.introspect import EXTENSION

    settings = build_settings([str(tmp_path)], routing_refresh_s=3600, metrics_max_age_s=0)  # fresh each scrape
    state = State()
    state.openai_serving_completion, state.serving_tokenization = FakeCompletions(), FakeTokenization()
    state.openai_serving_chat = FakeChat()
    eng = ModelEngine(
        name="m",
        path=str(tmp_path),
        args=argparse.Namespace(worker_extension_cls=EXTENSION),
        client=FakeClient(),
        state=state,
        facts=WeightFacts(path=str(tmp_path)),
        gate=AdmissionGate(2),
        throughput=Throughput(),
        routing_refresh_s=3600,
    )
    with TestClient(build_app(EnginePool({"m": eng}), settings)) as client:
        yield client, eng


def test_request_larger_than_the_limit_is_400_not_admitted_alone(fake_app):
    client, eng = fake_app
    for body in ({"model": "m", "prompt": "x", "n": 3}, {"model": "m", "prompt": ["a", "b", "c"]}):
        r = client.post("/v1/completions", json={**body, "max_tokens": 2})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "BadRequestError" and err["code"] == 400
        assert "needs 3 slots" in err["message"] and "admits at most 2" in err["message"]
    assert eng.gate.in_flight == 0 and eng.gate.rejected == 0


def test_tokenize_is_admitted(fake_app):
    client, eng = fake_app
    assert client.post("/tokenize", json={"model": "m", "prompt": "x"}).json()["count"] == 2
    eng.gate.in_flight = eng.gate.limit  # busy
    r = client.post("/tokenize", json={"model": "m", "prompt": "x"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError" and r.headers["retry-after"]
    eng.gate.in_flight = 0


@pytest.mark.parametrize("prompt", ["die", "vllm-error"])
def test_engine_death_mid_stream_ends_with_an_error_event(fake_app, prompt):
    client, eng = fake_app
    with client.stream("POST", "/v1/completions", json={"model": "m", "prompt": prompt, "stream": True}) as r:
        assert r.status_code == 200
        events = r.read().decode().split("\n\n")
    assert events[0].startswith('data: {"choices"') and events[-2:] == ["data: [DONE]", ""]
    err = json.loads(events[-3].removeprefix("data: "))["error"]
    assert err["code"] == 500 and err["type"] == "InternalServerError" and err["message"]
    assert eng.gate.in_flight == 0 and eng.gate.incomplete == 1  # slot freed, counted as not finished
    with client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "ok", "stream": True}) as r:
        assert r.read().decode().endswith("data: [DONE]\n\n")
    assert eng.gate.in_flight == 0 and eng.gate.incomplete == 1  # a normal stream is not


@pytest.mark.parametrize(
    "prompt, status, err_type",
    [("raise-generate-error", 500, "InternalServerError"), ("raise-engine-dead", 503, "ServiceUnavailableError")],
)
def test_engine_errors_of_a_non_streaming_request_are_openai_errors(fake_app, prompt, status, err_type):
    """vLLM's own handler for these reads app.state.server (to stop the whole server) and crashed instead."""
    client, eng = fake_app
    r = client.post("/v1/completions", json={"model": "m", "prompt": prompt})
    assert r.status_code == status and r.json()["error"]["type"] == err_type and "state" not in r.text, r.text
    assert eng.gate.in_flight == 0
    assert client.get("/health").status_code == 200  # the server goes on


def test_integers_past_64_bits_are_400_before_the_engine():
    from vllm.exceptions import VLLMValidationError

    from server.protocol import CheckedChatCompletionRequest, CheckedCompletionRequest

    hi = [{"role": "user", "content": "hi"}]
    for model, body, param in [
        (CheckedCompletionRequest, {"prompt": "x", "top_k": 2**70}, "top_k"),
        (CheckedChatCompletionRequest, {"messages": hi, "stream_interval": -(2**64)}, "stream_interval"),
        (CheckedCompletionRequest, {"prompt": "x", "vllm_xargs": {"a": [1, 2**64]}}, "vllm_xargs.a[1]"),
    ]:
        with pytest.raises(VLLMValidationError) as e:
            model.model_validate(body)
        assert e.value.parameter == param
    assert CheckedCompletionRequest.model_validate({"prompt": "x", "seed": 2**63 - 1}).seed == 2**63 - 1
    deep = 2**70
    for _ in range(5000):  # nested deeper than the recursion limit: found, and its path quoted short
        deep = [deep]
    with pytest.raises(VLLMValidationError) as e:
        CheckedCompletionRequest.model_validate({"prompt": "x", "vllm_xargs": {"a": deep}})
    assert e.value.parameter.startswith("vllm_xargs.a[0][0]") and e.value.parameter.endswith("...[truncated]")


def test_chunked_body_over_the_limit_is_413(fake_app):
    client, _ = fake_app
    limit = client.app.state.settings.max_body_bytes

    def body():
        yield b'{"model": "m", "prompt": "'
        yield b"x" * limit
        yield b'"}'

    r = client.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == 413 and "over" in r.json()["error"]["message"]


def test_metrics_scrapes_never_reach_the_workers(fake_app):
    client, eng = fake_app
    for _ in range(3):
        assert client.get("/metrics").status_code == 200
    assert eng.client.rpc_calls <= 1  # at most the background refresher's first gathering
    routing = client.get("/v1/moemix/routing").json()["m"]
    assert eng.client.rpc_calls == 1  # the endpoint respects routing_refresh_s (3600 s) too
    assert routing["experts"]["model.layers.0.block_sparse_moe.0"]["tokens"] == 1
    assert 'moemix_expert_routed_tokens_total{bits="2",layer="0",model="m"} 1.0' in client.get("/metrics").text


def test_metrics_flood_renders_once_per_interval():
    """Scrapes within metrics_max_age_s share one rendering (concurrent ones too) and get the same body; the next
    scrape after the interval renders anew."""
    import prometheus_client

    from server.routes.metrics import CachedExposition

    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("flood_probe", "a value that changes", registry=registry)
    exposition = CachedExposition(registry, max_age_s=0.3)

    async def scenario():
        bodies = await asyncio.gather(*(exposition.body() for _ in range(50)))
        assert exposition.renders == 1 and len(set(bodies)) == 1
        counter.inc()
        assert await exposition.body() == bodies[0] and exposition.renders == 1  # still within the interval
        await asyncio.sleep(0.35)
        assert b"flood_probe_total 1.0" in await exposition.body() and exposition.renders == 2

    asyncio.run(scenario())


def test_metrics_scrapes_are_paced():
    """At most per_s callers a second get through; the others wait, in arrival order."""
    from server.routes.metrics import Pacer

    pacer = Pacer(per_s=50)

    async def scenario():
        t0 = time.monotonic()
        done = []

        async def scrape(i):
            await pacer.turn()
            done.append(i)

        await asyncio.gather(*(scrape(i) for i in range(11)))
        return time.monotonic() - t0, done

    took, order = asyncio.run(scenario())
    assert order == list(range(11)) and 0.19 <= took < 0.5, took  # 10 intervals of 20 ms after the first
    assert Pacer(per_s=0).interval == 0  # no bound


def test_metrics_are_served_before_routing_and_auth(tmp_path):
    """GET /metrics is answered by the outermost ASGI layer: no key needed even with one set, the Prometheus
    content type, HEAD without a body; other methods go on to the app."""
    from starlette.testclient import TestClient

    from server.app import build_app
    from server.engine import EnginePool

    settings = build_settings([str(tmp_path)], api_key="k")
    with TestClient(build_app(EnginePool({}), settings, shutdown_engines=False)) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
        assert b"# TYPE" in r.content
        head = client.head("/metrics")
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        assert client.post("/metrics").status_code == 404  # not the metrics endpoint: on to the app


def test_routing_refresh_respects_the_interval():
    from server.engine import ModelEngine
    from server.facts import WeightFacts
    from server.stats import Throughput
    from vllm_moemix.layers.introspect import EXTENSION

    eng = ModelEngine(
        name="m",
        path="/m",
        args=argparse.Namespace(worker_extension_cls=EXTENSION),
        client=FakeClient(),
        state=None,
        facts=WeightFacts(path="/m"),
        gate=AdmissionGate(1),
        throughput=Throughput(),
        routing_refresh_s=0.2,
    )

    async def scenario():
        first = await asyncio.gather(*(eng.refresh_routing() for _ in range(5)))  # concurrent: one gathering
        assert eng.client.rpc_calls == 1 and all(r is first[0] for r in first)
        await eng.refresh_routing()
        assert eng.client.rpc_calls == 1
        await asyncio.sleep(0.25)
        await eng.refresh_routing()
        assert eng.client.rpc_calls == 2

    asyncio.run(scenario())


def test_unknown_model_name_is_not_echoed_whole(fake_app):
    """A megabyte model name gets its 404 with the name cut short: an error is never as big as the request."""
    client, _ = fake_app
    r = client.post("/v1/completions", json={"model": "m" * 2**20, "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    assert len(r.content) < 1024 and "...[truncated]" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"})
    assert "`gpt-5` does not exist" in r.json()["error"]["message"]


# --------------------------------------------------------------------- overload and faults (no engine)


def _serve_in_thread(app, protocol, keep_alive_s: float, loop: str = "auto"):
    """uvicorn (httptools) on a free loopback port in a thread; returns (server, thread, port)."""
    import threading

    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=protocol, timeout_keep_alive=keep_alive_s, loop=loop, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    return srv, thread, port


async def _stalling_app(scope, receive, send):
    """Answers `ok`; `?stall` also stalls the loop twice from timer callbacks, 0.9 s and 0.95 s later (0.3 s and
    0.6 s: a loaded server's loop busy with other work, or a garbage-collection pause)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    if scope["query_string"] == b"stall":
        loop = asyncio.get_running_loop()
        loop.call_later(0.9, time.sleep, 0.3)
        loop.call_later(0.95, time.sleep, 0.6)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("ours", [True, False], ids=["ours", "uvicorn-stock"])
def test_keep_alive_timer_never_drops_a_request_that_arrived(ours, loop):
    """The root cause of requests that got no status under overload. Keep-alive 1 s; the loop stalls from 0.9 s
    to 1.8 s, so the idle timer cannot close the connection on time and the client, 1.4 s after its last
    response, still sees it open and sends its next request. The loop reaches the timer (due since 1.0 s) after
    the second stall but before it reads the socket: stock uvicorn then closes the connection with the request
    unanswered (connection reset: the client cannot know whether it ran). Ours sees the unread bytes and
    answers."""
    import http.client

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from server.connection import http_protocol

    srv, thread, port = _serve_in_thread(
        _stalling_app, http_protocol() if ours else HttpToolsProtocol, keep_alive_s=1.0, loop=loop
    )
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/?stall")
        assert conn.getresponse().read() == b"ok"  # the server arms its 1 s keep-alive timer for this connection
        time.sleep(1.4)
        conn.request("GET", "/")
        try:
            answer = conn.getresponse().read()
        except (ConnectionError, http.client.HTTPException) as e:
            answer = repr(e)
        assert (answer == b"ok") == ours, answer
    finally:
        srv.should_exit = True
        thread.join(10)


def test_probes_bypass_the_concurrency_limit():
    """Past limit_concurrency uvicorn answers 503 without reading the request; /health and /ready go through."""
    import http.client

    from server.connection import http_protocol

    srv, thread, port = _serve_in_thread(_stalling_app, http_protocol(), 5)
    srv.config.limit_concurrency = 1
    try:
        held = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        held.connect()  # one open connection: the limit is reached
        time.sleep(0.2)
        for path, status in (("/", 503), ("/health", 200), ("/ready?x=1", 200)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path)
            assert conn.getresponse().status == status, path
            conn.close()
    finally:
        srv.should_exit = True
        thread.join(10)


def test_engine_flags_and_yaml(tmp_path):
    from server.cli import settings_from_args

    args = _serve_args([str(tmp_path), "--on-engine-death", "stay", "--keep-alive", "30", "--auth-metrics"])
    with pytest.raises(SettingsError, match="no key is configured"):
        settings_from_args(args)
    s = settings_from_args(_serve_args([str(tmp_path), "--on-engine-death", "stay", "--keep-alive", "30"]))
    assert (s.on_engine_death, s.keep_alive_s, s.auth_metrics) == ("stay", 30, False)
    d = build_settings([str(tmp_path)])
    assert (d.on_engine_death, d.keep_alive_s, d.auth_metrics) == ("exit", 75.0, False)  # the defaults
    cfg = tmp_path / "s.yaml"
    cfg.write_text("on_engine_death: stay\nkeep_alive_s: 20\nauth_metrics: true\napi_key: k\n")
    s = build_settings([str(tmp_path)], str(cfg))
    assert (s.on_engine_death, s.keep_alive_s, s.auth_metrics) == ("stay", 20, True)


def test_health_and_ready_probes(fake_app):
    """/health: alive or not; /ready: alive and a free slot. Answered from memory, open, GET and HEAD."""
    client, eng = fake_app
    assert client.get("/health").json() == {"status": "ok", "models": {"m": "ok"}}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["models"]["m"] == {"status": "ok", "in_flight": 0, "limit": 2}
    assert client.head("/ready").status_code == 200 and client.head("/ready").content == b""
    eng.gate.in_flight = 2  # full: new requests would get 429
    try:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert (
            r.status_code == 503 and r.json()["status"] == "not ready" and r.json()["models"]["m"]["status"] == "full"
        )
    finally:
        eng.gate.in_flight = 0
    eng.client.errored = True
    try:
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "unhealthy", "models": {"m": "dead"}}
        assert client.get("/ready").json()["models"]["m"]["status"] == "dead"
    finally:
        eng.client.errored = False


@pytest.mark.parametrize("auth_metrics", [False, True])
def test_auth_metrics_puts_metrics_version_and_docs_behind_the_key(tmp_path, auth_metrics):
    from starlette.testclient import TestClient

    from server.app import build_app
    from server.engine import EnginePool

    settings = build_settings([str(tmp_path)], api_key="k", auth_metrics=auth_metrics)
    key = {"Authorization": "Bearer k"}
    with TestClient(build_app(EnginePool({}), settings, shutdown_engines=False)) as client:
        for path in ("/metrics", "/version", "/openapi.json", "/docs", "/redoc"):
            r = client.get(path)
            assert r.status_code == (401 if auth_metrics else 200), (path, r.status_code)
            if auth_metrics:
                assert r.json()["error"]["type"] == "AuthenticationError"
                assert client.get(path, headers=key).status_code == 200, path
        for path in ("/health", "/ready"):  # probes stay open
            assert client.get(path).status_code == 200
        assert client.get("/v1/models").status_code == 401


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": "10"}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"stream": "true"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"n": "2"}, "n"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids[1]"),
        ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
        ({"logit_bias": {"5": 1e308}}, "logit_bias"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias"),
        ({"best_of": 1e9}, "best_of"),
        ({"best_of": 3}, "best_of"),
        ({"best_of": "1"}, "best_of"),
    ],
)
def test_strict_completion_requests(fake_app, body, param):
    """What pydantic's lax mode would coerce (strings as numbers, numbers as booleans) and what vLLM would clamp
    or ignore (logit_bias magnitudes, best_of) is a 400 naming the field, before the engine."""
    client, eng = fake_app
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["param"] == param, err
    assert eng.gate.in_flight == 0


def test_non_finite_numbers_are_400(fake_app):
    client, _ = fake_app
    for raw in (
        b'{"model": "m", "prompt": "x", "temperature": NaN}',
        b'{"model": "m", "prompt": "x", "top_p": -Infinity}',
    ):
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "non-finite" in r.json()["error"]["message"], r.text


def test_well_typed_requests_still_pass(fake_app):
    """The shapes OpenAI clients send: ints where floats go, null, best_of equal to n, biases within +-100."""
    client, _ = fake_app
    body = {
        "model": "m",
        "prompt": "x",
        "max_tokens": 4,
        "temperature": 1,
        "top_p": 0.9,
        "stream": False,
        "seed": None,
        "n": 1,
        "best_of": 1,
        "logit_bias": {"5": -100, "6": 100.0},
        "stop_token_ids": [1, 2],
        "stream_options": None,
        "some_vendor_extra": "ignored, as vLLM does",
    }
    assert client.post("/v1/completions", json=body).status_code == 200


def test_chat_roles_are_openais_or_the_templates():
    from vllm.exceptions import VLLMValidationError

    from server.protocol import OPENAI_ROLES, check_roles, roles_of_template

    llama31 = "{% if message['role'] == 'ipython' %}<|start_header_id|>ipython{% endif %}"
    assert roles_of_template(None) == OPENAI_ROLES and "ipython" in roles_of_template(llama31)
    check_roles([{"role": "developer", "content": "x"}, {"role": "tool", "content": "y"}], OPENAI_ROLES)
    with pytest.raises(VLLMValidationError) as e:
        check_roles([{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}], OPENAI_ROLES)
    assert e.value.parameter == "messages[1].role" and "'wizard'" in str(e.value)


def test_unknown_chat_role_is_400(fake_app):
    client, _ = fake_app
    ok = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "developer", "content": "x"}]})
    assert ok.status_code == 200, ok.text
    r = client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role", r.text
    assert r.json()["error"]["type"] == "BadRequestError"


@pytest.mark.parametrize("policy", ["exit", "stay"])
def test_engine_death_is_logged_once_and_exits_by_default(tmp_path, policy, caplog):
    """The watcher notices a dead engine within ENGINE_WATCH_S, logs one ERROR line naming the model and what
    happens next, and with `exit` asks the HTTP server to stop (drain) with exit status 3."""
    import logging

    from starlette.datastructures import State
    from starlette.testclient import TestClient

    from server.app import ENGINE_DEATH_EXIT_CODE, ENGINE_WATCH_S, build_app
    from server.engine import EnginePool, ModelEngine
    from server.facts import WeightFacts
    from server.stats import Throughput

    def engine(name):
        return ModelEngine(
            name=name,
            path=str(tmp_path),
            args=argparse.Namespace(worker_extension_cls=None),
            client=FakeClient(),
            state=State(),
            facts=WeightFacts(path=str(tmp_path)),
            gate=AdmissionGate(2),
            throughput=Throughput(),
        )

    pool = EnginePool({"a": engine("a"), "b": engine("b")})
    settings = build_settings([str(tmp_path)], on_engine_death=policy, drain_timeout_s=7)
    app = build_app(pool, settings, shutdown_engines=False)
    stops = []
    app.state.request_shutdown = lambda: stops.append(time.monotonic())
    with caplog.at_level(logging.ERROR, logger="moemix.server"), TestClient(app) as client:
        time.sleep(2 * ENGINE_WATCH_S)
        assert not stops and app.state.exit_code == 0
        pool.engines["a"].client.errored = True
        time.sleep(3 * ENGINE_WATCH_S)
        assert client.get("/health").status_code == 503
    lines = [r.getMessage() for r in caplog.records if "ENGINE DEAD" in r.getMessage()]
    assert len(lines) == 1 and "model a:" in lines[0], lines
    if policy == "exit":
        assert len(stops) == 1 and app.state.exit_code == ENGINE_DEATH_EXIT_CODE
        assert "exiting with status 3 once the in-flight requests of b have finished (at most 7 s" in lines[0]
    else:
        assert not stops and app.state.exit_code == 0 and "staying up, answering 503" in lines[0]


def test_relay_batches_keeps_alive_and_stops_the_generator():
    """The SSE relay: a silent generator gets `: keep-alive`; events that arrive while the response is busy leave
    in one piece; an error event or a raising generator fails the request (slot released, incomplete); closing
    the response (client gone) closes vLLM's generator, which aborts the request in the engine."""
    from server.routes.common import _relay

    class Slot:
        def __init__(self):
            self.completed = None

        def release(self, completed=True):
            self.completed = completed

    def raw_request():
        slot = Slot()
        scope = {"moemix.admission_slots": [slot]}
        return SimpleNamespace(scope=scope, url=SimpleNamespace(path="/v1/completions")), slot

    closed = []

    async def vllm_stream(gaps, fail=None):
        try:
            for i, gap in enumerate(gaps):
                await asyncio.sleep(gap)
                yield f"data: {i}\n\n"
            if fail == "event":
                yield 'data: {"error": {"code": 500}}\n\n'
            if fail == "raise":
                raise RuntimeError("engine died")
            yield "data: [DONE]\n\n"
        finally:
            closed.append(True)

    async def scenario():
        req, slot = raw_request()
        out = [c async for c in _relay(vllm_stream([0.0, 0.25]), req, keep_alive_s=0.1)]
        assert out[0] == "data: 0\n\n" and ": keep-alive\n\n" in out and out[-1].endswith("data: [DONE]\n\n")
        assert slot.completed is None  # a clean stream: the middleware releases it, completed

        req, _ = raw_request()
        relay, got = _relay(vllm_stream([0.0] * 5), req, keep_alive_s=0), []
        async for chunk in relay:
            got.append(chunk)
            await asyncio.sleep(0.05)  # a slow response: the pump runs ahead
        assert len(got) < 6 and "".join(got) == "".join(f"data: {i}\n\n" for i in range(5)) + "data: [DONE]\n\n"

        for fail in ("event", "raise"):
            req, slot = raw_request()
            out = "".join([c async for c in _relay(vllm_stream([0.0], fail=fail), req, keep_alive_s=0)])
            assert slot.completed is False and '"error"' in out and out.endswith("data: [DONE]\n\n"), out

        closed.clear()
        req, _ = raw_request()
        relay = _relay(vllm_stream([0.0, 10.0]), req, keep_alive_s=0)
        assert await relay.__anext__() == "data: 0\n\n"
        await relay.aclose()  # the client went away
        assert closed == [True]

    asyncio.run(scenario())


def test_a_full_model_sheds_before_parsing(fake_app):
    """While a model is full its requests get the route's own 429 (Retry-After, counted as rejected) from the body's
    `model` alone, before vLLM's request model validates them: a body the route would refuse with 400 gets 429.
    Other models, unreadable bodies and free models go on to the route unchanged."""
    client, eng = fake_app
    invalid = {"model": "m", "prompt": "x", "max_tokens": "10"}
    assert client.post("/v1/completions", json=invalid).status_code == 400  # free: the route validates
    eng.gate.in_flight = eng.gate.limit
    rejected = eng.gate.rejected
    try:
        for path, body in (("/v1/completions", invalid), ("/tokenize", {"prompt": "x"})):
            r = client.post(path, json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "RateLimitError" and "at its limit of 2" in r.json()["error"]["message"]
        assert eng.gate.rejected == rejected + 2
        assert client.post("/v1/completions", json={"model": "other", "prompt": "x"}).status_code == 404
        bad = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400
    finally:
        eng.gate.in_flight = 0


def test_shedding_leaves_a_free_model_untouched():
    """Nothing is full: the middleware does not even read the body (the app gets the server's own receive)."""
    from server.middleware.shed import ShedMiddleware

    gate = AdmissionGate(1)
    pool = SimpleNamespace(engines={"m": SimpleNamespace(gate=gate)})
    seen = []

    async def app(scope, receive, send):
        seen.append(receive)

    async def receive():
        return {"type": "http.request", "body": b'{"model": "m"}', "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(ShedMiddleware(app, pool, 1)(scope, receive, None))
    assert seen == [receive]
