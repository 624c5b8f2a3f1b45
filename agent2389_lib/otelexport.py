"""Spans recorded and exported over OTLP/HTTP: only with the `[otel]` extra (this module imports it)
and an endpoint. A span is a few attributes and two clocks while its task runs; the export thread
turns finished ones into the SDK's `ReadableSpan`s and hands them to the SDK's OTLP/HTTP exporter
(which speaks HTTP through requests). The SDK's own span machinery costs about 70 us a span in
the worker thread, a third of a task's CPU for its three spans; this costs a few. The SDK and its
exporter read what they honour from the environment (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_EXPORTER_OTLP_HEADERS, ..._TIMEOUT, ..._COMPRESSION, ..._CERTIFICATE); the sampler is the
SDK's, as OTEL_TRACES_SAMPLER names it."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Optional

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from . import __version__, tracing
from .config import TracingSettings
from .httpsessions import endpoint_session
from .redaction import public_url
from .logs import Throttle
from .metrics import Metrics

log = logging.getLogger("agent2389.tracing")

_KINDS = {tracing.INTERNAL: trace.SpanKind.INTERNAL, tracing.CLIENT: trace.SpanKind.CLIENT,
          tracing.PRODUCER: trace.SpanKind.PRODUCER, tracing.CONSUMER: trace.SpanKind.CONSUMER}
_SCOPE = InstrumentationScope("agent2389", __version__)
_UNSET, _SAMPLED = trace.Status(trace.StatusCode.UNSET), 1


def sampler_of(settings: TracingSettings) -> Sampler:
    root: Sampler = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}.get(
        settings.sampler.replace("parentbased_", "")) or TraceIdRatioBased(settings.sampler_ratio)
    return ParentBased(root) if settings.sampler.startswith("parentbased_") else root


def _span_context(context: tracing.TraceContext, made: Optional[dict] = None) -> trace.SpanContext:
    found = made.get(context) if made is not None else None
    if found is None:
        found = trace.SpanContext(int(context.trace_id, 16), int(context.span_id, 16), context.remote,
                                  trace.TraceFlags(context.flags),
                                  trace.TraceState.from_header([context.state]) if context.state else None)
        if made is not None:
            made[context] = found
    return found


class _AgentResource(Resource):
    """The process's resource, which never changes: the exporter groups spans by resource, hashing
    it once a span, and the SDK's hash serializes every attribute to JSON each time."""

    def __init__(self, resource: Resource):
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


