"""Each request's stages as OpenTelemetry spans, exported over OTLP/HTTP when an endpoint is configured
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OpenTelemetry's own variables) and the `otel`
extra is installed. Without one, the run folder's trace.jsonl is the record.

One trace per request: a root span from receipt to the last token, `preprocess`, `prefill` (the frontend's round
trip) with the prefill worker's `encode`, `queue` and `compute` inside it, and on disaggregated requests
`kv_wait` (room in a full KV cache), `kv_transfer` and `decode first step`. Worker stages are durations measured
on the worker. They are laid end to end inside the frontend's window, so their order is drawn, not measured; their
lengths are measured."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("frontend")


class SpanExporter:
    def __init__(self, deployment: str):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": "hpc-frontend",
                                                                 "hpc.deployment": deployment}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("hpc.frontend")

    @classmethod
    def from_env(cls, deployment: str) -> "SpanExporter | None":
        if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
            return None
        try:
            return cls(deployment)
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry's SDK is not installed "
                        "(pip install 'hpc[otel]'): spans go to the trace file only")
            return None

    def export(self, record: dict) -> None:
        ns = 1_000_000_000
        end = int(record["time"] * ns)
        start = end - int(record["e2e"] * ns)
        attrs = {k: v for k, v in record.items() if isinstance(v, (str, int, float)) and v is not None
                 and k not in ("time",)}
        root = self.tracer.start_span("request", start_time=start, attributes=attrs)
        ctx = _context(root)
        cursor = self._child("preprocess", start, record["preprocess"], ctx)
        prefill_end = self._child("prefill", cursor, record.get("prefill_rtt") or 0.0, ctx,
                                  {"worker": record.get("prefill_worker") or "", "host": record.get("prefill_host")
                                   or ""})
        inner = cursor
        for stage in ("encode", "queue", "compute"):
            seconds = (record.get("prefill") or {}).get(stage)
            if seconds is not None:
                inner = self._child(stage, inner, seconds, ctx)
        decode = record.get("decode") or {}
        if decode:
            at = prefill_end
            if "kv_wait" in decode:
                at = self._child("kv_wait", at, decode["kv_wait"], ctx)
            if "kv_transfer" in decode:
                at = self._child("kv_transfer", at, decode["kv_transfer"], ctx, {"bytes": decode.get("kv_bytes", 0)})
            self._child("decode first step", at, decode.get("decode_first", 0.0), ctx,
                        {"worker": record.get("decode_worker") or ""})
        root.end(end_time=end)

    def _child(self, name: str, start: int, seconds: float, ctx, attrs: dict | None = None) -> int:
        end = start + int(seconds * 1_000_000_000)
        span = self.tracer.start_span(name, context=ctx, start_time=start, attributes=attrs or {})
        span.end(end_time=end)
        return end

    def close(self) -> None:
        self.provider.shutdown()


def _context(span):
    from opentelemetry import trace

    return trace.set_span_in_context(span)
