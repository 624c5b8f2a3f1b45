"""Instructions per task, counted by valgrind's callgrind: figures that hold still on a shared
machine (the same burst counts the same to within half a percent, whatever else runs), for the
agent and for its baselines in the same run.

    python benchmarks/instructions.py [--tasks 50] [--json FILE]   (also: run.py --instructions)

Each process runs under `valgrind --tool=callgrind --instr-atstart=no`: start-up and a warm-up of
5 tasks are not counted; `callgrind_control -i on PID` before a burst of tasks sent one at a time,
`-i off` and `-d` after it, and the dump's `totals:` divided by the tasks is the figure. Only
the measured process is counted (mosquitto, the loopback LLM server and a command tool's child
are not). valgrind is installed with apt-get when missing (as root); the peer (paho and the
official `openai` SDK, benchmarks/peer_openai.py) runs from a side environment,
benchmarks/.peer-venv, made here with pip.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

from harness import (AGENT, HERE, Driver, Processes, free_port, start_agent, start_broker, start_llm, wait_port,
                     write_agent_config)

WARM_UP = 5
PEER_VENV = os.path.join(HERE, ".peer-venv")
TOOL = ('\n[[tools]]\nname = "say"\ncommand = "/bin/echo"\nargs = ["{message}"]\ndescription = "Say it."\n'
        'schema = { type = "object", properties = { message = { type = "string" } } }\n')
HEADER = ("measurement", "instructions/task", "baseline", "ratio", "target")
USE_A_TOOL = "use a tool"  # what makes the loopback LLM server call one (benchmarks/llm_server.py)


def ensure_valgrind() -> None:
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("valgrind is needed for instruction counts: install it (Debian/Ubuntu: "
                         "apt-get install valgrind) and run again")
    print("installing valgrind (apt-get install valgrind) ...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def peer_python() -> Optional[str]:
    """The side environment's interpreter with `openai` and `paho-mqtt`; None when it cannot be made."""
    python = os.path.join(PEER_VENV, "bin", "python")
    if not os.path.exists(python):
        try:
            subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True)
            subprocess.run([python, "-m", "pip", "install", "-q", "openai", "paho-mqtt>=2.1"], check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"no peer figure: could not make {PEER_VENV} ({exc})", file=sys.stderr)
            shutil.rmtree(PEER_VENV, ignore_errors=True)
            return None
    return python


class Callgrind:
    """Processes under callgrind, each counted around the bursts given to `count`."""

    def __init__(self, directory: str):
        self.dir = directory

    def argv(self, name: str) -> list[str]:
        return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-line=no",
                f"--callgrind-out-file={self.dir}/{name}.%p.out"]

    def count(self, pid: int, burst: Callable[[], None]) -> int:
        """Instructions the process executed (every thread) during `burst`."""
        self._control(pid, "-i", "on")
        burst()
        self._control(pid, "-i", "off")
        before = set(glob.glob(f"{self.dir}/*.{pid}.out.*"))
        self._control(pid, "-d")
        (dump,) = set(glob.glob(f"{self.dir}/*.{pid}.out.*")) - before
        with open(dump) as handle:
            return sum(int(line.split()[1]) for line in handle if line.startswith("totals:"))

    @staticmethod
    def _control(pid: int, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


class Run:
    """One measuring run: the broker, the LLM server and the driver every process shares."""

    def __init__(self, procs: Processes, tasks: int):
        self.procs, self.tasks = procs, tasks
        self.callgrind = Callgrind(procs.dir)
        self.broker = start_broker(procs)
        self.driver = Driver(self.broker)
        self.llm_port = start_llm(procs, 0)
        self.llm_url = f"http://127.0.0.1:{self.llm_port}/v1"

    def per_task(self, pid: int, burst: Callable[[int], None]) -> int:
        burst(WARM_UP)
        return round(self.callgrind.count(pid, lambda: burst(self.tasks)) / self.tasks)

    def mqtt_client(self, name: str, argv: list[str], agent: str) -> int:
        """A baseline that answers tasks like an agent (the paho echo, the peer)."""
        proc = self.procs.spawn([*self.callgrind.argv(name), *argv], log=f"{name}.log")
        self.driver.first_answer(agent)
        try:
            return self.per_task(proc.pid, lambda n: self.driver.latencies(n, agent=agent, timeout=120))
        finally:
            self.procs.stop(proc)

    def calls(self, name: str, args: list[str]) -> int:
        """A baseline of calls.py: the work of one task's call, without MQTT."""
        with open(os.path.join(self.procs.dir, f"{name}.log"), "ab") as log:
            proc = subprocess.Popen([*self.callgrind.argv(name), sys.executable, os.path.join(HERE, "calls.py"), *args],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                    cwd=self.procs.dir)
        self.procs.procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None

        def burst(count: int) -> None:
            proc.stdin.write(f"{count}\n")
            proc.stdin.flush()
            if proc.stdout.readline().strip() != "done":
                raise RuntimeError(f"{name} baseline failed (see {self.procs.dir})")

        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name} baseline did not start")
        try:
            return self.per_task(proc.pid, burst)
        finally:
            proc.stdin.close()
            self.procs.stop(proc)

    def agent(self, provider: dict, env: Optional[dict] = None, program: str = "", progress: bool = True,
              extra: str = "", instruction: str = "bench") -> int:
        config = write_agent_config(self.procs, self.broker, provider, progress=progress, extra=extra)
        proc, _ = start_agent(self.procs, self.driver, config, env, program=program,
                              wrapper=self.callgrind.argv("agent"), timeout=600)
        try:
            return self.per_task(proc.pid, lambda n: self.driver.latencies(n, instruction, timeout=120))
        finally:
            self.procs.stop(proc)


