"""Soak: mixed traffic for a while, sampling the agent's threads, descriptors and RSS.

    python benchmarks/soak.py [--minutes 10] [--rate 100]

Traffic, per 20 messages: 14 valid tasks, 1 redelivered duplicate, 1 pipeline that revisits
the agent, 1 not JSON, 1 invalid envelope, 1 oversized, 1 lone-surrogate poison. The
completed-task store is small (2,000) so it is full after the first minute; the figures that
matter are the growth from then on. Every task that can be answered must be answered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import AGENT, Driver, Processes, memory_mb, start_agent, start_broker  # noqa: E402

INPUT = f"/control/agents/{AGENT}/input"
STORE_SIZE = 2000


def envelope(**over) -> dict:
    body = {"task_id": str(uuid.uuid4()), "conversation_id": "soak", "topic": INPUT, "instruction": "soak",
            "input": {"text": "lorem ipsum"}, "next": None}
    body.update(over)
    return body


def message(index: int, recent: list) -> tuple[bytes, str | None]:
    """The payload to send and the task id whose answer it must produce (None: no answer)."""
    kind = index % 20
    if kind == 14 and recent:
        return json.dumps(recent[-1]).encode(), None  # a duplicate: silently dropped
    if kind == 15:
        body = envelope(next={"topic": INPUT, "instruction": "again", "input": None, "next": None})
        return json.dumps(body).encode(), body["task_id"]  # forwarded to itself, answered at the revisit
    if kind == 16:
        return b"{not json", None
    if kind == 17:
        body = envelope(instruction=42)
        return json.dumps(body).encode(), body["task_id"]  # invalid_input
    if kind == 18:
        body = envelope(input="x" * 300000)
        return json.dumps(body).encode(), body["task_id"]  # oversized: invalid_input
    if kind == 19:
        body = envelope(instruction="POISON")
        return json.dumps(body).replace('"POISON"', '"\\ud800"').encode(), body["task_id"]  # invalid_input
    body = envelope()
    recent.append(body)
    del recent[:-10]
    return json.dumps(body).encode(), body["task_id"]


def sample(pid: int) -> dict:
    rss, _ = memory_mb(pid)
    return {"threads": len(os.listdir(f"/proc/{pid}/task")), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mb": round(rss, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    args = parser.parse_args()
    procs = Processes()
    try:
        broker = start_broker(procs)
        driver = Driver(broker)
        config = os.path.join(procs.dir, "soak.toml")
        with open(config, "w") as handle:
            handle.write(f'[agent]\nid = "{AGENT}"\nstate_dir = "./state"\ncompleted_store_size = {STORE_SIZE}\n\n'
                         f'[mqtt]\nbroker_url = "mqtt://127.0.0.1:{broker}"\n\n[llm]\nprovider = "echo"\n')
        agent, _ = start_agent(procs, driver, config)
        expected: list[str] = []
        recent: list = []
        samples = []
        started = time.monotonic()
        end = started + args.minutes * 60
        next_sample = started
        index = 0
        while time.monotonic() < end:
            payload, task_id = message(index, recent)
            driver.publish(payload)
            if task_id:
                expected.append(task_id)
            index += 1
            now = time.monotonic()
            if now >= next_sample:
                samples.append({"minute": round((now - started) / 60, 2), "sent": index, **sample(agent.pid)})
                print(json.dumps(samples[-1]), flush=True)
                next_sample += 15
            time.sleep(max(0.0, started + index / args.rate - time.monotonic()))  # pacing
        driver.wait(expected, 120)
        samples.append({"minute": round((time.monotonic() - started) / 60, 2), "sent": index, **sample(agent.pid)})
        driver.close()
    finally:
        procs.stop_all()
    full = [s for s in samples if s["sent"] >= STORE_SIZE * 20 / 14 + 1000] or samples[-2:]
    print(f"\nsoak: {index} messages in {args.minutes} min, {len(expected)} answers expected and all received")
    print(f"threads {min(s['threads'] for s in samples)}-{max(s['threads'] for s in samples)}, "
          f"fds {min(s['fds'] for s in samples)}-{max(s['fds'] for s in samples)}")
    print(f"RSS after the completed-task cache filled: {full[0]['rss_mb']} MB at minute {full[0]['minute']}, "
          f"{full[-1]['rss_mb']} MB at the end: growth {full[-1]['rss_mb'] - full[0]['rss_mb']:.1f} MB (target < 5)")


if __name__ == "__main__":
    main()
