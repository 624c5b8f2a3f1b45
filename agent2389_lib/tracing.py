"""W3C Trace Context across MQTT, and the spans of a task.

A task's context arrives as MQTT 5 user properties or, on MQTT 3.1.1, as top-level envelope
fields of the same names (the W3C draft for MQTT); what the agent publishes for the task carries
its task span's context the same ways, so a pipeline is one trace on every broker. This module
needs the stdlib only: it mints ids, keeps the current span for log lines, and records nothing.
With the `[otel]` extra and an OTLP endpoint, `otelexport.OtelTracer` records the same spans and
exports them.

`span` is the one way to observe a step. Its `log` fields (the operation and its ids) are what
every log line inside it carries as `span`, the enclosing span's fields included; a step that
is no trace span of its own (`record=False`) still names its operation for the log. With
LOG_SPANS, `logs` sets `on_log_span` to hear where such spans start and end.
"""

from __future__ import annotations

import random
import re
import time
from contextvars import ContextVar
from typing import Any, Callable, ContextManager, NamedTuple, Optional, Sequence

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
INTERNAL, CLIENT, PRODUCER, CONSUMER = "INTERNAL", "CLIENT", "PRODUCER", "CONSUMER"

# version-traceid-parentid-flags; a later version may append fields after a '-'
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_TRACESTATE_MAX = 512
_TRACESTATE_RE = re.compile(r"[\x20-\x7e]*\Z")
_ids = random.Random()
_INVALID_TRACE_ID, _INVALID_SPAN_ID = "0" * 32, "0" * 16  # W3C: all zeros is no id


class TraceContext(NamedTuple):
    """A span's W3C context. A tuple: made a few times for every task, and a frozen dataclass
    takes four times as long to make."""

    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16
    flags: int = 1  # bit 0: sampled (bit 1, W3C level 2: the trace id is random)
    state: Optional[str] = None  # tracestate, passed on as it came
    remote: bool = False  # parsed from a message: another process's span

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def fields(self) -> dict:
        """As top-level envelope fields."""
        return dict(self.headers())

    def headers(self) -> tuple:
        """As MQTT 5 user properties."""
        traceparent = (TRACEPARENT, self.traceparent)
        return (traceparent, (TRACESTATE, self.state)) if self.state else (traceparent,)


def parse(traceparent: Any, tracestate: Any = None) -> Optional[TraceContext]:
    """The context a `traceparent` names, or None when it is malformed (then a new trace starts)."""
    if not isinstance(traceparent, str):
        return None
    match = _TRACEPARENT_RE.match(traceparent.strip())
    if not match:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _INVALID_TRACE_ID or span_id == _INVALID_SPAN_ID:
        return None
    state = tracestate.strip() if isinstance(tracestate, str) else None
    if not state or len(state) > _TRACESTATE_MAX or not _TRACESTATE_RE.match(state):
        state = None
    return TraceContext(trace_id, span_id, int(flags, 16), state, remote=True)


def extract(user_properties: Sequence[tuple[str, str]], traceparent: Any = None,
            tracestate: Any = None) -> Optional[TraceContext]:
    """A message's context: its user properties first, else its envelope's fields."""
    found = {name: value for name, value in user_properties if name in (TRACEPARENT, TRACESTATE)}
    if TRACEPARENT in found:
        return parse(found[TRACEPARENT], found.get(TRACESTATE))
    return parse(traceparent, tracestate)


def child_of(parent: Optional[TraceContext]) -> TraceContext:
    """A new span's context: in the parent's trace, or the root of a new one (both ids from one
    draw: every task that arrives without a context starts one)."""
    if parent is None:
        ids = f"{_ids.getrandbits(192):048x}"
        trace_id, span_id, flags, state = ids[:32], ids[32:], 1, None
    else:
        trace_id, span_id, flags, state = parent.trace_id, f"{_ids.getrandbits(64):016x}", parent.flags, parent.state
    if trace_id == _INVALID_TRACE_ID or span_id == _INVALID_SPAN_ID:  # all zeros is invalid (odds 2**-64)
        return child_of(parent)
    return TraceContext(trace_id, span_id, flags, state)


_current: ContextVar[Optional[TraceContext]] = ContextVar("agent2389_span", default=None)
_task_headers: ContextVar[tuple] = ContextVar("agent2389_task_headers", default=())
_log_fields: ContextVar[Optional[dict]] = ContextVar("agent2389_log_span", default=None)
# (event, fields, duration in ms): "start" with None, "end" with the span's duration
on_log_span: Optional[Callable[[str, dict, Optional[float]], None]] = None


def current_log_fields() -> Optional[dict]:
    """The operation and ids of the innermost span with log fields: a log line's `span`."""
    return _log_fields.get()


