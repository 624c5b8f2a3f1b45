"""What every benchmark needs: its own mosquitto and loopback LLM server, a driver that publishes
tasks and times their answers, and agent processes started from a configuration."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Sequence

import paho.mqtt.client as mqtt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AGENT = "bench-agent"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


class Processes:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-")
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list, env: dict | None = None, log: str = "out.log") -> subprocess.Popen:
        handle = open(os.path.join(self.dir, log), "ab")
        proc = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=self.dir)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)


def start_broker(procs: Processes) -> int:
    port = free_port()
    conf = os.path.join(procs.dir, "mosquitto.conf")
    with open(conf, "w") as handle:
        handle.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                     "max_queued_messages 0\npersistence false\n" + ("user root\n" if os.geteuid() == 0 else ""))
    procs.spawn(["mosquitto", "-c", conf], log="mosquitto.log")
    wait_port(port)
    return port


def start_llm(procs: Processes, latency_ms: int) -> int:
    port = free_port()
    procs.spawn([sys.executable, os.path.join(HERE, "llm_server.py"), str(port), str(latency_ms)], log="llm.log")
    wait_port(port)
    return port


class Driver:
    """Publishes tasks and records when each answer (or the agent's status) arrives."""

    def __init__(self, port: int):
        self.arrivals: dict[str, float] = {}
        self.available: dict[str, threading.Event] = {}  # by agent id: its next `available`
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"driver-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()
        self.client.subscribe([("/conversations/+/+", 1), ("/control/agents/+/status", 1)])
        subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        now = time.perf_counter()
        payload = json.loads(message.payload)
        if message.topic.endswith("/status"):
            with self.cond:
                event = self.available.get(message.topic.split("/")[3])
            if event is not None and payload.get("status") == "available":
                event.set()
            return
        with self.cond:
            self.arrivals.setdefault(payload["task_id"], now)
            self.cond.notify_all()

    def next_available(self, agent: str) -> threading.Event:
        """Set when `agent` next publishes `available` (not by a retained status from before)."""
        with self.cond:
            event = self.available[agent] = threading.Event()
        return event

    def task(self, instruction: str = "bench", cid: str = "bench", agent: str = AGENT) -> tuple[str, bytes]:
        task_id = str(uuid.uuid4())
        body = {"task_id": task_id, "conversation_id": cid, "topic": f"/control/agents/{agent}/input",
                "instruction": instruction, "input": {"text": "lorem ipsum dolor sit amet"}, "next": None}
        return task_id, json.dumps(body).encode()

    def publish(self, payload: bytes, agent: str = AGENT):
        return self.client.publish(f"/control/agents/{agent}/input", payload, qos=1)

    def wait(self, ids: list, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(i in self.arrivals for i in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{sum(i in self.arrivals for i in ids)}/{len(ids)} answered in {timeout} s")
                self.cond.wait(left)
        return max(self.arrivals[i] for i in ids)

    def burst(self, count: int, timeout: float = 600) -> float:
        """Publish `count` tasks as fast as possible; tasks per second from first publish to last answer."""
        tasks = [self.task() for _ in range(count)]
        start = time.perf_counter()
        for _, payload in tasks:
            self.publish(payload)
        end = self.wait([t for t, _ in tasks], timeout)
        return count / (end - start)

    def paced(self, count: int, rate: float, agents: tuple = (AGENT,), timeout: float = 600) -> None:
        """Publish `count` tasks to each of `agents` at `rate` a second each and wait for their
        answers; the agents take turns, who goes first rotating. CPU per task then compares across
        settings: a saturated agent handles more messages per wake-up the slower it is, which hides
        part of what it spends."""
        turns = [agents[(index + offset) % len(agents)] for index in range(count) for offset in range(len(agents))]
        tasks = [(self.task(agent=agent), agent) for agent in turns]
        start = time.perf_counter()
        for index, ((_, payload), agent) in enumerate(tasks):
            delay = start + index / (rate * len(agents)) - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.publish(payload, agent)
        self.wait([task_id for (task_id, _), _ in tasks], timeout)

    def latencies(self, count: int, instruction: str = "bench", agent: str = AGENT,
                  timeout: float = 30) -> list[float]:
        """One task at a time: milliseconds from publish to answer."""
        samples = []
        for _ in range(count):
            task_id, payload = self.task(instruction, agent=agent)
            start = time.perf_counter()
            self.publish(payload, agent)
            samples.append((self.wait([task_id], timeout) - start) * 1000)
        return samples

    def first_answer(self, agent: str = AGENT, timeout: float = 300) -> None:
        """For a client that announces nothing (the baselines): a task every 2 s until one is
        answered (one published before it subscribed is lost)."""
        deadline = time.monotonic() + timeout
        while True:
            task_id, payload = self.task(agent=agent)
            self.publish(payload, agent)
            try:
                self.wait([task_id], 2)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{agent} answered nothing within {timeout} s") from None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_agent_config(procs: Processes, broker: int, provider: dict, progress: bool = True,
                       agent: str = AGENT, extra: str = "") -> str:
    """`extra`: more TOML (e.g. `[[tools]]` tables)."""
    path = os.path.join(procs.dir, f"agent-{uuid.uuid4().hex[:6]}.toml")
    llm = "\n".join(f"{k} = {json.dumps(v)}" for k, v in provider.items())
    with open(path, "w") as handle:
        handle.write(f'[agent]\nid = "{agent}"\nmax_pipeline_depth = 16\nprogress_events = {str(progress).lower()}\n\n'
                     f'[mqtt]\nbroker_url = "mqtt://127.0.0.1:{broker}"\n\n[llm]\n{llm}\n{extra}')
    return path


def start_agent(procs: Processes, driver: Driver, config: str, env_extra: dict | None = None,
                root: str = ROOT, program: str = "", agent: str = AGENT, wrapper: Sequence[str] = (),
                timeout: float = 30) -> tuple:
    """An agent process from the tree at `root` (or `program` with the same arguments; under
    `wrapper`, e.g. valgrind), and its seconds to `available`."""
    available = driver.next_available(agent)
    env = {"PATH": os.environ["PATH"], "HEALTH_PORT": str(free_port()), "LOG_LEVEL": "INFO",
           "OPENAI_API_KEY": "sk-bench", **(env_extra or {})}
    started = time.perf_counter()
    proc = procs.spawn([*wrapper, sys.executable, program or os.path.join(root, "agent2389.py"), "run", "--config",
                        config], env=env, log="agent.log")
    if not available.wait(timeout):
        raise RuntimeError(f"the agent did not become available (see {procs.dir}/agent.log)")
    return proc, time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]  # noqa: E731
    return {"p50": round(pick(0.50), 3), "p95": round(pick(0.95), 3), "p99": round(pick(0.99), 3)}


def memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]
