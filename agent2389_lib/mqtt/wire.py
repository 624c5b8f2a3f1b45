"""The socket under paho: TCP_NODELAY on every connection, closing one without DISCONNECT (so
the broker publishes the Last Will, as for a crash), the reason code of a PUBREC, and QoS 0
publishes queued without paho's publish().

paho has no call for the second; shutting the socket down makes paho's next read find the end
and close it itself, reporting it to on_disconnect like any connection the broker dropped. The
third and the fourth, and how paho's Properties are made, are the one place agent2389 touches
paho's private attributes (`on_pubrec_refusal`, `queue_qos0`, `share_property_tables`)."""

from __future__ import annotations

import errno
import socket
import ssl
import functools
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

_CLOSE_READS = 64  # reads that may come before the end of a socket that was shut down
_NOBODY_WAITS = mqtt.MQTTMessageInfo(0)  # what paho marks published once a queued QoS 0 packet is written


def set_nodelay(sock: socket.socket) -> None:
    """paho leaves Nagle on, which costs 40-80 ms per hop on small messages."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # pragma: no cover - e.g. a non-TCP socket
        pass


def open_socket(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's on_socket_open (a TCP socket, or TLS over one)."""
    set_nodelay(sock)


def close_socket(client: mqtt.Client) -> None:
    """Close the connection without DISCONNECT: what was already received is read first."""
    sock = client.socket()
    if not isinstance(sock, socket.socket):  # none, or (never here) a websocket
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    for _ in range(_CLOSE_READS):
        if client.socket() is None or client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            return


def reset_unread(sock: socket.socket) -> bool:
    """Whether a connection the peer is closing was reset: our bytes (the CONNECT) reached a
    socket that never read them, as when a load balancer or proxy drops a connection at accept.
    A broker that read the CONNECT and closed ends it cleanly instead. Only for a readable plain
    TCP socket (TLS cannot peek); it reads nothing paho would miss."""
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return False
    try:
        if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
            return False  # an answer, not a close
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:  # nothing to read after all, or no socket
        return False
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in (errno.ECONNRESET, errno.EPIPE)


def on_pubrec_refusal(client: mqtt.Client, refused: Callable[[int, int], None]) -> None:
    """Calls `refused(packet_id, reason_code)` for every PUBREC that refuses a QoS 2 publish
    (MQTT 5, code 0x80 or more). paho reads a PUBREC, drops its reason code and sends PUBREL
    regardless (MQTT 5 ends a refused exchange at PUBREC), and mosquitto completes that with a
    plain PUBCOMP: without this, a refused QoS 2 publish looks delivered. It wraps paho's
    handler of the packet, whose variable header (paho 2.1 and 2.2 alike) is the packet id,
    then the reason code."""
    def read_pubrec(handle: Callable[[], mqtt.MQTTErrorCode]) -> mqtt.MQTTErrorCode:
        header = client._in_packet["packet"]
        if len(header) > 2 and header[2] >= 0x80:
            refused(int.from_bytes(header[:2], "big"), header[2])
        return handle()

    client._handle_pubrec = functools.partial(  # type: ignore[method-assign]
        read_pubrec, client._handle_pubrec)


def queue_qos0(client: mqtt.Client, topic: bytes, properties: bytes, payload: bytes) -> None:
    """A QoS 0 PUBLISH packed here and put on paho's own queue of outgoing packets, so it goes out
    in order with paho's and is dropped with them when the connection is lost (as paho's publish()
    drops QoS 0). publish() costs four times as much, for messages nothing waits for (a progress
    event for every step of every task). `properties`: MQTT 5's, packed with their length (b"" on
    3.1.1). paho 2.1 and 2.2 queue alike: `_packet_queue(command, packet, mid, qos, info)`."""
    length = VariableByteIntegers.encode(2 + len(topic) + len(properties) + len(payload))
    packet = b"".join((bytes((mqtt.PUBLISH,)), length, len(topic).to_bytes(2, "big"), topic, properties, payload))
    client._packet_queue(mqtt.PUBLISH, packet, 0, 0, _NOBODY_WAITS)


PROPERTY_TABLES = {name: value for name, value in vars(Properties(PacketTypes.PUBLISH)).items()
                   if name != "packetType"}


def _properties_init(self: Properties, packetType: int) -> None:
    self.__dict__.update(PROPERTY_TABLES, packetType=packetType)


def share_property_tables() -> None:
    """paho's Properties builds its tables of every property's name, identifier and type anew for
    each one it makes: for every PUBLISH and PUBACK it reads, 7 us each, 20 times the rest of
    making one. The tables are the same every time and paho only reads them: made once here and
    shared by every Properties of the process (paho 2.1 and 2.2 alike: `names`, `types`,
    `properties`). Idempotent."""
    Properties.__init__ = _properties_init  # type: ignore[method-assign]
