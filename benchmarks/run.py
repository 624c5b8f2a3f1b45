"""agent2389 benchmarks: every figure next to a baseline measured in the same run.

    python benchmarks/run.py [--quick] [--instructions | --no-instructions] [--json FILE]

Starts its own mosquitto (set_tcp_nodelay) and a loopback OpenAI-compatible server, runs the
agent as a process (`agent2389.py run`), and prints two tables: instructions per task counted by
callgrind (benchmarks/instructions.py; the figures that hold still on a shared machine), then
wall-clock figures (latency, concurrency, memory, start-up) with their targets.
`--instructions` runs the first table only, `--no-instructions` the second only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

import cancel
import fleet
import gateway
import instructions
from harness import (AGENT, HERE, Driver, Processes, cpu_seconds, memory_mb, percentiles, start_agent, start_broker,
                     start_llm, write_agent_config)


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


def run(quick: bool) -> dict:
    scale = 5 if quick else 1
    burst, backlog, sequential, slow_tasks = 5000 // scale, 20000 // scale, 500 // scale, 320 // scale
    procs = Processes()
    results: dict = {}
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

        # concurrency: 200 ms LLM, 16 workers
        slow_config = write_agent_config(procs, broker, {"provider": "openai", "model": "bench",
                                                         "base_url": f"http://127.0.0.1:{slow_llm}/v1"})
        agent, _ = start_agent(procs, driver, slow_config)
        concurrent_rate = driver.burst(slow_tasks)
        procs.stop(agent)

        # cancel: from its publish to the end of the task's LLM connection
        cancel_ms = percentiles(cancel.measure(procs, driver, broker, 100 // scale))

        # the A2A gateway: what it adds to a task, against inject --wait and the bare MQTT round trip
        a2a = gateway.measure(procs, driver, broker, 500 // scale)

        # a pool of 4 x 8 workers against a provider allowing 60 requests a minute, without and with
        without, with_ = fleet.measure(procs, driver, broker, 180.0 / scale)

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
         f"{requests_cpu * 1e6:.0f}", round(llm_cpu / (paho_cpu + requests_cpu), 3),
         "(information: instructions above are the figure)"),
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
        ("cancel to the LLM connection's end p50/p99 (ms)", f"{cancel_ms['p50']}/{cancel_ms['p99']}",
         f"{100 // scale} cancels", cancel_ms["p99"], "p99 < 200 ms"),
        ("A2A send to answer via the gateway p50/p99 (ms)", f"{a2a['gateway']['p50']}/{a2a['gateway']['p99']}",
         f"MQTT round trip {a2a['direct']['p50']}/{a2a['direct']['p99']}, inject --wait {a2a['inject']['p50']}",
         round(a2a["gateway"]["p50"] - a2a["direct"]["p50"], 3), "(information: what it adds at p50)"),
        ("  gateway CPU per task (us)", a2a["gateway_cpu_us"], "", a2a["gateway_cpu_us"], "(information)"),
        ("429s, pool of 4 x 8 vs 60 requests/min, with / without fleet cooldowns and limits", with_["refused"],
         f"without: {without['refused']}", round(with_["refused"] / max(1, without["refused"]), 3), "<= 0.05"),
        ("  tasks answered a minute with them", round(with_["answered_per_minute"], 1), "the provider's limit 60",
         round(with_["answered_per_minute"] / 60, 3), ">= 0.9"),
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
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--instructions", action="store_true", help="only the instruction counts (callgrind)")
    only.add_argument("--no-instructions", action="store_true", help="only the wall-clock figures")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    results: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "platform": platform.platform(), "quick": args.quick}}
    print(f"agent2389 benchmarks ({results['machine']['platform']}, {results['machine']['cpus']} CPUs, "
          f"Python {results['machine']['python']})", flush=True)
    if not args.no_instructions:
        tasks = 10 if args.quick else 50
        results["instructions per task"] = counts = instructions.measure(tasks)
        print(f"\ninstructions per task (callgrind, {tasks} tasks one at a time after a warm-up of "
              f"{instructions.WARM_UP})\n")
        instructions.print_table(instructions.figures(counts), instructions.HEADER)
    if not args.instructions:
        results.update(run(args.quick))
        print("\nwall-clock figures\n")
        instructions.print_table(results["figures"], ("measurement", "agent", "baseline", "ratio / figure", "target"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
