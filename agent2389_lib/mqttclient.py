"""Making paho clients: protocol version, credentials, TLS, socket options, and the words for
what went wrong while connecting. Shared by the agent's links and the operator commands."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Optional

import paho.mqtt as paho
import paho.mqtt.client as mqtt

from .config import MqttSettings

log = logging.getLogger("agent2389.transport.mqtt")

UNSUPPORTED_PROTOCOL = 0x84  # paho maps the 3.1.1 CONNACK code 1 to it too


def _remaining_length(value: int) -> bytes:
    """MQTT's variable byte integer: 7 bits per byte, low bits first, high bit = more follows."""
    encoded = bytearray()
    while True:
        value, digit = divmod(value, 128)
        encoded.append(digit | 0x80 if value else digit)
        if not value:
            return bytes(encoded)


def publish_packet_size(topic: str, payload: bytes, v5: bool) -> int:
    """Bytes of a QoS 1 PUBLISH without properties: fixed header, topic, packet id, payload."""
    remaining = 2 + len(topic.encode("utf-8")) + 2 + (1 if v5 else 0) + len(payload)
    return 1 + len(_remaining_length(remaining)) + remaining


def qos0_publish_packet(topic: str, payload: bytes, v5: bool) -> bytes:
    """A QoS 0 PUBLISH without properties (MQTT 3.1.1 and 5, section 3.3): no packet id, nothing
    comes back for it."""
    name = topic.encode("utf-8")
    properties = b"\0" if v5 else b""
    return (b"\x30" + _remaining_length(2 + len(name) + len(properties) + len(payload))
            + len(name).to_bytes(2, "big") + name + properties + payload)


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """System CAs or `ca_cert_path`, optional client certificate, TLS 1.2+, hostname checked."""
    context = ssl.create_default_context(cafile=settings.ca_cert_path)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.client_cert_path:
        password = settings.client_key_password.reveal() if settings.client_key_password else None
        context.load_cert_chain(settings.client_cert_path, settings.client_key_path, password)
    if settings.tls_insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def set_nodelay(sock: socket.socket) -> None:
    """paho leaves Nagle on, which costs 40-80 ms per hop on small messages."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # pragma: no cover - e.g. a non-TCP socket
        pass


class BufferedSocket:
    """A link's socket as paho sees it: buffered reads, coalesced writes, and a way in for QoS 0
    publishes that does not go through paho.

    paho reads each packet's fixed header one byte at a time: three or four recv() calls for
    a 4-byte PUBACK. On plain TCP those reads are served from one 64 KiB buffer (TLS sockets
    already buffer whole records). paho also sends every packet with its own send(); with
    `coalesce_writes` they are collected and the owner's loop sends them together
    (`flush_writes`) once paho has written everything that was queued (only a loop that calls
    `flush_writes` may ask for it). Other threads may add whole packets with `write_packet`
    once the broker accepted the session; paho too only ever adds whole packets, so none
    interleave.
    """

    def __init__(self, sock: socket.socket, coalesce_writes: bool = False):
        self._sock = sock
        self._buffer_reads = not isinstance(sock, ssl.SSLSocket)
        self._data = b""
        self._pos = 0
        self._out = bytearray()
        self._out_lock = threading.Lock()
        self.coalesce_writes = coalesce_writes
        self.session_v5: Optional[bool] = None  # the accepted session's protocol, once CONNACK said so

    def send(self, data: bytes) -> int:
        if not self.coalesce_writes:
            return self._sock.send(data)
        with self._out_lock:
            self._out += data
        return len(data)

    def write_packet(self, packet: bytes, backlog_limit: int) -> bool:
        """Queue one whole packet for the next flush. False, and nothing queued, when no session
        is open on this socket, or when over `backlog_limit` bytes already wait (a broker that
        stopped reading must not make us hold what can be dropped)."""
        if self.session_v5 is None or not self.coalesce_writes:
            return False
        with self._out_lock:
            if len(self._out) > backlog_limit:
                return False
            self._out += packet
        return True

    def close(self) -> None:
        """paho closes the socket right after writing DISCONNECT: send what was collected first,
        or the broker sees a dropped connection and publishes the Last Will."""
        self.session_v5 = None
        try:
            self.flush_writes()
        except OSError:
            pass
        self._sock.close()

    def unsent(self) -> int:
        return len(self._out)

    def flush_writes(self) -> None:
        """As much of the collected bytes as the kernel takes now; the rest waits for writability."""
        while True:
            with self._out_lock:  # not held while sending: writers would wait for the syscall
                data, self._out = self._out, bytearray()
            if not data:
                return
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            if sent < len(data):
                with self._out_lock:
                    self._out[:0] = memoryview(data)[sent:]
                return

    def recv(self, size: int) -> bytes:
        if not self._buffer_reads:
            return self._sock.recv(size)
        if self._pos >= len(self._data):
            self._data, self._pos = self._sock.recv(65536), 0  # BlockingIOError when nothing is there
            if not self._data:
                return b""
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        return len(self._data) - self._pos if self._buffer_reads else self._sock.pending()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class PlainSocket:
    """What a link's loop asks of its socket, for a socket paho owns alone (the wrapper could
    not be put in): nothing buffered by us, nothing to flush, and no way in beside paho."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def pending(self) -> int:
        return self._sock.pending() if isinstance(self._sock, ssl.SSLSocket) else 0

    def unsent(self) -> int:
        return 0

    def flush_writes(self) -> None:
        pass

    def fileno(self) -> int:
        return self._sock.fileno()


