"""The agent loop (docs/architecture.md, One task, end to end): messages, tool calls, budget, failover
between providers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Protocol

from .. import tracing
from ..config import BudgetSettings
from ..errors import LlmError
from ..events import Events, LlmAnswered, LlmFailed, LlmRequested, ToolCalled, ToolReturned
from ..protocol import TaskEnvelope, compact_json, rfc3339, utc_millis
from .base import ChatReply, Message, Provider, ToolCall

log = logging.getLogger("agent2389.llm")

BUDGET_SPENT = ("The tool budget for this task is spent. Give your best final answer now, "
                "using what you already have.")


class ToolBox(Protocol):
    def definitions(self) -> list: ...

    def approval_timeout(self, name: str) -> Optional[int]:
        """Seconds a person has to approve a call of `name`; None when it needs no approval."""

    def execute(self, name: str, arguments: object, deadline: float) -> tuple[bool, str]:
        """(ok, content): content goes back to the model as the tool result."""


@dataclass
class LoopState:
    """Where a task's tool-calling loop stands; what a parked task keeps in the store, as JSON."""

    messages: list
    iteration: int = 0  # LLM requests made
    tool_calls: int = 0  # tools run
    pending: list = field(default_factory=list)  # the last reply's calls not answered yet

    def to_json(self) -> dict:
        return {"messages": [_message_json(m) for m in self.messages], "iteration": self.iteration,
                "tool_calls": self.tool_calls, "pending": [_call_json(c) for c in self.pending]}

    @classmethod
    def from_json(cls, data: dict) -> LoopState:
        messages = [Message(m["role"], m["content"], [ToolCall(**c) for c in m["tool_calls"]], m["tool_call_id"],
                            m["tool_name"], m["is_error"]) for m in data["messages"]]
        return cls(messages, data["iteration"], data["tool_calls"], [ToolCall(**c) for c in data["pending"]])


def _call_json(call: ToolCall) -> dict:
    return {"id": call.id, "name": call.name, "arguments": call.arguments}


def _message_json(message: Message) -> dict:
    return {"role": message.role, "content": message.content, "tool_calls": [_call_json(c) for c in message.tool_calls],
            "tool_call_id": message.tool_call_id, "tool_name": message.tool_name, "is_error": message.is_error}


class ApprovalNeeded(Exception):
    """A tool call waits for a person (PROTOCOL.md 9): the loop stops, `state` says where."""

    def __init__(self, state: LoopState, call: ToolCall, timeout: int):
        super().__init__(f"{call.name} needs approval")
        self.state, self.call, self.timeout = state, call, timeout


def initial_messages(envelope: TaskEnvelope) -> list[Message]:
    messages = []
    if envelope.instruction is not None:
        messages.append(Message("user", envelope.instruction))
    if envelope.input is not None:
        messages.append(Message("user", "Input data: " + compact_json(envelope.input)))
    return messages or [Message("user", "(no instruction or input was given)")]


class ProviderChain:
    """Providers tried in order; the next one is asked only when the previous failed after retries."""

    def __init__(self, providers: list[Provider]):
        self.providers = providers
        self._said: tuple = ()  # the cooldowns a failover was said for, the latest few

    def verify(self) -> None:
        self.providers[0].verify()

    def chat(self, system: str, messages: list, tools: list, deadline: float) -> ChatReply:
        failure: Optional[LlmError] = None
        for index, provider in enumerate(self.providers):
            cooldown = provider.cooling() if index + 1 < len(self.providers) else None
            if cooldown is not None:
                if cooldown not in self._said:  # once per cooldown, not per request
                    self._said = (*self._said[-7:], cooldown)
                    log.info("provider %s is cooling down until %s (HTTP %d at %s); failing over to %s at once",
                             provider.name, utc_millis(cooldown.until), cooldown.status, cooldown.agent_id,
                             self.providers[index + 1].name)
                continue
            try:
                reply = provider.chat(system, messages, tools, deadline)
            except LlmError as exc:
                failure = exc
                if index + 1 < len(self.providers):
                    log.warning("provider %s failed (%s); failing over to %s", provider.name, exc,
                                self.providers[index + 1].name)
                continue
            if failure is not None:
                log.info("provider %s answered after failover", provider.name)
            return reply
        assert failure is not None
        raise failure


