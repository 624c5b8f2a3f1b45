"""What the A2A gateway adds: milliseconds from an A2A SendMessage (JSON-RPC, blocking, over a
kept-alive HTTP connection) to the answer, against `inject --wait` (a process per task) and the
same task published on MQTT and awaited (what inject does, without its process start), all in
one run against one echo agent; and the gateway's CPU per task.

    python benchmarks/gateway.py [COUNT]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import requests

from harness import (AGENT, ROOT, Driver, Processes, cpu_seconds, free_port, percentiles, start_agent, start_broker,
                     write_agent_config)

_INJECTS = 20  # `inject --wait` runs: each is a process start


def measure(procs: Processes, driver: Driver, broker: int, count: int) -> dict:
    agent, _ = start_agent(procs, driver, write_agent_config(procs, broker, {"provider": "echo"}))
    port = free_port()
    program = os.path.join(ROOT, "agent2389.py")
    gateway = procs.spawn([sys.executable, program, "gateway", "--listen", f"127.0.0.1:{port}", "--broker-url",
                           f"mqtt://127.0.0.1:{broker}", "--state", os.path.join(procs.dir, "gateway.sqlite3")],
                          env={"PATH": os.environ["PATH"], "LOG_LEVEL": "WARN"}, log="gateway.log")
    url = f"http://127.0.0.1:{port}/agents/{AGENT}"
    session = requests.Session()
    deadline = time.monotonic() + 30
    while True:  # until it serves the agent's card (it read the retained status)
        try:
            if session.get(f"{url}/.well-known/agent-card.json", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not serve {AGENT} (see {procs.dir}/gateway.log)")
        time.sleep(0.05)

    def send() -> float:
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {
            "messageId": uuid.uuid4().hex, "role": "ROLE_USER", "parts": [{"text": "bench"}]}}}
        start = time.perf_counter()
        answer = session.post(url, json=body, headers={"A2A-Version": "1.0"}, timeout=30).json()
        elapsed = (time.perf_counter() - start) * 1000
        if answer["result"]["task"]["status"]["state"] != "TASK_STATE_COMPLETED":
            raise RuntimeError(f"the gateway answered {answer}")
        return elapsed

    try:
        for _ in range(20):
            send()
        direct = driver.latencies(count)
        cpu = cpu_seconds(gateway.pid)
        through = [send() for _ in range(count)]
        gateway_cpu = (cpu_seconds(gateway.pid) - cpu) / count
        injects = []
        for _ in range(_INJECTS):
            start = time.perf_counter()
            subprocess.run([sys.executable, program, "inject", "--agent-id", AGENT, "--message", "bench", "--wait",
                            "30", "--broker-url", f"mqtt://127.0.0.1:{broker}"], check=True, capture_output=True,
                           env={"PATH": os.environ["PATH"]})
            injects.append((time.perf_counter() - start) * 1000)
    finally:
        procs.stop(gateway)
        procs.stop(agent)
    return {"gateway": percentiles(through), "direct": percentiles(direct), "inject": percentiles(injects),
            "gateway_cpu_us": round(gateway_cpu * 1e6)}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    procs = Processes()
    try:
        broker = start_broker(procs)
        driver = Driver(broker)
        figures = measure(procs, driver, broker, count)
        driver.close()
    finally:
        procs.stop_all()
    gateway, direct, inject = figures["gateway"], figures["direct"], figures["inject"]
    print(f"A2A SendMessage to its answer through the gateway, {count} tasks: p50 {gateway['p50']} ms, p99 "
          f"{gateway['p99']} ms; the same task on MQTT {direct['p50']} / {direct['p99']} ms (the gateway adds "
          f"{gateway['p50'] - direct['p50']:.2f} ms at p50); `inject --wait` {inject['p50']} / {inject['p99']} ms "
          f"({_INJECTS} runs, a process each); gateway CPU {figures['gateway_cpu_us']} us a task")


if __name__ == "__main__":
    main()
