"""agent2389 benchmarks: every figure next to a baseline measured in the same run.

    python benchmarks/run.py [--quick] [--json FILE]

Starts its own mosquitto (set_tcp_nodelay) and a loopback OpenAI-compatible server, runs the
agent as a process (`agent2389.py run`), and prints a table of measurements with their targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as mqtt
import requests

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

    def latencies(self, count: int) -> list[float]:
        """One task at a time: milliseconds from publish to answer."""
        samples = []
        for _ in range(count):
            task_id, payload = self.task()
            start = time.perf_counter()
            self.publish(payload)
            samples.append((self.wait([task_id], 30) - start) * 1000)
        return samples

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_agent_config(procs: Processes, broker: int, provider: dict, progress: bool = True,
                       agent: str = AGENT) -> str:
    path = os.path.join(procs.dir, f"agent-{uuid.uuid4().hex[:6]}.toml")
    llm = "\n".join(f"{k} = {json.dumps(v)}" for k, v in provider.items())
    with open(path, "w") as handle:
        handle.write(f'[agent]\nid = "{agent}"\nmax_pipeline_depth = 16\nprogress_events = {str(progress).lower()}\n\n'
                     f'[mqtt]\nbroker_url = "mqtt://127.0.0.1:{broker}"\n\n[llm]\n{llm}\n')
    return path


def start_agent(procs: Processes, driver: Driver, config: str, env_extra: dict | None = None,
                root: str = ROOT, program: str = "", agent: str = AGENT) -> tuple:
    """An agent process from the tree at `root` (or `program` with the same arguments), and its
    seconds to `available`."""
    available = driver.next_available(agent)
    env = {"PATH": os.environ["PATH"], "HEALTH_PORT": str(free_port()), "LOG_LEVEL": "INFO",
           "OPENAI_API_KEY": "sk-bench", **(env_extra or {})}
    started = time.perf_counter()
    proc = procs.spawn([sys.executable, program or os.path.join(root, "agent2389.py"), "run", "--config", config], env=env,
                       log="agent.log")
    if not available.wait(30):
        raise RuntimeError(f"the agent did not become available (see {procs.dir}/agent.log)")
    return proc, time.perf_counter() - started


def memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_baseline(llm_port: int, count: int, threads: int) -> tuple[float, float]:
    """The same LLM calls from a bare requests loop: one Session per thread, like the agent.
    Returns (calls per second, CPU seconds per call in this process)."""
    url = f"http://127.0.0.1:{llm_port}/v1/chat/completions"
    body = {"model": "bench", "messages": [{"role": "user", "content": "bench"}]}
    local = threading.local()

    def call(_: int) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        session.post(url, json=body, timeout=30).json()

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(call, range(count)))
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]  # noqa: E731
    return {"p50": round(pick(0.50), 3), "p95": round(pick(0.95), 3), "p99": round(pick(0.99), 3)}


def tracing_cpu_per_task(procs: Processes, driver: Driver, broker: int, provider: dict, count: int,
                         windows: int = 15) -> dict[str, list[float]]:
    """CPU seconds per task in each window, with tracing off, with the [otel] extra absent (ids,
    propagation and log correlation only) and exporting every span. The three agents run side by
    side, sent the same tasks in turn (100 a second each) and measured over the same window: this
    machine drifts by up to 25% from one window to the next, far more than the effect measured,
    and the drift hits the three alike. Each window starts them afresh, in a rotating order (one
    process can run 1.5% dearer than its twin all window long), and waits for the batch
    processor's last export (5 s) before reading the CPU clocks."""
    sink = free_port()
    procs.spawn([sys.executable, os.path.join(HERE, "otlp_sink.py"), str(sink)], log="otlp.log")
    wait_port(sink)
    exporting = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}", "OTEL_TRACES_SAMPLER": "always_on"}
    modes = {"off": ({"OTEL_SDK_DISABLED": "true"}, ""),
             "extra absent": (exporting, os.path.join(HERE, "without_otel.py")), "export on": (exporting, "")}
    names = {mode: f"{AGENT}-{mode.replace(' ', '-')}" for mode in modes}
    configs = {mode: write_agent_config(procs, broker, provider, agent=names[mode]) for mode in modes}
    order = list(modes)
    cpu: dict = {mode: [] for mode in modes}
    for window in range(windows):
        turn = order[window % len(order):] + order[:window % len(order)]
        agents = {mode: start_agent(procs, driver, configs[mode], modes[mode][0], program=modes[mode][1],
                                    agent=names[mode])[0] for mode in turn}
        driver.paced(200, 100, tuple(names.values()))
        before = {mode: cpu_seconds(agent.pid) for mode, agent in agents.items()}
        driver.paced(count, 100, tuple(names.values()))
        time.sleep(6)
        for mode, agent in agents.items():
            cpu[mode].append((cpu_seconds(agent.pid) - before[mode]) / count)
            procs.stop(agent)
    return cpu


