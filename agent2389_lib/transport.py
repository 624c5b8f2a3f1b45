"""MQTT transport on paho-mqtt 2.x: two links to the broker, each with its own network thread.

* The intake link subscribes to the input topic with a persistent session, carries the
  Last Will, and reads the socket only while the caller's intake has room. mosquitto lets a
  new Receive-Maximum window through for every PUBACK, so broker flow control is no bound;
  not reading is, because TCP then holds the backlog at the broker. Incoming tasks are
  acknowledged by the caller (manual ack) once their outcome is safely published.
* The output link publishes outcomes and status at QoS 1. Keeping it separate means
  waiting for a PUBACK never requires reading past a backlog of tasks.

Both links reconnect with exponential backoff and equal jitter, reset only once a connection
stayed up for a while (so two processes fighting over one client id slow down); on every intake reconnect the
subscription is renewed and `on_subscribed` fires (the runtime re-publishes `available`).
"""

from __future__ import annotations

import logging
import random
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .backoff import Backoff
from .config import MqttSettings
from .errors import PayloadTooLarge
from .mqttclient import (UNSUPPORTED_PROTOCOL, ProtocolVersion, close_socket, describe_refusal, describe_tls_error,
                         PlainSocket, link_socket, new_client, publish_packet_size, qos0_publish_packet,
                         say_plain_paho)
from .logs import Throttle
from .metrics import Metrics

log = logging.getLogger("agent2389.transport.mqtt")

_POLL_SECONDS = 1.0
_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 30.0
_NOT_ACKED = object()
_ACKED_EARLY_KEPT = 1024  # an early PUBACK is claimed within microseconds; the rest are QoS 0 reports
_STABLE_SECONDS = 30.0  # a link up this long resets the reconnect backoff
_QUICK_CLOSES_ALARM = 2
_SAME_EVENT_SECONDS = 0.1  # links lost this close together: one cause (a dying broker drops both at once)
_REFUSAL_CLOSE_SECONDS = 1.0  # a close this soon after a refused publish: the refusal's
_TAKEOVER_DELAY = (20.0, 30.0)  # seconds; two processes with one id then take over at most 3 times a minute
_SESSION_TAKEN_OVER = 0x8E
_FAILURE_CAUSES_KEPT = 16
_CONNACK_TIMEOUT = 10.0  # paho alone waits 1.5 keep-alives for a port that is not an MQTT broker
_ADVISORY_BACKLOG = 1 << 20  # bytes waiting to be sent beyond which progress events are dropped
_NOT_A_BROKER_HINT = "is it an MQTT broker's port? (MQTT_HOST/MQTT_PORT, [mqtt] broker_url)"


class SubscriptionRefused(RuntimeError):
    pass


@dataclass
class Delivery:
    """One task message as received; `ack()` sends its PUBACK (only if its session still exists).

    Two deliveries are equal when they are the same broker message (packet id within one
    session), so a redelivery is recognized and acknowledged once.
    """

    topic: str = field(compare=False)
    payload: bytes = field(compare=False, repr=False)
    retain: bool = field(compare=False)
    mid: int
    _link: "_Link" = field(repr=False, compare=False)
    _generation: int = field(repr=False, default=0)
    qos: int = field(compare=False, default=1)

    def ack(self) -> None:
        """A QoS 0 delivery has nothing to acknowledge (a PUBACK for it is a protocol error that
        makes the broker drop the connection)."""
        if self.qos:
            self._link.ack(self.mid, self._generation)


class PublishTicket:
    """Completion of one QoS 1 publish: set when the broker's PUBACK arrives. `refusal` is the
    PUBACK's failing reason (MQTT 5, e.g. "Not authorized") and `refusal_code` its value (0x87),
    both None when it was accepted."""

    __slots__ = ("done", "refusal", "refusal_code")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.refusal: Optional[str] = None
        self.refusal_code: Optional[int] = None

    def wait(self, timeout: Optional[float]) -> bool:
        return self.done.wait(timeout)

    def settle(self, refusal: Optional[tuple[str, int]]) -> None:
        if refusal is not None:
            self.refusal, self.refusal_code = refusal
        self.done.set()


