"""One Prometheus registry (vLLM's `get_prometheus_registry()`) holding vLLM's `vllm:` metrics for every
served model, labelled `model_name`, and ours under `moemix_` (bytes, seconds, per bit width, never per expert).

Why a shared vLLM logger: vLLM's PrometheusStatLogger creates module-level metrics and unregisters every
`vllm:` collector when constructed, so a second AsyncLLM in one process would silently drop the first
model's series. SharedPrometheusStatLogger creates each metric once, outside any registry, and
VllmMetricsCollector exposes them all; every engine writes its own `model_name` label values.
Caveat: histograms whose buckets depend on max_model_len take the first model's buckets.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorProm
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerBase
from vllm.v1.metrics.perf import PerfMetricsProm
from vllm.v1.metrics.prometheus import get_prometheus_registry
from vllm.v1.spec_decode.metrics import SpecDecodingProm

from vllm_moemix.config.routing_profile import by_layer_and_bits

if TYPE_CHECKING:
    from server.engine import EnginePool

# ---------------------------------------------------------------------------------------------- vLLM metrics

_shared: dict[str, prometheus_client.metrics.MetricWrapperBase] = {}
_shared_lock = threading.Lock()


def _shared_factory(cls: type) -> Callable[..., Any]:
    def make(name: str, documentation: str = "", labelnames=(), **kwargs: Any):
        labelnames = tuple(labelnames)
        with _shared_lock:
            metric = _shared.get(name)
            if metric is None:
                metric = cls(name=name, documentation=documentation, labelnames=labelnames, registry=None, **kwargs)
                _shared[name] = metric
            elif type(metric) is not cls or tuple(metric._labelnames) != labelnames:
                raise ValueError(f"metric {name} re-declared with another type or labels")
            return metric

    make.__name__ = f"shared_{cls.__name__}"
    return make


# staticmethod: vLLM calls them as `self._gauge_cls(...)`, a plain function would get `self` as `name`.
_gauge = staticmethod(_shared_factory(prometheus_client.Gauge))
_counter = staticmethod(_shared_factory(prometheus_client.Counter))
_histogram = staticmethod(_shared_factory(prometheus_client.Histogram))


class _SharedSpecDecodingProm(SpecDecodingProm):
    _counter_cls = _counter


class _SharedKVConnectorProm(KVConnectorProm):
    _gauge_cls, _counter_cls, _histogram_cls = _gauge, _counter, _histogram


class _SharedECConnectorProm(ECConnectorProm):
    _gauge_cls, _counter_cls, _histogram_cls = _gauge, _counter, _histogram


class _SharedPerfMetricsProm(PerfMetricsProm):
    _counter_cls = _counter


class SharedPrometheusStatLogger(PrometheusStatLogger):
    """vLLM's own Prometheus logger (same names, labels, buckets), safe with several engines in one process."""

    _gauge_cls, _counter_cls, _histogram_cls = _gauge, _counter, _histogram
    _spec_decoding_cls = _SharedSpecDecodingProm
    _kv_connector_cls = _SharedKVConnectorProm
    _ec_connector_cls = _SharedECConnectorProm
    _perf_metrics_cls = _SharedPerfMetricsProm


class VllmMetricsCollector(Collector):
    def collect(self):
        with _shared_lock:
            metrics = list(_shared.values())
        for metric in metrics:
            yield from metric.collect()

    def describe(self):
        return []


# ------------------------------------------------------------------------------------- generation throughput


