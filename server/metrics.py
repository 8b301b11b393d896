"""The `moemix_` metrics (bytes, seconds, per bit width, never per expert), collected at scrape time from the
engine pool's in-memory state (weight facts, admission gates, throughput, the routing counts the background
refresher gathered): a scrape never calls into an engine. Registered with vLLM's `vllm:` metrics
(server/stats.py) in vLLM's one registry.
"""

from __future__ import annotations

import os

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from vllm.v1.metrics.prometheus import get_prometheus_registry

from server.engine import EnginePool
from server.stats import VllmMetricsCollector
from vllm_moemix.config.routing_profile import by_layer_and_bits

# ------------------------------------------------------------------------------------------ moemix metrics


def _rss_tree(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class MoemixCollector(Collector):
    """`moemix_` metrics, computed at scrape time from the engine pool (no background thread)."""

    def __init__(self, pool: EnginePool):
        self.pool = pool

    def describe(self):
        return []

    def collect(self):
        engines = list(self.pool.engines.values())
        weight = GaugeMetricFamily(
            "moemix_weight_bytes",
            "Checkpoint weight bytes at rest, by component "
            "(experts, attention, shared, other) and bit width (2/3/4/8 or the float dtype).",
            labels=["model", "component", "bits"],
        )
        avg = GaugeMetricFamily(
            "moemix_weight_average_bits",
            "Average bits per weight of the quantizable linears "
            "(attention, experts, shared experts), including scales and zero points.",
            labels=["model"],
        )
        avg_payload = GaugeMetricFamily(
            "moemix_weight_average_payload_bits",
            "Average integer width of the quantizable linears (scales and zero points excluded).",
            labels=["model"],
        )
        by_width = GaugeMetricFamily(
            "moemix_quantized_linear_bytes",
            "Bytes of the quantizable linears by bit width, from the moemix checkpoint summary.",
            labels=["model", "bits"],
        )
        engine_rss = GaugeMetricFamily(
            "moemix_engine_resident_memory_bytes",
            "Resident memory of the model's engine-core process and its workers.",
            labels=["model"],
        )
        healthy = GaugeMetricFamily("moemix_engine_healthy", "1 if the model's engine is alive.", labels=["model"])
        tps = GaugeMetricFamily(
            "moemix_generation_tokens_per_second",
            "Generated tokens per second over the last 10 seconds.",
            labels=["model"],
        )
        in_flight = GaugeMetricFamily(
            "moemix_requests_in_flight",
            "Requests admitted and not finished (sequences; a /tokenize request counts one).",
            labels=["model"],
        )
        limit = GaugeMetricFamily(
            "moemix_requests_in_flight_limit", "Admission bound (max_num_seqs + max_queue).", labels=["model"]
        )
        rejected = CounterMetricFamily(
            "moemix_requests_rejected",
            "Requests answered 429 because the model's admission bound was reached.",
            labels=["model"],
        )
        incomplete = CounterMetricFamily(
            "moemix_requests_incomplete",
            "Admitted requests that did not finish: "
            "the response was not sent to its end (client disconnected: the engine "
            "aborted them) or a stream ended in an engine error.",
            labels=["model"],
        )
        routed = CounterMetricFamily(
            "moemix_expert_routed_tokens",
            "Tokens routed to experts since start, summed "
            "by MoE layer and the experts' bit width, as last gathered from the workers "
            "(every routing_refresh_s; per expert: GET /v1/moemix/routing).",
            labels=["model", "layer", "bits"],
        )
        kernel = InfoMetricFamily(
            "moemix_kernel",
            "The kernel serving a model's MoE layers or quantized linears "
            "(native CPU kernels name their ISA variant); `layers` is how many.",
            labels=["model", "role", "kernel", "layers"],
        )
        for eng in engines:
            name = eng.name
            for role, counts in (eng.kernels or {}).items():
                for kernel_name, n in sorted(counts.items()):
                    kernel.add_metric([name, role, kernel_name, str(n)], {})
            if eng.routing:
                for (layer, bits), n in sorted(by_layer_and_bits(eng.routing).items()):
                    routed.add_metric([name, str(layer), str(bits)], n)
            for (component, bits), n in sorted(eng.facts.bytes_by.items()):
                weight.add_metric([name, component, bits], n)
            if eng.facts.avg_bits is not None:
                avg.add_metric([name], eng.facts.avg_bits)
            if eng.facts.avg_payload_bits is not None:
                avg_payload.add_metric([name], eng.facts.avg_payload_bits)
            for bits, n in sorted(((eng.facts.summary or {}).get("bytes_by_width") or {}).items()):
                by_width.add_metric([name, str(bits)], n)
            pids = eng.engine_pids()
            if pids:
                engine_rss.add_metric([name], sum(_rss_tree(p) for p in pids))
            healthy.add_metric([name], 0.0 if eng.dead else 1.0)
            tps.add_metric([name], eng.throughput.rate())
            in_flight.add_metric([name], eng.gate.in_flight)
            limit.add_metric([name], eng.gate.limit)
            rejected.add_metric([name], eng.gate.rejected)
            incomplete.add_metric([name], eng.gate.incomplete)
        yield from (
            weight,
            avg,
            avg_payload,
            by_width,
            engine_rss,
            healthy,
            tps,
            in_flight,
            limit,
            rejected,
            incomplete,
            routed,
            kernel,
        )

        server_rss = GaugeMetricFamily(
            "moemix_server_resident_memory_bytes",
            "Resident memory of the API server process alone (engines are separate processes).",
        )
        server_rss.add_metric([], _rss_tree_self())
        yield server_rss
        yield from _cuda_memory()


def _rss_tree_self() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def _cuda_memory():
    try:
        import torch

        if not torch.cuda.is_available():
            return
        used = GaugeMetricFamily(
            "moemix_gpu_memory_used_bytes",
            "Device memory in use (all processes), from cudaMemGetInfo.",
            labels=["device"],
        )
        total = GaugeMetricFamily("moemix_gpu_memory_total_bytes", "Device memory capacity.", labels=["device"])
        for i in range(torch.cuda.device_count()):
            free, cap = torch.cuda.mem_get_info(i)
            used.add_metric([str(i)], cap - free)
            total.add_metric([str(i)], cap)
        yield used
        yield total
    except Exception:  # a scrape must never fail because of the GPU query
        return


# ------------------------------------------------------------------------------------------------ registry

_installed: list[Collector] = []


def install(pool: EnginePool) -> prometheus_client.CollectorRegistry:
    """Register our collectors in vLLM's registry (idempotent per process: a new pool replaces the old)."""
    registry = get_prometheus_registry()
    for collector in _installed:
        try:
            registry.unregister(collector)
        except KeyError:
            pass
    _installed[:] = [VllmMetricsCollector(), MoemixCollector(pool)]
    for collector in _installed:
        registry.register(collector)
    return registry
