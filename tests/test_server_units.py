"""Server pieces that need no engine: settings, checkpoint facts, admission, auth/body-limit middleware."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.admission import AdmissionGate, request_slots
from server.facts import component_of, read_weight_facts
from server.settings import SettingsError, build_settings, parse_model_arg, to_vllm_argv


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
    cfg.write_text("port: 9000\nmax_queue: 3\napi_key_env: TEST_KEY\nvllm_args: {max_model_len: 128}\n"
                   "models:\n  - {name: a, path: a, max_queue: 0, vllm_args: {max_num_seqs: 2}}\n"
                   f"  - {tmp_path / 'b'}\n")
    monkeypatch.setenv("TEST_KEY", "s3cret")
    s = build_settings([f"c={tmp_path / 'c'}"], str(cfg), port=9100, override_vllm_args={"enforce_eager": True})
    assert [m.name for m in s.models] == ["a", str(tmp_path / "b"), "c"]
    assert s.models[0].path == str(tmp_path / "a")  # relative to the YAML file
    assert s.port == 9100 and s.api_key == "s3cret"  # flag wins over YAML; key from the env var
    assert [s.max_queue_for(m) for m in s.models] == [0, 3, 3]
    assert s.vllm_args_for(s.models[0]) == {"max_model_len": 128, "max_num_seqs": 2, "enforce_eager": True}


@pytest.mark.parametrize("text, message", [
    ("models: [{path: a/b}, {path: a/b}]", "unique"),
    ("modles: [a/b]", "unknown keys"),
    ("models: [{name: x}]", "path"),
    ("models: [a/b]\nmax_queue: -1", "non-negative"),
    ("models: [{path: a/b, vllm_args: [1]}]", "mapping"),
    ("[1, 2]", "mapping"),
])
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
    argv = to_vllm_argv({"max_model_len": 256, "enforce_eager": True, "enable_prefix_caching": False,
                         "compilation_config": {"mode": 0}, "seed": None})
    assert argv == ["--max-model-len", "256", "--enforce-eager", "--no-enable-prefix-caching",
                    "--compilation-config", '{"mode": 0}']


def test_vllm_args_go_through_vllms_parser():
    from server.engine import vllm_serve_args
    from server.settings import ModelSettings

    args = vllm_serve_args(ModelSettings("m", "/m"), {"max_model_len": 128, "enforce_eager": True})
    assert (args.model, args.served_model_name, args.max_model_len, args.enforce_eager) == ("/m", ["m"], 128, True)
    with pytest.raises(SettingsError, match="bad vllm_args"):
        vllm_serve_args(ModelSettings("m", "/m"), {"no_such_option": 1})


@pytest.mark.parametrize("name, component", [
    ("model.layers.0.block_sparse_moe.experts.3.w1.qweight", "experts"),
    ("model.layers.0.mlp.experts.gate_up_proj", "experts"),
    ("model.layers.0.block_sparse_moe.gate.weight", "other"),
    ("model.layers.0.mlp.shared_expert.down_proj.scales", "shared"),
    ("model.layers.0.mlp.shared_expert_gate.weight", "other"),
    ("model.layers.0.self_attn.q_proj.qzeros", "attention"),
    ("model.layers.0.self_attn.q_norm.weight", "other"),
    ("model.embed_tokens.weight", "other"),
    ("lm_head.weight", "other"),
])
def test_components(name, component):
    assert component_of(name) == component


def test_facts_of_a_moemix_checkpoint(random_mixtral, tmp_path):
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.plan import Plan

    plan = Plan.from_dict({"default": {"bits": 4, "group_size": 64},
                           "modules": {"model.layers.*.block_sparse_moe.experts.[01]": 2,
                                       "model.layers.*.self_attn": 8}})
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


def test_admission_gate():
    gate = AdmissionGate(limit=3)
    a, b = gate.try_acquire(2), gate.try_acquire(1)
    assert a and b and gate.in_flight == 3
    assert gate.try_acquire(1) is None and gate.rejected == 1
    a.release()
    a.release()  # idempotent
    assert gate.in_flight == 1
    b.release()
    assert gate.try_acquire(10) is not None  # larger than the limit: admitted alone rather than never


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


def test_body_limit_middleware():
    from server.middleware.body_limit import BodyLimitMiddleware

    app = BodyLimitMiddleware(_ok_app, 10)
    status, _, body = _call(app, "/v1/completions", [(b"content-length", b"11")], b"x" * 11)
    assert status == 413 and body["error"]["code"] == 413
    assert _call(app, "/v1/completions", [(b"content-length", b"10")], b"x" * 10)[0] == 200
