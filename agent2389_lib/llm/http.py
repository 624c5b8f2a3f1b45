"""JSON over HTTP for LLM providers: retries with backoff, Retry-After, deadlines, clear errors.

Retried: HTTP 408, 409, 429, 5xx (529 "overloaded" included), connection errors, read
timeouts and bodies cut short, with exponential backoff and full jitter, honouring
`Retry-After` (seconds or an HTTP date), and never beyond the task deadline. Other 4xx fail
at once. Bodies are streamed: the deadline holds between chunks (a server trickling one byte
a second cannot keep a worker) and a body over `max_response_bytes` is an error, not memory.

Plain `http.client`, one keep-alive connection per worker thread: a call through `requests`
cost about 1.2 ms of CPU, through `http.client` 0.26 ms (README, Performance). The
environment's proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`; http:// proxies, CONNECT for
https) and CA bundle (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`, `SSL_CERT_FILE`) are honoured;
otherwise the system's trust store, as for the broker.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import os
import random
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .. import __version__
from ..errors import LlmError, TaskFailure
from ..metrics import Metrics
from ..protocol import truncate_utf8
from .base import ChatReply, remaining

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


def backoff_delay(attempt: int) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * (2 ** attempt)))


class Endpoint:
    """Where one base URL's requests go: straight to its host, or through the environment's proxy."""

    def __init__(self, base_url: str):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LlmError(f"{base_url!r} is not an http:// or https:// URL", "config")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.path = parts.path.rstrip("/") + (f"?{parts.query}" if parts.query else "")
        self.proxy: Optional[urllib.parse.SplitResult] = None
        proxy = urllib.request.getproxies_environment().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass_environment(self.host):
            self.proxy = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            if self.proxy.scheme != "http" or not self.proxy.hostname:
                raise LlmError(f"the {parts.scheme}_proxy environment variable names {proxy!r}; only http:// "
                               f"proxies can be used, not TLS or SOCKS ones (or exclude {self.host} with NO_PROXY)",
                               "config")
        # a plain-http request through a proxy names the whole URL
        self.prefix = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if self.proxy and not self.tls else ""
        self._context: Optional[ssl.SSLContext] = None

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        """A new (not yet opened) connection; http.client opens it with the first request."""
        if not self.proxy:
            if self.tls:
                return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.context())
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        proxy_port = self.proxy.port or 80
        if not self.tls:
            return http.client.HTTPConnection(self.proxy.hostname, proxy_port, timeout=timeout)
        connection = http.client.HTTPSConnection(self.proxy.hostname, proxy_port, timeout=timeout,
                                                 context=self.context())
        connection.set_tunnel(self.host, self.port, headers=self.proxy_headers())
        return connection

    def proxy_headers(self) -> dict:
        if self.proxy is None or not self.proxy.username:
            return {}
        credentials = f"{urllib.parse.unquote(self.proxy.username)}:{urllib.parse.unquote(self.proxy.password or '')}"
        return {"Proxy-Authorization": "Basic " + base64.b64encode(credentials.encode()).decode("ascii")}

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
            self._context = ssl.create_default_context(cafile=bundle)
        return self._context


class JsonHttpClient:
    """One provider endpoint; a keep-alive connection per thread."""

    def __init__(self, provider: str, base_url: str, headers: dict, max_attempts: int, request_timeout: float,
                 describe_error: Callable[[bytes], str], metrics: Optional[Metrics] = None,
                 label: str = "", max_body: int = DEFAULT_MAX_BODY):
        self.provider = provider
        self.max_body = max_body
        self.label = label or provider
        self.metrics = metrics
        self.base_url = base_url.rstrip("/")
        self.endpoint = Endpoint(self.base_url)
        self.headers = {"User-Agent": f"agent2389/{__version__}", "Content-Type": "application/json", **headers}
        if self.endpoint.proxy and not self.endpoint.tls:
            self.headers.update(self.endpoint.proxy_headers())
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.describe_error = describe_error
        self._local = threading.local()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        """This thread's connection; one the server closed while idle is replaced first (a
        request sent on it would fail for nothing)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self.endpoint.connect(timeout)
        elif connection.sock is not None and select.select([connection.sock], [], [], 0)[0]:
            connection.close()  # readable while idle: closed by the server (or garbage)
        connection.timeout = timeout  # for (re)connecting
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection

    def get(self, path: str, timeout: float) -> Any:
        """One GET without retries (startup checks); raises LlmError naming the URL and status."""
        url = self.base_url + path
        try:
            status, data, _ = self._request("GET", path, None, time.monotonic() + timeout, timeout)
        except _CONNECTION_ERRORS as exc:
            raise LlmError(f"{self.provider} endpoint {url} is unreachable: {_problem(exc)}", "connection") from None
        if status != 200:
            raise LlmError(self._status_message(status, data, url), error_kind(status))
        return _json_body(data, self.provider)

    def _request(self, method: str, path: str, body: Optional[dict], deadline: float,
                 timeout: float) -> tuple[int, bytes, http.client.HTTPMessage]:
        """Status, whole body and headers of one request, the body read within the deadline."""
        connection = self._connection(timeout)
        try:
            connection.request(method, self.endpoint.prefix + self.endpoint.path + path,
                               None if body is None else json.dumps(body).encode(), self.headers)
            sock = connection.sock  # the response may take it over (Connection: close)
            response = connection.getresponse()
            data = read_body(response, sock, deadline, self.max_body, timeout)
        except BaseException:
            connection.close()  # mid-request or mid-body: it cannot be reused
            raise
        return response.status, data, response.headers

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
            headers = None
            try:
                status, data, headers = self._request("POST", path, body, deadline, min(self.request_timeout, left))
            except BodyTooLarge as exc:
                raise LlmError(f"{self.provider} answer from {url} is {exc}", "bad_response") from None
            except BodyDeadline:
                raise LlmError(f"{self.provider} was still sending its answer from {url} when the task deadline "
                               f"passed", "timeout") from None
            except _CONNECTION_ERRORS as exc:
                last_problem = f"{_problem(exc)} talking to {url}"
                kind = "timeout" if isinstance(exc, socket.timeout) else "connection"
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
            wait = backoff_delay(attempt) if wait is None else wait
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


