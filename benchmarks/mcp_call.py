"""MCP stdio tool calls against a command tool doing the same work, in one run.

    python benchmarks/mcp_call.py [--calls 300]

Both answer "pong" from a Python process: the command tool starts `python -c` per call, the MCP
server (tests/mcp_bad_server.py, plain mode) is started once and answers over stdin/stdout.
Also shown: the reference servers the tests use (mcp-server-time, server-everything), when
installed in this interpreter's environment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from agent2389_lib.config import McpServerSpec, ToolSpec  # noqa: E402
from agent2389_lib.tools.command import CommandTool  # noqa: E402
from agent2389_lib.tools.mcp.server import McpServer  # noqa: E402
from agent2389_lib.tools.registry import ToolRegistry  # noqa: E402


def latencies(tools: ToolRegistry, name: str, arguments: dict, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        ok, text = tools.execute(name, arguments, time.monotonic() + 30)
        samples.append(time.perf_counter() - started)
        if not ok:
            raise RuntimeError(f"{name} failed: {text}")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    command = CommandTool(ToolSpec(name="pong", kind="command", command=sys.executable,
                                   args=("-c", "print('pong')")), 100000)
    scripts = sysconfig.get_path("scripts")
    specs = [McpServerSpec(name="py", command=(sys.executable, os.path.join(ROOT, "tests", "mcp_bad_server.py"),
                                                "plain"))]
    extra = [("time", "time__get_current_time", {"timezone": "UTC"}, ("mcp-server-time",)),
             ("everything", "everything__echo", {"message": "pong"}, ("mcp-server-everything", "stdio"))]
    for name, _, _, argv in extra:
        if os.access(os.path.join(scripts, argv[0]), os.X_OK):
            specs.append(McpServerSpec(name=name, command=(os.path.join(scripts, argv[0]), *argv[1:])))
    tools = ToolRegistry([command], [McpServer(spec, 100000) for spec in specs])
    tools.initialize()
    try:
        rows = [("command tool, python -c (a process per call)", latencies(tools, "pong", {}, args.calls))]
        rows.append(("MCP stdio, python server (baseline's work)", latencies(tools, "py__ping", {}, args.calls)))
        for name, tool, arguments, _ in extra:
            if tool in tools.tools:
                rows.append((f"MCP stdio, {name} ({tool})", latencies(tools, tool, arguments, args.calls)))
    finally:
        tools.shutdown()
    baseline = statistics.median(rows[0][1])
    print(f"\n{args.calls} calls each, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    print(f"{'tool':<50}  {'p50 ms':>8}  {'p95 ms':>8}  {'p50 / command tool':>18}")
    for label, samples in rows:
        ordered = sorted(samples)
        p50, p95 = statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]
        print(f"{label:<50}  {p50 * 1000:8.2f}  {p95 * 1000:8.2f}  {p50 / baseline:18.3f}")


if __name__ == "__main__":
    main()
