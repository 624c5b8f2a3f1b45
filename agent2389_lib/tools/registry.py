"""The configured tools: the allow-list, schema validation, execution with a deadline."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..config import AgentConfig, ToolSpec
from .base import Tool, ToolDef, ToolError, ToolTimeout

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

log = logging.getLogger("agent2389.tools")


class ToolStartupError(Exception):
    pass


def schema_problems(validator: "Draft202012Validator", params: Any) -> list[str]:
    """Every schema violation, each naming the failing path ($.a.b[0])."""
    problems = []
    for error in sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path)):
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        problems.append(f"{path}: {error.message}")
    return problems


class ToolRegistry:
    def __init__(self, tools: list[Tool]):
        self.tools = {tool.name: tool for tool in tools}
        self._validators = {}
        if tools:  # jsonschema costs ~8 MB of memory: an agent without tools never loads it
            from jsonschema import Draft202012Validator
            self._validators = {tool.name: Draft202012Validator(tool.schema) for tool in tools}
        self.on_execution: Callable[[str, bool, bool, float], None] = lambda name, ok, timed_out, seconds: None

    def definitions(self) -> list[ToolDef]:
        return [ToolDef(t.name, t.description, t.schema) for t in self.tools.values()]

    def initialize(self) -> None:
        for tool in self.tools.values():
            try:
                tool.initialize()
            except ToolError as exc:
                raise ToolStartupError(f"tool {tool.name} cannot start: {exc}") from None

    def shutdown(self) -> None:
        for tool in self.tools.values():
            try:
                tool.shutdown()
            except Exception:  # one tool's cleanup must not stop the others'
                log.exception("tool %s failed to shut down", tool.name)

    def check(self, name: str, arguments: Any) -> Optional[str]:
        """Why a call may not run (not configured, bad parameters), or None."""
        if name not in self.tools:
            return f"unknown tool {name!r}; the available tools are: {', '.join(sorted(self.tools)) or 'none'}"
        if not isinstance(arguments, dict):
            return f"the arguments for {name} must be a JSON object, got {str(arguments)[:100]!r}"
        problems = schema_problems(self._validators[name], arguments)
        if problems:
            return f"invalid parameters for {name}: " + "; ".join(problems[:5])
        return None

    def execute(self, name: str, arguments: Any, deadline: float) -> tuple[bool, str]:
        """(ok, content); a refused or failed call is reported, never raised."""
        refusal = self.check(name, arguments)
        if refusal is not None:
            log.warning("tool call refused: %s", refusal)
            return False, refusal
        started = time.monotonic()
        ok, timed_out = False, False
        try:
            result = self.tools[name].execute(arguments, deadline)
            ok = True
            return True, result
        except ToolError as exc:
            timed_out = isinstance(exc, ToolTimeout)
            log.warning("tool %s failed: %s", name, exc)
            return False, f"tool {name} failed: {exc}"
        except Exception as exc:
            log.exception("tool %s raised an unexpected error", name)
            return False, f"tool {name} failed unexpectedly: {type(exc).__name__}"
        finally:
            self.on_execution(name, ok, timed_out, time.monotonic() - started)


def build_tool(spec: ToolSpec, config: AgentConfig) -> Tool:
    from .builtins import BUILTINS
    from .command import CommandTool
    if spec.kind == "command":
        return CommandTool(spec, config.max_output_size)
    return BUILTINS[spec.name](spec, config)


def build_registry(config: AgentConfig) -> ToolRegistry:
    """The configured tools; raises ToolStartupError naming the tool whose options are wrong."""
    tools = []
    for spec in config.tools:
        try:
            tools.append(build_tool(spec, config))
        except ToolError as exc:
            raise ToolStartupError(f"tool {spec.name}: {exc}") from None
    return ToolRegistry(tools)