class RecordedSpan(tracing.Span):
    __slots__ = ("name", "kind", "parent", "attributes", "error", "started", "ended", "_batches")

    context: tracing.TraceContext  # a recorded span always has one

    def __init__(self, name: str, kind: str, context: tracing.TraceContext, parent: Optional[tracing.TraceContext],
                 attributes: dict, batches: "BatchExport"):
        super().__init__(context)
        self.name, self.kind, self.parent, self.attributes = name, kind, parent, attributes  # the caller's own dict
        self.error: Optional[str] = None
        self.started, self.ended = time.time_ns(), 0
        self._batches = batches

    def set(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def fail(self, description: str) -> None:
        self.error = description

    def end(self) -> None:
        self.ended = time.time_ns()
        self._batches.add(self)

    def readable(self, resource: Resource, contexts: dict) -> ReadableSpan:
        """`contexts`: the SpanContexts made so far for this batch (a task's spans share their parent)."""
        return ReadableSpan(self.name, _span_context(self.context, contexts),
                            _span_context(self.parent, contexts) if self.parent else None, resource, self.attributes,
                            kind=_KINDS[self.kind], instrumentation_scope=_SCOPE, start_time=self.started,
                            end_time=self.ended,
                            status=trace.Status(trace.StatusCode.ERROR, self.error) if self.error else _UNSET)


class OtelTracer(tracing.Tracer):
    """Where a trace enters this process (a root, or a parent from a message), the sampler
    decides; the spans under it follow that decision, as ParentBased samplers would."""

    records = True

    def __init__(self, settings: TracingSettings, agent_id: str, metrics: Metrics):
        super().__init__(True, settings.propagate_http)
        self._sampler = sampler_of(settings)
        # our defaults under the environment's: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
        resource = _AgentResource(Resource.create({"service.name": "agent2389", "service.instance.id": agent_id,
                                                   "service.version": __version__})
                                  .merge(OTELResourceDetector().detect()))
        exporter = OTLPSpanExporter(endpoint=settings.endpoint, session=endpoint_session(settings.endpoint))
        self._batches = BatchExport(exporter, resource, settings, metrics)
        # the exporter logs every failed batch; BatchExport says it once a minute, with the count
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        log.info("exporting traces to %s (OTLP/HTTP, sampler %s)", public_url(settings.endpoint), settings.sampler)

    def start(self, name: str, kind: str, parent: Optional[tracing.TraceContext], attributes: dict,
              task: bool) -> tracing.Span:
        context = tracing.child_of(parent)
        if parent is None or parent.remote:
            context = self._decided(context, name, kind, parent, attributes)
        if not context.flags & _SAMPLED:
            return tracing.Span(context)
        return RecordedSpan(name, kind, context, parent, attributes, self._batches)

    def _decided(self, context: tracing.TraceContext, name: str, kind: str, parent: Optional[tracing.TraceContext],
                 attributes: dict) -> tracing.TraceContext:
        remote = trace.set_span_in_context(trace.NonRecordingSpan(_span_context(parent)), Context()) if parent else None
        sampled = self._sampler.should_sample(remote, int(context.trace_id, 16), name, _KINDS[kind],
                                              attributes).decision.is_sampled()
        flags = (context.flags | _SAMPLED) if sampled else (context.flags & ~_SAMPLED)
        return tracing.TraceContext(context.trace_id, context.span_id, flags, context.state)

    def shutdown(self, timeout: float) -> None:
        self._batches.close(timeout)


class BatchExport:
    """A batch span processor that counts what it drops: the SDK's says so only in its log. A
    full queue drops the new span, a failed export its batch; so an unreachable collector shows on
    /metrics and costs at most the queue."""

    def __init__(self, exporter: SpanExporter, resource: Resource, settings: TracingSettings, metrics: Metrics):
        self._exporter = exporter
        self._resource = resource
        self._settings = settings
        self._metrics = metrics
        self._where = public_url(settings.endpoint)
        self._queue: deque = deque()
        self._ready = threading.Condition()
        self._closing = False
        self._failures = Throttle()
        self._thread = threading.Thread(target=self._run, name="trace-export", daemon=True)
        self._thread.start()

    def add(self, span: RecordedSpan) -> None:
        with self._ready:
            if len(self._queue) >= self._settings.max_queue_size:
                self._metrics.spans_dropped(1)
                return
            self._queue.append(span)
            if len(self._queue) >= self._settings.max_export_batch_size:
                self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                if not self._closing and len(self._queue) < self._settings.max_export_batch_size:
                    self._ready.wait(self._settings.schedule_delay)
                if self._closing and not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue),
                                                                  self._settings.max_export_batch_size))]
            if batch:
                self._export(batch)

    def _export(self, batch: list) -> None:
        try:
            contexts: dict = {}
            exported = self._exporter.export([span.readable(self._resource, contexts) for span in batch]) \
                == SpanExportResult.SUCCESS
            problem = "the collector refused them or could not be reached"
        except Exception as exc:  # the exporter's own fault: never the end of the export thread
            exported, problem = False, f"{type(exc).__name__}: {exc}"
        if exported:
            self._metrics.spans_exported(len(batch))
            return
        self._metrics.spans_dropped(len(batch))
        times = self._failures.occurred()
        if times:
            log.warning("could not export %d spans to %s (%s); they are dropped, %d failed export(s) since the "
                        "last report (agent2389_tracing_spans_dropped_total counts them)", len(batch), self._where,
                        problem, times)

    def close(self, timeout: float) -> None:
        """Export what is queued within `timeout` seconds (the export timeout at most); then stop."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(min(timeout, self._settings.export_timeout))
        self._exporter.shutdown()
