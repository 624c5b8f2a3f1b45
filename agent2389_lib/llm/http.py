"""A provider's endpoint: JSON requests with their retries (jsonhttp) whose failures are LLM
errors, each completion traced and counted under the provider's name."""

from __future__ import annotations

from typing import Any, Callable, NoReturn, Optional

from ..errors import LlmError, TaskTimeout
from ..jsonhttp import Attempted, HttpFailure, JsonHttpClient
from ..events import Events, LlmCalled
from .base import ChatReply, traced_chat


class ProviderHttp:
    def __init__(self, provider: str, base_url: str, headers: dict, max_attempts: int, request_timeout: float,
                 describe_error: Callable[[bytes], str], events: Optional[Events], max_body: int, label: str = ""):
        """`label` is the provider's name in the counters (default: `provider`); raises LlmError
        (kind config) when the environment's proxy for `base_url` cannot be used."""
        self.provider = provider
        self.label = label or provider
        self.events = events or Events()
        try:
            self.client = JsonHttpClient(provider, base_url, headers, max_attempts, request_timeout, describe_error,
                                         max_body, max_body_setting="max_response_bytes")
        except HttpFailure as exc:
            _as_llm_error(exc)

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
        return reply

    def _post(self, path: str, body: dict, deadline: float, spent: Attempted) -> Any:
        try:
            return self.client.post(path, body, deadline, spent)
        except HttpFailure as exc:
            _as_llm_error(exc)


def _as_llm_error(failure: HttpFailure) -> NoReturn:
    raise LlmError(str(failure), failure.kind.value) from None
