"""The agent loop (docs/architecture.md, One task, end to end): messages, tool calls, budget, failover
between providers."""

from __future__ import annotations

import logging
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

    def execute(self, name: str, arguments: object, deadline: float) -> tuple[bool, str]:
        """(ok, content): content goes back to the model as the tool result."""


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
        system = f"{self.system_prompt}\n\nCurrent UTC time: {rfc3339()}"
        messages = initial_messages(envelope)
        definitions = self.tools.definitions() if self.tools else []
        tool_calls = 0
        for iteration in range(1, self.budget.max_iterations + 1):
            offer = bool(definitions) and tool_calls < self.budget.max_tool_calls \
                and iteration < self.budget.max_iterations
            if definitions and not offer and iteration > 1:
                messages.append(Message("user", BUDGET_SPENT))
            reply = self._ask(envelope, iteration, system, messages, definitions if offer else [], deadline)
            if not (offer and reply.tool_calls):
                return reply.text
            messages.append(Message("assistant", reply.text, tool_calls=list(reply.tool_calls)))
            for call in reply.tool_calls:
                if tool_calls >= self.budget.max_tool_calls:
                    ok, content = False, "not executed: the tool budget for this task is spent"
                else:
                    tool_calls += 1
                    ok, content = self._run_tool(envelope, call, deadline)
                messages.append(Message("tool", content, tool_call_id=call.id, tool_name=call.name, is_error=not ok))
        raise AssertionError("unreachable: the last iteration never offers tools")

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
