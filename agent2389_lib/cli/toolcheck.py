"""`agent2389 tools list|call`: what the agent would offer the LLM, and one tool run by hand, from
a configuration, without a broker or an LLM (MCP servers are started to ask them)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from ..config import AgentConfig
from ..tools import build_registry
from ..tools.registry import ToolRegistry, ToolStartupError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_DESCRIPTION_SHOWN = 100


def list_tools(config: AgentConfig, as_json: bool) -> int:
    """Every tool with where it comes from; 1 when an MCP server could not be asked."""
    registry = _started(config)
    if registry is None:
        return EXIT_FAILED
    try:
        rows = [{"name": tool.name, "source": tool.source, "description": tool.description,
                 "input_schema": tool.schema} for tool in registry.tools.values()]
        servers = registry.server_statuses()
    finally:
        registry.shutdown()
    if as_json:
        print(json.dumps({"tools": rows, "mcp_servers": servers}, indent=2, ensure_ascii=False))
    else:
        width = max([len(row["name"]) for row in rows] + [4])
        for row in rows:
            first_line = (str(row["description"]).strip().splitlines() or [""])[0][:_DESCRIPTION_SHOWN]
            print(f"{row['name']:<{width}}  {row['source']:<20}  {first_line}")
    for server in servers:
        if server["state"] != "up":
            print(f"MCP server {server['name']} is {server['state']}: {server['last_error'] or 'no answer'}",
                  file=sys.stderr)
    return EXIT_OK if all(server["state"] == "up" for server in servers) else EXIT_FAILED


def call_tool(config: AgentConfig, name: str, arguments: str) -> int:
    """Run one tool as the agent would (same checks, timeout and output cap) and print its result."""
    try:
        params: Any = json.loads(arguments)
    except ValueError as exc:
        print(f"--args is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    registry = _started(config)
    if registry is None:
        return EXIT_FAILED
    try:
        ok, content = registry.execute(name, params, time.monotonic() + config.task_timeout)
    finally:
        registry.shutdown()
    print(content, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def _started(config: AgentConfig) -> "ToolRegistry | None":
    try:
        registry = build_registry(config)
        registry.initialize()
    except ToolStartupError as exc:
        print(exc, file=sys.stderr)
        return None
    return registry