class AgentLoop:
    def __init__(self, chain: ProviderChain, tools: Optional[ToolBox], budget: BudgetSettings, system_prompt: str,
                 events: Events):
        self.chain = chain
        self.tools = tools
        self.budget = budget
        self.system_prompt = system_prompt
        self.events = events

    def think(self, envelope: TaskEnvelope, deadline: float) -> str:
        return self.proceed(envelope, LoopState(initial_messages(envelope)), deadline)

    def resume(self, envelope: TaskEnvelope, state: LoopState, answer: Optional[tuple[bool, str]],
               deadline: float) -> str:
        """A parked call decided: approved (`answer` None), it runs now; else the LLM gets `answer`
        (ok, content) in its place (a denial). Then the loop goes on."""
        call = state.pending.pop(0)
        if answer is None:
            state.tool_calls += 1
            answer = self._run_tool(envelope, call, deadline)
        ok, content = answer
        state.messages.append(Message("tool", content, tool_call_id=call.id, tool_name=call.name, is_error=not ok))
        return self.proceed(envelope, state, deadline)

    def proceed(self, envelope: TaskEnvelope, state: LoopState, deadline: float) -> str:
        """Answer the calls pending, then ask the LLM, until it answers without calling tools.
        Raises ApprovalNeeded, `state` as it stands, at a call that waits for a person."""
        system = f"{self.system_prompt}\n\nCurrent UTC time: {rfc3339()}"
        definitions = self.tools.definitions() if self.tools else []
        while True:
            while state.pending:
                call = state.pending[0]
                if state.tool_calls >= self.budget.max_tool_calls:
                    ok, content = False, "not executed: the tool budget for this task is spent"
                else:
                    assert self.tools is not None  # tools are offered only when there are some
                    timeout = self.tools.approval_timeout(call.name)
                    if timeout is not None:
                        raise ApprovalNeeded(state, call, timeout)
                    state.tool_calls += 1
                    ok, content = self._run_tool(envelope, call, deadline)
                state.pending.pop(0)
                state.messages.append(Message("tool", content, tool_call_id=call.id, tool_name=call.name,
                                              is_error=not ok))
            state.iteration += 1
            offer = bool(definitions) and state.tool_calls < self.budget.max_tool_calls \
                and state.iteration < self.budget.max_iterations
            if definitions and not offer and state.iteration > 1:
                state.messages.append(Message("user", BUDGET_SPENT))
            reply = self._ask(envelope, state.iteration, system, state.messages, definitions if offer else [],
                              deadline)
            if not (offer and reply.tool_calls):
                return reply.text
            state.messages.append(Message("assistant", reply.text, tool_calls=list(reply.tool_calls)))
            state.pending = list(reply.tool_calls)

    def _ask(self, envelope: TaskEnvelope, iteration: int, system: str, messages: list, tools: list,
             deadline: float) -> ChatReply:
        ids = (envelope.task_id, envelope.conversation_id, iteration)
        self.events.emit(LlmRequested(*ids))
        with tracing.span("llm_request", log={"operation": "llm_request", "iteration": iteration}, record=False):
            try:
                reply = self.chain.chat(system, messages, tools, deadline)
            except LlmError as exc:
                self.events.emit(LlmFailed(*ids))
                log.debug("LLM request %d failed: %s", iteration, exc)
                raise
        self.events.emit(LlmAnswered(*ids, len(reply.tool_calls), reply.finish_reason))
        return reply

    def _run_tool(self, envelope: TaskEnvelope, call: ToolCall, deadline: float) -> tuple[bool, str]:
        ids = (envelope.task_id, envelope.conversation_id, call.name)
        self.events.emit(ToolCalled(*ids))
        assert self.tools is not None  # tools are offered only when there are some
        with tracing.span("tool_execution", log={"operation": "tool_execution", "tool": call.name}, record=False):
            ok, content = self.tools.execute(call.name, call.arguments, deadline)
        self.events.emit(ToolReturned(*ids, ok))
        return ok, content
