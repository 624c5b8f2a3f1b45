"""Anthropic Messages API: `system` top level, `max_tokens` always, tool_use / tool_result blocks."""

from __future__ import annotations

import json
from typing import Any, Optional

from ..config import OFFICIAL_BASE_URL, LlmSettings
from ..cooldowns import Fleet
from ..errors import LlmError
from ..events import Events
from ..redaction import truncate_utf8
from ..tools.base import ToolDef
from .base import ChatReply, Message, OutputSchema, ToolCall, warn_if_unlisted
from .http import ProviderHttp

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_VERIFY_TIMEOUT = 15.0


def describe_error(body: bytes) -> str:
    """Anthropic's `{"type": "error", "error": {"type", "message"}}`, or the start of the body."""
    try:
        error = json.loads(body).get("error") or {}
        return truncate_utf8(f"{error.get('type', '')} {error.get('message', '')}".strip(), 300)
    except (ValueError, AttributeError, RecursionError):
        return truncate_utf8(body.decode("utf-8", "replace").strip(), 200)


def tool_spec(tool: ToolDef) -> dict:
    return {"name": tool.name, "description": tool.description, "input_schema": tool.schema}


def _blocks(message: Message) -> list[dict]:
    if message.role == "tool":
        return [{"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content,
                 "is_error": message.is_error}]
    blocks: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    for call in message.tool_calls:
        arguments = call.arguments if isinstance(call.arguments, dict) else {"_raw_arguments": call.arguments}
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    return blocks


def to_wire(messages: list[Message]) -> list[dict]:
    """Alternating user/assistant turns: tool results become user turns and adjacent turns of
    one role are merged, tool_result blocks first (the API requires them to lead)."""
    wire: list[dict] = []
    for message in messages:
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if wire and wire[-1]["role"] == role:
            merged = wire[-1]["content"] + blocks
            merged.sort(key=lambda b: b["type"] != "tool_result")  # stable: results first
            wire[-1]["content"] = merged
        else:
            wire.append({"role": role, "content": blocks})
    return wire


def from_wire(data: Any) -> ChatReply:
    try:
        content = data["content"]
        text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
        calls = tuple(ToolCall(id=b["id"], name=b["name"], arguments=b.get("input", {}))
                      for b in content if b.get("type") == "tool_use")
        usage = data.get("usage") or {}
        return ChatReply(text=text, tool_calls=calls, finish_reason=data.get("stop_reason") or "end_turn",
                         tokens_in=int(usage.get("input_tokens") or 0), tokens_out=int(usage.get("output_tokens") or 0))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise LlmError("anthropic answered with an unexpected response shape (no content blocks)",
                       "bad_response") from None


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, settings: LlmSettings, events: Optional[Events] = None, fleet: Optional[Fleet] = None):
        self.settings = settings
        headers = {"anthropic-version": API_VERSION}
        if settings.api_key:
            headers["x-api-key"] = settings.api_key.reveal()
        self.http = ProviderHttp("anthropic", settings.base_url or OFFICIAL_BASE_URL["anthropic"], headers, settings,
                                 describe_error, events, fleet)
        self.cooling = self.http.cooling

    def verify(self) -> None:
        warn_if_unlisted(self.name, self.settings.model, self.http.get("/v1/models", _VERIFY_TIMEOUT))

    def chat(self, system: str, messages: list, tools: list, deadline: float,
             output: Optional[OutputSchema] = None) -> ChatReply:
        body: dict = {"model": self.settings.model, "max_tokens": self.settings.max_tokens or DEFAULT_MAX_TOKENS,
                      "system": system, "messages": to_wire(messages)}
        if tools:
            body["tools"] = [tool_spec(t) for t in tools]
        if output is not None:  # a tool the model must call: its input is the answer
            body["tools"] = body.get("tools", []) + [
                {"name": output.name, "description": output.description, "input_schema": output.schema}]
            body["tool_choice"] = {"type": "tool", "name": output.name}
        if self.settings.temperature is not None:
            body["temperature"] = min(self.settings.temperature, 1.0)
        return self.http.complete("/v1/messages", body, deadline, from_wire)
