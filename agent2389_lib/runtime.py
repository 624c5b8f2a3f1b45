"""Lifecycle of one agent process (docs/architecture.md): startup order, workers, heartbeat, shutdown.

Data flow: paho intake thread --(enqueue only)--> Intake --> worker pool --> processor. The intake
is bounded by its reader: the network thread stops reading the socket while the intake is full.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from typing import Any, Callable, Optional

from . import __version__, protocol, tracing
from .approvaldesk import ApprovalDesk, Resume
from .approvals import decision_topic
from .config import OFFICIAL_BASE_URL, AgentConfig
from .dedupe import DedupeStore
from .cancels import Cancel, cancel_message
from .cooldowns import Cooldowns, Fleet
from .discovery import STATUS_FILTER, Registry
from .errors import LlmError, StartupError
from .events import Event, Events, counted_in
from .health import AgentStatus, HealthServer
from .inflight import InFlight
from .redaction import public_url
from .llm import build_agent_loop
from .llm.loop import AgentLoop
from .logs import Throttle
from .metrics import Metrics
from .mqtt.transport import MqttTransport, SubscriptionRefused
from .pool import Membership
from .processor import Route, TaskProcessor
from .tools import build_registry
from .tracers import build_tracer

log = logging.getLogger("agent2389.runtime")

EXIT_OK, EXIT_STARTUP = 0, 1
_STOP = object()
_STATUS_WAIT = 5.0
_SESSION_QUIET = 1.0  # seconds without a delivery after which a leaving member's session is taken as empty
_DRAIN_POLL = 0.05
_MAX_PACKET_SLACK = 2
_PROVIDERS = "/control/providers/"  # their cooldowns (cooldowns.py)


class Intake:
    """The hand-off from the network thread to the workers. The queue itself is unbounded, so
    `put` never blocks the network thread; what bounds it is that the network thread reads the
    socket only while `has_room()` (one read may bring a few messages past `capacity`). Taking
    an item from a full intake calls `on_room` so the network thread resumes at once, also when
    the taker was waiting on an empty intake while it filled.
    """

    def __init__(self, capacity: int, on_room: Callable[[], None] = lambda: None):
        self.capacity = capacity
        self.on_room = on_room
        self._queue: "queue.Queue[Any]" = queue.Queue()

    def has_room(self) -> bool:
        return self._queue.qsize() < self.capacity

    def depth(self) -> int:
        return self._queue.qsize()

    def put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def get(self) -> Any:
        item = self._queue.get()
        if self._queue.qsize() + 1 >= self.capacity:  # it was full before this item left
            self.on_room()
        return item

    def drain(self) -> int:
        """Drop everything queued (unacknowledged, so the broker redelivers it); returns how many."""
        dropped = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return dropped
            dropped += 1


class StopRequest:
    """A stop asked for by SIGTERM or SIGINT. The handler runs in the main thread between any two
    bytecodes, possibly while that thread holds a lock: inside `threading.Event.wait` it holds the
    event's own lock, so setting an Event from the handler can deadlock the agent for good. The
    handler therefore takes no lock: it keeps the signal's name and writes a byte to a pipe that
    `wait` selects on. Logging from it would fail the same way; the main thread logs the stop."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._readable, self._writable = os.pipe()
        self._installed = False

    def install(self) -> None:
        """Handle SIGTERM and SIGINT (from the main thread). The kernel hands a signal to any thread
        of the process, and Python runs the handler in the main thread only when that thread next
        runs bytecode: asleep in `wait`, it would not notice for a whole heartbeat (60 s, longer
        than an orchestrator's grace). The pipe is also the wakeup fd, written by whichever thread
        took the signal, so `wait` wakes at once."""
        os.set_blocking(self._writable, False)
        signal.set_wakeup_fd(self._writable)
        self._installed = True
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            os._exit(128 + signum)  # the second signal: at once
        self.signal_name = signal.Signals(signum).name
        try:
            os.write(self._writable, b"!")
        except OSError:  # closed (the agent has stopped already), or full of wakeups
            pass

    def is_set(self) -> bool:
        return self.signal_name is not None

    def close(self) -> None:
        if self._installed:
            signal.set_wakeup_fd(-1)
        os.close(self._readable)
        os.close(self._writable)

    def wait(self, timeout: float) -> bool:
        """True once a stop was asked for; a signal arriving after the check still ends the select."""
        if not self.is_set():
            readable, _, _ = select.select([self._readable], [], [], timeout)
            if readable and not self.is_set():  # the wakeup of a signal that asks no stop: not again
                os.read(self._readable, 512)
        return self.is_set()


