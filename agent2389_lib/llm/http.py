"""A provider's endpoint: JSON requests with their retries (jsonhttp) whose failures are LLM
errors, each completion traced and counted under the provider's name."""

from __future__ import annotations

from typing import Any, Callable, NoReturn, Optional

from ..config import LlmSettings
from ..cooldowns import Cooldown, Fleet
from ..errors import LlmError, TaskTimeout
from ..jsonhttp import Attempted, HttpFailure, JsonHttpClient
from ..events import Events, LlmCalled
from .base import ChatReply, traced_chat


class ProviderHttp:
    def __init__(self, provider: str, base_url: str, headers: dict, settings: LlmSettings,
                 describe_error: Callable[[bytes], str], events: Optional[Events], fleet: Optional[Fleet] = None,
                 label: str = ""):
        """`label` is the provider's name in the counters (default: `provider`); with a `fleet`, its
        requests pass the fleet's cooldowns and the client-side limits. Raises LlmError (kind
        config) when the environment's proxy for `base_url` cannot be used."""
        self.provider = provider
        self.label = label or provider
        self.events = events or Events()
        self.gate = fleet.gate(self.label, settings, base_url) if fleet is not None else None
        try:
            self.client = JsonHttpClient(provider, base_url, headers, settings.max_attempts, settings.request_timeout,
                                         describe_error, settings.max_response_bytes,
                                         max_body_setting="max_response_bytes", gate=self.gate)
        except HttpFailure as exc:
            _as_llm_error(exc)

    def cooling(self) -> Optional[Cooldown]:
        """The fleet's cooldown of this provider, while one lasts."""
        return self.gate.cooling() if self.gate is not None else None

    def get(self, path: str, timeout: float) -> Any:
        """One GET without retries (startup checks)."""
        try:
            return self.client.get(path, timeout)
        except HttpFailure as exc:
            _as_llm_error(exc)

    def complete(self, path: str, body: dict, deadline: float, parse: Callable[[Any], ChatReply]) -> ChatReply:
        """One chat completion with its retries, told to the events for the per-provider counters
        (a failure under its kind; a task deadline that passed as "deadline")."""
        spent = Attempted()
        model = str(body.get("model"))
        try:
            reply, cost = traced_chat(self.provider, model, lambda: parse(self._post(path, body, deadline, spent)))
        except LlmError as exc:
            self.events.emit(LlmCalled(self.label, spent.seconds, spent.retries, exc.kind))
            raise
        except TaskTimeout:
            self.events.emit(LlmCalled(self.label, spent.seconds, spent.retries, "deadline"))
            raise
        self.events.emit(LlmCalled(self.label, spent.seconds, spent.retries, None, reply.tokens_in, reply.tokens_out,
                                   model, cost))
        if self.gate is not None:
            self.gate.spent(reply.tokens_in + reply.tokens_out)
        return reply

    def _post(self, path: str, body: dict, deadline: float, spent: Attempted) -> Any:
        try:
            return self.client.post(path, body, deadline, spent)
        except HttpFailure as exc:
            _as_llm_error(exc)


def _as_llm_error(failure: HttpFailure) -> NoReturn:
    raise LlmError(str(failure), failure.kind.value) from None
