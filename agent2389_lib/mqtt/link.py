"""One connection to the broker: a paho client driven by our own select loop on a dedicated
thread. It connects and reconnects (waiting as its `LinkHistory` judges), publishes with tickets,
acknowledges deliveries of its own session only, and hands messages to its owner."""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..errors import PayloadTooLarge
from ..metrics import Metrics
from .clients import UNSUPPORTED_PROTOCOL, describe_refusal, new_client, publish_packet_size, publish_properties
from .history import LinkHistory
from .state import ConnectionState, LinkState
from .tickets import PublishTicket, Tickets
from .wire import close_socket, on_pubrec_refusal, queue_qos0, reset_unread

log = logging.getLogger("agent2389.transport.mqtt")

_POLL_SECONDS = 1.0
_MISC_SECONDS = 0.25  # paho's keep-alive checks (PINGREQ due, PINGRESP overdue) need no more than this
_NO_PROPERTIES = {True: b"\x00", False: b""}  # MQTT 5: an empty property list; 3.1.1: none at all
_ADVISORY_BACKLOG = 1 << 20  # progress bytes published while paho could not write everything it had


class MessageStateError(RuntimeError):
    """A delivery acknowledged twice: the second PUBACK could acknowledge another message that
    the broker has since given the same packet id."""


@dataclass
class InboundMessage:
    """One message as received; `ack()` sends its PUBACK (only if its session still exists), once.

    Two are equal when they are the same broker message (packet id within one session), so a
    redelivery is recognized and acknowledged once.
    """

    topic: str = field(compare=False)
    payload: bytes | bytearray = field(compare=False, repr=False)
    retain: bool = field(compare=False)
    mid: int
    _link: "Link" = field(repr=False, compare=False)
    _generation: int = field(repr=False, default=0)
    qos: int = field(compare=False, default=1)
    user_properties: tuple = field(compare=False, default=())  # MQTT 5 (name, value) pairs
    expires_at: Optional[float] = field(compare=False, default=None)  # MQTT 5 Message Expiry, as Unix time
    acknowledged: bool = field(compare=False, default=False, init=False)

    def ack(self) -> None:
        """A QoS 0 delivery has nothing to acknowledge (a PUBACK for it is a protocol error that
        makes the broker drop the connection). Raises MessageStateError the second time."""
        if self.acknowledged:
            raise MessageStateError(f"message {self.mid} on {self.topic} was already acknowledged")
        self.acknowledged = True
        if self.qos:
            self._link.ack(self.mid, self._generation)


