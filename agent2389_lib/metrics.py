"""Counters for tasks, MQTT, tools, LLM providers and the lifecycle, behind one lock.

`snapshot()` has the shape the deployment guide's tools read (`$.tasks.tasks_processing`,
`$.mqtt.connected`, `$.tasks.avg_processing_time_ms`, `$.uptime_seconds`, ...);
`prometheus_text()` renders the same numbers in the Prometheus text format 0.0.4.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections import defaultdict, deque
from typing import Any, Callable, Optional

from .outcome import TaskResult

_WINDOW = 1000
_COUNTERS = {TaskResult.COMPLETED: "completed", TaskResult.FAILED: "failed", TaskResult.REJECTED: "rejected",
             TaskResult.DUPLICATE: "duplicates", TaskResult.IGNORED: "ignored"}  # the attribute each one counts in


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(round(fraction * len(ordered), 9)))
    return ordered[min(rank, len(ordered)) - 1]


def _avg(total: float, count: int) -> float:
    return round(total / count, 3) if count else 0.0


class _ToolStats:
    __slots__ = ("executions", "failures", "timeouts", "seconds", "last_execution")

    def __init__(self) -> None:
        self.executions = self.failures = self.timeouts = 0
        self.seconds = 0.0
        self.last_execution: Optional[float] = None


class _LlmStats:
    __slots__ = ("requests", "errors", "errors_by_kind", "retries", "tokens_in", "tokens_out", "seconds")

    def __init__(self) -> None:
        self.requests = self.errors = self.retries = self.tokens_in = self.tokens_out = 0
        self.errors_by_kind: dict[str, int] = defaultdict(int)
        self.seconds = 0.0


def _process_memory_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Metrics:
    def __init__(self, agent_id: str, workers: int, clock: Callable[[], float] = time.time):
        self.agent_id = agent_id
        self.workers = workers
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._cpu_mark = (time.monotonic(), time.process_time())
        self.intake_depth: Callable[[], int] = lambda: 0
        self.store_degraded: Callable[[], bool] = lambda: False
        self.registry_size: Callable[[], tuple[int, int]] = lambda: (0, 0)  # routable agents, statuses ignored
        self.mcp_servers: Callable[[], list[dict]] = lambda: []  # each MCP server's status
        self.routing: dict[str, int] = defaultdict(int)  # decisions by outcome
        # tasks
        self.received = self.completed = self.failed = self.rejected = self.duplicates = self.ignored = 0
        self.processing = self.max_processing = 0
        self.total_seconds = 0.0
        self.finished = 0
        self.recent: deque = deque(maxlen=_WINDOW)
        self.last_task_activity: Optional[float] = None
        # mqtt
        self.connected = False
        self.connection_attempts = self.connections_established = self.connection_failures = 0
        self.published = self.publish_failures = self.messages_received = 0
        self.outcomes_undeliverable = self.progress_events_dropped = 0
        self.spans_exported_count = self.spans_dropped_count = 0
        self.last_heartbeat: Optional[float] = None
        self.connected_since: Optional[float] = None
        # tools, llm, lifecycle
        self.tools: dict[str, _ToolStats] = defaultdict(_ToolStats)
        self.llm: dict[str, _LlmStats] = defaultdict(_LlmStats)
        self.state = "starting"
        self.state_transitions = 0
        self.restarts = 0
        self.last_health_check: Optional[float] = None

    # -------------------------------------------------------------- recording
    def task_received(self) -> None:
        with self._lock:
            self.received += 1
            self.messages_received += 1

    def task_started(self) -> None:
        with self._lock:
            self.processing += 1
            self.max_processing = max(self.max_processing, self.processing)

    def task_finished(self, result: TaskResult, seconds: float) -> None:
        """completed, failed or rejected (after task_started)."""
        with self._lock:
            self.processing -= 1
            self._count(result)
            self.finished += 1
            self.total_seconds += seconds
            self.recent.append(seconds)
            self.last_task_activity = self._clock()

    def task_dropped(self, result: TaskResult) -> None:
        """A message handled without processing: rejected, duplicate or ignored."""
        with self._lock:
            self._count(result)
            self.last_task_activity = self._clock()

    def _count(self, result: TaskResult) -> None:
        counter = _COUNTERS[result]
        setattr(self, counter, getattr(self, counter) + 1)

    def mqtt_connecting(self) -> None:
        with self._lock:
            self.connection_attempts += 1

    def mqtt_connection(self, up: bool, failed: bool = False) -> None:
        with self._lock:
            if up and not self.connected:
                self.connections_established += 1
                if self.connections_established > 1:
                    self.restarts += 1
                self.connected_since = self._clock()
            if failed:
                self.connection_failures += 1
            if not up:
                self.connected_since = None
            self.connected = up

    def published_message(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.published += 1
            else:
                self.publish_failures += 1

    def progress_dropped(self) -> None:
        with self._lock:
            self.progress_events_dropped += 1

    def spans_exported(self, count: int) -> None:
        with self._lock:
            self.spans_exported_count += count

    def spans_dropped(self, count: int) -> None:
        with self._lock:
            self.spans_dropped_count += count

    def outcome_undeliverable(self) -> None:
        with self._lock:
            self.outcomes_undeliverable += 1

    def heartbeat(self) -> None:
        with self._lock:
            self.last_heartbeat = self._clock()

    def tool_execution(self, name: str, ok: bool, timed_out: bool, seconds: float) -> None:
        with self._lock:
            stats = self.tools[name]
            stats.executions += 1
            stats.failures += 0 if ok else 1
            stats.timeouts += 1 if timed_out else 0
            stats.seconds += seconds
            stats.last_execution = self._clock()

    def llm_request(self, provider: str, *, seconds: float, retries: int, error_kind: Optional[str] = None,
                    tokens_in: int = 0, tokens_out: int = 0) -> None:
        with self._lock:
            stats = self.llm[provider]
            stats.requests += 1
            stats.retries += retries
            stats.seconds += seconds
            stats.tokens_in += tokens_in
            stats.tokens_out += tokens_out
            if error_kind:
                stats.errors += 1
                stats.errors_by_kind[error_kind] += 1

    def routing_decision(self, outcome: str) -> None:
        """forward, or how a workflow ended: router, max_iterations, router_error."""
        with self._lock:
            self.routing[outcome] += 1

    def set_state(self, state: str) -> None:
        with self._lock:
            if state != self.state:
                self.state = state
                self.state_transitions += 1

    def health_checked(self) -> None:
        with self._lock:
            self.last_health_check = self._clock()

    # -------------------------------------------------------------- reading
    def uptime(self) -> float:
        return self._clock() - self._started

    def _system(self) -> dict:
        now, cpu = time.monotonic(), time.process_time()
        wall, used = now - self._cpu_mark[0], cpu - self._cpu_mark[1]
        self._cpu_mark = (now, cpu)
        return {"memory_used_bytes": _process_memory_bytes(),
                "cpu_usage_percent": round(100.0 * used / wall, 2) if wall > 0 else 0.0,
                "active_threads": threading.active_count()}

    def snapshot(self) -> dict:
        depth = self.intake_depth()
        store_degraded = self.store_degraded()
        registry_agents, registry_ignored = self.registry_size()
        mcp_servers = self.mcp_servers()
        with self._lock:
            now = self._clock()
            recent = list(self.recent)
            uptime = round(now - self._started, 3)
            tools: dict[str, dict[str, Any]]
            tools = {name: {"executions": s.executions, "failures": s.failures, "timeouts": s.timeouts,
                            "avg_execution_time_ms": _avg(s.seconds * 1000, s.executions),
                            "last_execution": s.last_execution,
                            "success_rate": round((s.executions - s.failures) / s.executions, 4)
                            if s.executions else 1.0}
                     for name, s in sorted(self.tools.items())}
            llm = {name: {"requests": s.requests, "errors": s.errors, "errors_by_kind": dict(s.errors_by_kind),
                          "retries": s.retries, "tokens_in": s.tokens_in, "tokens_out": s.tokens_out,
                          "avg_latency_ms": _avg(s.seconds * 1000, s.requests)}
                   for name, s in sorted(self.llm.items())}
            snapshot = {
                "agent_id": self.agent_id,
                "timestamp": int(now),
                "uptime_seconds": uptime,
                "tasks": {
                    "tasks_received": self.received, "tasks_processing": self.processing,
                    "tasks_completed": self.completed, "tasks_failed": self.failed, "tasks_rejected": self.rejected,
                    "tasks_duplicate": self.duplicates, "tasks_ignored": self.ignored,
                    "avg_processing_time_ms": _avg(self.total_seconds * 1000, self.finished),
                    "processing_time_p50_ms": round(percentile(recent, 0.50) * 1000, 3),
                    "processing_time_p95_ms": round(percentile(recent, 0.95) * 1000, 3),
                    "processing_time_p99_ms": round(percentile(recent, 0.99) * 1000, 3),
                    "current_pipeline_depth": self.processing, "max_pipeline_depth_reached": self.max_processing,
                    "max_pipeline_depth": self.workers, "intake_queue_depth": depth,
                    "busy_ratio": round(self.processing / self.workers, 4), "state_store_degraded": store_degraded,
                    "processing_time_sum_seconds": round(self.total_seconds, 6), "tasks_finished": self.finished,
                },
                "mqtt": {
                    "connected": self.connected, "connection_attempts": self.connection_attempts,
                    "connections_established": self.connections_established,
                    "connection_failures": self.connection_failures, "messages_published": self.published,
                    "publish_failures": self.publish_failures, "messages_received": self.messages_received,
                    "outcomes_undeliverable": self.outcomes_undeliverable,
                    "progress_events_dropped": self.progress_events_dropped,
                    "last_heartbeat": self.last_heartbeat,
                    "connection_duration_seconds": round(now - self.connected_since, 3) if self.connected_since else 0,
                },
                "mcp": {"servers": mcp_servers},
                "tracing": {"spans_exported": self.spans_exported_count, "spans_dropped": self.spans_dropped_count},
                "tools": {"tool_stats": tools,
                          "total_executions": sum(t["executions"] for t in tools.values()),
                          "total_failures": sum(t["failures"] for t in tools.values()),
                          "total_timeouts": sum(t["timeouts"] for t in tools.values())},
                "llm": {"providers": llm},
                "routing": {"decisions": dict(self.routing), "registry_agents": registry_agents,
                            "registry_statuses_ignored": registry_ignored},
                "lifecycle": {"current_state": self.state, "uptime_seconds": uptime,
                              "state_transitions": self.state_transitions, "restarts": self.restarts,
                              "healthy": self.connected and self.state == "running",
                              "last_health_check": self.last_health_check},
            }
        snapshot["system"] = self._system()
        return snapshot


# ---------------------------------------------------------------- Prometheus text format 0.0.4

def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def prometheus_text(snapshot: dict, version: str) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            lines.append(f"{name}{suffix}{_labels(**labels)} {_number(value)}")

    tasks, mqtt = snapshot["tasks"], snapshot["mqtt"]
    tools, llm = snapshot["tools"]["tool_stats"], snapshot["llm"]["providers"]
    family("agent2389_info", "gauge", "Agent identity.",
           [("", {"agent_id": snapshot["agent_id"], "version": version}, 1)])
    family("agent2389_uptime_seconds", "gauge", "Seconds since the agent started.",
           [("", {}, snapshot["uptime_seconds"])])
    for key, help_text in (("received", "Task messages received."), ("completed", "Tasks answered or forwarded."),
                           ("failed", "Tasks that ended with an error."),
                           ("rejected", "Task messages rejected as invalid."),
                           ("duplicate", "Duplicate task messages discarded."),
                           ("ignored", "Retained task messages ignored.")):
        family(f"agent2389_tasks_{key}_total", "counter", help_text, [("", {}, tasks[f"tasks_{key}"])])
    family("agent2389_tasks_processing", "gauge", "Tasks in progress.", [("", {}, tasks["tasks_processing"])])
    family("agent2389_tasks_processing_max", "gauge", "Most tasks in progress at once.",
           [("", {}, tasks["max_pipeline_depth_reached"])])
    family("agent2389_intake_queue_depth", "gauge", "Task messages received and waiting for a worker.",
           [("", {}, tasks["intake_queue_depth"])])
    family("agent2389_busy_ratio", "gauge", "Tasks in progress / workers (max_pipeline_depth): what to scale on.",
           [("", {}, tasks["busy_ratio"])])
    family("agent2389_state_store_degraded", "gauge", "1 while the completed-task store cannot be written.",
           [("", {}, int(tasks["state_store_degraded"]))])
    family("agent2389_task_duration_seconds", "summary", "Task processing time (quantiles over the last 1000).",
           [("", {"quantile": q}, tasks[f"processing_time_p{p}_ms"] / 1000)
            for q, p in (("0.5", 50), ("0.95", 95), ("0.99", 99))]
           + [("_sum", {}, tasks["processing_time_sum_seconds"]), ("_count", {}, tasks["tasks_finished"])])
    family("agent2389_mqtt_connected", "gauge", "1 while connected and subscribed.", [("", {}, int(mqtt["connected"]))])
    for key, name, help_text in (("connection_attempts", "connection_attempts", "Connection attempts."),
                                 ("connections_established", "connections", "Connections established."),
                                 ("connection_failures", "connection_failures", "Failed or refused connections."),
                                 ("messages_published", "messages_published",
                                  "Messages published: acknowledged by the broker (QoS 1), or written (progress "
                                  "events, QoS 0)."),
                                 ("publish_failures", "publish_failures", "QoS 1 publishes refused by the broker."),
                                 ("progress_events_dropped", "progress_events_dropped",
                                  "Progress events (QoS 0) dropped: no connection, too large, or the broker not "
                                  "reading."),
                                 ("messages_received", "messages_received", "Messages received.")):
        family(f"agent2389_mqtt_{name}_total", "counter", help_text, [("", {}, mqtt[key])])
    family("agent2389_outcomes_undeliverable_total", "counter", "Task outcomes the broker refused for good "
           "(not authorized, invalid topic, too large): final for their task, sent to the dead-letter topic.",
           [("", {}, mqtt["outcomes_undeliverable"])])
    family("agent2389_tracing_spans_exported_total", "counter", "Spans the OTLP collector accepted.",
           [("", {}, snapshot["tracing"]["spans_exported"])])
    family("agent2389_tracing_spans_dropped_total", "counter", "Spans dropped: the export queue was full "
           "(OTEL_BSP_MAX_QUEUE_SIZE) or the collector refused them or could not be reached.",
           [("", {}, snapshot["tracing"]["spans_dropped"])])
    family("agent2389_tool_executions_total", "counter", "Tool executions.",
           [("", {"tool": n}, s["executions"]) for n, s in tools.items()])
    family("agent2389_tool_failures_total", "counter", "Failed tool executions.",
           [("", {"tool": n}, s["failures"]) for n, s in tools.items()])
    family("agent2389_tool_timeouts_total", "counter", "Tool executions killed at their timeout.",
           [("", {"tool": n}, s["timeouts"]) for n, s in tools.items()])
    servers = snapshot["mcp"]["servers"]
    family("agent2389_mcp_server_up", "gauge", "1 while the MCP server is connected and its tools listed.",
           [("", {"server": s["name"]}, int(s["state"] == "up")) for s in servers])
    family("agent2389_mcp_server_tools", "gauge", "Tools the MCP server offers the LLM now.",
           [("", {"server": s["name"]}, s["tools"]) for s in servers])
    family("agent2389_mcp_server_restarts_total", "counter", "Attempts to start (stdio) or reach (HTTP) the "
           "MCP server again after it was lost or failed to start.",
           [("", {"server": s["name"]}, s["restarts"]) for s in servers])
    family("agent2389_mcp_calls_total", "counter", "tools/call requests to the MCP server.",
           [("", {"server": s["name"]}, s["calls"]) for s in servers])
    family("agent2389_mcp_call_errors_total", "counter", "tools/call requests that failed, timed out or "
           "returned isError.", [("", {"server": s["name"]}, s["call_errors"]) for s in servers])
    family("agent2389_llm_requests_total", "counter", "LLM requests (each with its retries).",
           [("", {"provider": n}, s["requests"]) for n, s in llm.items()])
    family("agent2389_llm_errors_total", "counter", "LLM requests that failed, by kind.",
           [("", {"provider": n, "kind": k}, c)
            for n, s in llm.items() for k, c in sorted(s["errors_by_kind"].items())])
    family("agent2389_llm_retries_total", "counter", "LLM request retries.",
           [("", {"provider": n}, s["retries"]) for n, s in llm.items()])
    family("agent2389_llm_tokens_total", "counter", "LLM tokens.",
           [("", {"provider": n, "direction": d}, s[f"tokens_{d}"]) for n, s in llm.items() for d in ("in", "out")])
    routing = snapshot["routing"]
    family("agent2389_routing_decisions_total", "counter",
           "Routed hops (v2): forward, or the end of a workflow (router, max_iterations, router_error).",
           [("", {"outcome": k}, v) for k, v in sorted(routing["decisions"].items())])
    family("agent2389_registry_agents", "gauge", "Agents the router may choose now (v2 discovery).",
           [("", {}, routing["registry_agents"])])
    family("agent2389_registry_statuses_ignored_total", "counter", "Malformed status messages ignored by discovery.",
           [("", {}, routing["registry_statuses_ignored"])])
    family("agent2389_process_resident_memory_bytes", "gauge", "Resident memory.",
           [("", {}, snapshot["system"]["memory_used_bytes"])])
    family("agent2389_threads", "gauge", "Active threads.", [("", {}, snapshot["system"]["active_threads"])])
    return "\n".join(lines) + "\n"
