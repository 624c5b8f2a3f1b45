"""Idle memory of an agent without tools (echo: the edge-box case), this tree against a baseline
commit, measured in the same run:
`python benchmarks/idle_memory.py [--baseline REF] [--runs N] [--provider echo|openai]`.

Each agent is started against a local mosquitto, waited for until its retained `available`
status arrives, left idle for a second, and its resident set (VmRSS) read. Also shown: which
heavy modules the agent has imported (`/proc` cannot say, so a probe run imports the runtime).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from harness import (Driver, Processes, memory_mb, start_agent, start_broker, start_llm,  # noqa: E402
                     write_agent_config)

HEAVY = ("jsonschema", "requests", "urllib3", "charset_normalizer", "sqlite3", "ssl")


def worktree(ref: str) -> str:
    path = tempfile.mkdtemp(prefix="baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, ref], check=True, capture_output=True)
    return path


def imported(tree: str, provider: str) -> list[str]:
    probe = (f"import sys; import agent2389_lib.runtime, agent2389_lib.llm.{provider}; "
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def idle_rss(procs: Processes, driver: Driver, broker: int, tree: str, provider: dict) -> float:
    config = write_agent_config(procs, broker, provider)
    agent, _ = start_agent(procs, driver, config, root=tree)
    time.sleep(1.0)  # idle: what the agent holds between tasks
    rss = memory_mb(agent.pid)[0]
    procs.stop(agent)
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="cf75d15", help="commit to compare with (default: before lazy imports)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--provider", choices=("echo", "openai"), default="echo",
                        help="openai: against a loopback OpenAI-compatible server")
    args = parser.parse_args()
    baseline = worktree(args.baseline)
    procs = Processes()
    try:
        broker = start_broker(procs)
        driver = Driver(broker)
        provider = {"provider": "echo"} if args.provider == "echo" else {
            "provider": "openai", "model": "bench", "base_url": f"http://127.0.0.1:{start_llm(procs, 0)}/v1"}
        trees = {"baseline " + args.baseline: baseline, "this tree": ROOT}
        figures = {name: [idle_rss(procs, driver, broker, tree, provider) for _ in range(args.runs)] for name, tree in trees.items()}
        base = statistics.median(figures["baseline " + args.baseline])
        print(f"{'agent':24} {'idle RSS MB (median of ' + str(args.runs) + ')':28} {'vs baseline':12} heavy modules loaded")
        for name, values in figures.items():
            median = statistics.median(values)
            print(f"{name:24} {median:<28.1f} {median - base:+.1f} MB ({median / base:.2f}x)  "
                  f"{' '.join(imported(trees[name], args.provider)) or '-'}")
    finally:
        procs.stop_all()
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", baseline], capture_output=True)


if __name__ == "__main__":
    main()
