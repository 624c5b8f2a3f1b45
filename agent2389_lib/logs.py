"""Process-wide logging: JSON lines or readable text, with secrets redacted everywhere.

A JSON line looks like the deployment guide's example:
`{"timestamp", "level", "target", "span": {...}, "fields": {"message": ...}}`; a line written
inside a traced span (a task, its LLM requests, tool calls and publishes) also has `trace_id`
and `span_id`, so a log aggregator can link it to its trace.
`target` is the logger name with dots as `::` (e.g. `agent2389::transport::mqtt`), so
`jq 'select(.target | contains("mqtt"))'` picks the MQTT lines. Pass `extra={"span": {...}}`
to attach a span (e.g. `{"operation": "task_processing", "task_id": ...}`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional, TextIO

from . import tracing
from .protocol import utc_millis
from .redaction import redact

_LEVEL_NAMES = {"WARNING": "WARN", "CRITICAL": "ERROR"}
_PY_LEVELS = {"ERROR": logging.ERROR, "WARN": logging.WARNING, "INFO": logging.INFO, "DEBUG": logging.DEBUG}


def _target(record: logging.LogRecord) -> str:
    return record.name.replace(".", "::")


def _level(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelname, record.levelname)


class RedactingFilter(logging.Filter):
    """Renders each record's message (and exception) once, with secrets masked."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.secrets)
            record.exc_info = None
        span = getattr(record, "span", None) or tracing.current_log_fields()  # the step the line was logged in
        if isinstance(span, dict):
            record.span = {k: redact(v, self.secrets) if isinstance(v, str) else v for k, v in span.items()}
        return True


_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)  # made once: json.dumps with options makes one a call


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {"message": record.getMessage()}
        if record.exc_text:
            fields["exception"] = record.exc_text
        line: dict[str, Any] = {"timestamp": utc_millis(record.created), "level": _level(record),
                                "target": _target(record)}
        context = tracing.current()
        if context is not None:
            line["trace_id"], line["span_id"] = context.trace_id, context.span_id
        span = getattr(record, "span", None)
        if span:
            line["span"] = span
        line["fields"] = fields
        return _LINE_ENCODER.encode(line)


_TEXT_OMITTED = frozenset({"operation", "agent_id"})


class TextFormatter(logging.Formatter):
    """One line per record, for a person: the message, then what the operation adds that the
    message does not already say (never the agent id, the same on every line of the process),
    then the trace. Line breaks inside a message (an error body, a traceback) are written as
    `\\n`, so `grep` and log shippers see whole records."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        span = getattr(record, "span", None) or {}
        extra = [f"{k}={v}" for k, v in span.items()
                 if k not in _TEXT_OMITTED and v is not None and str(v) not in message]
        context = tracing.current()
        if context is not None:
            extra.append(f"trace={context.trace_id}")
        text = f"{utc_millis(record.created)} {_level(record):5} {_target(record)}: {message}"
        if extra:
            text += f" ({' '.join(extra)})"
        if record.exc_text:
            text += "\n" + record.exc_text
        return text.replace("\r", "\\r").replace("\n", "\\n")


_span_log = logging.getLogger("agent2389.spans")


def _log_span_event(event: str, fields: dict, duration_ms: Optional[float]) -> None:
    """LOG_SPANS: a `span start` and a `span end` line (with `duration_ms`) for every step."""
    extra = {"event": event} if duration_ms is None else {"event": event, "duration_ms": duration_ms}
    _span_log.info("span %s", event, extra={"span": {**fields, **extra}})


def configure_logging(level: str = "INFO", fmt: str = "json", secrets: Iterable[str] = (),
                      stream: Optional[TextIO] = None, spans: bool = False) -> logging.Handler:
    """Install one handler on the root logger (replacing earlier ones) and return it. `auto`:
    text for a person at a terminal, JSON for a log collector."""
    tracing.on_log_span = _log_span_event if spans else None
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_PY_LEVELS.get(level.upper(), logging.INFO))
    logging.getLogger("urllib3").setLevel(max(root.level, logging.INFO))
    return handler


class Throttle:
    """For conditions that can repeat on every message: at most one log line per interval,
    saying how often the condition occurred since the last line."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._count = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def occurred(self) -> int:
        """Count one occurrence; returns how many to report now, or 0 when a line is not due."""
        with self._lock:
            self._count += 1
            now = self._clock()
            if now - self._last < self.interval:
                return 0
            count, self._count, self._last = self._count, 0, now
            return count
