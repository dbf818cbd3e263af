"""Prometheus metrics of a worker, served over HTTP on a free port (published in its etcd registration)."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.utils import INF, floatToGoString

from hpc.procs import free_port

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Children:
    """`children(metric, *labels)` is `metric.labels(*labels)`, looked up once per label set: prometheus_client
    validates the labels and takes a lock on every labels() call, and each request asks for the same few."""

    def __init__(self):
        self._found: dict[tuple, object] = {}

    def __call__(self, metric, *labels: str):
        key = (metric, labels)
        found = self._found.get(key)
        if found is None:
            found = self._found[key] = metric.labels(*labels)
        return found


class LoopHistogram:
    """A Prometheus histogram for code on one thread (an event loop, whose /metrics handler runs on it too):
    observe() is a bisect and two additions. prometheus_client's Histogram takes a lock twice and scans its buckets
    on every observation, and the frontend makes several per request. The registry exposes it like any other
    histogram (`_bucket`, `_count`, `_sum`), as a collector."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS, registry: CollectorRegistry | None = None):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets if b != INF)
        self._series: dict[tuple[str, ...], _Series] = {}
        if not self.labelnames:
            self._unlabelled = self.labels()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> "_Series":
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            series = self._series[values] = _Series(self.bounds)
        return series

    def observe(self, seconds: float) -> None:
        self._unlabelled.observe(seconds)

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self._series.items()):
            cumulative, total = [], 0
            for bound, n in zip(self.bounds + (INF,), series.counts):
                total += n
                cumulative.append((floatToGoString(bound), total))
            family.add_metric(list(values), cumulative, series.sum)
        yield family


class _Series:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value ("le")
        self.sum += value


class WorkerMetrics:
    def __init__(self, role: str, worker_id: str):
        self.registry = r = CollectorRegistry()
        labels = {"role": role, "worker": worker_id}
        self.requests = Counter("hpc_worker_requests", "Requests by outcome", ["status"], registry=r)
        self.queue_depth = Gauge("hpc_worker_queue_depth", "Requests waiting for prefill", registry=r)
        self.running = Gauge("hpc_worker_running", "Requests decoding", registry=r)
        self.kv_blocks_free = Gauge("hpc_worker_kv_blocks_free", "Free KV blocks", registry=r)
        self.batch_size = Histogram("hpc_worker_batch_size", "Running requests per engine step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.prefill_seconds = Histogram("hpc_prefill_seconds", "Prefill time per request", registry=r,
                                         buckets=LATENCY_BUCKETS)
        self.kv_bytes = Counter("hpc_kv_transfer_bytes", "KV bytes pulled from prefill workers", registry=r)
        self.kv_seconds = Histogram("hpc_kv_transfer_seconds", "KV transfer time", ["path"], registry=r,
                                    buckets=LATENCY_BUCKETS)
        self.kv_gbps = Gauge("hpc_kv_transfer_gbps", "GB/s of the last KV transfer", ["path"], registry=r)
        self.tokens = Counter("hpc_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("hpc_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.reused_prompt_tokens = Counter("hpc_prompt_tokens_reused", "Prompt tokens whose KV the prefix cache "
                                            "held (block reuse)", registry=r)
        self.images = Counter("hpc_images", "Images and embedding files taken, by kind", ["kind"], registry=r)
        self.encode_seconds = Histogram("hpc_encode_seconds", "Time to encode (or load) a request's images",
                                        registry=r, buckets=LATENCY_BUCKETS)
        self.encode_queue = Gauge("hpc_encode_queue_depth", "Encode requests in progress", registry=r)
        self.embedding_bytes = Counter("hpc_embedding_transfer_bytes", "Embedding bytes read from encode workers",
                                       registry=r)
        self.embedding_seconds = Histogram("hpc_embedding_transfer_seconds", "Embedding transfer time",
                                           registry=r, buckets=LATENCY_BUCKETS)
        self.embedding_gbps = Gauge("hpc_embedding_transfer_gbps", "GB/s of the last embedding transfer",
                                    registry=r)
        self.stages = Histogram("hpc_worker_stage_seconds", "Where a request's time goes on this worker: queue, "
                                "compute (prefill), encode, kv_transfer, decode_first", ["stage"], registry=r,
                                buckets=LATENCY_BUCKETS)
        self._counted = (0, 0, 0)
        self.child = Children()
        self.info = Gauge("hpc_worker_info", "Worker identity", list(labels), registry=r)
        self.info.labels(**labels).set(1)

    def observe_stages(self, timing: dict) -> None:
        for stage, seconds in timing.items():
            if stage != "kv_bytes":
                self.child(self.stages, stage).observe(seconds)

    def count_tokens(self, prompt: int, reused: int, generated: int) -> None:
        """The engine keeps running totals; the counters take what is new since the last call. Counting here, a
        few times a second, keeps Prometheus' lock and checks off the path of every token."""
        for counter, total, before in zip((self.prompt_tokens, self.reused_prompt_tokens, self.tokens),
                                          (prompt, reused, generated), self._counted):
            counter.inc(total - before)
        self._counted = (prompt, reused, generated)

    def serve(self, host: str = "0.0.0.0", port: int = 0) -> int:
        port = port or free_port()
        start_http_server(port, addr=host, registry=self.registry)
        return port
