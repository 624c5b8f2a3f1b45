"""OpenAI Chat Completions (and every OpenAI-compatible server: Ollama, vLLM, llama.cpp, LM Studio)."""

from __future__ import annotations

import json
from typing import Any, Optional

from ..config import OFFICIAL_BASE_URL, LlmSettings
from ..cooldowns import Fleet
from ..errors import LlmError
from ..redaction import truncate_utf8
from ..tools.base import ToolDef
from .base import ChatReply, Message, OutputSchema, ToolCall, warn_if_unlisted
from ..events import Events
from .http import ProviderHttp

_VERIFY_TIMEOUT = 15.0


def describe_error(body: bytes) -> str:
    """OpenAI's `{"error": {"message", "type", "code"}}`, or the start of the body."""
    try:
        error = json.loads(body).get("error") or {}
        parts = [str(error.get(k)) for k in ("type", "code") if error.get(k)]
        message = error.get("message") or ""
        return truncate_utf8(f"{'/'.join(parts)} {message}".strip(), 300)
    except (ValueError, AttributeError, RecursionError):
        return truncate_utf8(body.decode("utf-8", "replace").strip(), 200)


def tool_spec(tool: ToolDef) -> dict:
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.schema}}


def to_wire(system: str, messages: list[Message]) -> list[dict]:
    wire: list[dict] = [{"role": "system", "content": system}]
    for message in messages:
        if message.role == "tool":
            wire.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content})
        elif message.role == "assistant":
            item: dict = {"role": "assistant", "content": message.content or None}
            if message.tool_calls:
                item["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                    else json.dumps(c.arguments, separators=(",", ":"))}} for c in message.tool_calls]
            if item["content"] is None:
                del item["content"]
            wire.append(item)
        else:
            wire.append({"role": "user", "content": message.content})
    return wire


def from_wire(data: Any) -> ChatReply:
    try:
        choice = data["choices"][0]
        message = choice["message"]
        calls = tuple(_tool_call(c) for c in message.get("tool_calls") or [])
        usage = data.get("usage") or {}
        return ChatReply(text=_text(message.get("content")), tool_calls=calls,
                         finish_reason=choice.get("finish_reason") or "stop",
                         tokens_in=int(usage.get("prompt_tokens") or 0),
                         tokens_out=int(usage.get("completion_tokens") or 0))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise LlmError("openai answered with an unexpected response shape (no choices[0].message)",
                       "bad_response") from None


def _text(content: Any) -> str:
    """`content` is a string, null, or (some compatible servers) a list of parts: text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(part if isinstance(part, str) else str(part.get("text") or "")
                       for part in content if isinstance(part, str) or part.get("type") in ("text", "output_text"))
    raise ValueError("content is neither a string nor a list of parts")


def _tool_call(call: dict) -> ToolCall:
    function = call["function"]
    raw = function.get("arguments") or "{}"
    try:
        arguments = json.loads(raw)
    except ValueError:
        arguments = raw  # the loop reports malformed arguments back to the model
    return ToolCall(id=call["id"], name=function["name"], arguments=arguments)


class OpenAIProvider:
    def __init__(self, settings: LlmSettings, events: Optional[Events] = None, fleet: Optional[Fleet] = None):
        self.settings = settings
        self.name = "openai" if not settings.base_url else f"openai-compatible({settings.base_url})"
        headers = {"Authorization": f"Bearer {settings.api_key.reveal()}"} if settings.api_key else {}
        self.http = ProviderHttp("openai", settings.base_url or OFFICIAL_BASE_URL["openai"], headers, settings,
                                 describe_error, events, fleet, self.name)
        self.cooling = self.http.cooling

    def verify(self) -> None:
        warn_if_unlisted(self.name, self.settings.model, self.http.get("/models", _VERIFY_TIMEOUT))

    def chat(self, system: str, messages: list, tools: list, deadline: float,
             output: Optional[OutputSchema] = None) -> ChatReply:
        body: dict = {"model": self.settings.model, "messages": to_wire(system, messages)}
        if tools:
            body["tools"] = [tool_spec(t) for t in tools]
        if output is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": output.name, "description": output.description, "strict": True, "schema": output.schema}}
        if self.settings.temperature is not None:
            body["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            body["max_tokens"] = self.settings.max_tokens
        return self.http.complete("/chat/completions", body, deadline, from_wire)
