"""The configured tools: the allow-list, schema validation, execution with a deadline. Command
tools and built-ins are fixed at startup; an MCP server's tools are whatever it last listed."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .. import protocol, taskscope, tracing
from ..config import AgentConfig, ToolSpec
from ..errors import StartupError
from ..events import Events, ToolExecuted
from ..httpsessions import cancellable
from ..taskscope import TaskCanceled
from .base import Tool, ToolDef, ToolError, ToolTimeout
from .mcp.server import AskPerson, McpServer, McpTool

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

log = logging.getLogger("agent2389.tools")

_ATTEMPT_SLACK = 1.0  # seconds beyond startup_timeout for a failed first attempt to be told


class ToolStartupError(StartupError):
    pass


def schema_problems(validator: "Draft202012Validator", params: Any) -> list[str]:
    """Every schema violation, each naming the failing path ($.a.b[0])."""
    problems = []
    for error in sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path)):
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        problems.append(f"{path}: {error.message}")
    return problems


class ToolRegistry:
    def __init__(self, tools: list[Tool], servers: Sequence[McpServer] = (), events: Optional[Events] = None):
        """Every execution is told to `events`."""
        self.fixed = {tool.name: tool for tool in tools}
        self.servers = list(servers)
        self._validators: dict[str, tuple[Tool, "Draft202012Validator"]] = {}  # made on first use
        self.events = events or Events()

    @property
    def tools(self) -> dict[str, Tool]:
        """Every tool offered now: the fixed ones, then each MCP server's (a name taken is not taken over)."""
        if not self.servers:
            return self.fixed
        current = dict(self.fixed)
        for server in self.servers:
            for name, tool in server.tools.items():
                current.setdefault(name, tool)
        return current

    def server_statuses(self) -> list[dict]:
        return [server.status() for server in self.servers]

    def approval_timeout(self, name: str) -> Optional[int]:
        tool = self.tools.get(name)
        return tool.approval_timeout if tool is not None else None

    def definitions(self) -> list[ToolDef]:
        return [ToolDef(t.name, t.description, t.schema) for t in self.tools.values()]

    def initialize(self) -> None:
        """Check the fixed tools, then start the MCP servers in parallel and wait for each up to its
        startup_timeout. A server that is not up by then is only logged: the agent serves without
        its tools meanwhile (a `required` one keeps /ready at 503), and it keeps being retried."""
        for tool in self.fixed.values():
            try:
                tool.initialize()
            except ToolError as exc:
                raise ToolStartupError(f"tool {tool.name} cannot start: {exc}") from None
        started = time.monotonic()
        for server in self.servers:
            server.start()
        for server in self.servers:
            waited = started + server.spec.startup_timeout + _ATTEMPT_SLACK - time.monotonic()
            if not server.wait_first_attempt(max(0.0, waited)):
                log.log(logging.ERROR if server.spec.required else logging.WARNING,
                        "MCP server %s is not up after %g s (%s); the agent starts without its tools%s",
                        server.name, server.spec.startup_timeout, server.last_error or "no answer yet",
                        " and /ready stays 503 until it is up" if server.spec.required else "")

    def shutdown(self, timeout: float = 5.0) -> None:
        """The fixed tools, then every MCP server at once, within `timeout`."""
        for tool in self.fixed.values():
            try:
                tool.shutdown()
            except Exception:  # one tool's cleanup must not stop the others'
                log.exception("tool %s failed to shut down", tool.name)
        stopping = [threading.Thread(target=server.stop, args=(timeout,), daemon=True) for server in self.servers]
        for thread in stopping:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in stopping:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _validator(self, tool: Tool) -> "Draft202012Validator":
        cached = self._validators.get(tool.name)
        if cached is None or cached[0] is not tool:  # jsonschema costs ~8 MB: loaded only once a tool is called
            from jsonschema import Draft202012Validator, validators
            cached = (tool, validators.validator_for(tool.schema, default=Draft202012Validator)(tool.schema))
            self._validators[tool.name] = cached
        return cached[1]

    def _refusal(self, tools: dict[str, Tool], name: str, arguments: Any) -> Optional[str]:
        """Why a call may not run (not configured, bad parameters), or None."""
        if name not in tools:
            return f"unknown tool {name!r}; the available tools are: {', '.join(sorted(tools)) or 'none'}"
        if not isinstance(arguments, dict):
            return f"the arguments for {name} must be a JSON object, got {str(arguments)[:100]!r}"
        problems = schema_problems(self._validator(tools[name]), arguments)
        if problems:
            return f"invalid parameters for {name}: " + "; ".join(problems[:5])
        return None

    def execute(self, name: str, arguments: Any, deadline: float) -> tuple[bool, str]:
        """(ok, content); a refused or failed call is reported, never raised."""
        tools = self.tools  # one view for the check and the call: an MCP server may list anew meanwhile
        refusal = self._refusal(tools, name, arguments)
        if refusal is not None:
            log.warning("tool call refused: %s", refusal)
            return False, refusal
        tool = tools[name]
        attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name}
        if isinstance(tool, McpTool):
            attributes.update({"agent2389.mcp.server": tool.server.name, "mcp.method.name": "tools/call"})
        started = time.monotonic()
        ok, timed_out = False, False
        with tracing.span(f"execute_tool {name}", attributes=attributes) as span:
            try:
                with cancellable():  # HTTP tools and MCP servers: a cancel shuts their connections
                    result = tool.execute(arguments, deadline)
                ok = True
                return True, result
            except TaskCanceled:
                span.fail(protocol.CANCELED)
                raise
            except ToolError as exc:
                taskscope.check()  # a failure the task's cancel caused
                timed_out = isinstance(exc, ToolTimeout)
                log.warning("tool %s failed: %s", name, exc)
                span.fail(type(exc).__name__)
                return False, f"tool {name} failed: {exc}"
            except Exception as exc:
                log.exception("tool %s raised an unexpected error", name)
                span.fail(type(exc).__name__)
                return False, f"tool {name} failed unexpectedly: {type(exc).__name__}"
            finally:
                self.events.emit(ToolExecuted(name, ok, timed_out, time.monotonic() - started))


def build_tool(spec: ToolSpec, config: AgentConfig) -> Tool:
    from .builtins import BUILTINS
    from .command import CommandTool
    tool = CommandTool(spec, config.max_output_size) if spec.kind == "command" else BUILTINS[spec.name](spec, config)
    tool.approval_timeout = spec.approval_timeout if spec.requires_approval else None
    return tool


def build_registry(config: AgentConfig, events: Optional[Events] = None,
                   ask: Optional[AskPerson] = None) -> ToolRegistry:
    """The configured tools; raises ToolStartupError naming the tool whose options are wrong.
    `ask` puts the MCP servers' elicitation requests to a person."""
    tools = []
    for spec in config.tools:
        try:
            tools.append(build_tool(spec, config))
        except ToolError as exc:
            raise ToolStartupError(f"tool {spec.name}: {exc}") from None
    return ToolRegistry(tools, [McpServer(spec, config.max_output_size, ask) for spec in config.mcp_servers], events)
