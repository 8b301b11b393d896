"""vLLM's stat plumbing for several engines in one process: vLLM's `vllm:` metrics for every served model in vLLM's
registry (`get_prometheus_registry()`), labelled `model_name`, and each engine's recent generation throughput.

Why a shared vLLM logger: vLLM's PrometheusStatLogger creates module-level metrics and unregisters every
`vllm:` collector when constructed, so a second AsyncLLM in one process would silently drop the first
model's series. SharedPrometheusStatLogger creates each metric once, outside any registry, and
VllmMetricsCollector exposes them all; every engine writes its own `model_name` label values.
Caveat: histograms whose buckets depend on max_model_len take the first model's buckets.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import prometheus_client
from prometheus_client.registry import Collector
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorProm
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerBase
from vllm.v1.metrics.perf import PerfMetricsProm
from vllm.v1.spec_decode.metrics import SpecDecodingProm

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
