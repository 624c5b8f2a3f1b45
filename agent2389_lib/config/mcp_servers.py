"""`[[mcp_servers]]`: Model Context Protocol tool servers, over stdio (`command`) or streamable
HTTP (`url`). The same table in both layouts; every problem names the entry and the key."""

from __future__ import annotations

import re
from typing import Any, Optional

from .model import McpServerSpec, Secret
from .reader import Reader, table_reader
from .sources import Collector

_DEFAULTS = McpServerSpec(name="")  # as model.py declares them

MCP_SERVER_KEYS = ("name", "command", "args", "url", "headers", "env", "cwd", "timeout", "startup_timeout",
                   "required", "allowed_tools", "denied_tools", "approval_tools", "approval_timeout")
_NAME_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
_VARIABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)
_CREDENTIAL_NAME = re.compile(r"(?i)pass|token|key|secret|auth|credential|cookie|session")


def build_mcp_servers(entries: list, out: Collector) -> tuple[McpServerSpec, ...]:
    specs: list[McpServerSpec] = []
    for origin, table in entries:
        spec = _build_server(origin, table, out)
        if spec is None:
            continue
        if any(other.name == spec.name for other in specs):
            out.problem(f"{origin} ({spec.name}): MCP server name {spec.name!r} is used twice; each needs its own "
                        f"name")
            continue
        specs.append(spec)
    return tuple(specs)


def _build_server(origin: str, table: Any, out: Collector) -> Optional[McpServerSpec]:
    if not isinstance(table, dict):
        out.problem(f"{origin} must be a table")
        return None
    given = table.get("name")
    if isinstance(given, str) and _NAME_RE.match(given):
        origin = f"{origin} ({given})"  # every problem below names the server too
    read = table_reader(out, origin, table, MCP_SERVER_KEYS)
    name = read.string("name", None, allow_empty=False)
    if name is None:
        out.problem(f"{origin} needs name = \"...\" (its tools reach the LLM as NAME__TOOL)")
        return None
    if not _NAME_RE.match(name):
        read.bad("name", name, "must be 1-32 of a-z, 0-9, '_' or '-'")
        return None
    command, url = table.get("command"), table.get("url")
    if (command is None) == (url is None):
        out.problem(f"{origin} needs exactly one of command = \"program\" (stdio) or url = \"https://...\" "
                    f"(streamable HTTP)")
        return None
    argv: tuple = ()
    if command is not None:
        program = read.string("command", None, allow_empty=False)
        args = read.strings("args", [])
        if program is None or args is None:
            return None
        argv = (program, *args)
        if "headers" in table:
            out.problem(f"{origin} headers apply to url servers only")
    else:
        url = read.http_url("url", "http://mcp-server:8000/mcp")
        if url is None:
            return None
        for key in ("args", "env", "cwd"):
            if key in table:
                out.problem(f"{origin} {key} applies to command (stdio) servers only")
    allowed = read.strings("allowed_tools", None)
    denied = read.strings("denied_tools", [])
    if allowed is not None and denied:
        out.problem(f"{origin}: set allowed_tools or denied_tools, not both")
    return McpServerSpec(
        name=name, command=argv, url=url if command is None else None,
        env=_pairs(read, "env", _VARIABLE_RE, "an environment variable name"),
        headers=_pairs(read, "headers", _HEADER_RE, "an HTTP header name"),
        cwd=read.string("cwd", None, allow_empty=False),
        timeout=read.number("timeout", _DEFAULTS.timeout, 0.1, 3600.0),
        startup_timeout=read.number("startup_timeout", _DEFAULTS.startup_timeout, 1.0, 3600.0),
        required=read.boolean("required", _DEFAULTS.required),
        allowed_tools=tuple(allowed) if allowed is not None else None,
        denied_tools=tuple(denied or ()),
        approval_tools=tuple(read.strings("approval_tools", []) or ()),
        approval_timeout=read.integer("approval_timeout", _DEFAULTS.approval_timeout, 1, 7 * 86400))


def _pairs(read: Reader, key: str, name_rule: re.Pattern, noun: str) -> tuple:
    """A table of strings; values under credential-like names become Secrets (masked, redacted)."""
    table = read.raw(key, {})
    if not isinstance(table, dict):
        read.out.problem(f"{read.origin(key)} must be a table of strings, like {key} = {{ NAME = \"value\" }}")
        return ()
    pairs = []
    for name, value in table.items():
        if not name_rule.match(name):
            read.out.problem(f"{read.origin(key)}: {name!r} is not {noun}")
        elif not isinstance(value, str) or "\0" in value:
            read.out.problem(f"{read.origin(key)} {name} must be a string")
        else:
            pairs.append((name, Secret(value) if _CREDENTIAL_NAME.search(name) else value))
    return tuple(pairs)
