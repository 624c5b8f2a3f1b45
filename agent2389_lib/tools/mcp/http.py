"""MCP's streamable HTTP transport (2025-03-26 and later), through `requests`: every message is
a POST; the answer is one JSON message or a `text/event-stream` carrying the server's messages
until the response. The session id the server gives at initialize goes with every later request
and is deleted at shutdown; a 404 for it means the server forgot the session."""

from __future__ import annotations

import json
import threading
import time
from typing import Iterator, Optional

import requests
import urllib3

from ... import tracing
from ...httpsessions import (BodyDeadline, BodyError, ThreadSessions, describe_failure, endpoint_session,
                             public_url, read_body, timed_out)
from . import jsonrpc
from .session import McpError, McpSession, McpTimeout, SessionExpired

_BODY_SHOWN = 200  # characters of an error body in a message
MAX_EVENT = 8 << 20  # bytes of one event-stream event (or JSON answer)
_READ_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)  # reading a streamed body


class HttpChannel:
    def __init__(self, session: McpSession, url: str, headers: dict):
        self.session = session
        self.server = session.server
        self.url = url
        self.protocol_version: Optional[str] = None
        self._sessions = ThreadSessions(lambda: endpoint_session(url, headers))
        self._session_id: Optional[str] = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Nothing to open: the first POST (initialize) starts the session."""

    def _headers(self) -> dict:
        """Those of the session, and the trace context of the call a request belongs to."""
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   **(tracing.http_headers() or {})}
        with self._lock:
            if self._session_id:
                headers["Mcp-Session-Id"] = self._session_id
        if self.protocol_version:
            headers["MCP-Protocol-Version"] = self.protocol_version
        return headers

    def send(self, message: dict, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        headers = self._headers()
        try:
            response = self._sessions.get().post(self.url, data=jsonrpc.encode(message), headers=headers,
                                                 timeout=(min(timeout, 10.0), timeout), stream=True)
        except requests.Timeout:
            raise McpTimeout(f"MCP server {self.server} did not answer within {timeout:.1f} s") from None
        except requests.RequestException as exc:
            raise McpError(f"MCP server {self.server} ({public_url(self.url)}) cannot be reached: "
                           f"{describe_failure(exc)}") from None
        with response:
            if response.status_code == 404 and "Mcp-Session-Id" in headers:
                raise SessionExpired(f"MCP server {self.server} no longer knows our session (HTTP 404)")
            if response.status_code >= 400:
                raise McpError(f"MCP server {self.server} answered HTTP {response.status_code}: "
                               f"{_short(response)}")
            session_id = response.headers.get("Mcp-Session-Id")
            if session_id and message.get("method") == "initialize":
                with self._lock:
                    self._session_id = session_id
            if response.status_code == 202 or "id" not in message or "method" not in message:
                return  # a notification or a response of ours: nothing comes back
            try:
                for answer in self._answers(response, deadline):
                    self.session.dispatch(answer)
                    if jsonrpc.is_response(answer) and answer.get("id") == message["id"]:
                        return
            except _READ_ERRORS as exc:
                if timed_out(exc):
                    raise McpTimeout(f"MCP server {self.server} did not answer within {timeout:.1f} s") from None
                raise McpError(f"MCP server {self.server}: the answer broke off: {describe_failure(exc)}") from None

    def _answers(self, response: requests.Response, deadline: float) -> Iterator[dict]:
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            yield from _events(response, deadline, self.server)
            return
        if kind != "application/json":
            raise McpError(f"MCP server {self.server} answered with Content-Type {kind or 'none'!r}, not JSON "
                           f"or an event stream")
        try:
            body = read_body(response, deadline, MAX_EVENT, max(0.1, deadline - time.monotonic()))
        except BodyDeadline:
            raise McpTimeout(f"MCP server {self.server} did not finish its answer in time") from None
        except BodyError as exc:
            raise McpError(f"MCP server {self.server}: the answer broke off: {exc}") from None
        if len(body) > MAX_EVENT:
            raise McpError(f"MCP server {self.server} answered with more than {MAX_EVENT >> 20} MiB")
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):
            raise McpError(f"MCP server {self.server} answered with something that is not JSON") from None
        for item in decoded if isinstance(decoded, list) else [decoded]:  # 2025-03-26 allows a batch
            if isinstance(item, dict) and item.get("jsonrpc") == "2.0":
                yield item

    def close(self, timeout: float) -> None:
        """DELETE the session (a server that does not allow it answers 405: fine)."""
        headers = self._headers()
        with self._lock:
            session_id, self._session_id = self._session_id, None
        if session_id:
            try:
                self._sessions.get().delete(self.url, headers=headers, timeout=max(0.1, timeout)).close()
            except requests.RequestException:
                pass  # gone already


def _events(response: requests.Response, deadline: float, server: str) -> Iterator[dict]:
    """The JSON messages of an event stream (`data:` lines joined per event; other fields and
    comments ignored), until it ends or the deadline passes. No line is held past MAX_EVENT."""
    data: list[bytes] = []
    for line in _lines(response, server):
        if time.monotonic() > deadline:
            return
        if not line:
            if data:
                try:
                    yield jsonrpc.decode(b"\n".join(data))
                except jsonrpc.RpcError:
                    pass  # not a message of ours (an event of another kind)
            data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
            if sum(len(part) for part in data) > MAX_EVENT:
                raise McpError(f"MCP server {server} sent an event of more than {MAX_EVENT >> 20} MiB")


def _lines(response: requests.Response, server: str) -> Iterator[bytes]:
    pending = b""
    for chunk in response.iter_content(65536):
        if b"\n" in chunk:
            *lines, rest = (pending + chunk).split(b"\n")
            pending = rest
            for line in lines:
                yield line[:-1] if line.endswith(b"\r") else line
        else:
            pending += chunk
        if len(pending) > MAX_EVENT:
            raise McpError(f"MCP server {server} sent a line of more than {MAX_EVENT >> 20} MiB")
    if pending:
        yield pending


def _short(response: requests.Response) -> str:
    try:
        text = response.raw.read(_BODY_SHOWN * 4, decode_content=True).decode("utf-8", "replace")
    except Exception:  # the body is only decoration for the message
        text = ""
    return " ".join(text.split())[:_BODY_SHOWN] or response.reason or "no body"