def run(quick: bool) -> dict:
    scale = 5 if quick else 1
    burst, backlog, sequential, slow_tasks = 5000 // scale, 20000 // scale, 500 // scale, 320 // scale
    paced = 1500 // scale
    procs = Processes()
    results: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "platform": platform.platform(), "quick": quick}}
    try:
        broker = start_broker(procs)
        driver = Driver(broker)
        instant_llm = start_llm(procs, 0)
        slow_llm = start_llm(procs, 200)

        # baselines: a bare paho echo client, a bare requests loop
        baseline = procs.spawn([sys.executable, os.path.join(HERE, "echo_baseline.py"), str(broker), AGENT],
                               log="baseline.log")
        time.sleep(0.5)  # its subscription (benchmarks may pace themselves; tests may not)
        driver.burst(200)
        cpu = cpu_seconds(baseline.pid)
        paho_rate = driver.burst(burst)
        paho_cpu = (cpu_seconds(baseline.pid) - cpu) / burst
        paho_latency = percentiles(driver.latencies(sequential))
        procs.stop(baseline)
        requests_rate, requests_cpu = requests_baseline(instant_llm, burst, 16)

        # echo provider: throughput, latency, startup, idle memory
        echo_config = write_agent_config(procs, broker, {"provider": "echo"})
        startups = []
        for _ in range(3):
            agent, startup = start_agent(procs, driver, echo_config)
            startups.append(startup)
            procs.stop(agent)
        agent, _ = start_agent(procs, driver, echo_config)
        time.sleep(1.0)
        idle_rss = memory_mb(agent.pid)[0]
        driver.burst(200)
        echo_rate = driver.burst(burst)
        echo_latency = percentiles(driver.latencies(sequential))
        procs.stop(agent)
        quiet_config = write_agent_config(procs, broker, {"provider": "echo"}, progress=False)
        agent, _ = start_agent(procs, driver, quiet_config)
        driver.burst(200)
        quiet_rate = driver.burst(burst)
        procs.stop(agent)

        # instant LLM over HTTP: throughput and peak memory under load
        instant = {"provider": "openai", "model": "bench", "base_url": f"http://127.0.0.1:{instant_llm}/v1"}
        openai_config = write_agent_config(procs, broker, instant)
        agent, _ = start_agent(procs, driver, openai_config)
        driver.burst(200)
        cpu = cpu_seconds(agent.pid)
        llm_rate = driver.burst(burst)
        llm_cpu = (cpu_seconds(agent.pid) - cpu) / burst
        llm_latency = percentiles(driver.latencies(sequential))
        load_peak = memory_mb(agent.pid)[1]
        procs.stop(agent)

        tracing_cpu = tracing_cpu_per_task(procs, driver, broker, instant, paced)
        results["tracing CPU per task by window (us)"] = {mode: [round(c * 1e6) for c in cpus]
                                                          for mode, cpus in tracing_cpu.items()}
        traced_off = statistics.median(tracing_cpu["off"])
        traced_ratio = {mode: statistics.median(c / off for c, off in zip(tracing_cpu[mode], tracing_cpu["off"]))
                        for mode in ("extra absent", "export on")}

        # concurrency: 200 ms LLM, 16 workers
        slow_config = write_agent_config(procs, broker, {"provider": "openai", "model": "bench",
                                                         "base_url": f"http://127.0.0.1:{slow_llm}/v1"})
        agent, _ = start_agent(procs, driver, slow_config)
        concurrent_rate = driver.burst(slow_tasks)
        procs.stop(agent)

        # backlog: tasks queued in the persistent session while the agent is down
        agent, _ = start_agent(procs, driver, echo_config)
        procs.stop(agent)
        tasks = [driver.task() for _ in range(backlog)]
        infos = [driver.publish(payload) for _, payload in tasks]
        for info in infos:
            info.wait_for_publish(60)
        agent, _ = start_agent(procs, driver, echo_config)
        driver.wait([t for t, _ in tasks], 900)
        backlog_peak = memory_mb(agent.pid)[1]
        procs.stop(agent)
        driver.close()
    finally:
        procs.stop_all()

    slower = min(paho_rate, requests_rate)
    results["figures"] = [
        ("throughput, instant LLM (tasks/s)", round(llm_rate, 1), f"baselines: paho echo {paho_rate:.0f}, "
         f"requests loop {requests_rate:.0f}", round(llm_rate / slower, 3), "(information: of the slower baseline)"),
        ("CPU per task, instant LLM (us)", round(llm_cpu * 1e6), f"paho echo {paho_cpu * 1e6:.0f} + requests "
         f"{requests_cpu * 1e6:.0f}", round(llm_cpu / (paho_cpu + requests_cpu), 3), "<= 1.4x of the baselines' sum"),
        ("CPU per task, tracing: [otel] extra absent (us)", round(statistics.median(tracing_cpu["extra absent"]) * 1e6),
         f"tracing off {traced_off * 1e6:.0f}", round(traced_ratio["extra absent"], 3), "<= 1.02x of tracing off"),
        ("CPU per task, tracing: every span exported (us)", round(statistics.median(tracing_cpu["export on"]) * 1e6),
         f"tracing off {traced_off * 1e6:.0f}", round(traced_ratio["export on"], 3), "<= 1.15x of tracing off"),
        ("throughput, echo provider (tasks/s)", round(echo_rate, 1), f"paho echo {paho_rate:.0f}",
         round(echo_rate / paho_rate, 3), ">= 0.6"),
        ("  same, progress_events = false", round(quiet_rate, 1), f"paho echo {paho_rate:.0f}",
         round(quiet_rate / paho_rate, 3), "(information)"),
        ("latency p50/p95/p99, echo provider (ms)", f"{echo_latency['p50']}/{echo_latency['p95']}/{echo_latency['p99']}",
         f"paho echo {paho_latency['p50']}/{paho_latency['p95']}/{paho_latency['p99']}",
         round(echo_latency["p50"] - paho_latency["p50"], 3), "p50 overhead < 2 ms"),
        ("latency p50/p95/p99, instant LLM (ms)", f"{llm_latency['p50']}/{llm_latency['p95']}/{llm_latency['p99']}",
         f"paho echo {paho_latency['p50']}", round(llm_latency["p50"] - paho_latency["p50"], 3), "(information)"),
        ("concurrency, 200 ms LLM, 16 workers (tasks/s)", round(concurrent_rate, 1), "ideal 16 / 0.2 s = 80",
         round(concurrent_rate / 80, 3), ">= 0.9"),
        ("idle RSS, echo provider (MB)", round(idle_rss, 1), "", round(idle_rss, 1), "<= 29"),
        ("peak RSS under load (MB)", round(load_peak, 1), "", round(load_peak, 1), "(information)"),
        (f"peak RSS draining a {backlog}-task backlog (MB)", round(backlog_peak, 1), "", round(backlog_peak, 1), "< 80"),
        ("startup to retained available (s)", round(statistics.median(startups), 3), "median of 3", "",
         "< 1 s"),
    ]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the tasks (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    results = run(args.quick)
    print(f"\nagent2389 benchmarks ({results['machine']['platform']}, {results['machine']['cpus']} CPUs, "
          f"Python {results['machine']['python']})\n")
    header = ("measurement", "agent", "baseline", "ratio / figure", "target")
    rows = [header] + [tuple(str(c) for c in row) for row in results["figures"]]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