# paho's private names, here and nowhere else: it assigns a new connection's socket to `_sock`
# before calling on_socket_open (2.0 to 2.2), and `_sock_close()` closes it without DISCONNECT.
# A release that changes either only costs the wrapper (see `link_socket`), never a connection.
PAHO_SOCKET = "_sock"
PAHO_SOCKET_CLOSE = "_sock_close"
_CLOSE_READS = 64  # reads that may come before the end of a socket closed the public way


def open_socket(client: mqtt.Client, sock: socket.socket, coalesce_writes: bool) -> None:
    """paho's on_socket_open: no Nagle; buffered reads on plain TCP, coalesced writes when asked."""
    set_nodelay(sock)
    if getattr(client, PAHO_SOCKET, None) is sock and (coalesce_writes or not isinstance(sock, ssl.SSLSocket)):
        # paho has no hook for its reads; it assigned the socket just before
        setattr(client, PAHO_SOCKET, BufferedSocket(sock, coalesce_writes))


def link_socket(client: mqtt.Client) -> "BufferedSocket | PlainSocket | None":
    """The connection's socket as a link's loop drives it: our wrapper where paho took it, else
    paho's own socket behind `PlainSocket` (the loop then runs on plain paho: slower, same behaviour)."""
    sock = client.socket()
    if sock is None or isinstance(sock, BufferedSocket):
        return sock
    return PlainSocket(sock)


_plain_paho_said = threading.Event()  # paho is one per process: so is this news


def say_plain_paho() -> None:
    """Once per process, when a link's socket turned out not to be the wrapper."""
    if not _plain_paho_said.is_set():
        _plain_paho_said.set()
        log.info("paho-mqtt %s does not hand its new sockets over as agent2389 expects (%s before on_socket_open); "
                 "running on plain paho: same behaviour, more CPU per message", paho.__version__, PAHO_SOCKET)


def close_socket(client: mqtt.Client) -> None:
    """Close the connection without DISCONNECT (paho has no public call for it). Without the
    private one: shut the socket down, so paho's next read finds it closed and closes it itself."""
    close = getattr(client, PAHO_SOCKET_CLOSE, None)
    if close is not None:
        close()
        return
    try:
        client.socket().shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    for _ in range(_CLOSE_READS):  # what was already received comes first, then the end
        if client.socket() is None or client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            return



