"""The offline provider: answers without any network call (quick start, plumbing, benchmarks).

The answer is the user messages joined by newlines. If the task input carries
`tool_request: {"name": ..., "parameters": {...}}` (the reference implementation's inject
convention), it first asks for that tool call and then answers with the tool's result, so
tool plumbing works offline through the normal validated tool path.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from .. import taskscope
from ..errors import TaskTimeout
from ..events import Events, LlmCalled
from ..errors import remaining
from .base import ChatReply, Message, OutputSchema, ToolCall, traced_chat

_INPUT_PREFIX = "Input data: "


class EchoProvider:
    name = "echo"

    def __init__(self, latency_ms: int = 0, events: Optional[Events] = None):
        self.latency = latency_ms / 1000.0
        self.events = events or Events()

    def verify(self) -> None:
        return None

    def cooling(self) -> None:
        return None

    def chat(self, system: str, messages: list, tools: list, deadline: float,
             output: Optional[OutputSchema] = None) -> ChatReply:
        """`output` is never given: echo cannot be a router's provider (ROUTER_PROVIDERS)."""
        started = time.monotonic()
        try:
            reply, _ = traced_chat(self.name, self.name, lambda: self._answer(messages, tools, deadline))
        except TaskTimeout:
            self.events.emit(LlmCalled(self.name, time.monotonic() - started, 0, "deadline"))
            raise
        self.events.emit(LlmCalled(self.name, time.monotonic() - started, 0))
        return reply

    def _answer(self, messages: list, tools: list, deadline: float) -> ChatReply:
        if self.latency:
            pause = min(self.latency, remaining(deadline))
            taskscope.sleep(pause)
            if pause < self.latency:
                raise TaskTimeout("task deadline passed while the echo provider was thinking")
        results = [m for m in messages if m.role == "tool"]
        if results:
            return ChatReply(text=results[-1].content)
        request = _tool_request(messages)
        if request is not None and tools:
            return ChatReply(text="", tool_calls=(ToolCall("echo-call-1", request[0], request[1]),),
                             finish_reason="tool_calls")
        return ChatReply(text="\n".join(m.content for m in messages if m.role == "user") or "(empty task)")


def _tool_request(messages: list[Message]):
    for message in messages:
        if message.role == "user" and message.content.startswith(_INPUT_PREFIX):
            try:
                data = json.loads(message.content[len(_INPUT_PREFIX):])
            except ValueError:
                return None
            request = data.get("tool_request") if isinstance(data, dict) else None
            if isinstance(request, dict) and isinstance(request.get("name"), str):
                return request["name"], request.get("parameters", {})
    return None
