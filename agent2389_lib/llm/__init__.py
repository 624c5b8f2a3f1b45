"""LLM providers and the agent loop."""

from __future__ import annotations

from typing import Optional

from ..config import AgentConfig, LlmSettings
from ..cooldowns import Fleet
from ..events import Events
from .base import Provider
from .echo import EchoProvider
from .loop import AgentLoop, ProviderChain


def build_provider(settings: LlmSettings, events: Optional[Events] = None, fleet: Optional[Fleet] = None) -> Provider:
    """HTTP providers are imported only when configured: `requests` costs memory an offline
    (echo) agent on a small box does not need. Their requests are told to `events`, and pass
    the `fleet`'s cooldowns and limits."""
    events = events or Events()
    if settings.provider == "openai":
        from .openai import OpenAIProvider
        return OpenAIProvider(settings, events, fleet)
    if settings.provider == "anthropic":
        from .anthropic import AnthropicProvider
        return AnthropicProvider(settings, events, fleet)
    return EchoProvider(settings.latency_ms, events)


def build_agent_loop(config: AgentConfig, tools=None, events: Optional[Events] = None,
                     fleet: Optional[Fleet] = None) -> AgentLoop:
    settings = config.llm
    events = events or Events()
    chain = ProviderChain([build_provider(s, events, fleet) for s in (settings, *settings.fallback)])
    return AgentLoop(chain, tools, config.budget, settings.system_prompt, events)
