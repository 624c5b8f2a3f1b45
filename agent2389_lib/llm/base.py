"""Provider-neutral chat types; each provider converts them to its own wire format."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from .. import taskscope, tracing
from ..cooldowns import Cooldown

log = logging.getLogger("agent2389.llm")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: Any  # parsed JSON; a provider's malformed arguments arrive as the raw string


@dataclass
class Message:
    """role is "user", "assistant" or "tool" (a tool result answering `tool_call_id`)."""

    role: str
    content: str = ""
    tool_calls: list = field(default_factory=list)
    tool_call_id: Optional[str] = None
    tool_name: Optional[str] = None
    is_error: bool = False


@dataclass(frozen=True)
class ChatReply:
    text: str
    tool_calls: tuple = ()
    finish_reason: str = "stop"
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass(frozen=True)
class OutputSchema:
    """Ask for one JSON object of this shape, natively: OpenAI strict `json_schema`, Anthropic a forced tool."""

    name: str
    description: str
    schema: dict


class Provider(Protocol):
    name: str

    def verify(self) -> None:
        """Check at startup that the provider answers (raises LlmError)."""

    def cooling(self) -> Optional[Cooldown]:
        """The fleet's cooldown of this provider while one lasts (cooldowns.py), else None."""

    def chat(self, system: str, messages: list, tools: list, deadline: float,
             output: Optional[OutputSchema] = None) -> ChatReply:
        """One completion; raises LlmError or TaskTimeout. With `output`, the reply's object is
        its text (OpenAI) or its one tool call's arguments (Anthropic)."""


def traced_chat(provider: str, model: str, chat: Callable[[], ChatReply]) -> tuple[ChatReply, float]:
    """One LLM request as a span with OpenTelemetry's GenAI attributes, within the task's budget
    (spend.py: BudgetExceeded before the request when it is spent); the reply and its cost."""
    spend = taskscope.current_spend()
    if spend is not None:
        spend.check()
    with tracing.span(f"chat {model}", tracing.CLIENT, {"gen_ai.operation.name": "chat",
                                                        "gen_ai.provider.name": provider,
                                                        "gen_ai.request.model": model}) as span:
        reply = chat()
        span.set("gen_ai.usage.input_tokens", reply.tokens_in)
        span.set("gen_ai.usage.output_tokens", reply.tokens_out)
        span.set("gen_ai.response.finish_reasons", [reply.finish_reason])
    return reply, spend.record(model, reply.tokens_in, reply.tokens_out) if spend is not None else 0.0


def warn_if_unlisted(provider: str, model: str, listing: Any) -> None:
    """Startup check: a model the server does not list is most likely a typo (every request
    would fail with 404); said once, as a warning, since some servers list only a subset."""
    entries = listing.get("data") if isinstance(listing, dict) else None
    ids = [entry.get("id") for entry in entries or [] if isinstance(entry, dict)]
    if ids and model not in ids:
        shown = ", ".join(str(i) for i in ids[:8]) + (", ..." if len(ids) > 8 else "")
        log.warning("model %r is not among the %d models %s lists (%s); check [llm] model / DEFAULT_MODEL",
                    model, len(ids), provider, shown)
