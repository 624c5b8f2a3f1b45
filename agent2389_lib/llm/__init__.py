"""LLM providers and the agent loop."""

from __future__ import annotations

from typing import Optional

from ..config import AgentConfig, LlmSettings
from ..metrics import Metrics
from .anthropic import AnthropicProvider
from .base import Provider
from .echo import EchoProvider
from .loop import AgentLoop, Progress, ProviderChain
from .openai import OpenAIProvider


def build_provider(settings: LlmSettings, metrics: Optional[Metrics] = None) -> Provider:
    if settings.provider == "openai":
        return OpenAIProvider(settings, metrics)
    if settings.provider == "anthropic":
        return AnthropicProvider(settings, metrics)
    return EchoProvider(settings.latency_ms, metrics)


def build_agent_loop(config: AgentConfig, tools=None, metrics: Optional[Metrics] = None,
                     progress: Optional[Progress] = None) -> AgentLoop:
    settings = config.llm
    chain = ProviderChain([build_provider(s, metrics) for s in (settings, *settings.fallback)])
    return AgentLoop(chain, tools, config.budget, settings.system_prompt, progress)
