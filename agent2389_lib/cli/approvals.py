"""`agent2389 approvals`: what waits for a person, read from the agents' retained requests
(PROTOCOL.md 9), and deciding it."""

from __future__ import annotations

import json
from typing import Optional

from .. import protocol
from ..approvals import approval_topic, content_problem, decision_message, decision_topic
from .ops import json_or_text
from .opsclient import OperatorClient, OperatorError

_PROBE_WAIT = 10.0


class NotWaiting(OperatorError):
    """No approval with that id waits (decided already, expired, or never asked)."""


def pending(client: OperatorClient, agent_id: Optional[str]) -> list[dict]:
    """Every retained approval request (of `agent_id`, or of every agent), each with the
    `agent_id` its topic names. A probe published after subscribing comes back after the
    retained messages, so the list is complete when it does."""
    probe = protocol.probe_topic(agent_id or "approvals", client.client_id)
    client.subscribe([approval_topic(agent_id or "+"), probe])
    client.publish(probe, b"{}")
    requests: list[dict] = []
    while True:
        message = client.next_message(_PROBE_WAIT)
        if message is None:
            raise OperatorError(f"broker {client.where} did not return the probe on {probe} within {_PROBE_WAIT:g} s")
        if message.topic == probe:
            return sorted(requests, key=lambda request: str(request.get("requested_at")))
        request = json_or_text(message.payload)
        if isinstance(request, dict) and isinstance(request.get("approval_id"), str):
            requests.append({**request, "agent_id": message.topic.split("/")[3]})


def describe(request: dict) -> str:
    """One approval, as `approvals list` prints it."""
    what = (f"{request.get('tool')} {json.dumps(request.get('arguments'), ensure_ascii=False)}"
            if request.get("kind") == "tool" else f"{request.get('tool')} asks: {request.get('message')}")
    return (f"{request['approval_id']}  agent {request['agent_id']}  task {request.get('task_id')}  until "
            f"{request.get('expires_at')}\n    {request.get('kind')}: {what}")


def decide(client: OperatorClient, approval_id: str, agent_id: Optional[str], approve: bool, by: str, reason: str,
           content: Optional[dict]) -> dict:
    """Publish a decision for a waiting approval; returns its request. OperatorError when none
    is waiting, ValueError when `content` does not match the schema an elicitation asked with."""
    request = next((r for r in pending(client, agent_id) if r["approval_id"] == approval_id), None)
    if request is None:
        raise NotWaiting(f"no approval {approval_id} is waiting{f' at {agent_id}' if agent_id else ''} (see "
                            f"`agent2389 approvals list`)")
    schema = request.get("schema")
    if approve and isinstance(schema, dict):
        problem = content_problem(content or {}, schema)
        if problem:
            raise ValueError(f"--content does not match the schema the MCP server asked with: {problem}")
    client.publish(decision_topic(request["agent_id"], approval_id),
                   protocol.to_payload(decision_message(approve, by, reason, content)))
    return request
