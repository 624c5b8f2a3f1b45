"""Every HTTP call the agent makes goes through a `requests.Session` made here, one per thread
and endpoint (keep-alive, and requests' own rules for the environment: `HTTP(S)_PROXY`,
`ALL_PROXY`, `NO_PROXY` with CIDR entries, https:// proxies, `REQUESTS_CA_BUNDLE` and
`CURL_CA_BUNDLE`), and every failure is worded here for the user who reads it. Only the
`http_request` tool's sessions ignore the environment (tools/netguard.py says why)."""

from __future__ import annotations

import os
import ssl
import threading
import urllib.parse
from typing import Callable, Iterator, Optional

import requests
import urllib3

from . import __version__
from .redaction import mask_url_credentials

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


def new_session(headers: Optional[dict] = None) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    session.headers.update(headers or {})
    return session


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


def public_url(url: str) -> str:
    """`url` without its user name and password, fit for a log line or an error."""
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    except ValueError:  # too broken to split (http://[bad)
        return mask_url_credentials(url)
    if parts.username is None and parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


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
