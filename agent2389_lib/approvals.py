"""Approvals on the wire (PROTOCOL.md 9): the retained request an agent publishes when a tool call
(or an MCP server's elicitation) waits for a person, and the decision a person publishes."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .redaction import REDACTED, redact

APPROVAL_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_DECISION_BYTES = 65536  # a decision is a few words, or an elicitation's answer
_MAX_BY, _MAX_REASON = 200, 500
TOOL, ELICITATION = "tool", "elicitation"
_CREDENTIAL_KEY = re.compile(r"(?i)password|passwd|token|secret|api[_-]?key|authorization")


class DecisionError(ValueError):
    """A decision that cannot be read; the message says why."""


@dataclass
class Decision:
    approve: bool
    by: str
    reason: str
    content: Optional[dict] = None  # an elicitation's answer


def new_approval_id() -> str:
    return uuid.uuid4().hex


def approval_topic(agent_id: str, approval_id: str = "+") -> str:
    """A request (retained); `+`: every one of the agent's (a filter)."""
    return f"/control/agents/{agent_id}/approvals/{approval_id}"


def decision_topic(agent_id: str, approval_id: str = "+") -> str:
    return f"/control/agents/{agent_id}/approvals/{approval_id}/decision"


def approval_id_of(topic: str) -> Optional[str]:
    """The approval id a decision's topic names, if it is one."""
    parts = topic.rstrip("/").split("/")
    if len(parts) < 3 or parts[-1] != "decision" or parts[-3] != "approvals":
        return None
    return parts[-2] if APPROVAL_ID_RE.match(parts[-2]) else None


def parse_decision(payload: bytes) -> Decision:
    """`{"decision": "approve" | "deny", "by": str, "reason": str, "content": object}`."""
    if len(payload) > MAX_DECISION_BYTES:
        raise DecisionError(f"a decision of {len(payload)} bytes is over {MAX_DECISION_BYTES}")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DecisionError("not JSON") from None
    if not isinstance(data, dict):
        raise DecisionError("a decision must be a JSON object")
    verdict = data.get("decision")
    if verdict not in ("approve", "deny"):
        raise DecisionError('decision must be "approve" or "deny"')
    by, reason, content = data.get("by", ""), data.get("reason", ""), data.get("content")
    if not isinstance(by, str) or len(by) > _MAX_BY:
        raise DecisionError(f"by must be a string of at most {_MAX_BY} characters")
    if not isinstance(reason, str) or len(reason) > _MAX_REASON:
        raise DecisionError(f"reason must be a string of at most {_MAX_REASON} characters")
    if content is not None and not isinstance(content, dict):
        raise DecisionError("content must be a JSON object")
    return Decision(verdict == "approve", by or "someone", reason, content)


def content_problem(content: dict, schema: dict) -> Optional[str]:
    """What is wrong with an elicitation's answer for the schema the MCP server asked with, or None."""
    from jsonschema import FormatChecker, validators
    from jsonschema.exceptions import SchemaError
    try:
        validator = validators.validator_for(schema)(schema, format_checker=FormatChecker())
        error = next(iter(validator.iter_errors(content)), None)
    except SchemaError as exc:
        return f"the server's schema is invalid: {exc.message[:200]}"
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path)
    return f"{where + ': ' if where else ''}{error.message[:200]}"


def decision_message(approve: bool, by: str, reason: str = "", content: Optional[dict] = None) -> dict:
    """What a person publishes (the CLI's `approvals approve` and `deny`)."""
    message: dict = {"decision": "approve" if approve else "deny", "by": by, "reason": reason}
    if content is not None:
        message["content"] = content
    return message


def masked(value: Any, secrets: tuple = ()) -> Any:
    """`value` with configured secrets, URL passwords and credential-looking fields masked."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [masked(item, secrets) for item in value]
    if isinstance(value, dict):
        return {key: REDACTED if _CREDENTIAL_KEY.search(str(key)) else masked(item, secrets)
                for key, item in value.items()}
    return value


def request_message(approval_id: str, task_id: str, conversation_id: str, kind: str, tool: str, arguments: Any,
                    requested_at: str, expires_at: str, secrets: tuple = (), message: Optional[str] = None,
                    schema: Optional[dict] = None) -> dict:
    """What the retained request says; the arguments with secrets masked as the logs mask them."""
    request: dict = {"approval_id": approval_id, "task_id": task_id, "conversation_id": conversation_id,
                     "kind": kind, "tool": tool, "arguments": masked(arguments, secrets), "requested_at": requested_at,
                     "expires_at": expires_at}
    if message is not None:
        request["message"] = message
    if schema is not None:
        request["schema"] = schema
    return request
