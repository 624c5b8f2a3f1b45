"""Every HTTP call the agent makes goes through a `requests.Session` made here, one per thread
and endpoint (keep-alive, and requests' own rules for the environment: `HTTP(S)_PROXY`,
`ALL_PROXY`, `NO_PROXY` with CIDR entries, https:// proxies, `REQUESTS_CA_BUNDLE` and
`CURL_CA_BUNDLE`), and every failure is worded here for the user who reads it. Only the
`http_request` tool's sessions ignore the environment (tools/netguard.py says why)."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import time
import weakref
from typing import Any, Callable, ContextManager, Iterator, Optional

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection

from . import __version__, taskscope, tracing
from .redaction import public_url

USER_AGENT = f"agent2389/{__version__}"


class ProxyUnusable(Exception):
    """The environment names a proxy this install cannot speak."""


class ThreadSessions:
    """One Session per thread: a Session is not thread-safe, and each keeps its own pool of
    keep-alive connections (a connection the server closed while idle is replaced by urllib3)."""

    def __init__(self, factory: Callable[[], requests.Session]):
        self._factory = factory
        self._local = threading.local()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._factory()
        return session


class OpenConnections:
    """The HTTP connections one thread's sessions opened. Sessions are per thread, so shutting
    these down from another thread ends the request that thread is making (a cancelled task's)
    and only that; an idle one shut with them is reopened when next used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[HTTPConnection] = weakref.WeakSet()

    def add(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connections.add(connection)

    def shut(self) -> None:
        """Shut every open socket for reading and writing; never blocks."""
        with self._lock:
            sockets = [connection.sock for connection in self._connections]
        for sock in sockets:
            if sock is not None:
                _shut(sock)


_opened = threading.local()


def thread_connections() -> OpenConnections:
    """The connections this thread's sessions opened."""
    connections = getattr(_opened, "connections", None)
    if connections is None:
        connections = _opened.connections = OpenConnections()
    return connections


def tracked(base: type) -> type:
    """`base` (a urllib3 connection class) whose connections join their thread's OpenConnections."""
    class Tracked(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            super().connect()
            thread_connections().add(self)

    return Tracked


def adapter(http_connection: type, https_connection: type) -> HTTPAdapter:
    """An HTTPAdapter whose pools (a proxy's too, SOCKS aside) make these connection classes."""
    pools = {"http": type("HttpPool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": http_connection}),
             "https": type("HttpsPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": https_connection})}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith("socks"):  # PySocks' pools open their own sockets
                manager.pool_classes_by_scheme = pools
            return manager

    return Adapter()


def cancellable() -> ContextManager[None]:
    """For the body, a cancel of this thread's task shuts this thread's connections: the request
    in flight ends at once (and the server stops generating its answer)."""
    return taskscope.aborting(thread_connections().shut)


_TRACKED = (tracked(HTTPConnection), tracked(HTTPSConnection))


def new_session(headers: Optional[dict] = None, connections: tuple[type, type] = _TRACKED) -> requests.Session:
    """A Session whose connections (of the classes given) a cancelled task can shut."""
    session = requests.Session()
    mounted = adapter(*connections)
    for prefix in ("http://", "https://"):
        session.mount(prefix, mounted)
    session.headers["User-Agent"] = USER_AGENT
    session.headers.update(headers or {})
    return session


class _TraceContext(requests.auth.AuthBase):
    """Adds the current span's W3C trace context (`tracing.http_headers`) to a prepared request.
    Given as `auth`: as `headers=`, requests would merge them with the session's on every call,
    1.4% of a task's instructions with an LLM."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        headers = tracing.http_headers()
        if headers:
            request.headers.update(headers)
        return request


TRACE_CONTEXT = _TraceContext()


def endpoint_session(url: str, headers: Optional[dict] = None) -> requests.Session:
    """A Session for one endpoint with the environment's proxy and CA bundle, by requests' own
    rules, applied once: with `trust_env` requests would apply them again on every request
    (scanning the environment, looking for ~/.netrc), a few percent of an agent's CPU per task."""
    session = new_session(headers)
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(url)
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return session


def check_proxy(url: str) -> None:
    """At startup: a SOCKS proxy the environment names for `url` needs PySocks (the `socks`
    extra); without it every request would fail, so say which extra to install."""
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if not proxy or not proxy.lower().startswith("socks"):
        return
    try:
        import socks  # noqa: F401  (PySocks, what requests' SOCKS support uses)
    except ImportError:
        raise ProxyUnusable(f"the environment names the SOCKS proxy {public_url(proxy)} for {public_url(url)}; "
                            f"SOCKS needs the [socks] extra: pip install -e '.[socks]' in the project (or exclude the "
                            f"host with NO_PROXY)") from None


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps, outermost first: requests wraps urllib3's errors (in their
    arguments, `reason` or `original_error`), which wrap the socket's (as cause or context)."""
    queue: list[BaseException] = [exc]
    seen: set[int] = set()
    while queue and len(seen) < 16:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [*current.args, getattr(current, "reason", None), getattr(current, "original_error", None),
                  current.__cause__, current.__context__]
        queue.extend(item for item in linked if isinstance(item, BaseException))


def timed_out(exc: BaseException) -> bool:
    """Whether a failed request ran out of time: requests says so itself, or (urllib3 1.x, a read
    timeout while streaming a body) only the urllib3 error it wraps in a ConnectionError does."""
    return any(isinstance(cause, (requests.Timeout, TimeoutError, urllib3.exceptions.ReadTimeoutError))
               for cause in causes(exc))


def describe_failure(exc: BaseException) -> str:
    """A failed request in a few words: "Connection refused", "timed out", "TLS certificate
    verification failed (...)", "cannot reach the proxy (...)"; never a URL with credentials."""
    chain = list(causes(exc))
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({cause.verify_message})"
    if timed_out(exc):
        return "timed out"
    for cause in chain:
        if isinstance(cause, OSError) and cause.strerror:
            prefix = "cannot reach the proxy: " if isinstance(exc, requests.exceptions.ProxyError) else ""
            return prefix + cause.strerror
    if isinstance(exc, requests.exceptions.ProxyError):
        return "the proxy refused the connection (check HTTPS_PROXY / HTTP_PROXY and its credentials)"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    return type(exc).__name__


class BodyError(Exception):
    """The body could not be read whole."""


class BodyDeadline(BodyError):
    pass


def read_body(response: requests.Response, deadline: float, limit: int, read_timeout: float) -> bytes:
    """The decoded body, chunk by chunk: each read may wait at most the time left before the
    deadline (BodyDeadline past it). Reading stops once more than `limit` bytes arrived: a
    longer result says the body was larger, and the caller decides whether that is an error
    (the connection is then closed, not reused). A body shorter than its Content-Length (or a
    broken chunked body) raises BodyError."""
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
                raise BodyError(problem(exc)) from None
            if not chunk:
                if time.monotonic() >= deadline:
                    raise BodyDeadline()
                if raw.length_remaining:  # urllib3 1.x does not say when a Content-Length body was cut short
                    raise BodyError(_CUT_SHORT)
                return b"".join(chunks)
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                response.close()
                return b"".join(chunks)
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
_CHUNK_BYTES = 65536


def problem(exc: BaseException) -> str:
    """What went wrong with a request, in a few words."""
    if isinstance(exc, BodyError) and str(exc):
        return str(exc)
    if any(isinstance(cause, http.client.IncompleteRead) for cause in causes(exc)):  # urllib3's too
        return _CUT_SHORT
    return describe_failure(exc)
