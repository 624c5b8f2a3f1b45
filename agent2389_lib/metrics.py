"""Counters for tasks, MQTT, tools, LLM providers and the lifecycle, behind one lock, and the
figures made of them, each declared once (`FAMILIES`): from one `read()`, `json_document` builds
the JSON shape the deployment guide's tools read (`$.tasks.tasks_processing`, `$.mqtt.connected`,
`$.tasks.avg_processing_time_ms`, `$.uptime_seconds`, ...) and `prometheus_text` the Prometheus
text format 0.0.4.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import __version__
from .outcome import TaskResult

_WINDOW = 1000
_COUNTERS = {TaskResult.COMPLETED: "completed", TaskResult.FAILED: "failed", TaskResult.REJECTED: "rejected",
             TaskResult.DUPLICATE: "duplicates", TaskResult.IGNORED: "ignored",
             TaskResult.CANCELED: "canceled", TaskResult.PARKED: "parked"}  # the attribute each one counts in
CANCEL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, from a cancel to its task's end


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
        self.version = __version__
        self.intake_depth: Callable[[], int] = lambda: 0
        self.store_degraded: Callable[[], bool] = lambda: False
        self.registry_size: Callable[[], tuple[int, int]] = lambda: (0, 0)  # routable agents, statuses ignored
        self.mcp_servers: Callable[[], list[dict]] = lambda: []  # each MCP server's status
        self.routing: dict[str, int] = defaultdict(int)  # decisions by outcome
        self.approvals_pending: Callable[[], int] = lambda: 0  # waiting for a person (PROTOCOL.md 9)
        self.approvals: dict[str, int] = defaultdict(int)  # decisions by outcome
        self.approval_seconds = 0.0  # from the request to its decision, summed
        # tasks
        self.received = self.completed = self.failed = self.rejected = self.duplicates = self.ignored = 0
        self.canceled = self.budget_exceeded = self.parked = 0
        self.cancel_buckets = [0] * len(CANCEL_BUCKETS)  # cancelled tasks that ended within each bucket
        self.cancel_seconds = 0.0
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
        self.llm_tokens: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (provider, model): in, out
        self.llm_cost: dict[str, float] = defaultdict(float)  # model: USD, by the price table
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

    def task_finished(self, result: TaskResult, seconds: float, cancel_seconds: Optional[float] = None,
                      budget_exceeded: bool = False) -> None:
        """completed, failed, rejected or canceled (after task_started); a cancelled one with the
        time from its cancel to its end."""
        with self._lock:
            self.processing -= 1
            self._count(result)
            self.budget_exceeded += budget_exceeded
            if cancel_seconds is not None:
                self.cancel_seconds += cancel_seconds
                for index, bound in enumerate(CANCEL_BUCKETS):
                    if cancel_seconds <= bound:
                        self.cancel_buckets[index] += 1
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
                    tokens_in: int = 0, tokens_out: int = 0, model: str = "", cost_usd: float = 0.0) -> None:
        with self._lock:
            stats = self.llm[provider]
            stats.requests += 1
            stats.retries += retries
            stats.seconds += seconds
            stats.tokens_in += tokens_in
            stats.tokens_out += tokens_out
            if model:
                tokens = self.llm_tokens[(provider, model)]
                tokens[0] += tokens_in
                tokens[1] += tokens_out
                self.llm_cost[model] += cost_usd
            if error_kind:
                stats.errors += 1
                stats.errors_by_kind[error_kind] += 1

    def routing_decision(self, outcome: str) -> None:
        """forward, or how a workflow ended: router, max_iterations, router_error."""
        with self._lock:
            self.routing[outcome] += 1

    def approval_decided(self, outcome: str, seconds: float) -> None:
        """approved, denied, timeout or canceled, `seconds` after it was asked for."""
        with self._lock:
            self.approvals[outcome] += 1
            self.approval_seconds += seconds

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

    def read(self) -> Reading:
        """One consistent copy of every figure (the hooks are asked before the lock is taken)."""
        depth, store_degraded = self.intake_depth(), self.store_degraded()
        registry_agents, registry_ignored = self.registry_size()
        mcp_servers, approvals_pending = self.mcp_servers(), self.approvals_pending()
        with self._lock:
            now = self._clock()
            return Reading(
                now=now, uptime=round(now - self._started, 3), recent=list(self.recent),
                tools={name: _vars_of(stats) for name, stats in sorted(self.tools.items())},
                llm={name: {**_vars_of(stats), "errors_by_kind": dict(stats.errors_by_kind)}
                     for name, stats in sorted(self.llm.items())},
                counts={name: getattr(self, name) for name in _COPIED}, routing=dict(self.routing),
                approvals=dict(self.approvals), approvals_pending=approvals_pending,
                cancel_buckets=list(self.cancel_buckets),
                llm_tokens={key: tuple(counts) for key, counts in self.llm_tokens.items()},
                llm_cost=dict(self.llm_cost),
                depth=depth, store_degraded=store_degraded, registry_agents=registry_agents,
                registry_ignored=registry_ignored, mcp_servers=mcp_servers, cpu_seconds=time.process_time(),
                memory=_process_memory_bytes(), threads=threading.active_count())

    def snapshot(self) -> dict:
        """The JSON document of /metrics."""
        return json_document(self.read())


def _vars_of(stats: Any) -> dict:
    return {name: getattr(stats, name) for name in stats.__slots__}


# What `read` copies under the lock, by attribute name
_COPIED = ("received", "completed", "failed", "rejected", "duplicates", "ignored", "canceled", "cancel_seconds",
           "budget_exceeded", "parked", "approval_seconds",
           "processing", "max_processing",
           "total_seconds", "finished", "connected", "connection_attempts", "connections_established",
           "connection_failures", "published", "publish_failures", "messages_received", "outcomes_undeliverable",
           "progress_events_dropped", "spans_exported_count", "spans_dropped_count", "last_heartbeat",
           "connected_since", "state", "state_transitions", "restarts", "last_health_check", "workers", "agent_id",
           "version")


@dataclass
class Reading:
    now: float
    uptime: float
    recent: list  # the last task durations, seconds
    tools: dict  # name: its counters
    llm: dict  # provider: its counters
    counts: dict  # _COPIED
    routing: dict
    approvals: dict  # decisions by outcome
    approvals_pending: int
    cancel_buckets: list  # cancelled tasks that ended within each of CANCEL_BUCKETS (cumulative, as `le`)
    llm_tokens: dict  # (provider, model): (input, output)
    llm_cost: dict  # model: USD
    depth: int
    store_degraded: bool
    registry_agents: int
    registry_ignored: int
    mcp_servers: list
    cpu_seconds: float
    memory: int
    threads: int


# ---------------------------------------------------------------- the figures, declared once

@dataclass(frozen=True)
class Family:
    """One figure: where the JSON document has it, and (with a name) the Prometheus family it also
    is. `read` gives its value from a Reading; with labels, a dict by the first label's value (of
    dicts by the second's). A "*" in `path` stands for the first label's value. Adding a figure
    is adding one of these, and what records it."""

    path: str  # "tasks.tasks_completed"; "" for a Prometheus family only
    read: Callable[[Reading], Any]
    name: str = ""  # "" for the JSON document only
    kind: str = "gauge"
    help: str = ""
    labels: tuple = ()


def _counted(name: str) -> Callable[[Reading], Any]:
    return lambda r: r.counts[name]


def _per_tool(key: str) -> Callable[[Reading], dict]:
    return lambda r: {name: stats[key] for name, stats in r.tools.items()}


def _per_provider(key: str) -> Callable[[Reading], dict]:
    return lambda r: {name: stats[key] for name, stats in r.llm.items()}


def _per_server(read: Callable[[dict], Any]) -> Callable[[Reading], dict]:
    return lambda r: {server["name"]: read(server) for server in r.mcp_servers}


def _task_counter(key: str, attribute: str, help_text: str) -> Family:
    return Family(f"tasks.tasks_{key}", _counted(attribute), f"agent2389_tasks_{key}_total", "counter", help_text)


def _mqtt_counter(key: str, attribute: str, name: str, help_text: str) -> Family:
    return Family(f"mqtt.{key}", _counted(attribute), f"agent2389_mqtt_{name}_total", "counter", help_text)


def _tool_totals(key: str) -> Callable[[Reading], int]:
    return lambda r: sum(stats[key] for stats in r.tools.values())


def _quantile_ms(fraction: float) -> Callable[[Reading], float]:
    return lambda r: round(percentile(r.recent, fraction) * 1000, 3)


def _duration_samples(r: Reading) -> list:
    quantiles = [("", {"quantile": q}, percentile(r.recent, fraction)) for q, fraction, _ in _QUANTILES]
    return quantiles + [("_sum", {}, r.counts["total_seconds"]), ("_count", {}, r.counts["finished"])]


def _tokens_by_model(r: Reading) -> dict:
    table: dict = defaultdict(dict)
    for (provider, model), (tokens_in, tokens_out) in r.llm_tokens.items():
        table[provider][model] = {"in": tokens_in, "out": tokens_out}
    return table


def _cancel_samples(r: Reading) -> list:
    buckets = [("_bucket", {"le": repr(bound)}, count) for bound, count in zip(CANCEL_BUCKETS, r.cancel_buckets)]
    return buckets + [("_bucket", {"le": "+Inf"}, r.counts["canceled"]), ("_sum", {}, r.counts["cancel_seconds"]),
                      ("_count", {}, r.counts["canceled"])]


_QUANTILES = (("0.5", 0.50, "p50"), ("0.95", 0.95, "p95"), ("0.99", 0.99, "p99"))  # label, fraction, JSON key
SUMMARY, HISTOGRAM = "summary", "histogram"  # their `read` gives the samples: (suffix, labels, value)

FAMILIES: tuple[Family, ...] = (
    Family("", lambda r: {r.counts["agent_id"]: {r.counts["version"]: 1}}, "agent2389_info", help="Agent identity.",
           labels=("agent_id", "version")),
    Family("agent_id", _counted("agent_id")),
    Family("timestamp", lambda r: int(r.now)),
    Family("uptime_seconds", lambda r: r.uptime, "agent2389_uptime_seconds", help="Seconds since the agent started."),
    _task_counter("received", "received", "Task messages received."),
    Family("tasks.tasks_processing", _counted("processing"), "agent2389_tasks_processing",
           help="Tasks in progress."),
    _task_counter("completed", "completed", "Tasks answered or forwarded."),
    _task_counter("failed", "failed", "Tasks that ended with an error."),
    _task_counter("rejected", "rejected", "Task messages rejected as invalid."),
    _task_counter("duplicate", "duplicates", "Duplicate task messages discarded."),
    _task_counter("ignored", "ignored", "Retained task messages ignored."),
    _task_counter("canceled", "canceled", "Tasks stopped by a cancel (PROTOCOL.md 7), before or while they ran."),
    _task_counter("parked", "parked", "Tasks parked to wait for a person's approval (PROTOCOL.md 9)."),
    _task_counter("budget_exceeded", "budget_exceeded", "Tasks ended because a token or cost limit was spent "
                  "(PROTOCOL.md 8); counted in failed too."),
    Family("approvals.pending", lambda r: r.approvals_pending, "agent2389_approvals_pending",
           help="Tool calls and MCP elicitations waiting for a person's decision (PROTOCOL.md 9)."),
    Family("approvals.decisions.*", lambda r: r.approvals, "agent2389_approval_decisions_total", "counter",
           "Approvals decided, by outcome: approved, denied, timeout, canceled.", ("outcome",)),
    Family("", lambda r: [("_sum", {}, r.counts["approval_seconds"]), ("_count", {}, sum(r.approvals.values()))],
           "agent2389_approval_decision_seconds", SUMMARY, "Time from an approval's request to its decision."),
    Family("tasks.cancel_to_end_avg_ms", lambda r: _avg(r.counts["cancel_seconds"] * 1000, r.counts["canceled"])),
    Family("", _cancel_samples, "agent2389_cancel_to_end_seconds", HISTOGRAM,
           "Time from a cancel's arrival to the end of its task."),
    Family("tasks.avg_processing_time_ms", lambda r: _avg(r.counts["total_seconds"] * 1000, r.counts["finished"])),
    *(Family(f"tasks.processing_time_{key}_ms", _quantile_ms(fraction)) for _, fraction, key in _QUANTILES),
    Family("tasks.current_pipeline_depth", _counted("processing")),
    Family("tasks.max_pipeline_depth_reached", _counted("max_processing"), "agent2389_tasks_processing_max",
           help="Most tasks in progress at once."),
    Family("tasks.max_pipeline_depth", _counted("workers")),
    Family("tasks.intake_queue_depth", lambda r: r.depth, "agent2389_intake_queue_depth",
           help="Task messages received and waiting for a worker."),
    Family("tasks.busy_ratio", lambda r: round(r.counts["processing"] / r.counts["workers"], 4),
           "agent2389_busy_ratio", help="Tasks in progress / workers (max_pipeline_depth): what to scale on."),
    Family("tasks.state_store_degraded", lambda r: r.store_degraded, "agent2389_state_store_degraded",
           help="1 while the completed-task store cannot be written."),
    Family("tasks.processing_time_sum_seconds", lambda r: round(r.counts["total_seconds"], 6)),
    Family("tasks.tasks_finished", _counted("finished")),
    Family("", _duration_samples, "agent2389_task_duration_seconds", SUMMARY,
           "Task processing time (quantiles over the last 1000)."),
    Family("mqtt.connected", _counted("connected"), "agent2389_mqtt_connected",
           help="1 while connected and subscribed."),
    _mqtt_counter("connection_attempts", "connection_attempts", "connection_attempts", "Connection attempts."),
    _mqtt_counter("connections_established", "connections_established", "connections", "Connections established."),
    _mqtt_counter("connection_failures", "connection_failures", "connection_failures",
                  "Failed or refused connections."),
    _mqtt_counter("messages_published", "published", "messages_published",
                  "Messages published: acknowledged by the broker (QoS 1 and 2), or written (progress events, QoS 0)."),
    _mqtt_counter("publish_failures", "publish_failures", "publish_failures", "Publishes refused by the broker."),
    _mqtt_counter("messages_received", "messages_received", "messages_received", "Messages received."),
    Family("mqtt.outcomes_undeliverable", _counted("outcomes_undeliverable"), "agent2389_outcomes_undeliverable_total",
           "counter", "Task outcomes the broker refused for good (not authorized, invalid topic, too large): final "
           "for their task, sent to the dead-letter topic."),
    _mqtt_counter("progress_events_dropped", "progress_events_dropped", "progress_events_dropped",
                  "Progress events (QoS 0) dropped: no connection, too large, or the broker not reading."),
    Family("mqtt.last_heartbeat", _counted("last_heartbeat")),
    Family("mqtt.connection_duration_seconds",
           lambda r: round(r.now - r.counts["connected_since"], 3) if r.counts["connected_since"] else 0),
    Family("mcp.servers", lambda r: r.mcp_servers),
    Family("", _per_server(lambda s: s["state"] == "up"), "agent2389_mcp_server_up",
           help="1 while the MCP server is connected and its tools listed.", labels=("server",)),
    Family("", _per_server(lambda s: s["tools"]), "agent2389_mcp_server_tools",
           help="Tools the MCP server offers the LLM now.", labels=("server",)),
    Family("", _per_server(lambda s: s["restarts"]), "agent2389_mcp_server_restarts_total", "counter",
           "Attempts to start (stdio) or reach (HTTP) the MCP server again after it was lost or failed to start.",
           ("server",)),
    Family("", _per_server(lambda s: s["calls"]), "agent2389_mcp_calls_total", "counter",
           "tools/call requests to the MCP server.", ("server",)),
    Family("", _per_server(lambda s: s["call_errors"]), "agent2389_mcp_call_errors_total", "counter",
           "tools/call requests that failed, timed out or returned isError.", ("server",)),
    Family("tracing.spans_exported", _counted("spans_exported_count"), "agent2389_tracing_spans_exported_total",
           "counter", "Spans the OTLP collector accepted."),
    Family("tracing.spans_dropped", _counted("spans_dropped_count"), "agent2389_tracing_spans_dropped_total",
           "counter", "Spans dropped: the export queue was full (OTEL_BSP_MAX_QUEUE_SIZE) or the collector refused "
           "them or could not be reached."),
    Family("tools.tool_stats.*.executions", _per_tool("executions"), "agent2389_tool_executions_total", "counter",
           "Tool executions.", ("tool",)),
    Family("tools.tool_stats.*.failures", _per_tool("failures"), "agent2389_tool_failures_total", "counter",
           "Failed tool executions.", ("tool",)),
    Family("tools.tool_stats.*.timeouts", _per_tool("timeouts"), "agent2389_tool_timeouts_total", "counter",
           "Tool executions killed at their timeout.", ("tool",)),
    Family("tools.tool_stats.*.avg_execution_time_ms",
           lambda r: {n: _avg(s["seconds"] * 1000, s["executions"]) for n, s in r.tools.items()}),
    Family("tools.tool_stats.*.last_execution", _per_tool("last_execution")),
    Family("tools.tool_stats.*.success_rate",
           lambda r: {n: round((s["executions"] - s["failures"]) / s["executions"], 4) if s["executions"] else 1.0
                      for n, s in r.tools.items()}),
    Family("tools.total_executions", _tool_totals("executions")),
    Family("tools.total_failures", _tool_totals("failures")),
    Family("tools.total_timeouts", _tool_totals("timeouts")),
    Family("llm.providers.*.requests", _per_provider("requests"), "agent2389_llm_requests_total", "counter",
           "LLM requests (each with its retries).", ("provider",)),
    Family("llm.providers.*.errors", _per_provider("errors")),
    Family("llm.providers.*.errors_by_kind", _per_provider("errors_by_kind"), "agent2389_llm_errors_total", "counter",
           "LLM requests that failed, by kind.", ("provider", "kind")),
    Family("llm.providers.*.retries", _per_provider("retries"), "agent2389_llm_retries_total", "counter",
           "LLM request retries.", ("provider",)),
    Family("llm.providers.*.tokens_in", _per_provider("tokens_in")),
    Family("llm.providers.*.tokens_out", _per_provider("tokens_out")),
    Family("", _tokens_by_model, "agent2389_llm_tokens_total", "counter",
           "LLM tokens, as the providers' usage fields count them.", ("provider", "model", "direction")),
    Family("llm.cost_usd.*", lambda r: r.llm_cost, "agent2389_llm_cost_usd_total", "counter",
           "LLM spend in US dollars, by the price table ([llm.prices]); models without a price count nothing.",
           ("model",)),
    Family("llm.providers.*.avg_latency_ms",
           lambda r: {n: _avg(s["seconds"] * 1000, s["requests"]) for n, s in r.llm.items()}),
    Family("routing.decisions.*", lambda r: r.routing, "agent2389_routing_decisions_total", "counter",
           "Routed hops (v2): forward, or the end of a workflow (router, max_iterations, router_error).",
           ("outcome",)),
    Family("routing.registry_agents", lambda r: r.registry_agents, "agent2389_registry_agents",
           help="Agents the router may choose now (v2 discovery)."),
    Family("routing.registry_statuses_ignored", lambda r: r.registry_ignored,
           "agent2389_registry_statuses_ignored_total", "counter", "Malformed status messages ignored by discovery."),
    Family("lifecycle.current_state", _counted("state")),
    Family("lifecycle.uptime_seconds", lambda r: r.uptime),
    Family("lifecycle.state_transitions", _counted("state_transitions")),
    Family("lifecycle.restarts", _counted("restarts")),
    Family("lifecycle.healthy", lambda r: r.counts["connected"] and r.counts["state"] == "running"),
    Family("lifecycle.last_health_check", _counted("last_health_check")),
    Family("system.memory_used_bytes", lambda r: r.memory, "agent2389_process_resident_memory_bytes",
           help="Resident memory."),
    Family("system.cpu_seconds_total", lambda r: r.cpu_seconds, "agent2389_process_cpu_seconds_total", "counter",
           "CPU time the process used, user and system, in seconds."),
    Family("system.active_threads", lambda r: r.threads, "agent2389_threads", help="Active threads."),
)


def json_document(reading: Reading) -> dict:
    """The /metrics JSON document: every family with a path, nested as the path says."""
    document: dict = {}
    for family in FAMILIES:
        if not family.path:
            continue
        value = family.read(reading)
        head, star, tail = family.path.partition("*")
        if not star:
            _place(document, head.split("."), value)
        elif not tail:  # the whole table, by label value: "routing.decisions.*"
            _place(document, head.rstrip(".").split("."), dict(value))
        else:  # an entry in each label value's table: "tools.tool_stats.*.executions"
            for label, each in value.items():
                _place(document, [*head.rstrip(".").split("."), label, *tail.lstrip(".").split(".")], each)
    return document


def _place(document: dict, keys: list, value: Any) -> None:
    *parents, leaf = keys
    for key in parents:
        document = document.setdefault(key, {})
    document[leaf] = value


# ---------------------------------------------------------------- Prometheus text format 0.0.4

def prometheus_text(reading: Reading) -> str:
    """Every family with a name, from the same reading as the JSON document."""
    lines: list[str] = []
    for family in FAMILIES:
        if not family.name:
            continue
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        value = family.read(reading)
        samples = value if family.kind in (SUMMARY, HISTOGRAM) else _samples(value, family.labels)
        for suffix, labels, number in samples:
            lines.append(f"{family.name}{suffix}{_labels(labels)} {_number(number)}")
    return "\n".join(lines) + "\n"


def _samples(value: Any, names: tuple) -> list:
    if not names:
        return [("", {}, value)]
    return [(suffix, {names[0]: key, **labels}, number)
            for key, inner in sorted(value.items()) for suffix, labels, number in _samples(inner, names[1:])]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))