class Throughput:
    """Generated tokens per second over the last `window_s` seconds, fed by the engine's iteration stats."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, timestamp: float, tokens: int) -> None:
        if tokens:
            with self._lock:
                self._events.append((timestamp, tokens))
                self._trim(time.time())

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()

    def rate(self) -> float:
        with self._lock:
            self._trim(time.time())
            return sum(t for _, t in self._events) / self.window_s


class _ThroughputStatLogger(StatLoggerBase):
    def __init__(self, throughput: Throughput):
        self.throughput = throughput

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if iteration_stats is not None:
            self.throughput.add(iteration_stats.iteration_timestamp, iteration_stats.num_generation_tokens)

    def log_engine_initialized(self):
        pass


def throughput_logger_factory(throughput: Throughput):
    """A per-engine stat logger factory for AsyncLLM(stat_loggers=[...])."""
    return lambda vllm_config, engine_index=0: _ThroughputStatLogger(throughput)


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

    def __init__(self, pool: "EnginePool"):
        self.pool = pool

    def describe(self):
        return []

    def collect(self):
        engines = list(self.pool.engines.values())
        weight = GaugeMetricFamily("moemix_weight_bytes", "Checkpoint weight bytes at rest, by component "
                                   "(experts, attention, shared, other) and bit width (2/3/4/8 or the float dtype).",
                                   labels=["model", "component", "bits"])
        avg = GaugeMetricFamily("moemix_weight_average_bits", "Average bits per weight of the quantizable linears "
                                "(attention, experts, shared experts), including scales and zero points.",
                                labels=["model"])
        avg_payload = GaugeMetricFamily("moemix_weight_average_payload_bits", "Average integer width of the "
                                        "quantizable linears (scales and zero points excluded).", labels=["model"])
        by_width = GaugeMetricFamily("moemix_quantized_linear_bytes", "Bytes of the quantizable linears by bit "
                                     "width, from the moemix checkpoint summary.", labels=["model", "bits"])
        engine_rss = GaugeMetricFamily("moemix_engine_resident_memory_bytes", "Resident memory of the model's "
                                       "engine-core process and its workers.", labels=["model"])
        healthy = GaugeMetricFamily("moemix_engine_healthy", "1 if the model's engine is alive.", labels=["model"])
        tps = GaugeMetricFamily("moemix_generation_tokens_per_second", "Generated tokens per second over the "
                                "last 10 seconds.", labels=["model"])
        in_flight = GaugeMetricFamily("moemix_requests_in_flight", "Requests admitted and not finished "
                                      "(sequences; a /tokenize request counts one).", labels=["model"])
        limit = GaugeMetricFamily("moemix_requests_in_flight_limit", "Admission bound (max_num_seqs + max_queue).",
                                  labels=["model"])
        rejected = CounterMetricFamily("moemix_requests_rejected", "Requests answered 429 because the model's "
                                       "admission bound was reached.", labels=["model"])
        incomplete = CounterMetricFamily("moemix_requests_incomplete", "Admitted requests that did not finish: "
                                         "the response was not sent to its end (client disconnected: the engine "
                                         "aborted them) or a stream ended in an engine error.", labels=["model"])
        routed = CounterMetricFamily("moemix_expert_routed_tokens", "Tokens routed to experts since start, summed "
                                     "by MoE layer and the experts' bit width, as last gathered from the workers "
                                     "(every routing_refresh_s; per expert: GET /v1/moemix/routing).",
                                     labels=["model", "layer", "bits"])
        kernel = InfoMetricFamily("moemix_kernel", "The kernel serving a model's MoE layers or quantized linears "
                                  "(native CPU kernels name their ISA variant); `layers` is how many.",
                                  labels=["model", "role", "kernel", "layers"])
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
        yield from (weight, avg, avg_payload, by_width, engine_rss, healthy, tps, in_flight, limit, rejected,
                    incomplete, routed, kernel)

        server_rss = GaugeMetricFamily("moemix_server_resident_memory_bytes", "Resident memory of the API server "
                                       "process alone (engines are separate processes).")
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
        used = GaugeMetricFamily("moemix_gpu_memory_used_bytes", "Device memory in use (all processes), "
                                 "from cudaMemGetInfo.", labels=["device"])
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


def install(pool: "EnginePool") -> prometheus_client.CollectorRegistry:
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
