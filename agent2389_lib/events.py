"""What the steps of a task report, as events (huey's signals are the model): the processor, the
agent loop, the router and the LLM and tool clients emit; the subscribers (the metrics, the
progress publisher) hear every event. Each kind of event says itself what it counts for and
which progress event it is, so a new kind is one class here. Events are plain dataclasses, not
frozen ones, which take three times as long to make (six are made for every task)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from .outcome import TaskResult

if TYPE_CHECKING:
    from .metrics import Metrics

# a progress event (docs/protocol.md, Progress): task, conversation, category, type, message, metadata
Progress = tuple[str, str, str, str, str, Optional[dict]]


class Event:
    def record(self, metrics: Metrics) -> None:
        """What it counts for in the metrics."""

    def progress(self) -> Optional[Progress]:
        """The progress event it is, if any."""
        return None


@dataclass
class TaskReceived(Event):
    def record(self, metrics: Metrics) -> None:
        metrics.task_received()


@dataclass
class TaskDropped(Event):
    """A message handled without processing it (retained, invalid, a duplicate)."""

    result: TaskResult

    def record(self, metrics: Metrics) -> None:
        metrics.task_dropped(self.result)


@dataclass
class TaskRejected(Event):
    """An invalid envelope whose conversation is known: it is answered invalid_input."""

    task_id: str
    conversation_id: str

    def progress(self) -> Optional[Progress]:
        return self.task_id, self.conversation_id, "General", "ValidationError", "the task envelope is invalid", None


@dataclass
class TaskStarted(Event):
    task_id: str
    conversation_id: str

    def record(self, metrics: Metrics) -> None:
        metrics.task_started()

    def progress(self) -> Optional[Progress]:
        return self.task_id, self.conversation_id, "General", "TaskStart", "task accepted", None


@dataclass
class TaskFinished(Event):
    """`description` says how ("response", "error llm_error", ...); None when the task ended in a
    way no progress event tells (an internal error already answered, a shutdown)."""

    task_id: str
    conversation_id: str
    result: TaskResult
    seconds: float
    description: Optional[str] = None
    code: Optional[str] = None  # the error's, if the task ended with one
    cancel_seconds: Optional[float] = None  # from the cancel's arrival to the end, for a cancelled task
    usage: Optional[dict] = None  # what this agent spent on the task's LLM requests (PROTOCOL.md 8)

    def record(self, metrics: Metrics) -> None:
        metrics.task_finished(self.result, self.seconds, self.cancel_seconds, self.code == "budget_exceeded")

    def progress(self) -> Optional[Progress]:
        if self.description is None:
            return None
        message = f"task finished: {self.description}"
        own = {"usage": self.usage} if self.usage is not None else None
        if self.result is TaskResult.CANCELED:  # an extension type, as the Rust agents' routing events are
            return (self.task_id, self.conversation_id, "General", "Custom", message,
                    {"kind": "task_canceled", **(own or {})})
        return (self.task_id, self.conversation_id, "General", "TaskError" if self.code else "TaskComplete",
                message, own)


@dataclass
class ApprovalRequired(Event):
    """A task parked: a call of `tool` waits for a person (PROTOCOL.md 9)."""

    task_id: str
    conversation_id: str
    approval_id: str
    tool: str

    def progress(self) -> Optional[Progress]:
        return (self.task_id, self.conversation_id, "General", "ApprovalRequired",
                f"{self.tool} waits for approval {self.approval_id}", {"approval_id": self.approval_id,
                                                                       "tool_name": self.tool})


@dataclass
class ApprovalDecided(Event):
    """An approval ended: approved, denied, timeout or canceled, `seconds` after it was asked for."""

    approval_id: str
    outcome: str
    seconds: float

    def record(self, metrics: Metrics) -> None:
        metrics.approval_decided(self.outcome, self.seconds)


@dataclass
class CancelReceived(Event):
    """A cancel, and where it found its task (inflight.py): running, forwarded, finished or not_seen."""

    task_id: str
    conversation_id: str  # "" when the cancel did not say
    found: str
    next_agent: Optional[str]

    def progress(self) -> Optional[Progress]:
        metadata: dict = {"kind": "cancel_received", "found": self.found}
        if self.next_agent:
            metadata["next_agent"] = self.next_agent
        return (self.task_id, self.conversation_id, "General", "Custom", f"cancel received: task {self.found}",
                metadata)


@dataclass
class OutcomeRefused(Event):
    """The broker refused a task's outcome for good."""

    def record(self, metrics: Metrics) -> None:
        metrics.outcome_undeliverable()


