"""OpenTelemetry's standard variables for traces, checked like every other setting: a bad value
is a config error naming the variable, not a warning from deep inside the SDK at runtime."""

from __future__ import annotations

from typing import Any, Mapping

from .model import TracingSettings
from .reader import is_http_url
from .sources import Collector

PROPAGATORS = ("tracecontext", "baggage", "none")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
_BOOLEANS = {"true": True, "false": False, "": False}
# variable, TracingSettings field, default, scale (milliseconds to seconds)
_BATCH = (("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size", 2048, 1), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
          "max_export_batch_size", 512, 1), ("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay", 5000, 1000),
          ("OTEL_BSP_EXPORT_TIMEOUT", "export_timeout", 30000, 1000))


def build_tracing(env: Mapping[str, str], out: Collector) -> TracingSettings:
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower()
    if disabled not in _BOOLEANS:
        out.problem(f"OTEL_SDK_DISABLED={disabled!r} must be true or false")
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter not in ("otlp", "none"):
        out.problem(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: agent2389 exports traces over OTLP/HTTP "
                    f"(otlp) or not at all (none)")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        wire = env.get(name, "").strip()
        if wire and wire != "http/protobuf":
            out.problem(f"{name}={wire!r} is not supported: agent2389 sends OTLP over HTTP with protobuf "
                        f"(http/protobuf); point it at the collector's HTTP port (4318)")
    sampler, ratio = _sampler(env, out)
    batch: dict[str, Any] = {}
    for name, attr, default, scale in _BATCH:
        text = env.get(name, "").strip()
        value = int(text) if text.isdigit() else None
        if text and not value:
            out.problem(f"{name}={text!r} must be a positive whole number")
        batch[attr] = (value or default) / scale if scale > 1 else (value or default)
    if batch["max_export_batch_size"] > batch["max_queue_size"]:
        out.problem("OTEL_BSP_MAX_EXPORT_BATCH_SIZE must not be larger than OTEL_BSP_MAX_QUEUE_SIZE")
    endpoint = "" if exporter == "none" else _traces_endpoint(env, out)
    return TracingSettings(enabled=not _BOOLEANS.get(disabled, False), endpoint=endpoint, sampler=sampler,
                           sampler_ratio=ratio, propagate_http=_propagates(env, out), **batch)


def _propagates(env: Mapping[str, str], out: Collector) -> bool:
    """OTEL_PROPAGATORS (default tracecontext,baggage): W3C trace context, or none. MQTT messages
    carry the context whatever it says: that is the protocol's, between our own agents."""
    names = [name.strip().lower() for name in env.get("OTEL_PROPAGATORS", "").split(",") if name.strip()]
    unknown = [name for name in names if name not in PROPAGATORS]
    if unknown:
        out.problem(f"OTEL_PROPAGATORS names {', '.join(map(repr, unknown))}: agent2389 propagates W3C trace "
                    f"context (tracecontext; baggage is accepted and not sent) or nothing (none)")
    return not names or "tracecontext" in names


def _traces_endpoint(env: Mapping[str, str], out: Collector) -> str:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as it is, or OTEL_EXPORTER_OTLP_ENDPOINT plus /v1/traces."""
    for name, suffix in (("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""), ("OTEL_EXPORTER_OTLP_ENDPOINT", "/v1/traces")):
        url = env.get(name, "").strip()
        if not url:
            continue
        if not is_http_url(url):
            out.problem(f"{name} must be an http:// or https:// URL with a host, e.g. http://otel-collector:4318; "
                        f"got {url!r}")
            return ""
        return url.rstrip("/") + suffix if suffix else url
    return ""


def _sampler(env: Mapping[str, str], out: Collector) -> tuple[str, float]:
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if sampler not in SAMPLERS:
        out.problem(f"OTEL_TRACES_SAMPLER={sampler!r} is not supported; use one of {', '.join(SAMPLERS)}")
    argument = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    ratio = 1.0
    if argument and sampler.endswith("traceidratio"):
        try:
            ratio = float(argument)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            out.problem(f"OTEL_TRACES_SAMPLER_ARG={argument!r} must be a ratio from 0 to 1 (e.g. 0.25)")
    return sampler, ratio