def current() -> Optional[TraceContext]:
    """The span this thread is in: log lines carry its ids."""
    return _current.get()


def task_headers() -> tuple:
    """The context of the task span this thread is in, as the MQTT 5 user properties every
    message of the task carries (none outside a task)."""
    return _task_headers.get()


class Span:
    """A span that records nothing: its context is what propagation and log lines need."""

    __slots__ = ("context",)

    def __init__(self, context: Optional[TraceContext]):
        self.context = context

    def set(self, key: str, value: Any) -> None:
        pass

    def fail(self, description: str) -> None:
        pass

    def end(self) -> None:
        pass


_FROM_CURRENT: Any = object()


class Tracer:
    """Spans without the OpenTelemetry SDK: ids for propagation and log lines. Only a task span
    gets ids of its own (what the task's messages carry and its log lines name); a span inside it
    is recorded nowhere, so it passes the task span's context through, as OpenTelemetry's API does
    without an SDK. `enabled=False` (OTEL_SDK_DISABLED=true) mints nothing at all;
    `propagate_http=False` (OTEL_PROPAGATORS=none) sends no context with HTTP requests."""

    records = False  # whether its spans reach a collector

    def __init__(self, enabled: bool = True, propagate_http: bool = True):
        self.enabled = enabled
        self.propagate_http = propagate_http

    def start(self, name: str, kind: str, parent: Optional[TraceContext], attributes: dict, task: bool) -> Span:
        return Span(child_of(parent) if self.enabled and task else parent)

    def span(self, name: str, kind: str = INTERNAL, attributes: Optional[dict] = None,
             parent: Optional[TraceContext] = _FROM_CURRENT, task: bool = False, log: Optional[dict] = None,
             record: bool = True) -> ContextManager[Span]:
        """A span for the body, current while it runs; `parent=None` starts a new trace, and a
        `task` span is also what the task's messages carry. `log`: the fields its log lines carry
        (with `operation`); `record=False`: a step named for the log only, no span of the trace."""
        context = _current.get() if parent is _FROM_CURRENT else parent
        span = self.start(name, kind, context, attributes or {}, task) if record else Span(context)
        return _Scope(span, task, log, record)

    def shutdown(self, timeout: float) -> None:
        pass


class _Scope:
    """A span made current for a `with` body (a class: eight are entered for every task, and a
    generator-based context manager costs twice as much)."""

    __slots__ = ("span", "task", "log", "record", "tokens", "fields", "hook", "started")

    def __init__(self, span: Span, task: bool, log: Optional[dict], record: bool):
        self.span, self.task, self.log, self.record = span, task, log, record

    def __enter__(self) -> Span:
        context = self.span.context
        token = _current.set(context)
        task_token = _task_headers.set(context.headers() if context else ()) if self.task else None
        fields = {**(_log_fields.get() or {}), **self.log} if self.log else None
        log_token = _log_fields.set(fields) if fields else None
        self.tokens, self.fields = (token, task_token, log_token), fields
        self.hook = on_log_span if fields else None  # set with LOG_SPANS
        self.started = time.monotonic() if self.hook else 0.0  # the clock is read for the hook only
        if self.hook and fields:
            self.hook("start", fields, None)
        return self.span

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], traceback: Any) -> None:
        if kind is not None:
            self.span.fail(kind.__name__)
        if self.hook and self.fields:
            self.hook("end", self.fields, round((time.monotonic() - self.started) * 1000, 3))
        token, task_token, log_token = self.tokens
        if log_token is not None:
            _log_fields.reset(log_token)
        if task_token is not None:
            _task_headers.reset(task_token)
        _current.reset(token)
        if self.record:
            self.span.end()


_tracer = Tracer()


def install(tracer: Tracer) -> None:
    """The process's tracer, chosen at startup (`runtime._build_tracer`)."""
    global _tracer
    _tracer = tracer


def span(name: str, kind: str = INTERNAL, attributes: Optional[dict] = None,
         parent: Optional[TraceContext] = _FROM_CURRENT, task: bool = False, log: Optional[dict] = None,
         record: bool = True) -> ContextManager[Span]:
    """`Tracer.span` of the installed tracer."""
    return _tracer.span(name, kind, attributes, parent, task, log, record)


def shutdown(timeout: float) -> None:
    _tracer.shutdown(timeout)


def http_headers() -> Optional[dict]:
    """The current span's context as W3C Trace Context headers for an outgoing HTTP request (an
    LLM, a router, an MCP server), so the server's spans join the task's trace; None outside a
    span or with OTEL_PROPAGATORS=none."""
    context = _current.get()
    return dict(context.headers()) if context is not None and _tracer.propagate_http else None