@dataclass
class LlmRequested(Event):
    task_id: str
    conversation_id: str
    iteration: int

    def progress(self) -> Optional[Progress]:
        return self.task_id, self.conversation_id, "LLM", "LlmRequest", f"LLM request {self.iteration}", None


@dataclass
class LlmAnswered(Event):
    task_id: str
    conversation_id: str
    iteration: int
    tool_calls: int
    finish_reason: str

    def progress(self) -> Optional[Progress]:
        return (self.task_id, self.conversation_id, "LLM", "LlmResponse",
                f"LLM response {self.iteration}: {self.tool_calls} tool calls, finish {self.finish_reason}", None)


@dataclass
class LlmFailed(Event):
    task_id: str
    conversation_id: str
    iteration: int

    def progress(self) -> Optional[Progress]:
        return self.task_id, self.conversation_id, "LLM", "LlmError", f"LLM request {self.iteration} failed", None


@dataclass
class LlmCalled(Event):
    """One provider request with its retries, as the provider's counters see it."""

    provider: str
    seconds: float
    retries: int
    error_kind: Optional[str] = None
    tokens_in: int = 0
    tokens_out: int = 0
    model: str = ""
    cost_usd: float = 0.0  # by the price table ([llm.prices])

    def record(self, metrics: Metrics) -> None:
        metrics.llm_request(self.provider, seconds=self.seconds, retries=self.retries, error_kind=self.error_kind,
                            tokens_in=self.tokens_in, tokens_out=self.tokens_out, model=self.model,
                            cost_usd=self.cost_usd)


@dataclass
class ToolCalled(Event):
    task_id: str
    conversation_id: str
    tool: str

    def progress(self) -> Optional[Progress]:
        return self.task_id, self.conversation_id, "Tool", "ToolCall", f"calling {self.tool}", {"tool_name": self.tool}


@dataclass
class ToolReturned(Event):
    task_id: str
    conversation_id: str
    tool: str
    ok: bool

    def progress(self) -> Optional[Progress]:
        return (self.task_id, self.conversation_id, "Tool", "ToolComplete" if self.ok else "ToolError",
                f"{self.tool} {'completed' if self.ok else 'failed'}", {"tool_name": self.tool})


@dataclass
class ToolExecuted(Event):
    """One execution as the tool registry measured it."""

    tool: str
    ok: bool
    timed_out: bool
    seconds: float

    def record(self, metrics: Metrics) -> None:
        metrics.tool_execution(self.tool, self.ok, self.timed_out, self.seconds)


@dataclass
class Routed(Event):
    """A v2 hop forwarded to the agent the router chose."""

    task_id: str
    conversation_id: str
    target: str
    reasoning: str
    iteration: int

    def record(self, metrics: Metrics) -> None:
        metrics.routing_decision("forward")

    def progress(self) -> Optional[Progress]:
        return (self.task_id, self.conversation_id, "General", "Custom", f"routing to {self.target}",
                {"kind": "routing", "next_agent": self.target, "reasoning": self.reasoning,
                 "iteration": self.iteration})


@dataclass
class WorkflowEnded(Event):
    """How a routed workflow ended: router, max_iterations or router_error."""

    reason: str

    def record(self, metrics: Metrics) -> None:
        metrics.routing_decision(self.reason)


class Events:
    """The subscribers, called in the order they subscribed, on the emitting thread."""

    def __init__(self, *subscribers: Callable[[Event], None]) -> None:
        self._subscribers = list(subscribers)

    def subscribe(self, subscriber: Callable[[Event], None]) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in self._subscribers:
            subscriber(event)


def counted_in(metrics: Metrics) -> Callable[[Event], None]:
    """The metrics' subscription."""
    return lambda event: event.record(metrics)
