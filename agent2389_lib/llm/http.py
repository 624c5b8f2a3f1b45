"""JSON over HTTP for LLM providers: retries with backoff, Retry-After, deadlines, clear errors.

Retried: HTTP 408, 409, 429, 5xx (529 "overloaded" included), connection errors, read
timeouts and bodies cut short, with exponential backoff and full jitter, honouring
`Retry-After` (seconds or an HTTP date), and never beyond the task deadline. Other 4xx fail
at once. Bodies are streamed: the deadline holds between chunks (a server trickling one byte
a second cannot keep a worker) and a body over `max_response_bytes` is an error, not memory.
Requests go through `requests` (sessions from httpsessions: proxies and CA bundles by its rules).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import requests
import urllib3

from ..backoff import jittered
from ..errors import LlmError, TaskFailure
from ..httpsessions import (ProxyUnusable, ThreadSessions, causes, check_proxy, describe_failure, endpoint_session,
                            public_url)
from ..metrics import Metrics
from ..redaction import truncate_utf8
from .base import ChatReply, remaining, traced_chat

log = logging.getLogger("agent2389.llm.http")

RETRYABLE = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 20.0
_CHUNK_BYTES = 65536
DEFAULT_MAX_BODY = 8 * 1024 * 1024


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


class JsonHttpClient:
    """One provider endpoint; a requests.Session per thread (pooled keep-alive connections)."""

    def __init__(self, provider: str, base_url: str, headers: dict, max_attempts: int, request_timeout: float,
                 describe_error: Callable[[bytes], str], metrics: Optional[Metrics] = None,
                 label: str = "", max_body: int = DEFAULT_MAX_BODY):
        self.provider = provider
        self.max_body = max_body
        self.label = label or provider
        self.metrics = metrics
        self.base_url = base_url.rstrip("/")
        self.shown_url = public_url(self.base_url)
        try:
            check_proxy(self.base_url)
        except ProxyUnusable as exc:
            raise LlmError(str(exc), "config") from None
        # we ask for the identity encoding (a compressed body would be decompressed in memory
        # before the size cap could see it); a server that compresses all the same is understood
        self._sessions = ThreadSessions(lambda: endpoint_session(self.base_url, {"Accept-Encoding": "identity",
                                                                                 **headers}))
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.describe_error = describe_error

    def get(self, path: str, timeout: float) -> Any:
        """One GET without retries (startup checks); raises LlmError naming the URL and status."""
        url = self.shown_url + path
        try:
            status, data, _ = self._request("GET", path, None, time.monotonic() + timeout, timeout)
        except (requests.RequestException, BodyError) as exc:
            raise LlmError(f"{self.provider} endpoint {url} is unreachable: {_problem(exc)}", "connection") from None
        if status != 200:
            raise LlmError(self._status_message(status, data, url), error_kind(status))
        return _json_body(data, self.provider)

    def _request(self, method: str, path: str, body: Optional[dict], deadline: float,
                 timeout: float) -> tuple[int, bytes, Any]:
        """Status, whole body and headers of one request, the body read within the deadline."""
        response = self._sessions.get().request(method, self.base_url + path, json=body, timeout=timeout,
                                                stream=True)
        try:
            data = read_body(response, deadline, self.max_body, timeout)
        except BaseException:
            response.close()  # mid-body: the connection cannot be reused
            raise
        response.raw.release_conn()  # the whole body was read: back to the pool for the next request
        return response.status_code, data, response.headers

    def complete(self, path: str, body: dict, deadline: float, parse: Callable[[Any], ChatReply]) -> ChatReply:
        """One chat completion with its retries, recorded in the per-provider counters."""
        spent = Attempted()
        try:
            reply = traced_chat(self.provider, str(body.get("model")),
                                lambda: parse(self.post(path, body, deadline, spent)))
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
        url = self.shown_url + path
        last_problem, kind = "", "error"
        for attempt in range(self.max_attempts):
            left = remaining(deadline)
            spent.attempts += 1
            started = time.monotonic()
            headers = None
            try:
                status, data, headers = self._request("POST", path, body, deadline, min(self.request_timeout, left))
            except BodyTooLarge as exc:
                raise LlmError(f"{self.provider} answer from {url} is {exc}", "bad_response") from None
            except BodyDeadline:
                raise LlmError(f"{self.provider} was still sending its answer from {url} when the task deadline "
                               f"passed", "timeout") from None
            except (requests.ConnectionError, requests.Timeout, BodyError) as exc:
                last_problem = f"{_problem(exc)} talking to {url}"
                kind = "timeout" if isinstance(exc, requests.Timeout) else "connection"
            finally:
                spent.seconds += time.monotonic() - started
            if headers is not None:
                if status == 200:
                    return _json_body(data, self.provider)
                kind = error_kind(status)
                if status not in RETRYABLE:
                    raise LlmError(self._status_message(status, data, url), kind)
                last_problem = self._status_message(status, data, url)
            if attempt + 1 >= self.max_attempts:
                break
            wait = retry_after_seconds(headers.get("Retry-After")) if headers is not None else None
            wait = jittered(attempt, _BACKOFF_BASE, _BACKOFF_CAP) if wait is None else wait
            if wait >= deadline - time.monotonic():
                raise LlmError(f"{last_problem}; the task deadline leaves no time for another attempt", kind)
            spent.retries += 1
            log.warning("%s request failed (%s); retry %d of %d in %.2f s", self.provider, last_problem,
                        attempt + 1, self.max_attempts - 1, wait)
            time.sleep(wait)
        raise LlmError(f"{last_problem} (after {spent.attempts} attempts)", kind)

    def _status_message(self, status: int, body: bytes, url: str) -> str:
        if status == 401:
            return f"{self.provider} rejected the API key (HTTP 401 from {url}); check the key's value"
        detail = self.describe_error(body)
        return f"{self.provider} returned HTTP {status} from {url}" + (f": {detail}" if detail else "")


class BodyError(Exception):
    """The body could not be read whole."""


class BodyTooLarge(BodyError):
    pass


class BodyDeadline(BodyError):
    pass


def read_body(response: requests.Response, deadline: float, limit: int, read_timeout: float) -> bytes:
    """The decoded body, chunk by chunk: each read may wait at most the time left before the
    deadline; more than `limit` bytes raise BodyTooLarge. A body shorter than its
    Content-Length (or a broken chunked body) raises BodyError."""
    raw = response.raw
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    read = getattr(raw, "read1", None)
    cutoff = None
    if read is None:
        # urllib3 1.x has no read1: its read(amt) waits for amt bytes however long each one takes,
        # so the socket is shut at the deadline instead
        read, cutoff = raw.read, _cutoff(sock, deadline)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BodyDeadline()
            if sock is not None:
                sock.settimeout(min(read_timeout, max(left, 0.01)))
            try:
                chunk = read(_CHUNK_BYTES, decode_content=True)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise BodyDeadline() from None
                raise BodyError(_problem(exc)) from None
            if not chunk:
                if time.monotonic() >= deadline:
                    raise BodyDeadline()
                if raw.length_remaining:  # urllib3 1.x does not say when a Content-Length body was cut short
                    raise BodyError(_CUT_SHORT)
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"over the {limit}-byte limit (max_response_bytes)")
            chunks.append(chunk)
    finally:
        if cutoff is not None:
            cutoff.cancel()


def _cutoff(sock: Optional[socket.socket], deadline: float) -> Optional[threading.Timer]:
    """Shuts `sock` at the deadline. Should it fire just after the body was read whole, the
    connection pool finds the connection dropped and replaces it."""
    if sock is None:
        return None
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, (sock,))
    timer.daemon = True
    timer.start()
    return timer


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_CUT_SHORT = "the connection closed before the whole body arrived"


def _problem(exc: BaseException) -> str:
    """What went wrong with a request, in a few words."""
    if isinstance(exc, BodyError) and str(exc):
        return str(exc)
    if any(isinstance(cause, http.client.IncompleteRead) for cause in causes(exc)):  # urllib3's too
        return _CUT_SHORT
    return describe_failure(exc)


def _json_body(data: bytes, provider: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise LlmError(f"{provider} answered with a body that is not JSON: "
                       f"{truncate_utf8(data.decode('utf-8', 'replace'), 200)!r}", "bad_response") from None
