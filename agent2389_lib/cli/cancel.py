"""`agent2389 cancel`: publish a cancel (PROTOCOL.md 7) and, with `--wait`, follow it: each agent
that receives it says where it found the task (a progress event), and the agent that stopped
the task answers its conversation with the `canceled` error."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import protocol
from ..cancels import Cancel, cancel_message
from .ops import EXIT_ERROR, EXIT_RESPONSE, EXIT_TIMEOUT, PROGRESS_TOPIC, json_or_text, message_type
from .opsclient import OperatorClient


@dataclass
class Followed:
    """What `--wait` saw: where each agent found the task, and how the task ended."""

    findings: list = field(default_factory=list)  # {"agent_id", "found", "next_agent"}
    outcome: Optional[dict] = None  # {"topic", "payload"}: the task's answer or error
    finished_before: Optional[str] = None  # the agent where the task had already finished

    def code(self) -> int:
        if self.outcome is not None:
            error = self.outcome["payload"].get("error")
            return EXIT_RESPONSE if isinstance(error, dict) and error.get("code") == protocol.CANCELED else EXIT_ERROR
        return EXIT_ERROR if self.finished_before else EXIT_TIMEOUT


def send_cancel(client: OperatorClient, agent_id: str, cancel: Cancel, wait: Optional[float],
                show: Callable[[str], None] = lambda line: None) -> Followed:
    """Publish `cancel` to `agent_id`; with `wait`, follow it until the task's end is seen."""
    topic = protocol.cancel_topic(agent_id)
    if wait is not None:
        client.subscribe([PROGRESS_TOPIC, protocol.conversation_topic(cancel.conversation_id or "+", "+")])
    client.publish(topic, protocol.to_payload(cancel_message(cancel)))
    followed = Followed()
    if wait is None:
        return followed
    show(f"published the cancel of task {cancel.task_id} to {topic} on {client.where}; following it for up to "
         f"{wait:g} s")
    deadline = time.monotonic() + wait
    while followed.outcome is None and followed.finished_before is None:
        left = deadline - time.monotonic()
        message = client.next_message(left) if left > 0 else None
        if message is None:
            break
        _read(message.topic, json_or_text(message.payload), cancel.task_id, followed, show)
    return followed


def _read(topic: str, payload: Any, task_id: str, followed: Followed, show: Callable[[str], None]) -> None:
    if not isinstance(payload, dict) or payload.get("task_id") != task_id:
        return
    kind = message_type(topic, payload)
    if kind in ("response", "error"):
        followed.outcome = {"topic": topic, "payload": payload}
        return
    metadata = payload.get("metadata")
    if kind != "progress" or not isinstance(metadata, dict) or metadata.get("kind") != "cancel_received":
        return
    finding = {"agent_id": payload.get("agent_id"), "found": metadata.get("found"),
               "next_agent": metadata.get("next_agent")}
    followed.findings.append(finding)
    show(f"  [{finding['agent_id']}] {_FOUND.get(str(finding['found']), finding['found'])}"
         + (f" {finding['next_agent']}; the cancel follows it" if finding["next_agent"] else ""))
    if finding["found"] == "finished":
        followed.finished_before = str(finding["agent_id"])


_FOUND = {"running": "the task was running here: stopping it", "forwarded": "the task was forwarded to",
          "waiting_approval": "the task was waiting for an approval here: stopping it",
          "finished": "the task had already finished here: nothing to stop",
          "not_seen": "the task has not been seen here: the cancel is kept in case it arrives"}


def describe(followed: Followed, cancel: Cancel, wait: Optional[float]) -> str:
    if wait is None:
        return f"published the cancel of task {cancel.task_id}"
    if followed.outcome is not None:
        payload, where = followed.outcome["payload"], followed.outcome["topic"].rsplit("/", 1)[-1]
        error = payload.get("error") if isinstance(payload.get("error"), dict) else None
        if error is not None and error.get("code") == protocol.CANCELED:
            return f"task {cancel.task_id} canceled by {where}: {error.get('message')}"
        ended = f"error {error.get('code')}" if error is not None else "an answer"
        return f"task {cancel.task_id} ended with {ended} from {where} before the cancel reached it"
    if followed.finished_before:
        return f"task {cancel.task_id} had already finished at {followed.finished_before}: nothing was canceled"
    return (f"no agent reported the end of task {cancel.task_id} within {wait:g} s (agents that have not seen it keep "
            f"the cancel for their task_timeout)")
