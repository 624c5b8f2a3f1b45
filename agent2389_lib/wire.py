"""The socket under paho, through paho's public API only: TCP_NODELAY on every connection, and
closing one without DISCONNECT (so the broker publishes the Last Will, as for a crash).

paho has no call for the second; shutting the socket down makes paho's next read find the end
and close it itself, reporting it to on_disconnect like any connection the broker dropped. No
module of agent2389 touches paho's private attributes; should one ever have to, it goes here."""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt

_CLOSE_READS = 64  # reads that may come before the end of a socket that was shut down


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
