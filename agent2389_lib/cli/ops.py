"""What the operator commands do, apart from argument parsing: build tasks, wait for answers,
render monitored messages, probe the health endpoint."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from typing import Any, Callable, Optional, Sequence

from .. import protocol, tracing
from .opsclient import OperatorClient, OperatorError

EXIT_RESPONSE, EXIT_ERROR, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 0, 1, 3, 124
ROLE_INSTRUCTIONS = (  # (a word in the agent's id, what that agent is asked by default)
    ("research", "Research the topic: list the key facts, with sources."),
    ("writ", "Write a clear, well-structured article from the research."),
    ("edit", "Edit the article: fix errors, tighten the prose, keep every fact."),
    ("review", "Review the work: list what is wrong or missing, then give an improved version."),
    ("judg", "Judge the work: say whether it answers the request and why."),
    ("summar", "Summarise the work in a few sentences."),
)
GENERIC_INSTRUCTION = "Continue the work on the topic."
SUMMARY_CHARS = 160
PRETTY_CHARS = 2000  # of a message's summary in monitor's default view; --full shows it whole
_COLOURS = {"status": "\033[32m", "task": "\033[36m", "response": "\033[1;34m", "error": "\033[1;31m",
            "progress": "\033[33m", "other": "\033[0m"}
_RESET = "\033[0m"


def default_instruction(agent_id: str) -> str:
    """A stage's default instruction follows the agent's role, as its id names it."""
    lowered = agent_id.lower()
    return next((text for word, text in ROLE_INSTRUCTIONS if word in lowered), GENERIC_INSTRUCTION)


def next_chain(agent_ids: list[str], instructions: Optional[list[Optional[str]]] = None) -> Optional[dict]:
    """`a,b,c` -> {topic: a, next: {topic: b, next: {topic: c, next: null}}}."""
    chain: Optional[dict] = None
    for index in range(len(agent_ids) - 1, -1, -1):
        instruction = instructions[index] if instructions and index < len(instructions) else None
        chain = {"topic": protocol.input_topic(agent_ids[index]), "instruction": instruction, "input": None,
                 "next": chain}
    return chain


def build_task(agent_id: str, *, instruction: Optional[str], input: Any, conversation_id: Optional[str] = None,
               next: Optional[dict] = None, v2: bool = False, query: Optional[str] = None) -> dict:
    task: dict = {"task_id": str(uuid.uuid4()), "conversation_id": conversation_id or f"cli-{uuid.uuid4().hex[:12]}",
                  "topic": protocol.input_topic(agent_id), "instruction": instruction, "input": input, "next": next}
    if v2:
        original = query or instruction or (json.dumps(input) if input is not None else "")
        task.update(version="2.0", context={"original_query": original, "steps_completed": [], "iteration_count": 0},
                    routing_trace=[])
    return task


def answers(task: dict, payload: Any) -> bool:
    """Whether a conversation message is the answer to `task`. A v2 task's answer may come from
    another agent under another task id (a routed workflow's final answer, or an error of any hop)."""
    if not isinstance(payload, dict):
        return False
    if payload.get("task_id") == task["task_id"]:
        return True
    return "version" in task and ("workflow" in payload or "error" in payload)


PROGRESS_TOPIC = protocol.progress_filter()


def check_agent(client: OperatorClient, input_topic: str, timeout: float = 10.0) -> None:
    """Raises OperatorError unless the agent's retained status says it is available: a task for
    an agent that never announced itself would wait for an answer that cannot come. The broker
    sends retained messages on subscribing, before a probe published after it comes back."""
    agent_id = protocol.next_agent_id(input_topic)
    status_topic = protocol.status_topic(agent_id)
    probe = protocol.probe_topic(agent_id, client.client_id)
    client.subscribe([status_topic, probe])
    client.publish(probe, b"probe")
    status: Any = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = client.next_message(max(0.0, deadline - time.monotonic()))
        if message is None or message.topic == probe:
            break
        if message.topic == status_topic:
            status = json_or_text(message.payload)
    hint = "start it, check --agent-id and the broker, or publish anyway with --no-check"
    if not isinstance(status, dict):
        raise OperatorError(f"no agent {agent_id} has announced itself on {client.where} (no retained status on "
                            f"{status_topic}); {hint}")
    if status.get("status") != protocol.AVAILABLE:
        raise OperatorError(f"agent {agent_id} is {status.get('status')} on {client.where} (its status of "
                            f"{status.get('timestamp')}); {hint}")


def send_task(client: OperatorClient, task: dict, wait: Optional[float],
              on_progress: Optional[Callable[[str], None]] = None,
              expiry: Optional[int] = None) -> tuple[int, Optional[dict]]:
    """Publish a task (`expiry`: its MQTT 5 Message Expiry Interval); with `wait`, subscribe to its
    conversation first (and, with `on_progress`, to the agents' progress events) and return the answer."""
    answer_topic = protocol.conversation_topic(task["conversation_id"], "+")
    if wait is not None:
        client.subscribe([answer_topic] + ([PROGRESS_TOPIC] if on_progress else []))
    context = _trace(task)
    client.publish(task["topic"], protocol.to_payload(task), headers=context.headers() if context else (),
                   expiry=expiry)
    if wait is None:
        return EXIT_RESPONSE, None
    if on_progress:
        trace = f" (trace {context.trace_id})" if context else ""
        on_progress(f"published task {task['task_id']} to {task['topic']} on {client.where}{trace}; waiting up to "
                    f"{wait:g} s for an answer on {answer_topic}")
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        message = client.next_message(max(0.0, left)) if left > 0 else None
        if message is None:
            return EXIT_TIMEOUT, None
        payload = json_or_text(message.payload)
        if message_type(message.topic, payload) == "progress":
            if on_progress and payload_conversation(payload) == task["conversation_id"]:
                on_progress(progress_line(payload))
            continue
        if answers(task, payload):
            return (EXIT_ERROR if "error" in payload else EXIT_RESPONSE), {"topic": message.topic, "payload": payload}


def _trace(task: dict) -> Optional[tracing.TraceContext]:
    return tracing.parse(task.get(tracing.TRACEPARENT), task.get(tracing.TRACESTATE))


def describe_reply(reply: Optional[dict], task: dict, wait: Optional[float]) -> str:
    if wait is None:
        context = _trace(task)
        return (f"published task {task['task_id']} to {task['topic']} (conversation {task['conversation_id']}"
                f"{', trace ' + context.trace_id if context else ''})")
    if reply is None:
        return f"no answer to task {task['task_id']} within {wait:g} s"
    payload = reply["payload"]
    if "error" in payload:
        return f"error {payload['error'].get('code')}: {payload['error'].get('message')} (from {reply['topic']})"
    return str(payload.get("response"))


def describe_workflow(reply: Optional[dict]) -> Optional[str]:
    """The route a v2 workflow took, one hop per line, and how it ended; None for other answers."""
    if reply is None:
        return None
    workflow = reply["payload"].get("workflow")
    if not isinstance(workflow, dict):
        return None
    lines = [f"{step.get('step_number')}. {step.get('from_agent')} -> {step.get('to_agent')}: {step.get('reason')}"
             for step in workflow.get("routing_trace") or [] if isinstance(step, dict)]
    lines.append(f"workflow complete ({workflow.get('reason')}) after {workflow.get('iterations')} step(s), "
                 f"answered by {reply['topic'].rsplit('/', 1)[-1]}")
    return "\n".join(lines)


# ---------------------------------------------------------------- monitor

def monitor_topics(mode: str, agent_id: Optional[str], conversation_id: Optional[str]) -> list[str]:
    agent = agent_id or "+"
    topics = {
        "availability": [protocol.status_topic(agent), protocol.instance_status_topic(agent, "+")],
        "conversations": [protocol.conversation_filter(conversation_id or "+")],
        "inputs": [protocol.input_topic(agent)],
        "progress": [protocol.progress_filter(agent)],
    }
    topics["routing"] = topics["inputs"] + topics["conversations"]  # forwarded tasks carry the trace
    if mode == "all":
        return [t for key in ("availability", "inputs", "conversations", "progress") for t in topics[key]]
    return topics[mode]


def message_type(topic: str, payload: Any) -> str:
    parts = protocol.canonicalize_topic(topic).split("/")
    if parts[1:2] == ["conversations"]:
        return "error" if isinstance(payload, dict) and "error" in payload else "response"
    if parts[1:3] == ["control", "agents"] and len(parts) > 4:
        if parts[4] == "instances":  # a pool member's own status
            return "status" if parts[-1] == "status" else "other"
        return {"status": "status", "input": "task", "progress": "progress"}.get(parts[4], "other")
    return "other"


def routing_hop(topic: str, data: bytes) -> Optional[str]:
    """`monitor --mode routing`: one line for a routed hop (a v2 task whose trace grew) or a
    workflow's final answer; None for anything else."""
    payload = json_or_text(data)
    if not isinstance(payload, dict):
        return None
    kind = message_type(topic, payload)
    trace = payload.get("routing_trace")
    if kind == "task" and isinstance(trace, list) and trace and isinstance(trace[-1], dict):
        hop = trace[-1]
        return (f"{payload.get('conversation_id')} step {hop.get('step_number')}: {hop.get('from_agent')} -> "
                f"{hop.get('to_agent')}: {hop.get('reason')}")
    workflow = payload.get("workflow")
    if kind == "response" and isinstance(workflow, dict):
        return (f"{topic.split('/')[2]} complete ({workflow.get('reason')}) after {workflow.get('iterations')} "
                f"step(s), answered by {topic.rsplit('/', 1)[-1]}")
    return None


def payload_conversation(payload: Any) -> Optional[str]:
    return payload.get("conversation_id") if isinstance(payload, dict) else None


def in_conversation(topic: str, data: bytes, conversation_id: Optional[str]) -> bool:
    """Whether a monitored message belongs to the conversation (status messages belong to none)."""
    if not conversation_id:
        return True
    payload = json_or_text(data)
    if message_type(topic, payload) in ("response", "error"):
        return True  # the subscription already selects the conversation
    return payload_conversation(payload) == conversation_id


def json_or_text(data: bytes | bytearray) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")


def render(topic: str, data: bytes, fmt: str, colour: bool, now: Optional[datetime] = None,
           user_properties: Sequence[tuple[str, str]] = (), full: bool = False, expiry: Optional[int] = None) -> str:
    """One message for a person (pretty, compact: a bounded summary unless `full`) or a program
    (json: the whole payload). `expiry`: its MQTT 5 Message Expiry Interval as delivered (seconds left)."""
    payload = json_or_text(data)
    kind = message_type(topic, payload)
    stamp = protocol.rfc3339(now)
    fields = payload if isinstance(payload, dict) else {}
    context = tracing.extract(user_properties, fields.get(tracing.TRACEPARENT), fields.get(tracing.TRACESTATE))
    if fmt == "json":
        return json.dumps({"timestamp": stamp, "message_type": kind, "topic": topic, "payload": payload,
                           "trace_id": context.trace_id if context else None, "expiry_seconds": expiry},
                          ensure_ascii=False)
    body = protocol.compact_json(payload) if not isinstance(payload, str) else payload
    summary = _summary(kind, payload, body)
    trace = f" trace={context.trace_id}" if context else ""
    if isinstance(fields.get("expires_at"), str):
        trace += f" expires={fields['expires_at']}"
    if expiry is not None:
        trace += f" expiry={expiry}s"
    if fmt == "compact":
        return f"{stamp[11:23]} {kind} {topic}{trace} {' '.join(summary.split()) if full else _one_line(summary)}"
    if not full and len(summary) > PRETTY_CHARS:
        summary = (f"{summary[:PRETTY_CHARS]}... ({len(summary) - PRETTY_CHARS} more characters of {len(data)} bytes; "
                   f"--full shows the whole message)")
    line = f"{stamp[11:23]}  {kind.upper():8} {topic}{trace}\n    {summary}"
    return f"{_COLOURS[kind]}{line}{_RESET}" if colour else line


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SUMMARY_CHARS else flat[:SUMMARY_CHARS - 3] + "..."


def _summary(kind: str, payload: Any, body: str) -> str:
    """What a person wants to see of a message; absent fields are left out, never shown as None."""
    if not isinstance(payload, dict):
        return body

    def present(*parts: Any) -> str:
        return " ".join(str(p) for p in parts if p not in (None, ""))

    task = f"task {payload['task_id']}:" if payload.get("task_id") else None
    if kind == "status":
        caps = ", ".join(payload.get("capabilities") or [])
        member = f"instance {payload['instance_id']}" if payload.get("instance_id") else None
        return present(payload.get("agent_id"), member, "is", payload.get("status"),
                       f"(capabilities: {caps})" if caps else None)
    if kind == "task":
        instruction = payload.get("instruction")
        shown_input = payload.get("input")
        return present(task, repr(instruction) if instruction is not None else None,
                       f"input={json.dumps(shown_input, ensure_ascii=False)}" if shown_input is not None else None)
    if kind == "response":
        return present(task, payload.get("response"))
    if kind == "error":
        error = payload.get("error")
        if not isinstance(error, dict):
            error = {}
        return present(task, f"{error.get('code')}:" if error.get("code") else None, error.get("message"))
    if kind == "progress":
        return present(payload.get("agent_id"), task, payload.get("event_type"), payload.get("message"))
    return body


def progress_line(payload: dict) -> str:
    """`inject --wait`'s view of one progress event."""
    return (f"  [{payload.get('agent_id') or '?'}] {payload.get('event_type')}: "
            f"{_one_line(str(payload.get('message') or ''))}")


# ---------------------------------------------------------------- healthcheck

def wait_healthy(host: str, ports: Sequence[int], endpoint: str, timeout: float, wait: float,
                 poll: float = 0.2) -> tuple[bool, list[str]]:
    """Probe each port until all are healthy or `wait` seconds passed (one round when 0); returns
    whether they are and what each answered last."""
    deadline = time.monotonic() + wait
    while True:
        results = [probe(host, port, endpoint, timeout) for port in ports]
        if all(healthy for healthy, _ in results) or time.monotonic() >= deadline:
            return all(healthy for healthy, _ in results), [seen for _, seen in results]
        time.sleep(poll)


def probe(host: str, port: int, endpoint: str, timeout: float = 5.0) -> tuple[bool, str]:
    """(healthy, what was seen) for GET /{endpoint}."""
    url = f"http://{host}:{port}/{endpoint}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(2000).decode(errors="replace")
            return response.status == 200, f"{url}: HTTP {response.status} {body}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code} {exc.read(2000).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"