def measure(tasks: int) -> dict:
    ensure_valgrind()
    peer = peer_python()
    procs = Processes()
    try:
        run = Run(procs, tasks)
        sink = free_port()
        procs.spawn([sys.executable, os.path.join(HERE, "otlp_sink.py"), str(sink)], log="otlp.log")
        wait_port(sink)
        openai = {"provider": "openai", "model": "bench", "base_url": run.llm_url}
        off = {"OTEL_SDK_DISABLED": "true"}
        counts = {
            "paho echo": run.mqtt_client("echo", [sys.executable, os.path.join(HERE, "echo_baseline.py"),
                                                  str(run.broker), AGENT], AGENT),
            "requests call": run.calls("requests", ["requests", f"{run.llm_url}/chat/completions"]),
            "fork/exec": run.calls("exec", ["exec", "/bin/echo", "bench"]),
            "agent, OpenAI provider": run.agent(openai),
            "agent, OpenAI provider, a tool call": run.agent(openai, extra=TOOL, instruction=USE_A_TOOL),
            "agent, echo provider": run.agent({"provider": "echo"}),
            "agent, tracing off": run.agent(openai, off),
            "agent, [otel] extra absent": run.agent(openai, program=os.path.join(HERE, "without_otel.py")),
            "agent, every span exported": run.agent(openai, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}",
                                                             "OTEL_TRACES_SAMPLER": "always_on"}),
            "agent, progress_events = false": run.agent(openai, progress=False),
        }
        if peer:
            counts["paho + openai SDK (peer)"] = run.mqtt_client("peer", [peer, os.path.join(HERE, "peer_openai.py"),
                                                                          str(run.broker), "bench-peer", run.llm_url],
                                                                 "bench-peer")
        run.driver.close()
    finally:
        procs.stop_all()
    return counts


def figures(counts: dict) -> list[tuple]:
    """Rows of (measurement, instructions per task, baseline, ratio, target)."""
    floor = counts["paho echo"] + counts["requests call"]
    tool_floor = counts["paho echo"] + 2 * counts["requests call"] + counts["fork/exec"]
    agent, off = counts["agent, OpenAI provider"], counts["agent, tracing off"]
    rows = [(name, counts[name], "", "", "baseline") for name in ("paho echo", "requests call", "fork/exec")]
    rows += [
        ("agent, OpenAI provider", agent, f"floor {floor:,} (echo + requests)", agent / floor, "<= 1.08x"),
        ("agent, OpenAI provider, a tool call", counts["agent, OpenAI provider, a tool call"],
         f"floor {tool_floor:,} (echo + 2 requests + fork/exec)",
         counts["agent, OpenAI provider, a tool call"] / tool_floor, "<= 1.08x"),
        ("agent, echo provider", counts["agent, echo provider"], f"paho echo {counts['paho echo']:,}",
         counts["agent, echo provider"] / counts["paho echo"], "(report; halve what is above it)"),
        ("agent, [otel] extra absent", counts["agent, [otel] extra absent"], f"tracing off {off:,}",
         counts["agent, [otel] extra absent"] / off, "<= 1.02x"),
        ("agent, every span exported", counts["agent, every span exported"], f"tracing off {off:,}",
         counts["agent, every span exported"] / off, "<= 1.15x"),
        ("agent, progress_events = false", counts["agent, progress_events = false"], f"agent {agent:,}",
         counts["agent, progress_events = false"] / agent, "(information)"),
    ]
    peer = counts.get("paho + openai SDK (peer)")
    if peer:
        rows.append(("paho + openai SDK (peer)", peer, f"agent {agent:,}", agent / peer, "agent <= 0.6x of the peer"))
    return [(name, f"{count:,}", base, f"{ratio:.3f}" if ratio else "", target)
            for name, count, base, ratio, target in rows]


def print_table(rows: list[tuple], header: tuple) -> None:
    rows = [header] + [tuple(str(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50, help="tasks counted per process (after 5 of warm-up)")
    parser.add_argument("--json", metavar="FILE", help="also write the counts as JSON")
    args = parser.parse_args()
    started = time.monotonic()
    counts = measure(args.tasks)
    print(f"\ninstructions per task (callgrind, {args.tasks} tasks one at a time, Python {sys.version.split()[0]}; "
          f"{time.monotonic() - started:.0f} s)\n")
    print_table(figures(counts), HEADER)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(counts, handle, indent=2)


if __name__ == "__main__":
    main()
