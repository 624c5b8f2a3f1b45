"""A pool against a rate-limited provider: what one back-off for the fleet and the client-side
limits change (PROTOCOL.md 8).

    python benchmarks/fleet.py [SECONDS] [MEMBERS] [WORKERS] [LIMIT_PER_MINUTE]

The provider (in this process) answers LIMIT requests in any 60 s and 429 with Retry-After
beyond. The pool (MEMBERS agents with one id, WORKERS workers each) is kept busy for SECONDS,
twice: without (no client-side limit, no fleet cooldowns: each worker retries after its own
Retry-After) and with (`requests_per_minute` = LIMIT, `fleet_cooldowns` on). For each: the 429s
the provider sent and the tasks answered per minute.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import uuid
from collections import deque

import paho.mqtt.client as mqtt

from harness import AGENT, Driver, Processes, start_agent, start_broker, write_agent_config
from llm_server import LoopbackLlmHandler, completion, serve



class LimitedLlm:
    """`per_minute` completions in any 60 s; 429 with Retry-After beyond."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.window: deque = deque()
        self.answered = self.refused = 0
        self.lock = threading.Lock()
        llm = self

        class Handler(LoopbackLlmHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                wait = llm.admit()
                if wait is None:
                    self.send_json(200, completion("bench", {"role": "assistant", "content": "ok"}, 10, 2))
                else:
                    self.send_json(429, b'{"error": {"message": "rate limited", "type": "rate_limit_exceeded"}}',
                                   {"Retry-After": str(wait)})

        self.server = serve(Handler)
        self.port = self.server.server_address[1]

    def admit(self):
        """None when answered, else the whole seconds to wait."""
        with self.lock:
            now = time.monotonic()
            while self.window and self.window[0] <= now - 60:
                self.window.popleft()
            if len(self.window) < self.per_minute:
                self.window.append(now)
                self.answered += 1
                return None
            self.refused += 1
            return max(1, math.ceil(self.window[0] + 60 - now))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Answers:
    """Answers and errors on the pool's conversations, counted as they arrive."""

    def __init__(self, port: int) -> None:
        self.responses = self.errors = 0
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"answers-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()
        self.client.subscribe("/conversations/fleet/+", 1)
        subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            if b'"error"' in message.payload:
                self.errors += 1
            else:
                self.responses += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_pool(procs: Processes, driver: Driver, broker: int, seconds: float, members: int, workers: int,
             limit: int, shared: bool) -> dict:
    llm = LimitedLlm(limit)
    provider = {"provider": "openai", "model": "bench", "base_url": f"http://127.0.0.1:{llm.port}/v1",
                "fleet_cooldowns": shared}
    if shared:
        provider["requests_per_minute"] = limit
    agent = f"{AGENT}-{'with' if shared else 'without'}"
    config = write_agent_config(procs, broker, provider, progress=False, agent=agent)
    pool = [start_agent(procs, driver, config, {"AGENT_INSTANCE_ID": f"m{index}", "MAX_PIPELINE_DEPTH": str(workers)},
                        agent=agent)[0] for index in range(members)]
    answers = Answers(broker)
    try:
        started = time.monotonic()
        published = 0
        while time.monotonic() - started < seconds:  # twice the limit offered: the pool is never idle
            _, payload = driver.task(cid="fleet", agent=agent)
            driver.publish(payload, agent)
            published += 1
            time.sleep(max(0.0, started + published * 30.0 / limit - time.monotonic()))
        with answers.lock:
            responses, errors = answers.responses, answers.errors
        with llm.lock:
            refused = llm.refused
    finally:
        for proc in pool:
            procs.stop(proc)
        answers.close()
        llm.close()
    return {"refused": refused, "answered_per_minute": responses * 60.0 / seconds, "errors": errors}


def measure(procs: Processes, driver: Driver, broker: int, seconds: float, members: int = 4, workers: int = 8,
            limit: int = 60) -> tuple[dict, dict]:
    """(without, with)."""
    return (run_pool(procs, driver, broker, seconds, members, workers, limit, shared=False),
            run_pool(procs, driver, broker, seconds, members, workers, limit, shared=True))


def main() -> None:
    seconds, members, workers, limit = (float(sys.argv[1]) if len(sys.argv) > 1 else 180.0,
                                        *(int(value) for value in (sys.argv[2:5] or ["4", "8", "60"])))
    procs = Processes()
    try:
        broker = start_broker(procs)
        driver = Driver(broker)
        without, with_ = measure(procs, driver, broker, seconds, members, workers, limit)
        driver.close()
    finally:
        procs.stop_all()
    print(f"{members} members x {workers} workers, a provider allowing {limit} requests a minute, {seconds:g} s each:")
    for name, result in (("without", without), ("with fleet cooldowns and limits", with_)):
        print(f"  {name}: {result['refused']} 429s, {result['answered_per_minute']:.1f} tasks answered a minute "
              f"({result['answered_per_minute'] / limit:.0%} of the limit), {result['errors']} errors")
    print(f"  429s with / without: {with_['refused'] / max(1, without['refused']):.1%} (target <= 5%); answered a "
          f"minute with them: {with_['answered_per_minute'] / limit:.0%} of the limit (target >= 90%)")


if __name__ == "__main__":
    main()
