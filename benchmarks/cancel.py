"""How fast a cancel stops a task: milliseconds from publishing the cancel to the end of the task's
LLM connection, as the LLM server sees it (it runs in this process, so both times are one clock).

    python benchmarks/cancel.py [COUNT]

Each task's LLM request gets an answer that keeps coming (a byte every 20 ms, as a model
generating a long one); once it began, the cancel is published and the server notes when the
agent closes the connection. Then the next task, after the `canceled` error arrived.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
import uuid

from harness import AGENT, Driver, Processes, start_agent, start_broker, write_agent_config
from llm_server import LoopbackLlmHandler, serve

_TRICKLE_SECONDS, _EVERY = 60.0, 0.02


class TricklingLlm:
    """Answers every completion with a body that trickles until the client closes; by the marker
    in the request (the task's id), when the answer began and when its connection ended."""

    def __init__(self) -> None:
        self.started: dict[str, threading.Event] = {}
        self.closed_at: dict[str, float] = {}
        self.lock = threading.Lock()
        llm = self

        class Handler(LoopbackLlmHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                marker = next((m for m in llm.started if m in body), None)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                if marker is not None:
                    llm.started[marker].set()
                ends, closed = time.monotonic() + _TRICKLE_SECONDS, False
                try:
                    while not closed and time.monotonic() < ends:
                        readable, _, _ = select.select([self.connection], [], [], _EVERY)
                        closed = bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
                        if not closed:
                            self.wfile.write(b"1\r\n \r\n")
                            self.wfile.flush()
                except OSError:
                    closed = True
                if closed and marker is not None:
                    with llm.lock:
                        llm.closed_at[marker] = time.monotonic()
                self.close_connection = True

        self.server = serve(Handler)
        self.port = self.server.server_address[1]

    def expect(self, marker: str) -> threading.Event:
        event = self.started[marker] = threading.Event()
        return event

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def measure(procs: Processes, driver: Driver, broker: int, count: int) -> list[float]:
    """Milliseconds from each cancel's publish to its LLM connection's end, `count` of them."""
    llm = TricklingLlm()
    config = write_agent_config(procs, broker, {"provider": "openai", "model": "bench",
                                                "base_url": f"http://127.0.0.1:{llm.port}/v1"})
    agent, _ = start_agent(procs, driver, config)
    samples = []
    try:
        for _ in range(count):
            marker = uuid.uuid4().hex
            began = llm.expect(marker)
            task_id, payload = driver.task(instruction=marker)
            driver.publish(payload)
            if not began.wait(30):
                raise RuntimeError("the LLM request did not begin")
            sent = time.monotonic()
            driver.client.publish(f"/control/agents/{AGENT}/cancel", json.dumps({"task_id": task_id}), qos=1)
            driver.wait([task_id], 30)  # the canceled error
            deadline = time.monotonic() + 30
            while marker not in llm.closed_at:
                if time.monotonic() > deadline:
                    raise RuntimeError("the LLM connection was not closed")
                time.sleep(0.001)
            samples.append((llm.closed_at[marker] - sent) * 1000)
    finally:
        procs.stop(agent)
        llm.close()
    return samples


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    procs = Processes()
    try:
        broker = start_broker(procs)
        driver = Driver(broker)
        samples = sorted(measure(procs, driver, broker, count))
        driver.close()
    finally:
        procs.stop_all()
    pick = lambda q: samples[min(len(samples) - 1, max(0, round(q * len(samples)) - 1))]  # noqa: E731
    print(f"cancel to the end of the LLM connection, {count} cancels: p50 {pick(0.5):.1f} ms, "
          f"p99 {pick(0.99):.1f} ms, max {samples[-1]:.1f} ms (target: p99 < 200 ms)")


if __name__ == "__main__":
    main()
