"""A minimal OpenAI-compatible server for benchmarks: no validation, optional fixed latency; a
conversation that says "use a tool" gets a call of one of the tools offered (in turn), then an answer.

    python benchmarks/llm_server.py PORT LATENCY_MS
"""

import itertools
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

ROTATION = itertools.count()
MODELS = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model", "created": 0,
                                                 "owned_by": "bench"}]}).encode()


def completion(model: str, message: dict, prompt_tokens: int = 1, completion_tokens: int = 1) -> bytes:
    """A chat completion answering with `message`, as OpenAI's schema has it."""
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                                    "logprobs": None, "message": message}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}}).encode()


class LoopbackLlmHandler(BaseHTTPRequestHandler):
    """What every loopback LLM server of the benchmarks shares: keep-alive, the model list, silence."""

    protocol_version = "HTTP/1.1"
    # headers and body go out as two writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK (40 ms), a stall real LLM APIs do not have
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def send_json(self, code: int, body: bytes, headers: Optional[dict] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.send_json(200, MODELS)


def loopback_server(handler: type, port: int = 0) -> ThreadingHTTPServer:
    """`handler` on a loopback port (0: a free one)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server


def serve(handler: type) -> ThreadingHTTPServer:
    """`handler` on a free loopback port, served by a daemon thread of this process."""
    server = loopback_server(handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Handler(LoopbackLlmHandler):
    latency = 0.0  # seconds before each answer

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.latency:
            time.sleep(self.latency)
        last = request["messages"][-1]
        text = (last.get("content") or "")[:200]
        message = {"role": "assistant", "content": text}
        if request.get("tools") and last["role"] == "user" and "use a tool" in json.dumps(request["messages"]):
            # a tool call first (the tools offered in turn), the answer once its result is back
            name = request["tools"][next(ROTATION) % len(request["tools"])]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call-{time.monotonic_ns()}", "type": "function",
                "function": {"name": name, "arguments": json.dumps({"message": text})}}]}
        self.send_json(200, completion(request["model"], message))


if __name__ == "__main__":
    Handler.latency = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
    loopback_server(Handler, int(sys.argv[1])).serve_forever()
