"""An MCP server built with the official `mcp` SDK (a test dependency), over streamable HTTP:
`python mcp_sdk_server.py PORT [--json-response] [--cancel-log FILE] [--start-log FILE]`."""

import argparse
import asyncio

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

parser = argparse.ArgumentParser()
parser.add_argument("port", type=int)
parser.add_argument("--json-response", action="store_true", help="plain JSON answers instead of event streams")
parser.add_argument("--cancel-log", help="a file that gets a line for every call cancelled by the client")
parser.add_argument("--start-log", help="a file that gets a line for every call of wait as it begins")
args = parser.parse_args()
server = MCPServer("sdk-test")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def refuse(reason: str) -> str:
    """Always fails, with the reason given (isError: true)."""
    raise ToolError(reason)


@server.tool()
async def wait(seconds: float) -> str:
    """Waits, then says so."""
    if args.start_log:
        with open(args.start_log, "a") as handle:
            handle.write(f"waiting {seconds} s\n")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if args.cancel_log:
            with open(args.cancel_log, "a") as handle:
                handle.write(f"cancelled after asking for {seconds} s\n")
        raise
    return f"waited {seconds} s"


@server.tool()
def traceparent(ctx: Context) -> str:
    """The W3C traceparent header of the HTTP request that carried this call ("none" without one)."""
    request = ctx.request_context.request
    return (request.headers.get("traceparent") if request is not None else None) or "none"


server.run("streamable-http", host="127.0.0.1", port=args.port, json_response=args.json_response)
