"""Which tracer a process gets: the OpenTelemetry SDK's, recording and exporting, when an OTLP
endpoint is set and the `[otel]` extra is installed; otherwise the stdlib tracer, which mints
the ids that propagation and log lines need. The agent and `inject` choose alike."""

from __future__ import annotations

import logging

from . import tracing
from .config import TracingSettings
from .metrics import Metrics
from .redaction import public_url

log = logging.getLogger("agent2389.tracing")


def build_tracer(settings: TracingSettings, instance: str, metrics: Metrics) -> tracing.Tracer:
    """`instance`: the `service.instance.id` its spans carry (the agent id)."""
    if not (settings.enabled and settings.endpoint):
        return tracing.Tracer(settings.enabled, settings.propagate_http)
    try:
        from .otelexport import OtelTracer
    except ImportError as exc:
        log.warning("traces are not exported to %s: the OpenTelemetry SDK cannot be imported (%s); install the [otel] "
                    "extra (pip install -e '.[otel]' in the project). Messages still carry trace context and log "
                    "lines trace ids", public_url(settings.endpoint), exc)
        return tracing.Tracer(True, settings.propagate_http)
    return OtelTracer(settings, instance, metrics)
