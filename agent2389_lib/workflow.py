"""v2 dynamic routing on the wire (docs/protocol.md, Protocol v2): where a routed workflow stands, the envelope
of its next hop, and its final answer. Pure functions over protocol envelopes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from .answers import parse_json_or_none
from .protocol import (MAX_ACTION_CHARS, MAX_WORKFLOW_ENTRIES, TaskEnvelope, compact_json, input_topic,
                       response_message, rfc3339)


def is_routable(envelope: TaskEnvelope) -> bool:
    """Dynamic routing applies to a v2 envelope (a `version` that is not 1.x) without a static `next`."""
    version = envelope.version
    return version is not None and version != "1" and not version.startswith("1.") and envelope.next is None


@dataclass(frozen=True)
class Workflow:
    """Where a routed workflow stands when a hop receives it."""

    original_query: str
    steps: list
    trace: list
    iteration_count: int  # hops before this one


def workflow_of(envelope: TaskEnvelope) -> Workflow:
    context = envelope.context or {}
    query = context.get("original_query")
    if query is None:  # the first hop: the request is its instruction (or input)
        query = envelope.instruction or _as_text(envelope.input)
    return Workflow(query, list(context.get("steps_completed") or []), list(envelope.routing_trace or []),
                    int(context.get("iteration_count") or 0))


def _as_text(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    return compact_json(value)


def _newest(entries: list) -> list:
    return entries[-MAX_WORKFLOW_ENTRIES:]


def _with_this_step(envelope: TaskEnvelope, flow: Workflow, self_id: str, stamp: str) -> list:
    action = (envelope.instruction or "")[:MAX_ACTION_CHARS]
    return _newest(flow.steps + [{"agent_id": self_id, "action": action, "timestamp": stamp}])


def routed_envelope(envelope: TaskEnvelope, output: str, self_id: str, next_agent: str, instruction: Optional[str],
                    reason: str, now: Optional[datetime] = None) -> tuple[str, dict]:
    """The next hop of a routed workflow and the topic to publish it on. Its `task_id` is new,
    so an agent the workflow visits again does not take it for a duplicate."""
    flow = workflow_of(envelope)
    stamp = rfc3339(now)
    step = {"from_agent": self_id, "to_agent": next_agent, "reason": reason, "timestamp": stamp,
            "step_number": len(flow.trace) + 1}
    parsed = parse_json_or_none(output)
    topic = input_topic(next_agent)
    return topic, {
        "task_id": str(uuid.uuid4()), "conversation_id": envelope.conversation_id, "topic": topic,
        "instruction": instruction, "input": parsed if isinstance(parsed, (dict, list)) else output, "next": None,
        "version": "2.0",
        "context": {"original_query": flow.original_query,
                    "steps_completed": _with_this_step(envelope, flow, self_id, stamp),
                    "iteration_count": flow.iteration_count + 1},
        "routing_trace": _newest(flow.trace + [step]),
    }


def workflow_response(envelope: TaskEnvelope, response: str, self_id: str, reason: str,
                      now: Optional[datetime] = None) -> dict:
    """The final answer of a routed workflow: a response plus the additive `workflow` field."""
    flow = workflow_of(envelope)
    message = response_message(response, envelope.task_id)
    message["workflow"] = {"complete": True, "reason": reason, "iterations": flow.iteration_count + 1,
                           "routing_trace": flow.trace,
                           "steps_completed": _with_this_step(envelope, flow, self_id, rfc3339(now))}
    return message
