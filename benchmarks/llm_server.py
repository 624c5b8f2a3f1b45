"""A minimal OpenAI-compatible server for benchmarks: no validation, optional fixed latency.

    python benchmarks/llm_server.py PORT LATENCY_MS
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
        text = request["messages"][-1]["content"][:200]
        self._send(json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                               "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                            "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode())


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()