class Link:
    """One paho client, its network thread and its state; `history` (the transport's) judges
    what happens to it."""

    def __init__(self, history: LinkHistory, metrics: Metrics, *, persistent: bool,
                 will: Optional[tuple[str, bytes]] = None,
                 may_read: Callable[[], bool] = lambda: True, receive_maximum: Optional[int] = None,
                 max_packet_size: Optional[int] = None):
        self.name = history.name
        self.settings = history.settings
        self.version = history.version
        self.client_id = history.client_id
        self.metrics = metrics
        self.watch = history
        self.state = ConnectionState()
        self._client_options = (persistent, will, receive_maximum, max_packet_size)
        self._may_read = may_read
        self._stop = threading.Event()  # ends the network thread's waits
        self._tickets = Tickets()
        self._client_lock = threading.Lock()  # publishing vs. replacing the client
        self.max_packet_size: Optional[int] = None  # from the broker's CONNACK
        self._generation = 0
        self._last_read = time.monotonic()
        self._next_misc = 0.0  # when paho's keep-alive bookkeeping is due again
        self._had_session = False  # a connection was accepted since the last attempt
        self._pubrec_refusals: dict[int, tuple[str, int]] = {}  # QoS 2 packet id: refusal (network thread)
        self._advisory_backlog = 0  # bytes of progress events since paho last wrote all it had (a bound, unlocked)
        self._dropping = False  # closing the socket ourselves: paho's report of it is ours to make
        self._woken = False
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.on_connected: Callable[[bool], None] = lambda session_present: None
        self.on_disconnected: Callable[[], None] = lambda: None
        self.on_message: Callable[[InboundMessage], None] = lambda message: None
        self.on_subscribe: Callable[..., None] = lambda *args: None
        self.on_unsubscribe: Callable[..., None] = lambda *args: None
        self.client = self._make_client()

    # -------------------------------------------------------------- setup
    def _make_client(self) -> mqtt.Client:
        """A client for the process's current protocol version (made anew after a fall-back)."""
        persistent, will, receive_maximum, max_packet_size = self._client_options
        self.v5 = v5 = self.version.v5
        session = {} if v5 else {"clean_session": not persistent}
        client = new_client(self.settings, self.client_id, self.version.current, manual_ack=True, **session)
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_socket_register_write = lambda c, u, s: self.wake()
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        on_pubrec_refusal(client, self._pubrec_refused)
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
        return self.state.connected

    def wait_connected(self, timeout: Optional[float]) -> bool:
        return self.state.wait_connected(timeout)

    def wake(self) -> None:
        """One byte per round of the network loop, however many packets were queued meanwhile."""
        if self._woken:
            return
        self._woken = True
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full: a wake is already waiting
            pass

    # -------------------------------------------------------------- publishing and acking
    def publish(self, topic: str, payload: bytes, retain: bool = False,
                headers: Sequence[tuple[str, str]] = (), qos: int = 1, expiry: Optional[int] = None) -> PublishTicket:
        """Queue a QoS 1 (or 2) publish; paho sends it now or after the next reconnect. `headers` go as
        MQTT 5 user properties (3.1.1 has none). Raises PayloadTooLarge instead of sending what
        the broker announced it would refuse (it would drop the link, and paho would resend the
        same packet on every reconnect). `expiry`: MQTT 5's Message Expiry Interval, in seconds."""
        size = publish_packet_size(topic, payload, self.v5, publish_properties(headers, self.v5, expiry))
        if self.max_packet_size is not None and size > self.max_packet_size:
            raise PayloadTooLarge(size, self.max_packet_size, "broker's maximum packet size")
        ticket = PublishTicket()
        with self._client_lock:
            self._queue(ticket, topic, payload, retain, tuple(headers), qos, expiry)
        return ticket  # paho's register-write callback wakes the network thread

    def publish_advisory(self, topic: str, payload: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        """QoS 0, for progress events: nothing waits for them, and one lost costs nothing. Dropped,
        and counted as a dropped progress event, while no session is open (paho drops QoS 0
        messages then), over the broker's maximum packet size, or behind a 1 MiB send backlog
        (a broker that stopped reading must not make us hold what can be dropped)."""
        properties = publish_properties(headers, self.v5)
        fits = (self.max_packet_size is None
                or publish_packet_size(topic, payload, self.v5, properties) <= self.max_packet_size)
        if self.connected and fits and self._advisory_backlog <= _ADVISORY_BACKLOG:
            packed = properties.pack() if properties is not None else _NO_PROPERTIES[self.v5]
            queue_qos0(self.client, topic.encode("utf-8"), packed, payload)
            self._advisory_backlog += len(payload)
            self.metrics.published_message(True)
        else:
            self.metrics.progress_dropped()

    def _queue(self, ticket: PublishTicket, topic: str, payload: bytes, retain: bool, headers: tuple,
               qos: int, expiry: Optional[int]) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain,
                                   properties=publish_properties(headers, self.v5, expiry))
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise RuntimeError("MQTT outgoing queue is full")
        self._tickets.track(info.mid, ticket, (topic, payload, retain, headers, qos, expiry))

    def _replace_client(self) -> None:
        """A client for the other protocol version; what the old one had not yet delivered is
        queued on the new one, so no publish is lost by a fall-back."""
        with self._client_lock:
            unsettled = self._tickets.take_unsettled()
            self.client = self._make_client()
            for ticket, message in unsettled:
                self._queue(ticket, *message)

    def ack(self, mid: int, generation: int) -> None:
        """PUBACK a delivery, unless the broker lost the session it came from (then the id is stale)."""
        if generation != self._generation:
            log.info("not acknowledging message %d: the broker session it belongs to is gone", mid)
            return
        self.client.ack(mid, 1)

    # -------------------------------------------------------------- paho callbacks (network thread)
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.watch.answered = True
        client.on_log = None  # paho formats a log line for every packet while one is set
        if reason_code.is_failure:
            if (reason_code.value == UNSUPPORTED_PROTOCOL and self.v5
                    and (self.version.refused(self.watch.where, str(reason_code)) or not self.version.v5)):
                self.watch.broker_away()
                return  # the next attempt speaks 3.1.1
            why = describe_refusal(reason_code.value, str(reason_code), self.settings, self.client_id)
            self.watch.failed_attempt(logging.ERROR, f"broker {self.watch.where} refused the {self.name} connection: "
                                                     f"{why}")
            return
        self.version.accepted(self.v5, self.watch.where)
        self._had_session = True
        self.watch.accepted()
        if not flags.session_present:
            self._generation += 1
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        log.info("connected to broker %s (%s link, session %s)", self.watch.where, self.name,
                 "resumed" if flags.session_present else "new")
        self.state.become(LinkState.CONNECTED)
        self.on_connected(flags.session_present)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._dropping:
            return  # `_drop_socket` says what happened
        was_connected = self.state.become(LinkState.DISCONNECTED) is LinkState.CONNECTED
        if was_connected:
            self.watch.closed(reason_code)
        if not (self.state.closing or self.watch.takeover):  # a takeover is logged with its delay, later
            if was_connected:
                log.warning("lost connection to broker %s (%s link): %s", self.watch.where, self.name, reason_code)
            elif not self.watch.answered:
                self.watch.closed_before_connack(self.v5)
        self.on_disconnected()

    def _pubrec_refused(self, mid: int, code: int) -> None:
        """Kept for the PUBCOMP that ends the exchange (`wire.on_pubrec_refusal` says why)."""
        self._pubrec_refusals[mid] = (str(ReasonCode(PacketTypes.PUBREC, identifier=code)), code)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """A PUBACK or PUBCOMP (only `loop_read` runs with this callback set); a QoS 2 publish's
        refusal came with its PUBREC."""
        refusal = self._pubrec_refusals.pop(mid, None)
        if refusal is None and reason_code.is_failure:
            refusal = (str(reason_code), reason_code.value)
        self._tickets.reported(mid, refusal)
        self.metrics.published_message(refusal is None)

    def _handle_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        properties = message.properties
        interval = getattr(properties, "MessageExpiryInterval", None)  # what is left of it, as the broker sends it
        self.on_message(InboundMessage(message.topic, message.payload, bool(message.retain), message.mid,
                                       self, self._generation, message.qos,
                                       tuple(getattr(properties, "UserProperty", ())),
                                       None if interval is None else time.time() + interval))

    # -------------------------------------------------------------- network loop
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.client.socket() is None and self.state.closing:
                break  # DISCONNECT sent: connecting again would only leave a Last Will behind
            if self.client.socket() is None and not self._connect_once():
                self._stop.wait(self.watch.next_delay())
                continue
            try:
                self._service()
            except ssl.SSLError as exc:  # e.g. TLS 1.3 reports a missing client certificate after the handshake
                self._tls_failed(exc)
                self._stop.wait(self.watch.next_delay())
            except OSError as exc:
                self._loop_failed(logging.WARNING, f"connection to broker {self.watch.where} ({self.name} link) "
                                                   f"failed: {exc.strerror or exc}")
            except Exception:  # never let the network thread die
                self._loop_failed(logging.ERROR, f"unexpected error in the {self.name} network loop", exc_info=True)
        self._drop_socket()

    def _loop_failed(self, level: int, text: str, exc_info: bool = False) -> None:
        """Drop the connection and wait before the next: a fault that comes back on every round
        must turn into neither a reconnect storm nor a log flood."""
        self._drop_socket()
        self.watch.loop_failed(level, text, exc_info)
        self._stop.wait(self.watch.next_delay())

    def _connect_once(self) -> bool:
        self.metrics.mqtt_connecting()
        if self._had_session:
            self._had_session = False
            self.version.reconnecting()
        if self.v5 != self.version.v5:  # the other version, for the reasons ProtocolVersion gives
            self._replace_client()
        self.watch.attempt_started()
        self.state.become(LinkState.CONNECTING)
        self.client.on_log = self.watch.remember_error  # until CONNACK: why a connection failed
        try:
            self.client.reconnect()
            self._last_read = time.monotonic()
            return True
        except ssl.SSLError as exc:
            self._tls_failed(exc)
        except (OSError, ValueError) as exc:
            if self.settings.tls and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                self.watch.reset_in_handshake(exc)
            else:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                self.watch.failed_attempt(logging.WARNING, f"cannot connect to broker {self.watch.where} ({self.name} "
                                                           f"link): {why}")
        self.state.become(LinkState.DISCONNECTED)
        return False

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        self.watch.tls_failed(str(exc))
        self._drop_socket()

    def _service(self) -> None:
        """One round: wait for the socket or a wake, write what paho queued, read if there is room."""
        sock = self.client.socket()
        if sock is None:
            return
        if self.watch.connack_overdue():
            self._drop_socket()
            self._stop.wait(self.watch.next_delay())
            return
        read = self._may_read() or time.monotonic() - self._last_read >= self.settings.keep_alive / 2
        readable: list[Any]
        writable: list[Any]
        if read and isinstance(sock, ssl.SSLSocket) and sock.pending():  # a TLS record already read off the wire
            readable, writable = [sock], []
        else:
            rlist = [sock, self._wake_r] if read else [self._wake_r]
            wlist = [sock] if self.client.want_write() else []
            readable, writable, _ = select.select(rlist, wlist, [], _POLL_SECONDS)
        if self._wake_r in readable:
            self._drain_wake()
        rc = mqtt.MQTT_ERR_SUCCESS
        if sock in writable or self.client.want_write():
            rc = self._write()
        if rc == mqtt.MQTT_ERR_SUCCESS and sock in readable:
            if not self.watch.answered and isinstance(sock, socket.socket):  # a close now: did anyone read our CONNECT?
                self.watch.reset_unread = reset_unread(sock)
            rc = self.client.loop_read()
            self._last_read = time.monotonic()
        if rc == mqtt.MQTT_ERR_SUCCESS and time.monotonic() >= self._next_misc:
            self._next_misc = time.monotonic() + _MISC_SECONDS
            rc = self.client.loop_misc()
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            self._drop_socket()
            self._stop.wait(self.watch.delay_after_close())

    def _write(self) -> mqtt.MQTTErrorCode:
        """paho's loop_write without on_publish: paho reports each QoS 0 packet it writes to that
        callback, building a reason code and properties for it, and QoS 0 needs no report. Without
        the callback here, only PUBACKs (read by `loop_read`) reach it, and a QoS 0 packet id can
        never be taken for an early PUBACK of a later publish that paho gives the same id."""
        self.client.on_publish = None
        try:
            rc = self.client.loop_write()
        finally:
            self.client.on_publish = self._handle_publish
        if not self.client.want_write():
            self._advisory_backlog = 0  # everything paho had is written
        return rc

    def _drain_wake(self) -> None:
        """Then a later wake sends again; what was queued before it is written in this round. One
        read: wakes are a byte each and coalesced, and a read that finds nothing raises, dearly."""
        try:
            self._wake_r.recv(4096)
        except OSError:  # nothing after all (BlockingIOError), or closed
            pass
        self._woken = False

    def _drop_socket(self) -> None:
        self._dropping = True
        try:
            close_socket(self.client)
        finally:
            self._dropping = False
        if self.state.become(LinkState.DISCONNECTED) is LinkState.CONNECTED:
            self.on_disconnected()

    # -------------------------------------------------------------- shutdown
    def begin_stop(self) -> None:
        """Send DISCONNECT (so the broker does not publish the Last Will); `finish_stop` waits."""
        if self.state.become(LinkState.CLOSING) is LinkState.CONNECTED:
            self.on_disconnected()  # no longer of use to the owner, whenever the broker hears the DISCONNECT
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
                return
        self.state.become(LinkState.CLOSED)
        self._wake_r.close()
        self._wake_w.close()
