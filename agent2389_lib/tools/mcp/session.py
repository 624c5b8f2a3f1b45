"""One MCP session over any channel: the initialize handshake, tools/list, tools/call with a
timeout that cancels, and the server's own messages answered in passing (ping, list_changed,
and elicitation/create, put to a person while the call that asked waits)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from ... import __version__, taskscope, tracing
from . import jsonrpc

log = logging.getLogger("agent2389.tools.mcp")

OFFERED_VERSION = "2025-11-25"
SUPPORTED_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # newest first
_MAX_PAGES = 100  # of tools/list: a server whose cursor never ends must not hold startup forever


class McpError(Exception):
    """The server cannot be used for this request; the message says why, for the operator and the LLM."""


class McpTimeout(McpError):
    pass


class SessionExpired(McpError):
    """Streamable HTTP: 404 for our session id, so a new session has to be opened."""


class Channel(Protocol):
    """How messages reach the server: stdio or streamable HTTP. `send` may hand the server's
    answers to the session's `dispatch` before it returns (HTTP does)."""

    protocol_version: Optional[str]

    def start(self) -> None: ...

    def send(self, message: dict, timeout: float) -> None: ...

    def close(self, timeout: float) -> None: ...


@dataclass
class Asking:
    """A tools/call an elicitation may belong to: the tool, the task that called it, and when
    the call gives up (monotonic)."""

    tool: str
    task: dict
    deadline: float


# an elicitation's params and the call it belongs to (None if no call is open) -> the MCP result
Elicit = Callable[[dict, Optional[Asking]], dict]


class _Waiter:
    __slots__ = ("done", "message", "failure", "asking")

    def __init__(self, asking: Optional[Asking]) -> None:
        self.done = threading.Event()
        self.message: Optional[dict] = None
        self.failure: Optional[str] = None  # why the answer could not be read
        self.asking = asking


