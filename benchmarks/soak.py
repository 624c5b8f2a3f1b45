"""Soak: mixed traffic for a while, sampling the agent's threads, descriptors and RSS.

    python benchmarks/soak.py [--minutes 10] [--rate 40] [--root TREE] [--tracemalloc DIR]

The agent thinks with a loopback OpenAI-compatible server and has the `echo` built-in and a
command tool (`echo`, a process per call). Traffic, per 20 messages: 10 valid tasks, 3 that call
a tool (the two in turn), 1 forwarded to another agent (a pipeline hop),
1 redelivered duplicate, 1 pipeline that revisits the agent, 1 not JSON, 1 invalid envelope, 1
oversized, 1 lone-surrogate poison. The completed-task store is small (2,000) so it is full
after the first minute; the figures that matter are the growth from then on. Every task that
can be answered must be answered. `--root` runs the agent of another tree (an earlier commit)
for a before/after; `--tracemalloc DIR` takes a snapshot a minute and prints what grew most
between the first full-store minute and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import AGENT, ROOT, Driver, Processes, memory_mb, start_agent, start_broker, start_llm  # noqa: E402

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
    if kind in (10, 11, 12):
        body = envelope(instruction="use a tool, then answer")
        return json.dumps(body).encode(), body["task_id"]
    if kind == 13:
        body = envelope(next={"topic": "/control/agents/soak-sink/input", "instruction": "next", "input": None,
                              "next": None})
        return json.dumps(body).encode(), None  # a hop: forwarded to an agent that is not there
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
    parser.add_argument("--rate", type=float, default=40.0, help="messages per second")
    parser.add_argument("--root", default=ROOT, help="the tree whose agent to run (default: this one)")
    parser.add_argument("--tracemalloc", metavar="DIR", help="snapshot the agent's allocations into DIR")
    parser.add_argument("--store-size", type=int, default=STORE_SIZE,
                        help=f"completed_store_size (default {STORE_SIZE}: full after the first minute)")
    args = parser.parse_args()
    procs = Processes()
    try:
        broker = start_broker(procs)
        driver = Driver(broker)
        llm = start_llm(procs, 0)
        config = os.path.join(procs.dir, "soak.toml")
        with open(config, "w") as handle:
            handle.write(f'[agent]\nid = "{AGENT}"\nstate_dir = "./state"\ncompleted_store_size = {args.store_size}\n\n'
                         f'[mqtt]\nbroker_url = "mqtt://127.0.0.1:{broker}"\n\n'
                         f'[llm]\nprovider = "openai"\nmodel = "bench"\nbase_url = "http://127.0.0.1:{llm}/v1"\n\n'
                         f'[tools]\necho = "builtin"\n\n'
                         f'[tools.shout]\nimpl = "external"\ncommand = "echo"\nargs = ["{{message}}"]\n'
                         f'schema = {{ type = "object", properties = {{ message = {{ type = "string" }} }}, '
                         f'required = ["message"] }}\n')
        traced = {"SNAPSHOT_DIR": args.tracemalloc} if args.tracemalloc else {}
        agent, _ = start_agent(procs, driver, config, traced, root=args.root,
                               program=os.path.join(os.path.dirname(os.path.abspath(__file__)), "traced_agent.py")
                               if traced else "")
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
    full = [s for s in samples if s["sent"] >= args.store_size * 20 / 14 + 1000] or samples[-2:]
    print(f"\nsoak: {index} messages in {args.minutes} min, {len(expected)} answers expected and all received")
    print(f"threads {min(s['threads'] for s in samples)}-{max(s['threads'] for s in samples)}, "
          f"fds {min(s['fds'] for s in samples)}-{max(s['fds'] for s in samples)}")
    print(f"RSS after the completed-task cache filled: {full[0]['rss_mb']} MB at minute {full[0]['minute']}, "
          f"{full[-1]['rss_mb']} MB at the end: growth {full[-1]['rss_mb'] - full[0]['rss_mb']:.1f} MB (target < 5)")
    if args.tracemalloc:
        report_growth(args.tracemalloc, round(full[0]["minute"]))


def report_growth(directory: str, warm_minute: int) -> None:
    """What grew most between the snapshot after warm-up and the last one."""
    import tracemalloc
    names = sorted(os.listdir(directory))
    if len(names) < 2:
        return
    first = names[min(max(warm_minute, 1), len(names) - 1) - 1]
    before, after = (tracemalloc.Snapshot.load(os.path.join(directory, n)) for n in (first, names[-1]))
    print(f"\ntracemalloc, {first} -> {names[-1]}, the largest growth:")
    for stat in after.compare_to(before, "traceback")[:8]:
        print(f"  {stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks")
        for line in stat.traceback.format()[-6:]:
            print("    " + line)


if __name__ == "__main__":
    main()
