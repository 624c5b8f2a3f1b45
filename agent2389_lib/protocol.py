"""The 2389 wire contract: topics, envelopes, message builders.

Pure functions only: nothing here touches sockets, threads or configuration.
Parsing raises only `EnvelopeError`, whatever bytes it is given.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional, Sequence

from .redaction import sanitize_error_message
from .rfc3339 import parse_rfc3339
from .usage import Budget, Usage, UsageError, parse_budget, parse_usage

# Error codes (docs/protocol.md, the Error payload).
TOOL_EXECUTION_FAILED = "tool_execution_failed"
LLM_ERROR = "llm_error"
INVALID_INPUT = "invalid_input"
PIPELINE_DEPTH_EXCEEDED = "pipeline_depth_exceeded"
INTERNAL_ERROR = "internal_error"
CANCELED = "canceled"  # PROTOCOL.md 7: the task was cancelled
EXPIRED = "expired"  # PROTOCOL.md 7: the task reached the agent after its expiry and was not run
BUDGET_EXCEEDED = "budget_exceeded"  # PROTOCOL.md 8: a limit on tokens or cost was spent
ERROR_CODES = (TOOL_EXECUTION_FAILED, LLM_ERROR, INVALID_INPUT, PIPELINE_DEPTH_EXCEEDED, INTERNAL_ERROR, CANCELED,
               EXPIRED, BUDGET_EXCEEDED)

AVAILABLE = "available"
UNAVAILABLE = "unavailable"

PROGRESS_EVENT_TYPES = (
    "TaskStart", "TaskComplete", "TaskError", "ToolCall", "ToolComplete", "ToolError",
    "LlmRequest", "LlmResponse", "LlmError", "ValidationError", "Custom", "ApprovalRequired",
)
HEALTH_OK, HEALTH_DEGRADED = "ok", "degraded"
MAX_WORKFLOW_ENTRIES = 100  # steps_completed and routing_trace keep the newest this many
MAX_ACTION_CHARS = 200
_PROGRESS_SUFFIX = {"General": "", "Tool": "/tools", "LLM": "/llm"}

AGENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{3,64}$")
_UUID_RE = re.compile(
    r"^(?:urn:uuid:)?(\{)?([0-9a-f]{8})(-?)([0-9a-f]{4})\3([0-9a-f]{4})\3([0-9a-f]{4})\3([0-9a-f]{12})(?(1)\})$",
    re.IGNORECASE,
)
_TOPIC_UNSAFE = ("+", "#", "\0", "/")
MAX_TOPIC_BYTES = 65535
MAX_NEXT_LEVELS = 1000


class EnvelopeError(ValueError):
    """A payload that is not a valid task envelope.

    `task_id` and `conversation_id` are set when they could be read, so the caller can
    publish an `invalid_input` error to the conversation.
    """

    def __init__(self, message: str, task_id: Optional[str] = None, conversation_id: Optional[str] = None):
        super().__init__(message)
        self.task_id = task_id
        self.conversation_id = conversation_id


# ---------------------------------------------------------------- topics

def canonicalize_topic(topic: str) -> str:
    """Topics compare in this form: one leading slash, no empty levels, no trailing slash."""
    return "/" + "/".join(part for part in topic.split("/") if part)


def input_topic(agent_id: str) -> str:
    return f"/control/agents/{agent_id}/input"


def cancel_topic(agent_id: str) -> str:
    """Where a task of `agent_id` is cancelled (PROTOCOL.md 7; `+` for every agent's, a filter)."""
    return f"/control/agents/{agent_id}/cancel"


def status_topic(agent_id: str) -> str:
    """The agent's retained status (`+` for every agent's, a filter)."""
    return f"/control/agents/{agent_id}/status"


def instance_status_topic(agent_id: str, instance_id: str) -> str:
    """Status of one member of the pool serving `agent_id` (`+` for all of them)."""
    return f"/control/agents/{agent_id}/instances/{instance_id}/status"


def shared_subscription(group: str, topic: str) -> str:
    """MQTT 5 shared subscription: `$share/` + group + `/` + filter. Our topics begin with `/`,
    hence the two slashes (`$share/a//control/agents/a/input`)."""
    return f"$share/{group}/{topic}"


def progress_topic(agent_id: str, category: str) -> str:
    return f"/control/agents/{agent_id}/progress{_PROGRESS_SUFFIX[category]}"


def conversation_topic(conversation_id: str, agent_id: str) -> str:
    """Where `agent_id` answers in a conversation (`+` for any agent, a filter)."""
    return f"/conversations/{conversation_id}/{agent_id}"


def conversation_filter(conversation_id: str = "+") -> str:
    """Every message of a conversation (`+`: of every conversation)."""
    return f"/conversations/{conversation_id}/#"


def progress_filter(agent_id: str = "+") -> str:
    """Every progress event of an agent (`+`: of every agent); `#` also matches the parent level."""
    return f"/control/agents/{agent_id}/progress/#"


def probe_topic(agent_id: str, client_id: str) -> str:
    """A client's own probe: published after subscribing, it comes back after the retained statuses."""
    return f"/control/agents/{agent_id}/probe/{client_id}"


def dead_letter_topic(agent_id: str) -> str:
    return f"/control/agents/{agent_id}/dead-letter"


def destination_template(topic: str) -> str:
    """A topic fit for a span name: conversation ids make names of one use each."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[1] == "conversations":
        return conversation_topic("{conversation_id}", parts[3])
    return topic


def next_agent_id(next_topic: str) -> str:
    """The agent addressed by a `next.topic`; raises EnvelopeError unless it is an agent input topic."""
    parts = canonicalize_topic(next_topic).split("/")
    if len(parts) < 4 or parts[1] != "control" or parts[2] != "agents" or not is_valid_agent_id(parts[3]):
        raise EnvelopeError(f"next.topic {next_topic!r} is not of the form /control/agents/{{agent_id}}/input")
    return parts[3]


def is_valid_agent_id(agent_id: object) -> bool:
    return isinstance(agent_id, str) and bool(AGENT_ID_RE.match(agent_id))


def is_topic_safe(level: str) -> bool:
    """Whether a string can be used as one topic level (no wildcards, NUL or separators)."""
    return bool(level) and not any(ch in level for ch in _TOPIC_UNSAFE)


# ---------------------------------------------------------------- envelopes

@dataclass(frozen=True)
class NextTask:
    topic: str
    instruction: Optional[str]
    input: Any
    next: Optional["NextTask"]


@dataclass  # not frozen: one is made for every task, and a frozen one takes three times as long
class TaskEnvelope:
    task_id: str  # lowercase hyphenated
    conversation_id: str
    topic: str
    instruction: Optional[str]
    input: Any
    next: Optional[NextTask]
    depth: int  # 1 + number of nested `next`
    version: Optional[str] = None  # set only for v2 envelopes
    context: Optional[dict] = None
    routing_trace: Optional[list] = None
    traceparent: Any = None  # W3C trace context fields, as they came (tracing.extract checks them)
    tracestate: Any = None
    expires_at: Optional[float] = None  # Unix time, from the additive `expires_at` field (PROTOCOL.md 7)
    budget: Optional[Budget] = None  # PROTOCOL.md 8
    usage: Optional[Usage] = None  # the pipeline's so far, as a forward carries it


def normalize_uuid(value: object) -> Optional[str]:
    """Any standard UUID spelling to lowercase hyphenated, or None when it is not one."""
    if not isinstance(value, str):
        return None
    match = _UUID_RE.match(value.strip())
    if not match:
        return None
    return "-".join(match.group(2, 4, 5, 6, 7)).lower()  # as str(uuid.UUID(...)) spells it, without making one


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_STRICT = json.JSONDecoder(parse_constant=_reject_constant)  # json.loads with an option makes one a call


def decode_json(payload: bytes | str) -> Any:
    """Strict JSON (UTF-8, no NaN/Infinity); raises EnvelopeError with a readable reason."""
    try:
        text = payload.decode("utf-8") if isinstance(payload, (bytes, bytearray)) else payload
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"payload is not valid UTF-8 (byte {exc.start})") from None
    try:
        return _STRICT.decode(text)
    except RecursionError:
        raise EnvelopeError("payload JSON is nested too deeply") from None
    except ValueError as exc:
        raise EnvelopeError(f"payload is not valid JSON: {_first_line(str(exc))}") from None


def _first_line(text: str) -> str:
    return text.splitlines()[0][:200] if text else ""


def parse_envelope(payload: bytes | str) -> TaskEnvelope:
    """Parse a task envelope (v1 or v2); raises EnvelopeError only."""
    data = decode_json(payload)
    if not isinstance(data, dict):
        raise EnvelopeError(f"envelope must be a JSON object, got {_json_type(data)}")
    raw_task_id = data.get("task_id")
    task_id = normalize_uuid(raw_task_id)
    raw_cid = data.get("conversation_id")
    cid = raw_cid if _usable_conversation_id(raw_cid) else None
    try:
        raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        if _SURROGATE_ESCAPE_RE.search(raw):
            _reject_lone_surrogates(data)
        return _parse_envelope_object(data, task_id, raw_task_id, raw_cid)
    except EnvelopeError as exc:  # a task id that is no UUID is echoed as given: the requester knows it so
        raise EnvelopeError(str(exc), task_id or _echoable(raw_task_id), cid) from None


def _echoable(value: Any) -> Optional[str]:
    """A task id that is not a UUID, fit to be echoed in the error about it."""
    if isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable():
        return value
    return None


_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_lone_surrogates(data: dict) -> None:
    """JSON may escape half of a UTF-16 pair (`"\\ud800"`); such text cannot be encoded as UTF-8,
    so nothing derived from it could ever be published."""
    for name, value in data.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise EnvelopeError(f"{name} contains an unpaired UTF-16 surrogate escape (such as \\ud800); "
                                f"text must be valid Unicode") from None
        except RecursionError:
            raise EnvelopeError(f"{name} is nested too deeply") from None


def _parse_envelope_object(data: dict, task_id: Optional[str], raw_task_id: Any, raw_cid: Any) -> TaskEnvelope:
    if "task_id" not in data:
        raise EnvelopeError("envelope has no task_id")
    if task_id is None:
        raise EnvelopeError(f"task_id must be a UUID string, got {_short(raw_task_id)}")
    if not isinstance(raw_cid, str):
        raise EnvelopeError("conversation_id must be a string" if "conversation_id" in data
                            else "envelope has no conversation_id")
    if not raw_cid:
        raise EnvelopeError("conversation_id must not be empty")
    if not is_topic_safe(raw_cid):
        raise EnvelopeError("conversation_id must not contain '/', '+', '#' or NUL")
    if not _usable_conversation_id(raw_cid):
        raise EnvelopeError("conversation_id is too long for an MQTT topic")
    topic, instruction = _topic_and_instruction(data, "")
    if "input" not in data:
        raise EnvelopeError("envelope has no input (use null for none)")
    nxt, depth = _parse_next_chain(data.get("next"))
    version, context, trace = _v2_fields(data)
    try:
        budget, usage = parse_budget(data.get("budget")), parse_usage(data.get("usage"))
    except UsageError as exc:
        raise EnvelopeError(str(exc)) from None
    return TaskEnvelope(task_id, raw_cid, topic, instruction, data["input"], nxt, depth, version, context, trace,
                        data.get("traceparent"), data.get("tracestate"), _expiry(data.get("expires_at")), budget,
                        usage)


def _expiry(value: Any) -> Optional[float]:
    """`expires_at` as Unix time: RFC 3339 with a zone (`Z` or an offset); absent or null is none."""
    if value is None:
        return None
    moment = parse_rfc3339(value)
    if moment is not None:
        return moment
    raise EnvelopeError(f"expires_at must be an RFC 3339 date and time with a zone (e.g. 2026-12-07T10:00:00Z), "
                        f"got {_short(value)}")


def _usable_conversation_id(value: Any) -> bool:
    return (isinstance(value, str) and is_topic_safe(value) and _encodable(value)
            and len(conversation_topic(value, "x" * 64).encode("utf-8")) <= MAX_TOPIC_BYTES)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def task_key(agent_id: str, envelope: TaskEnvelope) -> str:
    """The idempotency key: agent, task and a digest of the canonical envelope. A redelivery has
    the same key; a pipeline that revisits this agent (same task id, other `next`, instruction
    or input) does not."""
    canonical = _CANONICAL.encode([envelope.conversation_id, canonicalize_topic(envelope.topic), envelope.instruction,
                                   envelope.input, next_task_to_dict(envelope.next), envelope.version,
                                   envelope.context, envelope.routing_trace])
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]
    return f"{agent_id}/{envelope.task_id}/{digest}"


def _topic_and_instruction(obj: dict, where: str) -> tuple[str, Optional[str]]:
    topic = obj.get("topic")
    if not isinstance(topic, str):
        raise EnvelopeError(f"{where}topic must be a string" if "topic" in obj else f"{where}topic is missing")
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise EnvelopeError(f"{where}instruction must be a string or null")
    return topic, instruction


def _parse_next_chain(raw: Any) -> tuple[Optional[NextTask], int]:
    """Iterative, so a long chain cannot exhaust the stack. Capped, so the answer does not
    depend on how deep the interpreter's JSON parser goes (3.13 parses deeper than 3.11)."""
    levels: list[dict] = []
    where = "next."
    while raw is not None:
        if len(levels) >= MAX_NEXT_LEVELS:
            raise EnvelopeError(f"next is nested too deeply (more than {MAX_NEXT_LEVELS} levels)")
        if not isinstance(raw, dict):
            raise EnvelopeError(f"{where[:-1]} must be an object or null")
        levels.append(raw)
        raw = raw.get("next")
        where += "next."
    built: Optional[NextTask] = None
    for index in range(len(levels) - 1, -1, -1):
        topic, instruction = _topic_and_instruction(levels[index], "next." * (index + 1))
        built = NextTask(topic, instruction, levels[index].get("input"), built)
    return built, 1 + len(levels)


def _v2_fields(data: dict) -> tuple[Optional[str], Optional[dict], Optional[list]]:
    """v2 only when `version` is a string and context/routing_trace are well formed (else v1)."""
    version = data.get("version")
    if not isinstance(version, str):
        return None, None, None
    context = data.get("context")
    trace = data.get("routing_trace")
    if context is not None and not _valid_context(context):
        return None, None, None
    if trace is not None and not (isinstance(trace, list) and all(_valid_routing_step(s) for s in trace)):
        return None, None, None
    return version, context, trace


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_context(context: Any) -> bool:
    if not isinstance(context, dict) or not isinstance(context.get("original_query"), str):
        return False
    steps = context.get("steps_completed")
    if not isinstance(steps, list):
        return False
    for step in steps:
        if not isinstance(step, dict) or not all(isinstance(step.get(k), str)
                                                 for k in ("agent_id", "action", "timestamp")):
            return False
    return "iteration_count" not in context or _is_count(context["iteration_count"])


def _valid_routing_step(step: Any) -> bool:
    return (isinstance(step, dict)
            and all(isinstance(step.get(k), str) for k in ("from_agent", "to_agent", "reason", "timestamp"))
            and _is_count(step.get("step_number")))


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def forward_envelope(envelope: TaskEnvelope, final_text: str, self_id: str,
                     now: Optional[datetime] = None) -> tuple[str, dict]:
    """The envelope for the next agent and the topic to publish it on (docs/protocol.md, How a task
    is processed)."""
    nxt = envelope.next
    if nxt is None:
        raise ValueError("envelope has no next step")
    target = next_agent_id(nxt.topic)
    out: dict = {
        "task_id": envelope.task_id,
        "conversation_id": envelope.conversation_id,
        "topic": nxt.topic,
        "instruction": nxt.instruction,
        "input": nxt.input if nxt.input is not None else final_text,
        "next": next_task_to_dict(nxt.next),
    }
    if envelope.expires_at is not None:  # the same moment: what is left travels with the task
        out["expires_at"] = utc_millis(envelope.expires_at)
    if envelope.version is not None:
        trace = list(envelope.routing_trace or [])
        trace.append({"from_agent": self_id, "to_agent": target, "reason": "static pipeline",
                      "timestamp": rfc3339(now), "step_number": len(trace) + 1})
        out["version"] = envelope.version
        if envelope.context is not None:
            out["context"] = envelope.context
        out["routing_trace"] = trace
    return input_topic(target), out


def next_task_to_dict(nxt: Optional[NextTask]) -> Optional[dict]:
    chain: list[NextTask] = []
    while nxt is not None:
        chain.append(nxt)
        nxt = nxt.next
    built: Optional[dict] = None
    for item in reversed(chain):
        built = {"topic": item.topic, "instruction": item.instruction, "input": item.input, "next": built}
    return built


# ---------------------------------------------------------------- builders

def rfc3339(now: Optional[datetime] = None) -> str:
    """RFC 3339 UTC with millisecond precision and a `Z` suffix, as every timestamp on the wire."""
    if now is None:  # the common case, on every progress event: without datetime objects
        return utc_millis(time.time())
    now = now.astimezone(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


_formatted_second: tuple[int, str] = (-1, "")


def utc_millis(stamp: float) -> str:
    """`rfc3339` of a Unix time. Every progress event and log line needs one: the date and time
    of day are formatted once per second."""
    global _formatted_second
    second = int(stamp)
    formatted = _formatted_second
    if formatted[0] != second:
        formatted = _formatted_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{formatted[1]}.{int(stamp * 1000) % 1000:03d}Z"


# json.dumps with any option builds an encoder per call: these are made once (they keep no state between calls)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True)
_json_string = json.encoder.encode_basestring  # a JSON string literal, non-ASCII characters as they are


def compact_json(value: Any) -> str:
    """Compact JSON text, non-ASCII characters as they are."""
    return _COMPACT.encode(value)


def to_payload(message: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON."""
    return utf8(_COMPACT.encode(message))


def utf8(text: str) -> bytes:
    """Unpaired surrogates (an LLM or tool can produce them) become U+FFFD, since they cannot be
    encoded and other implementations reject them even escaped."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def status_message(agent_id: str, status: str, *, capabilities: Sequence[str] = (), description: str = "",
                   load: float = 0.0, health: str = HEALTH_OK, version: str = "", heartbeat_interval: int = 0,
                   instance_id: Optional[str] = None, instances_hint: Optional[int] = None,
                   incarnation: Optional[str] = None, now: Optional[datetime] = None) -> dict:
    """The retained status: the reference's fields plus what its registry reads (`health`,
    `load`, `last_updated`). An unavailable agent says `health: "unavailable"` and `load: 1`
    too, since the reference's registry reads only those. Pool members add `instance_id` and
    `instances_hint` (members seen alive). `incarnation` names the process, so a second process
    started with the same id sees that the status is not its own."""
    stamp = rfc3339(now)
    msg: dict = {"agent_id": agent_id, "status": status, "timestamp": stamp}
    if capabilities:
        msg["capabilities"] = list(capabilities)
    if description:
        msg["description"] = description
    if status != AVAILABLE:
        health, load = UNAVAILABLE, 1.0
    msg.update({"health": health, "load": round(min(max(load, 0.0), 1.0), 3), "last_updated": stamp})
    if version:
        msg["version"] = version
    if heartbeat_interval:
        msg["heartbeat_interval"] = heartbeat_interval
    if instance_id is not None:
        msg["instance_id"] = instance_id
    if instances_hint is not None:
        msg["instances_hint"] = instances_hint
    if incarnation is not None:
        msg["incarnation"] = incarnation
    return msg


def response_message(response: str, task_id: str) -> dict:
    return {"response": response, "task_id": task_id}


def error_message(code: str, message: str, task_id: str, secrets: Iterable[str] = ()) -> dict:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return {"error": {"code": code, "message": sanitize_error_message(message, secrets)}, "task_id": task_id}


def dead_letter_message(agent_id: str, task_id: str, topic: str, reason_code: int, reason: str,
                        outcome: Optional[dict], outcome_bytes: int, now: Optional[datetime] = None) -> dict:
    """What a refused outcome leaves on the dead-letter topic: the outcome as it was (None when
    its size was the reason), its size, where it was going, and the broker's reason."""
    return {"agent_id": agent_id, "task_id": task_id, "topic": topic, "reason_code": reason_code,
            "reason": reason, "timestamp": rfc3339(now), "outcome": outcome, "outcome_bytes": outcome_bytes}


def progress_payload(agent_id: str, task_id: str, conversation_id: str, category: str, event_type: str,
                     message: str, metadata: Optional[dict] = None, now: Optional[datetime] = None) -> bytes:
    """A progress event, as published. Written as text, not through a dict: one goes out for every
    step of every task, and encoding the dict costs three times as much."""
    if category not in _PROGRESS_SUFFIX or event_type not in PROGRESS_EVENT_TYPES:
        raise ValueError(f"unknown progress category/event {category!r}/{event_type!r}")
    return utf8(f'{{"agent_id":{_json_string(agent_id)},"task_id":{_json_string(task_id)},'
                f'"conversation_id":{_json_string(conversation_id)},"timestamp":"{rfc3339(now)}",'
                f'"category":"{category}","event_type":"{event_type}","message":{_json_string(message)},'
                f'"metadata":{"null" if metadata is None else _COMPACT.encode(metadata)}}}')
