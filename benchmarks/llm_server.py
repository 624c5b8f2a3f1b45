"""A minimal OpenAI-compatible server for benchmarks: no validation, optional fixed latency; a
conversation that says "use a tool" gets a call of one of the tools offered (in turn), then an answer.

    python benchmarks/llm_server.py PORT LATENCY_MS
"""

import itertools
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROTATION = itertools.count()
LATENCY = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
MODELS = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model", "created": 0,
                                                 "owned_by": "bench"}]}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out as two writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK (40 ms), a stall real LLM APIs do not have
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(MODELS)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if LATENCY:
            time.sleep(LATENCY)
        last = request["messages"][-1]
        text = (last.get("content") or "")[:200]
        message = {"role": "assistant", "content": text}
        if request.get("tools") and last["role"] == "user" and "use a tool" in json.dumps(request["messages"]):
            # a tool call first (the tools offered in turn), the answer once its result is back
            name = request["tools"][next(ROTATION) % len(request["tools"])]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call-{time.monotonic_ns()}", "type": "function",
                "function": {"name": name, "arguments": json.dumps({"message": text})}}]}
        self._send(json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                               "choices": [{"index": 0, "finish_reason": "tool_calls" if "tool_calls" in message
                                            else "stop", "logprobs": None, "message": message}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode())


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
