"""Writes deploy/grafana/dashboards/moemix.json (Grafana 11 dashboard JSON, schemaVersion 39).

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the committed JSON differs (tests run this)

The dashboard is generated so that its queries live in one readable place. Label conventions of the server:
vLLM's metrics carry `model_name`, the server's own `moemix_` metrics carry `model`; `$model` filters both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "moemix.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
VM = 'model_name=~"$model"'  # vLLM metrics
MM = 'model=~"$model"'  # moemix_ metrics
RATE = "$__rate_interval"


class Layout:
    def __init__(self):
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def newline(self):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0

    def id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


L = Layout()


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, "range": not instant}
    if instant:
        t["instant"] = True
    return t


def refs(targets: list[tuple[str, str]], instant: bool = False) -> list[dict]:
    return [target(e, leg, chr(ord("A") + i), instant) for i, (e, leg) in enumerate(targets)]


def row(title: str) -> dict:
    L.newline()
    panel = {
        "type": "row",
        "title": title,
        "id": L.id(),
        "collapsed": False,
        "panels": [],
        "gridPos": {"x": 0, "y": L.y, "w": 24, "h": 1},
    }
    L.y += 1
    return panel


def timeseries(
    title: str,
    targets: list[tuple[str, str]],
    unit: str,
    w: int = 12,
    h: int = 8,
    description: str = "",
    stack: bool = False,
    min0: bool = True,
) -> dict:
    custom = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10 if not stack else 40,
        "showPoints": "never",
        "spanNulls": False,
    }
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults = {"unit": unit, "custom": custom}
    if min0:
        defaults["min"] = 0
    return {
        "type": "timeseries",
        "title": title,
        "id": L.id(),
        "description": description,
        "datasource": DS,
        "gridPos": L.place(w, h),
        "targets": refs(targets),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    expr: str,
    legend: str,
    unit: str,
    w: int = 4,
    h: int = 4,
    description: str = "",
    mappings: list | None = None,
    thresholds: list | None = None,
) -> dict:
    defaults: dict = {"unit": unit, "mappings": mappings or []}
    if thresholds:
        defaults["thresholds"] = {"mode": "absolute", "steps": thresholds}
        defaults["color"] = {"mode": "thresholds"}
    return {
        "type": "stat",
        "title": title,
        "id": L.id(),
        "description": description,
        "datasource": DS,
        "gridPos": L.place(w, h),
        "targets": refs([(expr, legend)], instant=True),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": "value_and_name",
            "orientation": "auto",
        },
    }


def bargauge(
    title: str, targets: list[tuple[str, str]], unit: str, w: int = 8, h: int = 8, description: str = ""
) -> dict:
    return {
        "type": "bargauge",
        "title": title,
        "id": L.id(),
        "description": description,
        "datasource": DS,
        "gridPos": L.place(w, h),
        "targets": refs(targets, instant=True),
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
        },
    }


def piechart(
    title: str, targets: list[tuple[str, str]], unit: str, w: int = 8, h: int = 8, description: str = ""
) -> dict:
    return {
        "type": "piechart",
        "title": title,
        "id": L.id(),
        "description": description,
        "datasource": DS,
        "gridPos": L.place(w, h),
        "targets": refs(targets, instant=True),
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "pieType": "donut",
            "legend": {"displayMode": "table", "placement": "right", "values": ["value", "percent"]},
        },
    }


def quantiles(metric: str, qs=(0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, model_name) (rate({metric}_bucket{{{VM}}}[{RATE}])))",
            f"{{{{model_name}}}} p{int(q * 100)}",
        )
        for q in qs
    ]


def build() -> dict:
    panels = []
    panels.append(row("Overview"))
    panels += [
        stat(
            "Engine",
            f"min by (model) (moemix_engine_healthy{{{MM}}})",
            "{{model}}",
            "none",
            description="1 = the model's engine is alive (GET /health 200); 0 = dead (503 for that model).",
            mappings=[
                {
                    "type": "value",
                    "options": {"0": {"text": "DEAD", "color": "red"}, "1": {"text": "UP", "color": "green"}},
                }
            ],
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
        ),
        stat(
            "Average bits (incl. scales)",
            f"moemix_weight_average_bits{{{MM}}}",
            "{{model}}",
            "none",
            description="Average bits per weight of the quantizable linears (attention, experts, shared "
            "experts), scales and zero points included; 16 for a bf16 checkpoint.",
        ),
        stat(
            "Weights at rest",
            f"sum by (model) (moemix_weight_bytes{{{MM}}})",
            "{{model}}",
            "bytes",
            description="Checkpoint bytes of every tensor (moemix_weight_bytes summed over component and width).",
        ),
        stat("Running", f"sum by (model_name) (vllm:num_requests_running{{{VM}}})", "{{model_name}}", "none"),
        stat(
            "Waiting",
            f"sum by (model_name) (vllm:num_requests_waiting{{{VM}}})",
            "{{model_name}}",
            "none",
            thresholds=[
                {"color": "green", "value": None},
                {"color": "orange", "value": 5},
                {"color": "red", "value": 20},
            ],
        ),
        stat(
            "KV cache",
            f"max by (model_name) (vllm:kv_cache_usage_perc{{{VM}}})",
            "{{model_name}}",
            "percentunit",
            thresholds=[
                {"color": "green", "value": None},
                {"color": "orange", "value": 0.8},
                {"color": "red", "value": 0.95},
            ],
        ),
    ]

    panels.append(row("Throughput"))
    panels += [
        timeseries(
            "Tokens/s",
            [
                (
                    f"sum by (model_name) (rate(vllm:generation_tokens_total{{{VM}}}[{RATE}]))",
                    "{{model_name}} generated",
                ),
                (f"sum by (model_name) (rate(vllm:prompt_tokens_total{{{VM}}}[{RATE}]))", "{{model_name}} prompt"),
                (f"moemix_generation_tokens_per_second{{{MM}}}", "{{model}} generated (server, 10 s window)"),
            ],
            "short",
            description="Generated (decode) and prompt (prefill) tokens per second.",
        ),
        timeseries(
            "Finished requests/s",
            [
                (
                    f"sum by (model_name, finished_reason) (rate(vllm:request_success_total{{{VM}}}[{RATE}]))",
                    "{{model_name}} {{finished_reason}}",
                ),
            ],
            "reqps",
            stack=True,
            description="By finish reason: stop, length, abort, error.",
        ),
    ]

    panels.append(row("Latency"))
    panels += [
        timeseries(
            "Time to first token (p50 / p95 / p99)",
            quantiles("vllm:time_to_first_token_seconds"),
            "s",
            w=8,
            description="histogram_quantile over vllm:time_to_first_token_seconds_bucket.",
        ),
        timeseries(
            "Inter-token latency (p50 / p95 / p99)",
            quantiles("vllm:inter_token_latency_seconds"),
            "s",
            w=8,
            description="histogram_quantile over vllm:inter_token_latency_seconds_bucket.",
        ),
        timeseries(
            "End-to-end request latency (p50 / p95 / p99)", quantiles("vllm:e2e_request_latency_seconds"), "s", w=8
        ),
        timeseries(
            "Queue time (p50 / p95 / p99)",
            quantiles("vllm:request_queue_time_seconds"),
            "s",
            w=12,
            description="Time requests spend waiting before the engine schedules them.",
        ),
        timeseries(
            "Time per output token (p50 / p95 / p99)",
            quantiles("vllm:request_time_per_output_token_seconds"),
            "s",
            w=12,
        ),
    ]

    panels.append(row("Scheduler, admission and KV cache"))
    panels += [
        timeseries(
            "Requests running / waiting",
            [
                (f"sum by (model_name) (vllm:num_requests_running{{{VM}}})", "{{model_name}} running"),
                (f"sum by (model_name) (vllm:num_requests_waiting{{{VM}}})", "{{model_name}} waiting"),
                (f"moemix_requests_in_flight{{{MM}}}", "{{model}} admitted (server)"),
                (f"moemix_requests_in_flight_limit{{{MM}}}", "{{model}} admission limit"),
            ],
            "short",
            w=8,
        ),
        timeseries(
            "KV cache usage",
            [
                (f"max by (model_name) (vllm:kv_cache_usage_perc{{{VM}}})", "{{model_name}}"),
            ],
            "percentunit",
            w=8,
        ),
        timeseries(
            "Rejected, cut off and preempted",
            [
                (f"sum by (model) (rate(moemix_requests_rejected_total{{{MM}}}[{RATE}]))", "{{model}} 429 rejected"),
                (
                    f"sum by (model) (rate(moemix_requests_incomplete_total{{{MM}}}[{RATE}]))",
                    "{{model}} client went away",
                ),
                (f"sum by (model_name) (rate(vllm:num_preemptions_total{{{VM}}}[{RATE}]))", "{{model_name}} preempted"),
            ],
            "reqps",
            w=8,
        ),
    ]

    panels.append(row("Memory and weights by bit width"))
    panels += [
        timeseries(
            "Memory",
            [
                (f"moemix_engine_resident_memory_bytes{{{MM}}}", "{{model}} engine RSS (weights, KV cache on CPU)"),
                ("moemix_server_resident_memory_bytes", "API server RSS {{instance}}"),
                ("moemix_gpu_memory_used_bytes", "GPU {{device}} used"),
                ("moemix_gpu_memory_total_bytes", "GPU {{device}} total"),
            ],
            "bytes",
            w=12,
            description="Resident memory of the engine processes and the API server; device "
            "memory per GPU (cudaMemGetInfo, all processes; only on CUDA hosts).",
        ),
        bargauge(
            "Weight bytes by bit width",
            [
                (f"sum by (model, bits) (moemix_weight_bytes{{{MM}}})", "{{model}} {{bits}}"),
            ],
            "bytes",
            w=12,
            description="Checkpoint bytes at rest per width (2/3/4/8 bits or the float dtype), all components.",
        ),
        bargauge(
            "Weight bytes by component and width",
            [
                (f"moemix_weight_bytes{{{MM}}}", "{{model}} {{component}} {{bits}}"),
            ],
            "bytes",
            w=12,
            h=10,
        ),
        piechart(
            "Quantized linears by width",
            [
                (f"moemix_quantized_linear_bytes{{{MM}}}", "{{model}} {{bits}}-bit"),
            ],
            "bytes",
            w=12,
            h=10,
            description="moemix checkpoint summary: bytes of the quantized linears "
            "(scales and zero points included) per bit width.",
        ),
    ]

    panels.append(row("Expert routing by bit width"))
    panels += [
        timeseries(
            "Routed tokens/s by expert bit width",
            [
                (
                    f"sum by (model, bits) (rate(moemix_expert_routed_tokens_total{{{MM}}}[{RATE}]))",
                    "{{model}} {{bits}}-bit experts",
                ),
            ],
            "short",
            stack=True,
            w=12,
            description="Tokens the router sends to experts of each width (counted in the "
            "moemix MoE kernel); per expert: GET /v1/moemix/routing.",
        ),
        timeseries(
            "Routed tokens/s by layer",
            [
                (
                    f"sum by (model, layer) (rate(moemix_expert_routed_tokens_total{{{MM}}}[{RATE}]))",
                    "{{model}} layer {{layer}}",
                ),
            ],
            "short",
            w=12,
            description="Every MoE layer routes top-k experts per token, so layers should agree.",
        ),
    ]

    return {
        "title": "moemix: mixed-bit MoE serving",
        "uid": "moemix-serving",
        "description": "vLLM serving metrics and moemix weight/memory metrics of `moemix serve` (deploy/).",
        "tags": ["moemix", "vllm", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "options": [],
                    "regex": "",
                },
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(vllm:num_requests_running, model_name)", "refId": "model"},
                    "definition": "label_values(vllm:num_requests_running, model_name)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "options": [],
                    "sort": 1,
                    "hide": 0,
                    "regex": "",
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    global L
    L = Layout()
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python deploy/grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