_CONNECTION_ERRORS = (OSError, http.client.HTTPException, BodyError)  # worth another attempt


def read_body(response: http.client.HTTPResponse, sock: Optional[socket.socket], deadline: float, limit: int,
              read_timeout: float) -> bytes:
    """The decoded body, chunk by chunk: each read may wait at most the time left before the
    deadline; more than `limit` bytes raise BodyTooLarge. A body shorter than its
    Content-Length (or a broken chunked body) raises BodyError."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BodyDeadline()
        if sock is not None:
            sock.settimeout(min(read_timeout, max(left, 0.01)))
        try:
            chunk = response.read1(_CHUNK_BYTES)
        except (http.client.HTTPException, OSError) as exc:
            if time.monotonic() >= deadline:
                raise BodyDeadline() from None
            raise BodyError(_problem(exc)) from None
        if not chunk:
            if response.length:  # http.client does not say when a Content-Length body was cut short
                raise BodyError(_CUT_SHORT)
            response.close()  # the whole body was read: the connection can carry the next request
            return _decoded(b"".join(chunks), response.getheader("Content-Encoding"), limit)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"over the {limit}-byte limit (max_response_bytes)")
        chunks.append(chunk)


def _decoded(data: bytes, encoding: Optional[str], limit: int) -> bytes:
    """We ask for the identity encoding; a server that compresses all the same is understood."""
    if encoding not in ("gzip", "deflate"):
        return data
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
    try:
        decoded = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise BodyError(f"the {encoding} body does not decompress: {exc}") from None
    if len(decoded) > limit:
        raise BodyTooLarge(f"over the {limit}-byte limit (max_response_bytes) once decompressed")
    return decoded


_CUT_SHORT = "the connection closed before the whole body arrived"


def _problem(exc: BaseException) -> str:
    """What went wrong with a connection, in a few words."""
    if isinstance(exc, http.client.IncompleteRead):
        return _CUT_SHORT
    if isinstance(exc, BodyError) and str(exc):
        return str(exc)
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({exc.verify_message})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _json_body(data: bytes, provider: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise LlmError(f"{provider} answered with a body that is not JSON: "
                       f"{truncate_utf8(data.decode('utf-8', 'replace'), 200)!r}", "bad_response") from None