class AgentRuntime:
    """The composition root: makes every part, each with its cleanup registered as it is made, so
    a part that fails leaves nothing of the others behind (threads, sockets, the store's lock)."""

    def __init__(self, config: AgentConfig):
        """Raises StartupError, saying what to fix."""
        self.config = config
        self.workers = config.max_pipeline_depth
        self.metrics = Metrics(config.agent_id, self.workers)
        # what the steps report: as progress events first (a task is counted finished after its last one)
        self.events = Events(self._publish_progress, counted_in(self.metrics))
        self._state = "starting"
        self.stop_requested = StopRequest()
        self._hard_stop = threading.Event()
        self._accepting = True
        self._last_delivery = 0.0
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._futures: list[Future] = []
        self._twins = Throttle()
        self.pool = Membership(config.agent_id, config.instance_id, on_twin=self._on_twin)
        self._probe_topic = protocol.probe_topic(config.agent_id, config.mqtt.client_id)
        self._cancel_topic = protocol.cancel_topic(config.agent_id)
        self._probe_seen = threading.Event()
        self.intake = Intake(capacity=2 * self.workers, on_room=lambda: self.transport.wake_intake())
        self.metrics.intake_depth = self.intake.depth
        unavailable = self._status_payload(protocol.UNAVAILABLE)
        own_will, pool_will = self.pool.wills()
        with ExitStack() as parts:
            parts.callback(self.stop_requested.close)
            self.dedupe = DedupeStore(config.completed_store_size, config.state_dir, config.agent_id)
            parts.callback(self.dedupe.close)
            self.metrics.store_degraded = lambda: self.dedupe.degraded is not None
            # approvals are decided on the intake's session where a call may wait for a person
            asks = any(tool.requires_approval for tool in config.tools) or config.mcp_servers or self.dedupe.parked()
            decisions = decision_topic(config.agent_id) if asks else None
            self._decisions_prefix = decisions[:-len("+/decision")] if decisions else None
            self.transport = MqttTransport(
                config.mqtt, self.metrics, may_read=self._may_read, receive_maximum=self.workers,
                max_packet_size=_MAX_PACKET_SLACK * config.max_message_size + 65536,
                input_topic=self.pool.input_filter(), will=(own_will, unavailable),
                output_will=(pool_will, unavailable) if pool_will else None,
                on_delivery=self._on_delivery, on_subscribed=self._on_subscribed, on_watched=self._on_watched,
                decisions=decisions)
            parts.callback(self.transport.stop, 0.0)
            self.desk = ApprovalDesk(config.agent_id, self.dedupe, self._publish_retained, self.intake.put,
                                     self.events, pool_member=self.pool.member)
            parts.callback(self.desk.stop)
            self.metrics.approvals_pending = self.desk.pending
            self.inflight = InFlight(self.dedupe, config.task_timeout, self.events, follow=self._follow_cancel,
                                     parked=self.desk)
            self.tools = build_registry(config, self.events, self.desk.elicit)
            self.metrics.mcp_servers = self.tools.server_statuses
            self.registry: Optional[Registry] = None
            self.cooldowns = Cooldowns(config.agent_id, self._publish_retained, v5=lambda: self.transport.output.v5)
            self.fleet = Fleet(self.cooldowns if config.llm.fleet_cooldowns else None,
                               members=lambda: self.pool.size_hint() or 1)
            self.agent_loop, route = self._build_thinking()
            self.processor = TaskProcessor(config, self.agent_loop.think, self.transport, self.dedupe, self.events,
                                           should_abandon=self._hard_stop.is_set, route=route,
                                           inflight=self.inflight, desk=self.desk,
                                           resume_loop=self.agent_loop.resume)
            self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="worker")
            parts.callback(self.executor.shutdown, wait=False)
            try:
                self.health = HealthServer(self.metrics, self.status, config.health_port, config.health_bind)
            except OSError as exc:
                raise StartupError(f"cannot serve health checks on {config.health_bind}:{config.health_port}: "
                                   f"{exc.strerror} (set HEALTH_PORT to a free port)") from None
            parts.callback(self.health.close)
            self._parts = parts.pop_all()  # closed by shutdown(), after its orderly steps

    def _build_thinking(self) -> tuple[AgentLoop, Optional[Route]]:
        """The LLM loop, and for v2 routing the router that discovery feeds."""
        config = self.config
        try:  # an HTTP endpoint the environment's proxy settings make unusable
            offered = self.tools if config.tools or config.mcp_servers else None
            agent_loop = build_agent_loop(config, offered, self.events, self.fleet)
            if config.routing is None:
                return agent_loop, None
            from .router import WorkflowRouter, build_router  # imports an HTTP client
            self.registry = registry = Registry()
            self.metrics.registry_size = lambda: (len(registry.routable()), registry.ignored)
            return agent_loop, WorkflowRouter(config.agent_id, config.routing, registry,
                                              build_router(config.routing, self.events, self.fleet),
                                              self.events).next_step
        except LlmError as exc:
            raise StartupError(str(exc)) from None

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        self.metrics.set_state(value)

    def status(self) -> AgentStatus:
        return AgentStatus(self.state, self.transport.connected, self.saturated(), self.intake.depth(),
                           self.dedupe.degraded, tuple(self.tools.server_statuses()), self.desk.pending())

    def _publish_progress(self, event: Event) -> None:
        """The progress event an event is, fire and forget at QoS 0 (advisory, as the reference
        implementation): progress never delays a task and is off when `progress_events = false`."""
        progress = event.progress() if self.config.progress else None
        if progress is not None:
            task_id, conversation_id, category, event_type, message, metadata = progress
            payload = protocol.progress_payload(self.config.agent_id, task_id, conversation_id, category, event_type,
                                                message, metadata)
            self.transport.publish_advisory(protocol.progress_topic(self.config.agent_id, category), payload,
                                            tracing.task_headers())

    # -------------------------------------------------------------- status
    def load(self) -> float:
        with self._busy_lock:
            return self._busy / self.workers

    def _status_payload(self, status: str) -> bytes:
        return protocol.to_payload(protocol.status_message(
            self.config.agent_id, status, capabilities=self.config.capabilities,
            description=self.config.description, load=self.load(),
            health=protocol.HEALTH_DEGRADED if self.saturated() else protocol.HEALTH_OK, version=__version__,
            heartbeat_interval=self.config.heartbeat_interval, instance_id=self.config.instance_id,
            instances_hint=self.pool.size_hint(), incarnation=self.pool.incarnation))

    def publish_status(self, status: str, wait_seconds: Optional[float] = None, heartbeat: bool = False) -> bool:
        """The retained status, on the topics the pool membership names."""
        return self._publish_status(self.pool.status_topics(status), status, wait_seconds, heartbeat)

    def _publish_status(self, topics: list, status: str, wait_seconds: Optional[float],
                        heartbeat: bool = False) -> bool:
        payload = self._status_payload(status)
        with tracing.span("publish_status", record=False, log={"operation": "publish_status",
                                                                "topic": self.pool.pool_topic,
                                                                "agent_id": self.config.agent_id}):
            tickets = [self.transport.publish(topic, payload, retain=True) for topic in topics]
            log.log(logging.DEBUG if heartbeat else logging.INFO, "Published agent status (%s) on %s", status,
                    ", ".join(topics))
        self.metrics.heartbeat()
        return all(ticket.wait(wait_seconds) for ticket in tickets) if wait_seconds is not None else True

    def _on_watched(self, topic: str, payload: bytes) -> None:
        """Cancels, and statuses (output link's network thread): for discovery, and for the pool
        membership, which may call for the pool's status to be re-asserted."""
        if topic == self._cancel_topic or protocol.canonicalize_topic(topic) == self._cancel_topic:
            self.inflight.receive(topic, payload)
            return
        if topic.startswith(_PROVIDERS):
            self.cooldowns.heard(topic, payload)
            return
        if topic == self._probe_topic:
            self._probe_seen.set()
            return
        if self.registry is not None:
            self.registry.observe(topic, payload)
        if self.pool.observe(topic, payload, self.state):
            self.publish_status(protocol.AVAILABLE)

    def _publish_retained(self, topic: str, payload: bytes, expiry: Optional[int]) -> None:
        """A provider's cooldown, an approval's request (or their clearing), not waited for."""
        self.transport.publish(topic, payload, retain=True, expiry=expiry)

    def _follow_cancel(self, agent_id: str, cancel: Cancel) -> None:
        """A cancel passed on to the agent a task was forwarded to (QoS 1, not waited for)."""
        self.transport.publish(protocol.cancel_topic(agent_id), protocol.to_payload(cancel_message(cancel)),
                               headers=tracing.task_headers())

    def _on_twin(self, text: str) -> None:
        """Said at once and then once a minute; the links wait 20-30 s when it takes them over."""
        if self._twins.occurred():
            log.error("%s; stop one of them, or give each process its own agent id (or [mqtt] client_id)", text)
        self.transport.history.twin_seen(text)

    def _survey(self) -> None:
        """Before `available`: see the retained statuses of this agent id (a probe published after
        subscribing comes back after them) and, in a pool, that the broker shares subscriptions."""
        member = self.config.instance_id
        probe = (protocol.shared_subscription(f"probe-{self.config.mqtt.client_id}", self._probe_topic)
                 if member else self._probe_topic)
        statuses = self.pool.watched_filters() + [probe] + ([STATUS_FILTER] if self.registry is not None else [])
        self.transport.watch([(topic, 0) for topic in statuses] + [(self._cancel_topic, 1)]  # direct, in a pool too
                             + [(topic, 1) for topic in self.fleet.topics()])
        answered = self.transport.wait_watching(_STATUS_WAIT)
        refusals = dict(self.transport.watch_refusals)
        if self._cancel_topic in refusals:
            log.warning("the broker refused the subscription to %s (%s): cancels will not reach this agent; let "
                        "agents subscribe to their cancel topic in the broker ACL (deploy/mosquitto/acl)",
                        self._cancel_topic, refusals.pop(self._cancel_topic))
        if not answered or refusals:
            refusal = next((f"{topic}: {code}" for topic, code in refusals.items()), "no answer")
            if member:
                raise StartupError(f"the broker did not grant the pool's status subscriptions ({refusal})")
            log.warning("could not follow the statuses of agent id %s (%s); a pool with the same id would go "
                        "unnoticed", self.config.agent_id, refusal)
            return
        self.transport.publish(self._probe_topic, b"probe")
        if not self._probe_seen.wait(_STATUS_WAIT):
            if member:
                raise StartupError(f"the broker does not deliver shared subscriptions ({probe}), so it cannot "
                                   f"serve a pool (instance_id {member}): use a broker with shared subscriptions "
                                   f"(MQTT 5: mosquitto, EMQX, HiveMQ, VerneMQ) or run without an instance id")
            log.warning("a probe on %s did not come back within %.0f s (check the broker ACL for this client); "
                        "statuses of other agents with id %s may go unnoticed", self._probe_topic, _STATUS_WAIT,
                        self.config.agent_id)
        if self.pool.startup_conflict:
            raise StartupError(self.pool.startup_conflict)

    def _on_subscribed(self) -> None:
        if self.state == "running":  # a reconnect: tell the world we are back
            self.publish_status(protocol.AVAILABLE)

    # -------------------------------------------------------------- intake
    def _may_read(self) -> bool:
        return self._accepting and self.intake.has_room()

    def _drain_session(self, deadline: float) -> None:
        """After UNSUBACK the broker queues nothing new for this session, and sends what it holds as
        acknowledgements free its window: done once no task is queued or running and nothing has
        arrived for a while."""
        while time.monotonic() < deadline:
            if (self.intake.depth() == 0 and self.load() == 0
                    and time.monotonic() - self._last_delivery >= _SESSION_QUIET):
                return
            self._hard_stop.wait(_DRAIN_POLL)
        log.warning("tasks were still arriving after shutdown_grace (%d s); the rest waits in this member's "
                    "session", self.config.shutdown_grace)

    def _on_delivery(self, delivery: Any) -> None:
        """A task for the workers, or an approval's decision: recorded in the store before it is
        acknowledged (the task it decides goes to the workers)."""
        self._last_delivery = time.monotonic()
        if not self._accepting:
            log.debug("not accepting tasks (shutting down); %s will be redelivered", delivery.topic)
            return
        if self._decisions_prefix is not None:
            topic = protocol.canonicalize_topic(delivery.topic)
            if topic.startswith(self._decisions_prefix):
                self.desk.receive(topic, bytes(delivery.payload))
                delivery.ack()
                return
        self.intake.put(delivery)

    def saturated(self) -> bool:
        return not self.intake.has_room()

    def _start_worker(self) -> Future:
        future = self.executor.submit(self._worker)
        future.add_done_callback(self._worker_ended)
        return future

    def _worker_ended(self, future: Future) -> None:
        """A worker only returns at shutdown; one that died is logged and replaced."""
        error = future.exception() if not future.cancelled() else None
        if error is None or self.state != "running":
            return
        log.error("a worker died (%s: %s); starting a replacement", type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__))
        with self._busy_lock:
            self._futures = [f for f in self._futures if f is not future] + [self._start_worker()]

    def _worker(self) -> None:
        while True:
            delivery = self.intake.get()
            if delivery is _STOP:
                return
            with self._busy_lock:
                self._busy += 1
            try:
                if isinstance(delivery, Resume):
                    self.processor.resume(delivery.approval_id)
                else:
                    self.processor.handle(delivery)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Connect, survey the statuses of this agent id, subscribe (SUBACK), verify the LLM,
        start workers, then publish `available`."""
        mqtt = self.config.mqtt
        llm = self.config.llm
        endpoint = "offline" if llm.provider == "echo" else public_url(llm.base_url or OFFICIAL_BASE_URL[llm.provider])
        log.info("agent %s starting (version %s): broker %s, LLM %s model %s at %s, %d workers", self.config.agent_id,
                 __version__, mqtt.broker_url, llm.provider, llm.model, endpoint, self.workers)
        if mqtt.tls_insecure_skip_verify:
            log.warning("TLS certificate and host name verification is OFF (tls_insecure_skip_verify = true): "
                        "anyone on the network path can impersonate the broker")
        tracing.install(build_tracer(self.config.tracing, self.config.agent_id, self.metrics))
        self.health.start()
        self.transport.start_output()
        self._wait_for(self.transport.output.wait_connected)
        self._survey()  # before any task can arrive
        self.desk.recover()  # parked tasks wait again, decided ones go to the workers once they start
        self.transport.start_intake()
        try:
            self._wait_for(self.transport.wait_subscribed)
        except SubscriptionRefused as exc:
            raise StartupError(str(exc)) from None
        self.tools.initialize()
        try:
            self.agent_loop.chain.verify()
        except LlmError as exc:
            raise StartupError(f"LLM provider check failed: {exc}") from None
        self._futures = [self._start_worker() for _ in range(self.workers)]
        self.state = "running"
        if not self.publish_status(protocol.AVAILABLE, wait_seconds=_STATUS_WAIT):
            log.warning("the broker has not yet acknowledged the available status; it is sent on reconnect")
        log.info("agent %s is available on %s", self.config.agent_id, protocol.input_topic(self.config.agent_id))

    def _wait_for(self, ready: Callable[[float], bool]) -> None:
        while not ready(1.0):
            if self.stop_requested.is_set():
                self.log_stop_signal()
                raise StartupError("stopped before the broker connection was established")

    def serve(self) -> None:
        """Heartbeat until a stop is requested."""
        while not self.stop_requested.wait(self.config.heartbeat_interval):
            self.publish_status(protocol.AVAILABLE, heartbeat=True)
        self.log_stop_signal()

    def log_stop_signal(self) -> None:
        log.info("received %s: finishing in-flight tasks (send again to exit at once)", self.stop_requested.signal_name)

    def shutdown(self) -> bool:
        """Warm shutdown; returns False when tasks were still running after the grace period."""
        self.state = "stopping"
        # a pool member leaves the shared subscription and answers everything the broker still
        # sends its session: what it left there would wait for a member with its instance id
        grace_ends = time.monotonic() + self.config.shutdown_grace
        if self.pool.member and self.transport.connected:
            if self.transport.leave_input(_STATUS_WAIT):
                self._drain_session(grace_ends)
            else:
                log.warning("the broker did not confirm leaving the shared subscription; this member's session "
                            "may keep receiving tasks until it returns or the session expires")
        self._accepting = False
        self.desk.stop()  # open MCP elicitations end as `cancel`; parked tasks stay in the store
        if not self.pool.member:
            dropped = self.intake.drain()
            if dropped:
                log.info("%d queued tasks left unacknowledged; the broker will redeliver them", dropped)
        for _ in self._futures:
            self.intake.put(_STOP)
        done, pending = wait(self._futures, timeout=max(0.0, grace_ends - time.monotonic()))
        if pending:
            self._hard_stop.set()
            log.warning("%d tasks still running after shutdown_grace (%d s); they stay unacknowledged "
                        "and will be redelivered", len(pending), self.config.shutdown_grace)
        if self.transport.connected:
            if self.config.state_dir is None:
                self.processor.release_parked()
            self.publish_status(protocol.UNAVAILABLE, wait_seconds=_STATUS_WAIT)
            last = self.pool.leaving_topics(_STATUS_WAIT)
            if last:
                self._publish_status(last, protocol.UNAVAILABLE, _STATUS_WAIT)
        self.transport.stop()
        self.tools.shutdown(max(1.0, grace_ends - time.monotonic()))
        tracing.shutdown(max(1.0, grace_ends - time.monotonic()))
        tracing.install(tracing.Tracer())  # the process's again: nothing of this agent's export is left
        self.state = "stopped"
        self._parts.close()  # health server, workers' pool, completed-task store, the links' sockets
        log.info("agent %s stopped", self.config.agent_id)
        return not pending


def run_agent(config: AgentConfig) -> int:
    """Runs until a stop signal; logging is already configured."""
    try:
        runtime = AgentRuntime(config)
    except StartupError as exc:
        log.error("startup failed: %s", exc)
        return EXIT_STARTUP
    runtime.stop_requested.install()
    try:
        runtime.start()
    except StartupError as exc:
        log.error("startup failed: %s", exc)
        runtime.shutdown()
        return EXIT_STARTUP
    runtime.serve()
    finished = runtime.shutdown()
    if not finished:  # worker threads cannot be interrupted; leave without waiting for them
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_OK)
    return EXIT_OK
