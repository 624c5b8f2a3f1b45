"""One configured MCP server, kept usable: connected at startup, reconnected with backoff when it
exits or cannot be reached (a stdio server is started again), its tool list refreshed when it
says the list changed. Its tools stay offered while it is away and fail with a clear error."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable, Optional

from ...backoff import Backoff
from ...config import McpServerSpec, Secret
from ..base import Tool, ToolError, ToolTimeout, seconds_left
from .results import result_text
from .session import Asking, McpError, McpSession, McpTimeout, SessionExpired

log = logging.getLogger("agent2389.tools.mcp")

SEPARATOR = "__"  # server__tool, as the LLM sees it
_LLM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI and Anthropic accept as a tool name
_RETRY_INITIAL, _RETRY_MAX = 1.0, 60.0
_LOST_WAIT = 1.0  # how often the supervisor looks at a connected server

# server, tool, the task's ids, message, requested schema, until (Unix time) -> the MCP result
AskPerson = Callable[[str, str, dict, str, dict, float], dict]


class McpTool(Tool):
    def __init__(self, server: "McpServer", remote_name: str, description: str, schema: dict):
        self.server = server
        self.remote_name = remote_name
        self.name = f"{server.name}{SEPARATOR}{remote_name}"
        self.description = description
        self.schema = schema
        self.source = f"mcp:{server.name} ({server.transport})"
        spec = server.spec
        self.approval_timeout = spec.approval_timeout if remote_name in spec.approval_tools else None

    def execute(self, params: dict, deadline: float) -> str:
        return self.server.call(self.remote_name, params, deadline)


class McpServer:
    def __init__(self, spec: McpServerSpec, max_output_size: int, ask: Optional[AskPerson] = None):
        """`ask` puts the server's elicitation requests to a person (approvaldesk.ApprovalDesk.elicit)."""
        self.spec = spec
        self.ask = ask
        self.name = spec.name
        self.max_output_size = max_output_size
        self.transport = "stdio" if spec.command else "http"
        self.state = "starting"  # starting | up | down | stopped
        self.restarts = 0
        self.calls = self.call_errors = 0
        self.last_error = ""
        self.tools: dict[str, McpTool] = {}
        self._session: Optional[McpSession] = None
        self._lock = threading.Lock()
        self._reopening = threading.Lock()  # one caller opens the session that replaces an expired one
        self._wake = threading.Event()  # lost, or the tool list changed
        self._refresh = False
        self._stop = threading.Event()
        self._up = threading.Event()
        self._attempted = threading.Event()  # the first attempt to connect ended, either way
        self._thread: Optional[threading.Thread] = None
        self.secrets = tuple(value.reveal() for _, value in spec.env + spec.headers if isinstance(value, Secret))

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name=f"mcp-{self.name}-supervisor", daemon=True)
        self._thread.start()

    def wait_first_attempt(self, timeout: float) -> bool:
        """Whether the server is up once its first attempt ended (or `timeout` passed)."""
        self._attempted.wait(timeout)
        return self._up.is_set()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close(timeout)
        self.state = "stopped"

    def status(self) -> dict:
        return {"name": self.name, "transport": self.transport, "state": self.state, "required": self.spec.required,
                "tools": len(self.tools), "restarts": self.restarts, "calls": self.calls,
                "call_errors": self.call_errors, "last_error": self.last_error}

    def _supervise(self) -> None:
        backoff = Backoff(_RETRY_INITIAL, _RETRY_MAX)
        while not self._stop.is_set():
            try:
                self._connect()
                self._attempted.set()
                backoff.reset()
                self._while_up()
            except McpError as exc:
                if self._stop.is_set():  # stopping closed it: nothing to report
                    return
                self._went_down(str(exc))
                self._attempted.set()
            if self._stop.is_set():
                return
            self._stop.wait(backoff.next_delay())
            if not self._stop.is_set():
                self.restarts += 1

    def _new_session(self) -> McpSession:
        """A session that starts its channel (the process, for stdio) and wakes the supervisor when lost."""
        return McpSession(self.name, self._open_channel, on_tools_changed=self._tools_changed,
                          on_closed=lambda reason: self._wake.set(), elicit=self._elicit if self.ask else None)

    def _elicit(self, params: dict, asking: Optional[Asking]) -> dict:
        """A person has until `approval_timeout`, within what the call that asked has left."""
        assert self.ask is not None
        left = float(self.spec.approval_timeout)
        if asking is not None:
            left = min(left, asking.deadline - time.monotonic())
        tool = f"{self.name}{SEPARATOR}{asking.tool}" if asking is not None else self.name
        return self.ask(self.name, tool, asking.task if asking is not None else {}, params["message"],
                        params["requestedSchema"], time.time() + max(0.0, left))

    def _connect(self) -> None:
        """A failed attempt leaves its session in `_session`, for `_went_down` (or `stop`) to close."""
        session = self._new_session()
        with self._lock:
            self._session = session
        if self._stop.is_set():
            session.close(1.0)
            return
        deadline = time.monotonic() + self.spec.startup_timeout
        session.initialize(self.spec.startup_timeout)
        self._install(session.list_tools(max(0.1, deadline - time.monotonic())))
        self.state, self.last_error = "up", ""
        self._up.set()
        log.info("MCP server %s is up (%s, protocol %s): %d tools", self.name, self.transport,
                 session.protocol_version, len(self.tools))

    def _while_up(self) -> None:
        """Until the server is lost (its process exited, or a call found it unreachable) or stopped."""
        while not self._stop.is_set():
            self._wake.wait(_LOST_WAIT)
            self._wake.clear()
            session = self._session
            if session is None or session.is_closed:
                if not self._stop.is_set():
                    raise McpError(session.closed_reason if session is not None else f"MCP server {self.name} is gone")
                return
            if self._refresh:
                self._refresh = False
                try:
                    self._install(session.list_tools(self.spec.timeout))
                except McpTimeout as exc:
                    log.warning("%s; keeping the tools known before", exc)

    def _went_down(self, reason: str) -> None:
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close(2.0)
        self.state = "down"
        self._up.clear()
        if reason != self.last_error:
            log.error("%s; retrying with backoff (its tools fail meanwhile)", reason)
        self.last_error = reason

    def _open_channel(self, session: McpSession) -> Any:
        if self.spec.command:
            from .stdio import StdioChannel, child_environment  # subprocess, only for a server started here
            env = child_environment({name: _plain(value) for name, value in self.spec.env})
            return StdioChannel(session, self.spec.command, env, self.spec.cwd, self.secrets)
        from .http import HttpChannel  # requests, only for a server over HTTP (6 MB of an agent's memory)
        return HttpChannel(session, self.spec.url or "", {name: _plain(value) for name, value in self.spec.headers})

    def _tools_changed(self) -> None:
        """From the server's reader: the list is fetched on the supervisor's thread, not this one."""
        self._refresh = True
        self._wake.set()

    # -------------------------------------------------------------- tools
    def _install(self, listed: list[dict]) -> None:
        from jsonschema import validators
        from jsonschema.exceptions import SchemaError
        tools: dict[str, McpTool] = {}
        for item in listed:
            name = item.get("name")
            if not isinstance(name, str) or not self._allowed(name):
                continue
            full = f"{self.name}{SEPARATOR}{name}"
            if not _LLM_NAME.match(full):
                log.warning("MCP server %s: tool %r cannot be offered to the LLM (a tool name there is at most 64 "
                            "of A-Z, a-z, 0-9, '_' and '-', with %r in front); skipped", self.name, name[:80],
                            self.name + SEPARATOR)
                continue
            if full in tools:
                log.warning("MCP server %s lists tool %r twice; using the first", self.name, name)
                continue
            schema = item.get("inputSchema")
            if not isinstance(schema, dict):
                schema = {"type": "object"}
            try:
                validators.validator_for(schema).check_schema(schema)
            except SchemaError as exc:
                log.warning("MCP server %s: tool %r has an invalid inputSchema (%s); skipped", self.name, name,
                            exc.message[:200])
                continue
            description = item.get("description") or item.get("title") or ""
            tools[full] = McpTool(self, name, str(description), schema)
        self.tools = tools

    def _allowed(self, name: str) -> bool:
        if self.spec.allowed_tools is not None:
            return name in self.spec.allowed_tools
        return name not in self.spec.denied_tools

    def call(self, tool: str, arguments: dict, deadline: float) -> str:
        """The tool's result as text for the LLM; ToolError (or ToolTimeout) with the reason."""
        timeout = seconds_left(deadline, self.spec.timeout)
        self._count(calls=1)
        try:
            result = self._call(tool, arguments, timeout)
        except McpTimeout as exc:
            self._count(errors=1)
            raise ToolTimeout(str(exc)) from None
        except McpError as exc:
            self._count(errors=1)
            raise ToolError(str(exc)) from None
        text = result_text(result, self.max_output_size)
        if result.get("isError") is True:
            self._count(errors=1)
            raise ToolError(text or "the tool reported an error without saying which")
        return text

    def _count(self, calls: int = 0, errors: int = 0) -> None:
        with self._lock:  # workers call at once
            self.calls += calls
            self.call_errors += errors

    def _call(self, tool: str, arguments: dict, timeout: float) -> dict:
        session = self._session
        if session is None or self.state != "up":
            raise McpError(f"MCP server {self.name} is {self.state}"
                           + (f" ({self.last_error})" if self.last_error else ""))
        started = time.monotonic()
        try:
            return session.call_tool(tool, arguments, timeout)
        except SessionExpired:
            log.info("MCP server %s forgot our session; opening a new one", self.name)
        except McpTimeout:
            raise
        except McpError as exc:
            if self.transport == "http":
                session.closed(str(exc))  # the supervisor reconnects
            raise
        session = self._reopen(session, timeout - (time.monotonic() - started))
        return session.call_tool(tool, arguments, max(0.1, timeout - (time.monotonic() - started)))

    def _reopen(self, expired: McpSession, timeout: float) -> McpSession:
        """A new HTTP session in place of one the server forgot, opened once however many workers
        found it expired: the first opens it on its thread, the others wait for it and use it
        (each opening its own left sessions on the server that nobody would ever delete)."""
        with self._reopening:
            current = self._session
            if current is not None and current is not expired and not current.is_closed:
                return current
            session = self._new_session()
            session.initialize(max(0.1, timeout))
            with self._lock:
                self._session = session
            return session


def _plain(value: object) -> str:
    return value.reveal() if isinstance(value, Secret) else str(value)
