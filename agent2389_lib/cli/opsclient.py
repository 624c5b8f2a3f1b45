"""A small synchronous MQTT client for the operator commands (inject, monitor, pipeline)."""

from __future__ import annotations

import math
import queue
import ssl
import threading
import uuid
from typing import Callable, Optional, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import MqttSettings
from ..mqtt.clients import UNSUPPORTED_PROTOCOL, describe_refusal, describe_tls_error, new_client, publish_properties
from ..mqtt.state import ConnectionState, LinkState


class OperatorError(Exception):
    """The broker could not be used: the message says why and what to check."""


# The most a subscription grants is the QoS a message was published with: answers published at
# outcome_qos = 2 then reach the operator exactly once, the rest at the QoS they were sent.
SUBSCRIBE_QOS = 2


class OperatorClient:
    """One connection for one command. With `session_seconds` (a command that waits for an
    answer) the broker keeps its MQTT 5 session that long across a lost connection, so an answer
    published meanwhile is delivered once it is back; the session is ended when the command is."""

    def __init__(self, settings: MqttSettings, session_seconds: Optional[float] = None,
                 client_id: Optional[str] = None):
        """`client_id`: a stable one keeps the session across runs (the gateway's); default, a new one."""
        self.settings = settings
        self.session_seconds = session_seconds
        self.client_id = client_id or f"agent2389-cli-{uuid.uuid4().hex[:10]}"
        self.version = "3.1.1" if settings.protocol == "3.1.1" else "5"
        self.messages: "queue.Queue[mqtt.MQTTMessage]" = queue.Queue()
        self.topics: list[str] = []
        self.state = ConnectionState()  # paho reconnects on its own; this says whether it has
        self._subscribed = threading.Event()
        self._refusal: Optional[str] = None
        self._not_v5 = False  # the broker closed an MQTT 5 CONNECT or refused its version
        self._publish_refusals: dict[int, str] = {}  # mid: the broker's PUBACK reason (MQTT 5)
        self.on_connection_change: Callable[[str], None] = lambda text: None  # lost / back, for long-running commands
        self.client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        client = new_client(self.settings, self.client_id, self.version)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = lambda client, userdata, message: self.messages.put(message)
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.reconnect_delay_set(1, 30)
        return client

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._not_v5 = self.version == "5" and reason_code.value == UNSUPPORTED_PROTOCOL
            self._refusal = (f"broker {self.where} refused the connection: "
                             f"{describe_refusal(reason_code.value, str(reason_code), self.settings, self.client_id)}")
            return
        if self.state.become(LinkState.CONNECTED) is LinkState.DISCONNECTED:
            self.on_connection_change(f"reconnected to broker {self.where}")
        if self.topics:  # after a reconnect too
            client.subscribe([(topic, SUBSCRIBE_QOS) for topic in self.topics])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.state.connected:
            self.state.become(LinkState.DISCONNECTED)
            self.on_connection_change(f"lost the connection to broker {self.where} ({reason_code}); reconnecting")
        elif self.state.value is LinkState.NEW and self.version == "5":
            self._not_v5 = True
            self._refusal = self._refusal or (f"broker {self.where} closed the connection before accepting it; it "
                                              f'may not speak MQTT 5: set [mqtt] protocol = "3.1.1" (or "auto")')

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            self._refusal = f"broker {self.where} refused the subscription: {refused[0]}"
        else:
            self._subscribed.set()

    def connect(self, timeout: float = 10.0) -> None:
        """Connect; with `protocol = "auto"`, MQTT 5 first, then 3.1.1 if the broker does not speak 5."""
        try:
            self._connect(timeout)
        except OperatorError:
            if not (self._not_v5 and self.settings.protocol == "auto"):
                raise
            self.client.loop_stop()
            self.version, self._refusal = "3.1.1", None
            self.client = self._new_client()
            self._connect(timeout)

    def _connect(self, timeout: float) -> None:
        session: dict = {}
        if self.version == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = math.ceil(self.session_seconds or 0)
            session = {"clean_start": not self.session_seconds, "properties": properties}
        try:
            self.client.connect(self.settings.host, self.settings.port, self.settings.keep_alive, **session)
        except ssl.SSLError as exc:
            raise OperatorError(f"TLS with broker {self.where} failed: {describe_tls_error(str(exc))}") from None
        except OSError as exc:
            raise OperatorError(f"cannot reach broker {self.where}: {exc.strerror or exc} "
                                f"(check MQTT_HOST/MQTT_PORT or --broker-url)") from None
        self.client.loop_start()
        self._wait(self.state.wait_connected, timeout, "connect")

    def subscribe(self, topics: list[str], timeout: float = 10.0) -> None:
        """Subscribe (again after every reconnect) and wait for the SUBACK."""
        self.topics = list(topics)
        self.client.subscribe([(topic, SUBSCRIBE_QOS) for topic in topics])
        self._wait(self._subscribed.wait, timeout, "subscribe")

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0,
                headers: Sequence[tuple[str, str]] = (), expiry: Optional[int] = None) -> None:
        """`headers` go as MQTT 5 user properties, `expiry` (seconds) as its Message Expiry Interval
        (3.1.1 has neither)."""
        info = self.client.publish(topic, payload, qos=1,
                                   properties=publish_properties(headers, self.version == "5", expiry))
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise OperatorError(f"could not publish to {topic}: {exc}") from None
        if not info.is_published():
            raise OperatorError(f"broker {self.where} did not acknowledge the publish to {topic} "
                                f"within {timeout:.0f} s")
        refusal = self._publish_refusals.pop(info.mid, None)
        if refusal is not None:
            raise OperatorError(f"broker {self.where} refused the publish to {topic}: {refusal} (check the broker "
                                f"ACL for this user)")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:  # before the publish counts as done: `publish` finds it
            self._publish_refusals[mid] = str(reason_code)

    def _wait(self, wait: Callable[[float], bool], timeout: float, what: str) -> None:
        waited = 0.0
        while not wait(0.05):
            waited += 0.05
            if self._refusal:
                raise OperatorError(self._refusal)
            if waited >= timeout:
                raise OperatorError(f"broker {self.where} did not answer ({what}) within {timeout:.0f} s")

    def next_message(self, timeout: Optional[float]) -> Optional[mqtt.MQTTMessage]:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self, keep_session: bool = False) -> None:
        """Disconnect; a kept session ends with it (MQTT 5: session expiry 0 in the DISCONNECT)
        unless `keep_session` (what arrives meanwhile waits in it for the next run)."""
        self.state.become(LinkState.CLOSING)
        properties = None
        if self.session_seconds and self.version == "5" and not keep_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        self.client.disconnect(properties=properties)
        self.client.loop_stop()
        self.state.become(LinkState.CLOSED)