class McpSession:
    """`open_channel(session)` makes the channel; the channel calls `dispatch` with every message
    from the server, `fail` for an answer it could not read, and `closed` once the server is gone."""

    def __init__(self, server: str, open_channel: Callable[["McpSession"], Channel],
                 on_tools_changed: Callable[[], None] = lambda: None,
                 on_closed: Callable[[str], None] = lambda reason: None, elicit: Optional[Elicit] = None):
        """`elicit`: how the server's questions reach a person (the `elicitation` capability is
        declared only with it)."""
        self.server = server
        self.elicit = elicit
        self.on_tools_changed = on_tools_changed
        self.on_closed = on_closed
        self.protocol_version: Optional[str] = None
        self.server_info: dict = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, _Waiter] = {}
        self._lock = threading.Lock()
        self._closed: Optional[str] = None
        self.channel = open_channel(self)
        self.channel.start()

    # -------------------------------------------------------------- requests
    def request(self, method: str, params: Optional[dict], timeout: float, asking: Optional[str] = None) -> dict:
        """The result of one request, or McpError; on timeout, or when the task it belongs to is
        cancelled (TaskCanceled), the server is told to cancel it and its late answer is dropped.
        `asking`: the tool a call is for (the server may ask a person a question meanwhile)."""
        taskscope.check()
        request_id = next(self._ids)
        deadline = time.monotonic() + timeout
        waiter = _Waiter(Asking(asking, tracing.current_log_fields() or {}, deadline) if asking else None)
        with self._lock:
            if self._closed is not None:
                raise McpError(self._closed)
            self._pending[request_id] = waiter
        try:
            try:
                with taskscope.aborting(waiter.done.set):
                    self.channel.send(jsonrpc.request(request_id, method, params), timeout)
                    answered = waiter.done.wait(max(0.0, deadline - time.monotonic()))
            except McpTimeout:  # the channel itself waited the whole time (HTTP)
                answered = False
            except McpError:  # the HTTP channel's connection, shut by a cancel
                taskscope.check()
                raise
            taskscope.check()
            if not answered:
                self._cancel(request_id, f"no answer within {timeout:.1f} s")
                raise McpTimeout(f"MCP server {self.server} did not answer {method} within {timeout:.1f} s; "
                                 f"the request was cancelled")
        except taskscope.TaskCanceled as exc:
            with taskscope.shielded():
                self._cancel(request_id, str(exc))
            raise
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        if waiter.message is None:  # unreadable, or the server went away meanwhile
            raise McpError(waiter.failure or self._closed or f"MCP server {self.server} went away")
        try:
            return jsonrpc.response_value(waiter.message)
        except jsonrpc.RpcError as exc:
            raise McpError(f"MCP server {self.server} answered {method} with an error: {exc}") from None

    def notify(self, method: str, params: Optional[dict] = None, timeout: float = 10.0) -> None:
        self.channel.send(jsonrpc.notification(method, params), timeout)

    def _cancel(self, request_id: int, reason: str) -> None:
        try:
            self.notify("notifications/cancelled", {"requestId": request_id, "reason": reason})
        except McpError:
            pass  # gone too: nothing left to cancel

    # -------------------------------------------------------------- the protocol
    def initialize(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        capabilities: dict = {"elicitation": {"form": {}}} if self.elicit is not None else {}
        result = self.request("initialize", {"protocolVersion": OFFERED_VERSION, "capabilities": capabilities,
                                             "clientInfo": {"name": "agent2389", "version": __version__}}, timeout)
        version = result.get("protocolVersion")
        if version not in SUPPORTED_VERSIONS:
            raise McpError(f"MCP server {self.server} speaks protocol version {str(version)[:40]!r}; agent2389 "
                           f"speaks {', '.join(SUPPORTED_VERSIONS)}")
        self.protocol_version = self.channel.protocol_version = version
        info = result.get("serverInfo")
        self.server_info = info if isinstance(info, dict) else {}
        self.notify("notifications/initialized", timeout=max(0.1, deadline - time.monotonic()))

    def list_tools(self, timeout: float) -> list[dict]:
        tools: list[dict] = []
        cursor = None
        for _ in range(_MAX_PAGES):
            result = self.request("tools/list", {"cursor": cursor} if cursor else None, timeout)
            page = result.get("tools")
            if not isinstance(page, list):
                raise McpError(f"MCP server {self.server} answered tools/list without a list of tools")
            tools.extend(tool for tool in page if isinstance(tool, dict))
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                return tools
        log.warning("MCP server %s: tools/list still had more pages after %d; using the tools so far",
                    self.server, _MAX_PAGES)
        return tools

    def call_tool(self, name: str, arguments: dict, timeout: float) -> dict:
        return self.request("tools/call", {"name": name, "arguments": arguments}, timeout, asking=name)

    # -------------------------------------------------------------- from the server
    def dispatch(self, message: dict) -> None:
        if jsonrpc.is_response(message):
            with self._lock:
                waiter = self._pending.get(message.get("id"))  # type: ignore[arg-type]
            if waiter is not None:
                waiter.message = message
                waiter.done.set()
            return
        method = message.get("method")
        if "id" in message and method == "elicitation/create" and self.elicit is not None:
            # a person answers on a thread of its own: this one keeps reading the server
            threading.Thread(target=self._ask_person, args=(message,), name=f"mcp-{self.server}-elicitation",
                             daemon=True).start()
        elif "id" in message:  # a request of the server's: we offer no capabilities but ping and elicitation
            self._answer(message, jsonrpc.result_response(message["id"], {}) if method == "ping" else
                         jsonrpc.error_response(message["id"], jsonrpc.METHOD_NOT_FOUND,
                                                f"agent2389 does not offer {str(method)[:60]}"))
        elif method == "notifications/tools/list_changed":
            self.on_tools_changed()

    def _answer(self, request: dict, answer: dict) -> None:
        try:
            self.channel.send(answer, 10.0)
        except McpError as exc:
            log.debug("MCP server %s: could not answer its %s: %s", self.server, request.get("method"), exc)

    def _ask_person(self, request: dict) -> None:
        """elicitation/create, form mode: the call that asked (the oldest open one, as stdio does
        not say which) waits while a person answers."""
        assert self.elicit is not None
        params = request.get("params")
        if not isinstance(params, dict) or params.get("mode", "form") != "form" \
                or not isinstance(params.get("requestedSchema"), dict) or not isinstance(params.get("message"), str):
            self._answer(request, jsonrpc.error_response(request["id"], jsonrpc.INVALID_PARAMS,
                                                         "agent2389 answers form-mode elicitation (a message and a "
                                                         "requestedSchema object) only"))
            return
        with self._lock:
            asking = next((waiter.asking for _, waiter in sorted(self._pending.items()) if waiter.asking), None)
        self._answer(request, jsonrpc.result_response(request["id"], self.elicit(params, asking)))

    def fail(self, request_id: int, reason: str) -> None:
        with self._lock:
            waiter = self._pending.get(request_id)
        if waiter is not None:
            waiter.failure = reason
            waiter.done.set()

    def closed(self, reason: str) -> None:
        """The server is gone: every waiting request ends with the reason."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = reason
            waiting = list(self._pending.values())
        for waiter in waiting:
            waiter.done.set()
        self.on_closed(reason)

    @property
    def is_closed(self) -> bool:
        return self._closed is not None

    @property
    def closed_reason(self) -> str:
        return self._closed or ""

    def close(self, timeout: float) -> None:
        self.channel.close(timeout)
