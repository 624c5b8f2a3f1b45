"""LLM providers and the agent loop."""

from __future__ import annotations

from typing import Optional

from ..config import AgentConfig, LlmSettings
from ..metrics import Metrics
from .base import Provider
from .echo import EchoProvider
from .loop import AgentLoop, Progress, ProviderChain


def build_provider(settings: LlmSettings, metrics: Optional[Metrics] = None) -> Provider:
    """HTTP providers are imported only when configured: `requests` costs memory an offline
    (echo) agent on a small box does not need."""
    if settings.provider == "openai":
        from .openai import OpenAIProvider
        return OpenAIProvider(settings, metrics)
    if settings.provider == "anthropic":
        from .anthropic import AnthropicProvider
        return AnthropicProvider(settings, metrics)
    return EchoProvider(settings.latency_ms, metrics)


def build_agent_loop(config: AgentConfig, tools=None, metrics: Optional[Metrics] = None,
                     progress: Optional[Progress] = None) -> AgentLoop:
    settings = config.llm
    chain = ProviderChain([build_provider(s, metrics) for s in (settings, *settings.fallback)])
    return AgentLoop(chain, tools, config.budget, settings.system_prompt, progress)
