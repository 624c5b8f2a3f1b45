"""JSON over HTTP for LLM providers: retries with backoff, Retry-After, deadlines, clear errors.

Retried: HTTP 408, 409, 429, 5xx (529 "overloaded" included), connection errors and read
timeouts, with exponential backoff and full jitter, honouring `Retry-After` (seconds or an
HTTP date), and never beyond the task deadline. Other 4xx fail at once.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import requests

from ..errors import LlmError, TaskFailure
from ..metrics import Metrics
from ..protocol import truncate_utf8
from .base import ChatReply, remaining

log = logging.getLogger("agent2389.llm.http")

RETRYABLE = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 20.0


@dataclass
class Attempted:
    """What one request cost: for the per-provider counters."""

    attempts: int = 0
    retries: int = 0
    seconds: float = 0.0


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None when absent/unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def error_kind(status: int) -> str:
    if status == 401 or status == 403:
        return "auth"
    if status == 429:
        return "rate_limited"
    if status == 529:
        return "overloaded"
    return "server_error" if status >= 500 else "bad_request"


def backoff_delay(attempt: int) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * (2 ** attempt)))


class JsonHttpClient:
    """One provider endpoint; a requests.Session per thread (pooled keep-alive connections)."""

    def __init__(self, provider: str, base_url: str, headers: dict, max_attempts: int, request_timeout: float,
                 describe_error: Callable[[requests.Response], str], metrics: Optional[Metrics] = None,
                 label: str = ""):
        self.provider = provider
        self.label = label or provider
        self.metrics = metrics
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.describe_error = describe_error
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.headers)
        return session

    def get(self, path: str, timeout: float) -> Any:
        """One GET without retries (startup checks); raises LlmError naming the URL and status."""
        url = self.base_url + path
        try:
            response = self._session().get(url, timeout=timeout)
        except requests.RequestException as exc:
            raise LlmError(f"{self.provider} endpoint {url} is unreachable: {type(exc).__name__}", "connection") from None
        if response.status_code != 200:
            raise LlmError(self._status_message(response, url), error_kind(response.status_code))
        return _json_body(response, self.provider)

    def complete(self, path: str, body: dict, deadline: float, parse: Callable[[Any], ChatReply]) -> ChatReply:
        """One chat completion with its retries, recorded in the per-provider counters."""
        spent = Attempted()
        try:
            reply = parse(self.post(path, body, deadline, spent))
        except TaskFailure as exc:
            self._record(spent, getattr(exc, "kind", "deadline"))
            raise
        self._record(spent, None, reply.tokens_in, reply.tokens_out)
        return reply

    def _record(self, spent: Attempted, kind: Optional[str], tokens_in: int = 0, tokens_out: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.llm_request(self.label, seconds=spent.seconds, retries=spent.retries, error_kind=kind,
                                     tokens_in=tokens_in, tokens_out=tokens_out)

    def post(self, path: str, body: dict, deadline: float, spent: Attempted) -> Any:
        url = self.base_url + path
        last_problem, kind = "", "error"
        for attempt in range(self.max_attempts):
            left = remaining(deadline)
            spent.attempts += 1
            started = time.monotonic()
            try:
                response = self._session().post(url, json=body, timeout=min(self.request_timeout, left))
            except (requests.ConnectionError, requests.Timeout) as exc:
                response, last_problem = None, f"{type(exc).__name__} talking to {url}"
                kind = "timeout" if isinstance(exc, requests.Timeout) else "connection"
            finally:
                spent.seconds += time.monotonic() - started
            if response is not None:
                if response.status_code == 200:
                    return _json_body(response, self.provider)
                kind = error_kind(response.status_code)
                if response.status_code not in RETRYABLE:
                    raise LlmError(self._status_message(response, url), kind)
                last_problem = self._status_message(response, url)
            if attempt + 1 >= self.max_attempts:
                break
            wait = retry_after_seconds(response.headers.get("Retry-After")) if response is not None else None
            wait = backoff_delay(attempt) if wait is None else wait
            if wait >= deadline - time.monotonic():
                raise LlmError(f"{last_problem}; the task deadline leaves no time for another attempt", kind)
            spent.retries += 1
            log.warning("%s request failed (%s); retry %d of %d in %.2f s", self.provider, last_problem,
                        attempt + 1, self.max_attempts - 1, wait)
            time.sleep(wait)
        raise LlmError(f"{last_problem} (after {spent.attempts} attempts)", kind)

    def _status_message(self, response: requests.Response, url: str) -> str:
        if response.status_code == 401:
            return f"{self.provider} rejected the API key (HTTP 401 from {url}); check the key's value"
        detail = self.describe_error(response)
        return f"{self.provider} returned HTTP {response.status_code} from {url}" + (f": {detail}" if detail else "")


def _json_body(response: requests.Response, provider: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise LlmError(f"{provider} answered with a body that is not JSON: "
                       f"{truncate_utf8(response.text, 200)!r}", "bad_response") from None
