"""Where one connection to the broker stands: one value, changed by the network thread that owns
the connection and waited on by others. Whether we are connected is read here and nowhere else."""

from __future__ import annotations

import enum
import threading
from typing import Optional


class LinkState(enum.Enum):
    """As paho's own connection states, with the ones our loop adds."""

    NEW = "new"  # never connected yet
    CONNECTING = "connecting"  # CONNECT sent, no CONNACK yet
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # lost or refused; the next attempt waits for its delay
    CLOSING = "closing"  # DISCONNECT asked for: no further attempt
    CLOSED = "closed"  # the network thread ended


_FINAL = (LinkState.CLOSING, LinkState.CLOSED)


class ConnectionState:
    """A connection's `LinkState`. Once closing, only closed follows: a report of the connection
    ending while we close it is the close, not a loss to recover from."""

    def __init__(self) -> None:
        self._value = LinkState.NEW
        self._changed = threading.Condition()

    @property
    def value(self) -> LinkState:
        return self._value

    @property
    def connected(self) -> bool:
        return self._value is LinkState.CONNECTED

    @property
    def closing(self) -> bool:
        return self._value in _FINAL

    def become(self, state: LinkState) -> LinkState:
        """Move to `state` (unless closing, see the class); returns the state it left."""
        with self._changed:
            previous = self._value
            if previous not in _FINAL or state is LinkState.CLOSED:
                self._value = state
                self._changed.notify_all()
            return previous

    def wait_connected(self, timeout: Optional[float]) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._value is LinkState.CONNECTED, timeout)
