"""An MCP stdio server that misbehaves on purpose, one way per mode (argv[1]), for the tests of
what the agent does with bad servers. The real servers the tests use are installed packages."""

import json
import os
import signal
import sys
import time

MODE = sys.argv[1]
FLAG = sys.argv[2] if len(sys.argv) > 2 else ""  # a file: "die-once" dies while it exists, then removes it
TOOL = {"name": "ping", "description": "Answers pong.", "inputSchema": {"type": "object"}}
ADDED = {"name": "added", "description": "Listed once ping was called.", "inputSchema": {"type": "object"}}
called = False


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def answer(request: dict) -> None:
    global called
    method = request.get("method")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": request["id"], "result": {
            "protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": MODE}}})
    elif method == "tools/list":
        tools = [TOOL, TOOL] if MODE == "duplicate" else [TOOL, ADDED] if called else [TOOL]
        result = {"tools": tools}
        if MODE == "paged" and not (request.get("params") or {}).get("cursor"):
            result = {"tools": [TOOL], "nextCursor": "page-2"}
        elif MODE == "paged":
            result = {"tools": [ADDED]}
        send({"jsonrpc": "2.0", "id": request["id"], "result": result})
        if MODE == "deaf":
            time.sleep(3600)  # reads nothing more: what the client writes fills the pipe
    elif method == "tools/call":
        if MODE == "die-once" and os.path.exists(FLAG):
            os.unlink(FLAG)
            os._exit(3)
        if MODE == "huge-once" and os.path.exists(FLAG):
            os.unlink(FLAG)
            sys.stdout.write('{"jsonrpc":"2.0","id":%d,"result":{"content":[{"type":"text","text":"' % request["id"])
            for _ in range(50):
                sys.stdout.write("x" * (1 << 20))
            sys.stdout.write('"}]}}\n')
            sys.stdout.flush()
            return
        send({"jsonrpc": "2.0", "id": request["id"], "result": {"content": [{"type": "text", "text": "pong"}]}})
        if MODE == "changing":
            called = True
            send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})


def main() -> None:
    if MODE == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if MODE == "noisy":
        for index in range(100):
            sys.stderr.write(f"noise {index} token={os.environ.get('API_TOKEN', '')}\n")
        sys.stderr.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if "id" not in request or "method" not in request:
            continue
        if MODE == "silent":
            continue
        if MODE == "garbage":
            sys.stdout.write("this is not JSON\n{\"half\": \n")
        answer(request)
    if MODE == "stubborn":
        while True:  # stdin closed, SIGTERM ignored: only SIGKILL ends it
            time.sleep(1)


main()
