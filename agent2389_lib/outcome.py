"""What a task produced, typed: its kind, where it goes and the message. The processor and the
router return one; metrics, logs, progress and trace propagation read the kind instead of
guessing it again from the message's keys."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


class Kind(enum.Enum):
    ANSWER = "response"  # {"response", "task_id"} to the conversation
    FORWARD = "forward"  # an envelope for the next agent (a static pipeline's or a routed one)
    WORKFLOW_END = "workflow end"  # a routed workflow's final answer: a response with `workflow`
    ERROR = "error"  # {"error": {"code", "message"}, "task_id"} to the conversation


class TaskResult(enum.Enum):
    """How a task message counts in the metrics."""

    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"  # bad input: the sender's fault
    CANCELED = "canceled"  # stopped by a cancel (PROTOCOL.md 7)
    PARKED = "parked"  # waiting for a person's approval (PROTOCOL.md 9): the store owns it
    DUPLICATE = "duplicate"
    IGNORED = "ignored"  # retained, so never a task


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    topic: str
    message: dict

    @property
    def error_code(self) -> Optional[str]:
        return self.message["error"]["code"] if self.kind is Kind.ERROR else None

    def with_message(self, message: dict) -> Outcome:
        return Outcome(self.kind, self.topic, message)  # dataclasses.replace takes four times as long

    def describe(self) -> str:
        """For the log line and the progress event that end a task."""
        return f"error {self.error_code}" if self.kind is Kind.ERROR else self.kind.value
