"""LLM providers and the agent loop."""

from __future__ import annotations

from ..config import AgentConfig, LlmSettings
from .base import Provider
from .echo import EchoProvider
from .loop import AgentLoop, ProviderChain


def build_provider(settings: LlmSettings) -> Provider:
    if settings.provider == "echo":
        return EchoProvider(settings.latency_ms)
    raise NotImplementedError(settings.provider)


def build_agent_loop(config: AgentConfig, tools=None) -> AgentLoop:
    settings = config.llm
    chain = ProviderChain([build_provider(s) for s in (settings, *settings.fallback)])
    return AgentLoop(chain, tools, config.budget, settings.system_prompt)
