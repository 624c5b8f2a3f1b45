"""JSON over HTTP, with the policy every caller wants: retries, Retry-After, the task deadline.

Retried: HTTP 408, 409, 429, 5xx (529 "overloaded" included), connection errors, read timeouts
and bodies cut short, with exponential backoff and full jitter, honouring `Retry-After` (seconds
or an HTTP date), and never beyond the task deadline (TaskTimeout). Other 4xx fail at once.
Failures are HttpFailure with a FailureKind; each caller names its own domain from it (a
provider's LlmError, the gatekeeper's RouterError). The transport under it (sessions, proxies,
a body read within the deadline and a size cap) is httpsessions'; requests does the HTTP.
"""

from __future__ import annotations

import email.utils
import enum
import json
import logging
import time
from dataclasses import dataclass
import re
from typing import Any, Callable, Optional, Protocol

import requests

from . import taskscope
from .backoff import jittered
from .errors import remaining
from .httpsessions import (TRACE_CONTEXT, BodyDeadline, BodyError, ProxyUnusable, ThreadSessions, check_proxy,
                           cancellable, endpoint_session, problem, public_url, read_body)
from .redaction import truncate_utf8
from .rfc3339 import parse_rfc3339

log = logging.getLogger("agent2389.http")

RETRYABLE = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 20.0
DEFAULT_MAX_BODY = 8 * 1024 * 1024


class FailureKind(enum.Enum):
    """What went wrong, for counters and for whether a retry may help."""

    AUTH = "auth"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    SERVER_ERROR = "server_error"
    BAD_REQUEST = "bad_request"
    CONNECTION = "connection"
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    CONFIG = "config"

    @classmethod
    def of_status(cls, status: int) -> FailureKind:
        if status in (401, 403):
            return cls.AUTH
        if status == 429:
            return cls.RATE_LIMITED
        if status == 529:
            return cls.OVERLOADED
        return cls.SERVER_ERROR if status >= 500 else cls.BAD_REQUEST


class HttpFailure(Exception):
    """A request that did not give a usable answer; the message names the service, the URL
    (without credentials) and what happened."""

    def __init__(self, message: str, kind: FailureKind):
        super().__init__(message)
        self.kind = kind


@dataclass
class Attempted:
    """What one request cost, its retries included: for the callers' counters."""

    attempts: int = 0
    retries: int = 0
    seconds: float = 0.0


class Gate(Protocol):
    """What each attempt passes first (a shared cooldown, client-side limits), and is told of a
    rate limit met (cooldowns.ProviderGate)."""

    def before(self, deadline: float) -> None: ...

    def limited(self, status: int, wait: float) -> None: ...


COOLDOWN_STATUSES = frozenset({429, 503, 529})
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATIONS_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_RESET_DURATIONS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")  # OpenAI: "6m0s", "20ms"
_RESET_TIMES = ("anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-reset",
                "anthropic-ratelimit-input-tokens-reset", "anthropic-ratelimit-output-tokens-reset")  # RFC 3339


def rate_limit_wait(status: int, headers: Any, now: Optional[float] = None) -> Optional[float]:
    """How long a provider asked to wait: `Retry-After`, or for a 429 without it, the latest of its
    rate-limit reset headers; None when it did not say."""
    hinted = retry_after_seconds(headers.get("Retry-After"), now)
    if hinted is not None or status != 429:
        return hinted
    waits = [_duration(headers.get(name)) for name in _RESET_DURATIONS]
    moment = time.time() if now is None else now
    waits += [None if (at := parse_rfc3339(headers.get(name))) is None else max(0.0, at - moment)
              for name in _RESET_TIMES]
    known = [wait for wait in waits if wait is not None]
    return max(known) if known else None


def _duration(value: Optional[str]) -> Optional[float]:
    """A Go-style duration ("1h2m3.5s", "20ms") in seconds; None when it is not one."""
    text = value.strip() if isinstance(value, str) else ""
    if not _DURATIONS_RE.fullmatch(text):
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_RE.findall(text))


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


