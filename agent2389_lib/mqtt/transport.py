"""MQTT transport on paho-mqtt 2.x: two links to the broker, each with its own network thread.

* The intake link subscribes to the input topic with a persistent session, carries the
  Last Will, and reads the socket only while the caller's intake has room. mosquitto lets a
  new Receive-Maximum window through for every PUBACK, so broker flow control is no bound;
  not reading is, because TCP then holds the backlog at the broker. Incoming tasks are
  acknowledged by the caller (manual ack) once their outcome is safely published.
* The output link publishes outcomes and status at QoS 1. Keeping it separate means
  waiting for a PUBACK never requires reading past a backlog of tasks.

Both links reconnect with exponential backoff and equal jitter, reset whenever the broker accepts
a connection (a broker back is rejoined at once); a close that evidence names a takeover by another
process with the same client id waits 20-30 s instead. On every intake reconnect the subscription
is renewed and `on_subscribed` fires (the runtime re-publishes `available`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config import MqttSettings
from ..metrics import Metrics
from .clients import ProtocolVersion
from .history import ConnectionHistory
from .link import InboundMessage, Link
from .tickets import PublishTicket

log = logging.getLogger("agent2389.transport.mqtt")


class SubscriptionRefused(RuntimeError):
    pass


class MqttTransport:
    """The agent's view of the broker: tasks in, outcomes and status out."""

    def __init__(self, settings: MqttSettings, metrics: Metrics, *, input_topic: str, will: tuple[str, bytes],
                 may_read: Callable[[], bool], receive_maximum: int, max_packet_size: int,
                 on_delivery: Callable[[InboundMessage], None], on_subscribed: Callable[[], None],
                 on_watched: Callable[[str, bytes], None], output_will: Optional[tuple[str, bytes]] = None,
                 decisions: Optional[str] = None):
        """`input_topic` is the subscription filter (a shared subscription for a pool member);
        `will` goes with the intake link, `output_will` (if any) with the output link. Tasks go
        to `on_delivery`, `on_subscribed` follows every granted input subscription, and the
        messages of `watch` go to `on_watched` (all on the links' network threads). `decisions`:
        the approval decisions' filter, held by the intake's persistent session beside the input
        (a decision published while the agent is down waits there); they go to `on_delivery` too."""
        self.settings = settings
        self.metrics = metrics
        self.input_topic = input_topic
        self.decisions = decisions
        self._watched: list[tuple[str, int]] = []
        self._watching = threading.Event()
        self.watch_refusals: dict[str, str] = {}  # filter: the broker's reason code
        self.on_watched = on_watched
        self._subscribed = threading.Event()
        self._refusal: Optional[str] = None
        self.on_subscribed = on_subscribed
        self.on_delivery = on_delivery
        self.version = ProtocolVersion(settings.protocol)
        self.history = ConnectionHistory(settings, self.version, metrics)
        self.intake = Link(self.history.link("intake", settings.client_id), metrics, persistent=True, will=will,
                            may_read=lambda: not self._subscribed.is_set() or may_read(),
                            receive_maximum=receive_maximum, max_packet_size=max_packet_size)
        # QoS 2 is exactly once across a reconnect only if the broker keeps the packet ids' state
        self.output = Link(self.history.link("output", f"{settings.client_id}-out"), metrics,
                            persistent=settings.outcome_qos == 2, will=output_will)
        self.intake.on_connected = self._intake_connected
        self.intake.on_message = lambda message: self.on_delivery(message)
        self.intake.on_disconnected = self._intake_disconnected
        self.output.on_connected = self._output_connected
        self.output.on_disconnected = self._connection_changed
        self.output.on_message = self._watched_message
        self.output.on_subscribe = self._handle_watch_suback
        self.intake.on_subscribe = self._handle_suback
        self._unsubscribed = threading.Event()
        self.intake.on_unsubscribe = lambda *args: self._unsubscribed.set()

    def watch(self, filters: Sequence[tuple[str, int]]) -> None:
        """Follow these (topic filter, QoS) on the output link (statuses, probes, cancels), which
        reads whatever the workers are doing; renewed on every reconnect. Messages go to
        `on_watched` and are acknowledged once it returns."""
        self._watched = list(filters)
        if self.output.connected:
            self._subscribe_watched()

    def _watched_message(self, message: InboundMessage) -> None:
        self.on_watched(message.topic, bytes(message.payload))
        message.ack()

    def leave_input(self, timeout: float) -> bool:
        """Unsubscribe from the input and wait for the UNSUBACK (the broker stops sending new tasks;
        those sent before it have been read by then). A pool member leaving gracefully must do this,
        or its persistent session keeps collecting a share of the tasks while it is away."""
        self._unsubscribed.clear()
        result, _ = self.intake.client.unsubscribe(self.input_topic)
        return result == mqtt.MQTT_ERR_SUCCESS and self._unsubscribed.wait(timeout)

    def wait_watching(self, timeout: float) -> bool:
        return self._watching.wait(timeout)

    def _output_connected(self, session_present: bool) -> None:
        self._connection_changed()
        if self._watched:
            self._subscribe_watched()

    def _subscribe_watched(self) -> None:
        self.output.client.subscribe(self._watched)

    def _handle_watch_suback(self, client, userdata, mid, reason_codes, properties) -> None:
        self.watch_refusals = {topic: str(rc) for (topic, _), rc in zip(self._watched, reason_codes) if rc.is_failure}
        self._watching.set()

    def start_output(self) -> None:
        self.output.start()

    def start_intake(self) -> None:
        """Separately, so the agent can look around on the output link before tasks arrive."""
        self.intake.start()

    @property
    def connected(self) -> bool:
        return self.intake.connected and self.output.connected and self._subscribed.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once SUBACK granted the input subscription; raises SubscriptionRefused on refusal."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._refusal:
                raise SubscriptionRefused(self._refusal)
            if self._subscribed.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                return True
        return self._subscribed.is_set()

    def wake_intake(self) -> None:
        self.intake.wake()

    def publish(self, topic: str, payload: bytes, retain: bool = False,
                headers: Sequence[tuple[str, str]] = (), qos: int = 1, expiry: Optional[int] = None) -> PublishTicket:
        return self.output.publish(topic, payload, retain, headers, qos, expiry)

    def publish_advisory(self, topic: str, payload: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.output.publish_advisory(topic, payload, headers)

    def _intake_connected(self, session_present: bool) -> None:
        filters = [self.input_topic] + ([self.decisions] if self.decisions else [])
        if self.intake.v5:
            options = SubscribeOptions(qos=1, retainAsPublished=True)
            result, _ = self.intake.client.subscribe([(topic, options) for topic in filters])
        else:
            result, _ = self.intake.client.subscribe([(topic, 1) for topic in filters])
        if result != mqtt.MQTT_ERR_SUCCESS:
            log.warning("could not send SUBSCRIBE for %s: %s", self.input_topic, mqtt.error_string(result))

    def _intake_disconnected(self) -> None:
        self._subscribed.clear()
        self._connection_changed()

    def _connection_changed(self) -> None:
        self.metrics.mqtt_connection(self.connected)

    def _handle_suback(self, client, userdata, mid, reason_codes, properties) -> None:
        if self.decisions and len(reason_codes) > 1 and reason_codes[1].is_failure:
            log.warning("the broker refused the subscription to %s: %s; approvals cannot be decided (check the broker "
                        "ACL for this client)", self.decisions, reason_codes[1])
        reason_codes = reason_codes[:1]
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        refused += [f"granted QoS {rc.value} only; at-least-once delivery needs QoS 1 (check the broker's max_qos)"
                    for rc in reason_codes if not rc.is_failure and rc.value < 1]
        if refused:
            self._refusal = (f"the broker refused the subscription to {self.input_topic}: {refused[0]} "
                             f"(check the broker ACL for this client)")
            log.error(self._refusal)
            return
        log.info("subscribed to %s", self.input_topic)
        self._subscribed.set()
        self._connection_changed()
        self.on_subscribed()

    def stop(self, timeout: float = 5.0) -> None:
        """Both links at once, within one deadline: a slow broker cannot stretch shutdown."""
        deadline = time.monotonic() + timeout
        for link in (self.intake, self.output):
            link.begin_stop()
        for link in (self.intake, self.output):
            link.finish_stop(deadline)