class ProtocolVersion:
    """The MQTT version this process speaks. With `protocol = "auto"` it is MQTT 5 unless the
    broker shows that it does not speak it. A CONNACK "unsupported protocol version" (0x84, which
    paho also makes of 3.1.1's code 1) is proof, for the rest of the process. A connection closed
    right after CONNECT is only a hint (a proxy without a backend yet, a broker still starting):
    after two in a row, one 3.1.1 attempt, and only a broker that accepts it makes the link speak
    3.1.1; every later connection tries 5 first again (one close away from 3.1.1 again). A broker
    that ever accepted MQTT 5 is not doubted."""

    HINTS_NEEDED = 2

    def __init__(self, setting: str):
        self.setting = setting
        self.current = "3.1.1" if setting == "3.1.1" else "5"
        self._v5_accepted = False
        self._proven = False  # by a CONNACK
        self._hints = 0  # MQTT 5 connections closed before CONNACK, in a row
        self._probing = False  # a 3.1.1 attempt after enough hints
        self._said = False
        self._lock = threading.Lock()

    @property
    def v5(self) -> bool:
        return self.current == "5"

    @property
    def deciding(self) -> bool:
        """Whether a close before CONNACK may still be the broker's answer to MQTT 5."""
        return self.setting == "auto" and not self._v5_accepted and not self._proven

    def refused(self, where: str, cause: str) -> bool:
        """A CONNACK refused MQTT 5 as a protocol version: True when the next attempt speaks 3.1.1."""
        if self.setting != "auto":
            return False
        with self._lock:
            self._proven, self.current = True, "3.1.1"
            self._say(where, cause)
        return True

    def closed_before_connack(self, v5: bool) -> bool:
        """A connection of this version was closed before CONNACK: True when the next attempt
        speaks 3.1.1 because of it."""
        with self._lock:
            if not self.deciding:
                return False
            if not v5:
                if self._probing:  # closed at 3.1.1 too: the closes said nothing about MQTT 5
                    self._probing, self._hints, self.current = False, 0, "5"
                return False
            self._hints += 1
            if self._hints < self.HINTS_NEEDED:
                return False
            self._probing, self.current = True, "3.1.1"
            return True

    def accepted(self, v5: bool, where: str) -> None:
        with self._lock:
            if v5:
                self._v5_accepted, self._hints = True, 0
                return
            if self._probing:
                self._probing = False
                self._say(where, f"it closed MQTT 5 connections right after CONNECT {self.HINTS_NEEDED} times, then "
                                 f"accepted MQTT 3.1.1")

    def reconnecting(self) -> None:
        """A link lost an established connection: where only hints made it 3.1.1, try 5 again."""
        with self._lock:
            if self.deciding and not self.v5:
                self.current, self._hints = "5", self.HINTS_NEEDED - 1

    def _say(self, where: str, cause: str) -> None:
        """Under the lock: once per process."""
        if not self._said:
            self._said = True
            log.warning("broker %s does not speak MQTT 5 (%s); using 3.1.1: no retain-as-published, session expiry "
                        "or receive maximum", where, cause)


def new_client(settings: MqttSettings, client_id: str, version: str = "", coalesce_writes: bool = False,
               **options: object) -> mqtt.Client:
    """A paho client with the protocol version (default: the settings' choice, MQTT 5 for
    "auto"), credentials, TLS and socket options. `coalesce_writes` only for a client whose
    network loop calls `BufferedSocket.flush_writes`."""
    version = version or ("3.1.1" if settings.protocol == "3.1.1" else "5")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311, **options)
    if settings.username:
        client.username_pw_set(settings.username, settings.password.reveal() if settings.password else None)
    if settings.tls:
        client.tls_set_context(tls_context(settings))
    client.on_socket_open = lambda c, userdata, sock: open_socket(c, sock, coalesce_writes)
    return client


_STRICT_X509_RULES = ("authority key identifier", "basic constraints", "key usage", "subject key identifier",
                      "path length", "empty subject alternative name")


def describe_tls_error(text: str) -> str:
    """One line saying which part of TLS failed, from OpenSSL's wording."""
    lowered = text.lower()
    if "certificate verify failed" in lowered:
        if "mismatch" in lowered or "hostname" in lowered:
            return f"the broker certificate does not match the host name ({text})"
        if "expired" in lowered:
            return f"the broker certificate has expired ({text})"
        if any(rule in lowered for rule in _STRICT_X509_RULES):
            return (f"the broker certificate (or its CA) breaks an RFC 5280 rule that Python 3.13 and newer enforce "
                    f"(VERIFY_X509_STRICT); reissue it with the extension named here ({text})")
        return f"the broker certificate is not trusted (unknown CA): set [mqtt] ca_cert_path ({text})"
    if "certificate required" in lowered or "peer did not return a certificate" in lowered:
        return "the broker requires a client certificate: set [mqtt] client_cert_path and client_key_path"
    if "handshake failure" in lowered:
        return (f"the broker rejected the TLS handshake; it may require a client certificate "
                f"([mqtt] client_cert_path/client_key_path) or another TLS version ({text})")
    if "unknown ca" in lowered or "bad certificate" in lowered:
        return f"the broker did not accept our client certificate ({text})"
    return text


def describe_refusal(reason: int, text: str, settings: MqttSettings, client_id: str) -> str:
    """A refused CONNECT, with the setting that is likely wrong (MQTT 5 reason codes; paho maps
    3.1.1 CONNACK codes onto them)."""
    if reason == UNSUPPORTED_PROTOCOL:
        return (f'{text}: the broker does not accept MQTT {settings.protocol}; set [mqtt] protocol = "3.1.1" '
                f'(or "auto")')
    if reason == 0x85:
        return f"{text}: the broker does not accept client id {client_id!r}; set [mqtt] client_id"
    if reason == 0x86:
        return f"{text}: check [mqtt] username and password (MQTT_USERNAME / MQTT_PASSWORD)"
    if reason == 0x87:
        return (f"{text}: the broker does not allow this client to connect; check the credentials, the client "
                f"certificate and the broker's access rules")
    if reason in (0x88, 0x89):
        return f"{text}: the broker is not able to take connections now"
    return text
