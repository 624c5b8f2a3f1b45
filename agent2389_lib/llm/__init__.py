"""LLM providers and the agent loop."""

from __future__ import annotations

from ..config import AgentConfig, LlmSettings
from .base import Provider
from .anthropic import AnthropicProvider
from .echo import EchoProvider
from .loop import AgentLoop, ProviderChain
from .openai import OpenAIProvider


def build_provider(settings: LlmSettings) -> Provider:
    if settings.provider == "openai":
        return OpenAIProvider(settings)
    if settings.provider == "anthropic":
        return AnthropicProvider(settings)
    return EchoProvider(settings.latency_ms)


def build_agent_loop(config: AgentConfig, tools=None) -> AgentLoop:
    settings = config.llm
    chain = ProviderChain([build_provider(s) for s in (settings, *settings.fallback)])
    return AgentLoop(chain, tools, config.budget, settings.system_prompt)