class _Link:
    """One paho client driven by our own select loop on a dedicated thread."""

    def __init__(self, name: str, settings: MqttSettings, client_id: str, metrics: Metrics, *, persistent: bool,
                 version: ProtocolVersion, will: Optional[tuple[str, bytes]] = None,
                 may_read: Callable[[], bool] = lambda: True, receive_maximum: Optional[int] = None,
                 max_packet_size: Optional[int] = None):
        self.name = name
        self.settings = settings
        self.version = version
        self._client_options = (client_id, persistent, will, receive_maximum, max_packet_size)
        self.metrics = metrics
        self._may_read = may_read
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[PublishTicket, str, bytes, bool]] = {}  # mid: ticket and message
        self._client_lock = threading.Lock()  # publishing vs. replacing the client
        self._acked_early: dict[int, Optional[tuple[str, int]]] = {}
        self.max_packet_size: Optional[int] = None  # from the broker's CONNACK
        self._generation = 0
        self._last_read = time.monotonic()
        self._last_error = ""
        self._backoff = Backoff(_BACKOFF_INITIAL, _BACKOFF_MAX)
        self._connected_at = 0.0
        self._quick_closes = 0  # young closes in a row by a broker that stayed up
        self._young_close: Optional[tuple[float, Optional[float]]] = None  # when, and since when the sibling was up
        self._lost_at = self._refused_at = float("-inf")
        self.sibling: Optional[_Link] = None  # the process's other link
        self._had_session = False  # a connection was accepted since the last attempt
        self._takeover = ""
        self._answered = False
        self._connect_started = 0.0
        self._failures: dict[str, Throttle] = {}  # by cause
        self._loop_faults = Throttle()
        self._woken = False
        self.client_id = client_id
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.on_connected: Callable[[bool], None] = lambda session_present: None
        self.on_disconnected: Callable[[], None] = lambda: None
        self.on_message: Callable[[Delivery], None] = lambda delivery: None
        self.on_subscribe: Callable[..., None] = lambda *args: None
        self.on_unsubscribe: Callable[..., None] = lambda *args: None
        self.client = self._make_client()

    # -------------------------------------------------------------- setup
    def _make_client(self) -> mqtt.Client:
        """A client for the process's current protocol version (made anew after a fall-back)."""
        client_id, persistent, will, receive_maximum, max_packet_size = self._client_options
        self.v5 = v5 = self.version.v5
        session = {} if v5 else {"clean_session": not persistent}
        client = new_client(self.settings, client_id, self.version.current, coalesce_writes=True, manual_ack=True,
                            **session)
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_socket_register_write = lambda c, u, s: self.wake()
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        client.on_subscribe = lambda *args: self.on_subscribe(*args)
        client.on_unsubscribe = lambda *args: self.on_unsubscribe(*args)
        connect_kwargs: dict = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.settings.session_expiry if persistent else 0
            if receive_maximum:
                props.ReceiveMaximum = receive_maximum
            if max_packet_size:
                props.MaximumPacketSize = max_packet_size
            connect_kwargs = {"clean_start": not persistent, "properties": props}
        client.connect_async(self.settings.host, self.settings.port, self.settings.keep_alive, **connect_kwargs)
        return client

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.name}", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- state
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: Optional[float]) -> bool:
        return self._connected.wait(timeout)

    def wake(self) -> None:
        """One byte per round of the network loop, however many packets were queued meanwhile."""
        if self._woken:
            return
        self._woken = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # -------------------------------------------------------------- publishing and acking
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> PublishTicket:
        """Queue a QoS 1 publish; paho sends it now or after the next reconnect. Raises PayloadTooLarge
        instead of sending what the broker announced it would refuse (it would drop the link,
        and paho would resend the same packet on every reconnect)."""
        size = publish_packet_size(topic, payload, self.v5)
        if self.max_packet_size is not None and size > self.max_packet_size:
            raise PayloadTooLarge(size, self.max_packet_size, "broker's maximum packet size")
        ticket = PublishTicket()
        with self._client_lock:
            self._queue(ticket, topic, payload, retain)
        return ticket  # paho's register-write callback wakes the network thread

    def publish_advisory(self, topic: str, payload: bytes) -> None:
        """QoS 0, for progress events: nothing waits for them, and one lost costs nothing. The
        packet goes straight into the connection's send buffer: paho would build a message info,
        a lock, and a reason code and properties to report it written, for every event. Dropped
        while no session is open, as paho drops QoS 0 messages then; dropped and counted as a
        failure when over the broker's maximum packet size or behind a 1 MiB send backlog."""
        sock = link_socket(self.client)
        if isinstance(sock, PlainSocket):  # paho owns the socket alone: through paho
            if self.connected:
                self.metrics.published_message(self.client.publish(topic, payload, qos=0).rc == mqtt.MQTT_ERR_SUCCESS)
            return
        v5 = sock.session_v5 if sock is not None else None
        if v5 is None:
            return
        packet = qos0_publish_packet(topic, payload, v5)
        written = ((self.max_packet_size is None or len(packet) <= self.max_packet_size)
                   and sock.write_packet(packet, _ADVISORY_BACKLOG))
        self.metrics.published_message(written)
        if written:
            self.wake()

    def _queue(self, ticket: PublishTicket, topic: str, payload: bytes, retain: bool) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise RuntimeError("MQTT outgoing queue is full")
        with self._lock:
            refusal = self._acked_early.pop(info.mid, _NOT_ACKED)
            if refusal is _NOT_ACKED:
                self._pending[info.mid] = (ticket, topic, payload, retain)
        if refusal is not _NOT_ACKED:
            ticket.settle(refusal)

    def _replace_client(self) -> None:
        """A client for the other protocol version; what the old one had not yet delivered is
        queued on the new one, so no publish is lost by a fall-back."""
        with self._client_lock:
            with self._lock:
                unsent = list(self._pending.values())
                self._pending.clear()
                self._acked_early.clear()
            self.client = self._make_client()
            for ticket, topic, payload, retain in unsent:
                self._queue(ticket, topic, payload, retain)

    def ack(self, mid: int, generation: int) -> None:
        """PUBACK a delivery, unless the broker lost the session it came from (then the id is stale)."""
        if generation != self._generation:
            log.info("not acknowledging message %d: the broker session it belongs to is gone", mid)
            return
        self.client.ack(mid, 1)

    # -------------------------------------------------------------- paho callbacks (network thread)
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._answered = True
        client.on_log = None  # paho formats a log line for every packet while one is set
        if reason_code.is_failure:
            if (reason_code.value == UNSUPPORTED_PROTOCOL and self.v5
                    and (self.version.refused(self.where, str(reason_code)) or not self.version.v5)):
                self._attempt_failed()
                return  # the next attempt speaks 3.1.1
            self._connect_failed(logging.ERROR, f"broker {self.where} refused the {self.name} connection: "
                                 f"{describe_refusal(reason_code.value, str(reason_code), self.settings, self.client_id)}")
            return
        self.version.accepted(self.v5, self.where)
        self._had_session = True
        self._judge_young_close()
        self._failures.clear()  # the next outage is reported at once
        if not flags.session_present:
            self._generation += 1
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        sock = link_socket(client)
        if isinstance(sock, PlainSocket):
            say_plain_paho()
        else:
            sock.session_v5 = self.v5
        self._connected_at = time.monotonic()
        log.info("connected to broker %s:%d (%s link, session %s)", self.settings.host, self.settings.port,
                 self.name, "resumed" if flags.session_present else "new")
        self._connected.set()
        self.on_connected(flags.session_present)

    def _note_lifetime(self, seconds: float, reason_code: object) -> None:
        """Two processes with one client id take the session from each other in a loop. Only
        evidence of that counts, never a broker that went away (a crash loop closes young links
        too). Evidence is the broker's reason 0x8E (MQTT 5), or, since not every broker says it,
        young links closed again and again by a broker that stayed up: it took the link back
        at the first attempt, the sibling link was not lost with it (a dying broker drops both),
        and no refused publish came just before (mosquitto closes a link after one). The backoff
        is reset once a connection stayed up, or was closed for a refused publish (the broker is
        fine); a named takeover waits longer still."""
        now = time.monotonic()
        self._lost_at = now
        self._takeover = ""
        if seconds >= _STABLE_SECONDS or 0 <= now - self._refused_at < _REFUSAL_CLOSE_SECONDS:
            self._backoff.reset()  # a link that stayed up, or one closed for a refused publish: no broker trouble
            self._quick_closes = 0
            return
        if getattr(reason_code, "value", None) == _SESSION_TAKEN_OVER:
            self._takeover = (f"the broker closed the {self.name} link because another connection took over client "
                              f"id {self.client_id} (reason 0x8E, session taken over)")
        elif self._quick_closes >= _QUICK_CLOSES_ALARM:
            self._takeover = (f"the broker closed the {self.name} link of client id {self.client_id} "
                              f"{self._quick_closes + 1} times in a row within {_STABLE_SECONDS:.0f} s of taking it "
                              f"back, while the broker stayed up ({reason_code})")
        else:  # judged once the broker took the link back (`_judge_young_close`)
            sibling = self.sibling
            self._young_close = (now, sibling._connected_at if sibling is not None and sibling.connected else None)
        if self._takeover:
            self._takeover += ("; another process is probably running with the same agent id and client id: stop "
                               "it, or give each process its own agent id (or [mqtt] client_id)")

    def _judge_young_close(self) -> None:
        """The link is back at the first attempt since a young close: was the broker up all along,
        the sibling link connected before that close and not lost with it?"""
        young, self._young_close = self._young_close, None
        if young is None:
            return
        closed_at, sibling_up_since = young
        sibling_stayed = (sibling_up_since is not None and sibling_up_since < closed_at and self.sibling is not None
                          and abs(self.sibling._lost_at - closed_at) >= _SAME_EVENT_SECONDS)
        self._quick_closes = self._quick_closes + 1 if sibling_stayed else 0

    def _attempt_failed(self) -> None:
        """The broker was away: no takeover closed either link."""
        self.metrics.mqtt_connection(False, failed=True)
        for link in (self, self.sibling):
            if link is not None:
                link._quick_closes, link._young_close = 0, None

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _remember_error(self, client, userdata, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = text

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._closing.is_set():
            self._note_lifetime(time.monotonic() - self._connected_at, reason_code)
        if not (self._closing.is_set() or self._takeover):  # a takeover is logged with its delay, later
            if was_connected:
                log.warning("lost connection to broker %s:%d (%s link): %s", self.settings.host,
                            self.settings.port, self.name, reason_code)
            elif not self._answered:
                self._closed_before_connack()
        self._last_error = ""
        self.on_disconnected()

    def _closed_before_connack(self) -> None:
        """The broker dropped the connection without answering CONNECT: TLS trouble (paho only
        logged why), or a broker that does not speak the version we sent."""
        if self._last_error and self.settings.tls:
            self._connect_failed(logging.ERROR, f"TLS with broker {self.where} failed ({self.name} link): "
                                                f"{describe_tls_error(self._last_error)}")
            return
        cause = self._last_error or "the broker closed the connection before answering CONNECT"
        deciding = self.v5 and self.version.deciding
        if self.version.closed_before_connack(self.v5) or self.v5 != self.version.v5:
            self._attempt_failed()
            return  # the next attempt speaks the other version
        explicit_v5 = self.v5 and self.version.setting == "5"
        if explicit_v5:
            hint = '; it may not speak MQTT 5: set [mqtt] protocol = "3.1.1" (or "auto")'
        elif deciding:
            hint = "; trying MQTT 5 once more, then 3.1.1 (protocol = auto)"
        else:
            hint = f"; {_NOT_A_BROKER_HINT}"
        self._connect_failed(logging.ERROR if explicit_v5 else logging.WARNING,
                             f"connection to broker {self.where} failed ({self.name} link): {cause}{hint}")

    def _connect_failed(self, level: int, text: str) -> None:
        """Every failed attempt is counted; each cause is logged at once the first time, then
        once a minute with how often it happened (a broker that stays away must not flood the
        log, nor one whose failures alternate between two wordings)."""
        self._attempt_failed()
        if len(self._failures) > _FAILURE_CAUSES_KEPT:
            self._failures.clear()
        count = self._failures.setdefault(text, Throttle()).occurred()
        if count:
            since = f" ({count} failed attempts since the last report)" if count > 1 else ""
            log.log(level, "%s; retrying with backoff%s", text, since)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        refusal = (str(reason_code), reason_code.value) if reason_code.is_failure else None
        if refusal:
            self._refused_at = time.monotonic()
        with self._lock:
            pending = self._pending.pop(mid, None)
            if pending is None:  # its publish() has not returned yet, or it was a QoS 0 publish (plain paho)
                self._acked_early[mid] = refusal
                if len(self._acked_early) > _ACKED_EARLY_KEPT:
                    del self._acked_early[next(iter(self._acked_early))]
        if pending is not None:
            pending[0].settle(refusal)
        self.metrics.published_message(refusal is None)

    def _handle_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self.on_message(Delivery(message.topic, message.payload, bool(message.retain), message.mid,
                                 self, self._generation, message.qos))

    # -------------------------------------------------------------- network loop
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.client.socket() is None and self._closing.is_set():
                break  # DISCONNECT sent: connecting again would only leave a Last Will behind
            if self.client.socket() is None and not self._connect_once():
                self._stop.wait(self._backoff.next_delay())
                continue
            try:
                self._service()
            except ssl.SSLError as exc:  # e.g. TLS 1.3 reports a missing client certificate after the handshake
                self._connection_failed(exc)
                self._stop.wait(self._backoff.next_delay())
            except OSError as exc:
                self._loop_failed(logging.WARNING, f"connection to broker {self.where} ({self.name} link) failed: "
                                                   f"{exc.strerror or exc}")
            except Exception:  # never let the network thread die
                self._loop_failed(logging.ERROR, f"unexpected error in the {self.name} network loop", exc_info=True)
        self._drop_socket()

    def _loop_failed(self, level: int, text: str, exc_info: bool = False) -> None:
        """Drop the connection and wait before the next: a fault that comes back on every round
        must turn into neither a reconnect storm nor a log flood (a line a minute, with the count)."""
        self._drop_socket()
        count = self._loop_faults.occurred()
        if count:
            since = f" ({count} times since the last report)" if count > 1 else ""
            log.log(level, "%s; reconnecting with backoff%s", text, since, exc_info=exc_info)
        self._stop.wait(self._backoff.next_delay())

    def _connect_once(self) -> bool:
        self.metrics.mqtt_connecting()
        if self._had_session:
            self._had_session = False
            self.version.reconnecting()
        if self.v5 != self.version.v5:  # the other version, for the reasons ProtocolVersion gives
            self._replace_client()
        self._answered = False
        self._connect_started = time.monotonic()
        self.client.on_log = self._remember_error  # until CONNACK: why a connection failed
        try:
            self.client.reconnect()
            self._last_read = time.monotonic()
            return True
        except ssl.SSLError as exc:
            self._connection_failed(exc)
        except (OSError, ValueError) as exc:
            self._connect_failed(logging.WARNING, f"cannot connect to broker {self.where} ({self.name} link): "
                                 f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
        return False

    def _connection_failed(self, exc: ssl.SSLError) -> None:
        self._connect_failed(logging.ERROR, f"TLS with broker {self.where} failed ({self.name} link): "
                                            f"{describe_tls_error(str(exc))}")
        self._drop_socket()

    def _service(self) -> None:
        sock = link_socket(self.client)
        if sock is None:
            return
        if not self._answered and time.monotonic() - self._connect_started > _CONNACK_TIMEOUT:
            self._connect_failed(logging.WARNING, f"broker {self.where} accepted the TCP connection ({self.name} "
                                                  f"link) but did not answer CONNECT within {_CONNACK_TIMEOUT:.0f} s; "
                                                  f"{_NOT_A_BROKER_HINT}")
            self._drop_socket()
            self._stop.wait(self._backoff.next_delay())
            return
        read = self._may_read() or time.monotonic() - self._last_read >= self.settings.keep_alive / 2
        if read and sock.pending():  # data already read off the wire (our buffer, or a TLS record)
            readable, writable = [sock], []
        else:
            rlist = [sock, self._wake_r] if read else [self._wake_r]
            wlist = [sock] if self.client.want_write() or sock.unsent() else []
            readable, writable, _ = select.select(rlist, wlist, [], _POLL_SECONDS)
        if self._wake_r in readable:
            self._drain_wake()
        rc = mqtt.MQTT_ERR_SUCCESS
        if sock in writable or self.client.want_write():
            rc = self.client.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS and sock in readable:
            rc = self.client.loop_read()
            self._last_read = time.monotonic()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc = self.client.loop_misc()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            sock.flush_writes()  # everything paho wrote in this round, in one send()
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            self._drop_socket()
            delay = self._backoff.next_delay()
            if self._takeover:
                delay = max(delay, random.uniform(*_TAKEOVER_DELAY))
                log.error("%s; next attempt in %.1f s", self._takeover, delay)
            self._stop.wait(delay)

    def _drain_wake(self) -> None:
        """Then a later wake sends again; what was queued before it is written in this round."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._woken = False

    def _drop_socket(self) -> None:
        if self.client.socket() is not None:
            close_socket(self.client)
        if self._connected.is_set():
            self._lost_at = time.monotonic()
            self._connected.clear()
            self.on_disconnected()

    # -------------------------------------------------------------- shutdown
    def begin_stop(self) -> None:
        """Send DISCONNECT (so the broker does not publish the Last Will); `finish_stop` waits."""
        self._closing.set()
        if self.connected:
            self.client.disconnect()
            self.wake()

    def finish_stop(self, deadline: float) -> None:
        """Wait until the DISCONNECT is written (or the deadline), then end the thread."""
        while self.client.socket() is not None and time.monotonic() < deadline:
            if self._thread is None or not self._thread.is_alive():
                break
            time.sleep(0.01)
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()) + _POLL_SECONDS)
            if self._thread.is_alive():
                log.warning("the %s link's thread did not end within the shutdown deadline", self.name)


class MqttTransport:
    """The agent's view of the broker: tasks in, outcomes and status out."""

    def __init__(self, settings: MqttSettings, metrics: Metrics, *, input_topic: str, will: tuple[str, bytes],
                 may_read: Callable[[], bool], receive_maximum: int, max_packet_size: int,
                 output_will: Optional[tuple[str, bytes]] = None):
        """`input_topic` is the subscription filter (a shared subscription for a pool member);
        `will` goes with the intake link, `output_will` (if any) with the output link."""
        self.settings = settings
        self.metrics = metrics
        self.input_topic = input_topic
        self._watched: list[str] = []
        self._watching = threading.Event()
        self.watch_refusal: Optional[str] = None
        self.on_watched: Callable[[str, bytes], None] = lambda topic, payload: None
        self._subscribed = threading.Event()
        self._refusal: Optional[str] = None
        self.on_subscribed: Callable[[], None] = lambda: None
        self.on_delivery: Callable[[Delivery], None] = lambda delivery: None
        self.version = ProtocolVersion(settings.protocol)
        self.intake = _Link("intake", settings, settings.client_id, metrics, persistent=True, version=self.version,
                            will=will,
                            may_read=lambda: not self._subscribed.is_set() or may_read(),
                            receive_maximum=receive_maximum, max_packet_size=max_packet_size)
        self.output = _Link("output", settings, f"{settings.client_id}-out", metrics, persistent=False,
                            version=self.version, will=output_will)
        self.intake.sibling, self.output.sibling = self.output, self.intake
        self.intake.on_connected = self._intake_connected
        self.intake.on_message = lambda delivery: self.on_delivery(delivery)
        self.intake.on_disconnected = self._intake_disconnected
        self.output.on_connected = self._output_connected
        self.output.on_disconnected = self._connection_changed
        self.output.on_message = lambda delivery: self.on_watched(delivery.topic, delivery.payload)
        self.output.on_subscribe = self._handle_watch_suback
        self.intake.on_subscribe = self._handle_suback
        self._unsubscribed = threading.Event()
        self.intake.on_unsubscribe = lambda *args: self._unsubscribed.set()

    def watch(self, filters: list[str]) -> None:
        """Follow these topic filters at QoS 0 on the output link (statuses, probes); renewed on
        every reconnect. Messages go to `on_watched`."""
        self._watched = list(filters)
        if self.output.connected:
            self._subscribe_watched()

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
        self.output.client.subscribe([(topic, 0) for topic in self._watched])

    def _handle_watch_suback(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [f"{topic}: {rc}" for topic, rc in zip(self._watched, reason_codes) if rc.is_failure]
        self.watch_refusal = refused[0] if refused else None
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

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> PublishTicket:
        return self.output.publish(topic, payload, retain)

    def publish_advisory(self, topic: str, payload: bytes) -> None:
        self.output.publish_advisory(topic, payload)

    def _intake_connected(self, session_present: bool) -> None:
        if self.intake.v5:
            result, _ = self.intake.client.subscribe(
                self.input_topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
        else:
            result, _ = self.intake.client.subscribe(self.input_topic, 1)
        if result != mqtt.MQTT_ERR_SUCCESS:
            log.warning("could not send SUBSCRIBE for %s: %s", self.input_topic, mqtt.error_string(result))

    def _intake_disconnected(self) -> None:
        self._subscribed.clear()
        self._connection_changed()

    def _connection_changed(self) -> None:
        self.metrics.mqtt_connection(self.connected)

    def _handle_suback(self, client, userdata, mid, reason_codes, properties) -> None:
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