class JsonHttpClient:
    """One service endpoint; a requests.Session per thread (pooled keep-alive connections)."""

    def __init__(self, service: str, base_url: str, headers: dict, max_attempts: int, request_timeout: float,
                 describe_error: Callable[[bytes], str], max_body: int = DEFAULT_MAX_BODY,
                 max_body_setting: str = "", gate: Optional[Gate] = None):
        """`describe_error` turns an error body into a few words; `max_body_setting` names the
        setting of `max_body` in the error about a larger answer; every attempt passes `gate`.
        Raises HttpFailure (CONFIG) when the environment's proxy for the URL cannot be used."""
        self.service = service
        self.gate = gate
        self.max_body = max_body
        self.max_body_setting = max_body_setting
        self.base_url = base_url.rstrip("/")
        self.shown_url = public_url(self.base_url)
        try:
            check_proxy(self.base_url)
        except ProxyUnusable as exc:
            raise HttpFailure(str(exc), FailureKind.CONFIG) from None
        # we ask for the identity encoding (a compressed body would be decompressed in memory
        # before the size cap could see it); a server that compresses all the same is understood
        self._sessions = ThreadSessions(lambda: endpoint_session(self.base_url, {"Accept-Encoding": "identity",
                                                                                 **headers}))
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.describe_error = describe_error

    def get(self, path: str, timeout: float) -> Any:
        """One GET without retries (startup checks)."""
        url = self.shown_url + path
        try:
            status, data, _ = self._request("GET", path, None, time.monotonic() + timeout, timeout)
        except (requests.RequestException, BodyError) as exc:
            raise HttpFailure(f"{self.service} endpoint {url} is unreachable: {problem(exc)}",
                              FailureKind.CONNECTION) from None
        if status != 200:
            raise HttpFailure(self._status_message(status, data, url), FailureKind.of_status(status))
        return self._json(data)

    def post(self, path: str, body: dict, deadline: float, spent: Attempted) -> Any:
        """The JSON answer to a POST, retried as the module says; `spent` counts the cost."""
        url = self.shown_url + path
        last_problem, kind = "", FailureKind.CONNECTION
        for attempt in range(self.max_attempts):
            taskscope.check()
            if self.gate is not None:
                self.gate.before(deadline)
            left = remaining(deadline)
            spent.attempts += 1
            started = time.monotonic()
            headers = None
            try:
                status, data, headers = self._request("POST", path, body, deadline, min(self.request_timeout, left))
            except BodyDeadline:
                raise HttpFailure(f"{self.service} was still sending its answer from {url} when the task deadline "
                                  f"passed", FailureKind.TIMEOUT) from None
            except (requests.ConnectionError, requests.Timeout, BodyError) as exc:
                last_problem = f"{problem(exc)} talking to {url}"
                kind = FailureKind.TIMEOUT if isinstance(exc, requests.Timeout) else FailureKind.CONNECTION
            finally:
                spent.seconds += time.monotonic() - started
            taskscope.check()  # a cancel ends the request by shutting its connection: not a failure to retry
            hinted = None
            if headers is not None:
                if status == 200:
                    return self._json(data)
                kind = FailureKind.of_status(status)
                if status not in RETRYABLE:
                    raise HttpFailure(self._status_message(status, data, url), kind)
                last_problem = self._status_message(status, data, url)
                hinted = rate_limit_wait(status, headers)
                if hinted is not None and self.gate is not None and status in COOLDOWN_STATUSES:
                    self.gate.limited(status, hinted)
            if attempt + 1 >= self.max_attempts:
                break
            wait = jittered(attempt, _BACKOFF_BASE, _BACKOFF_CAP) if hinted is None else hinted
            if wait >= deadline - time.monotonic():
                raise HttpFailure(f"{last_problem}; the task deadline leaves no time for another attempt", kind)
            spent.retries += 1
            log.warning("%s request failed (%s); retry %d of %d in %.2f s", self.service, last_problem,
                        attempt + 1, self.max_attempts - 1, wait)
            taskscope.sleep(wait)
        raise HttpFailure(f"{last_problem} (after {spent.attempts} attempts)", kind)

    def _request(self, method: str, path: str, body: Optional[dict], deadline: float,
                 timeout: float) -> tuple[int, bytes, Any]:
        """Status, whole body and headers of one request, the body read within the deadline. A
        cancel of the task shuts the request's connection, so the server stops generating."""
        with cancellable():
            response = self._sessions.get().request(method, self.base_url + path, json=body, timeout=timeout,
                                                    stream=True, auth=TRACE_CONTEXT)
            try:
                data = read_body(response, deadline, self.max_body, timeout)
            except BaseException:
                response.close()  # mid-body: the connection cannot be reused
                raise
        if len(data) > self.max_body:
            setting = f" ({self.max_body_setting})" if self.max_body_setting else ""
            raise HttpFailure(f"{self.service} answer from {self.shown_url + path} is over the {self.max_body}-byte "
                              f"limit{setting}", FailureKind.BAD_RESPONSE)
        response.raw.release_conn()  # the whole body was read: back to the pool for the next request
        return response.status_code, data, response.headers

    def _status_message(self, status: int, body: bytes, url: str) -> str:
        if status == 401:
            return f"{self.service} rejected the API key (HTTP 401 from {url}); check the key's value"
        detail = self.describe_error(body)
        return f"{self.service} returned HTTP {status} from {url}" + (f": {detail}" if detail else "")

    def _json(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise HttpFailure(f"{self.service} answered with a body that is not JSON: "
                              f"{truncate_utf8(data.decode('utf-8', 'replace'), 200)!r}",
                              FailureKind.BAD_RESPONSE) from None
