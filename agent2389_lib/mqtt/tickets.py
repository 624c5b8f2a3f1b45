"""QoS 1 publishes waiting for their PUBACK. paho reports a PUBACK by packet id, on its network
thread, and may do so before `publish()` has returned that id to the publishing thread."""

from __future__ import annotations

import threading
from typing import Optional

Refusal = Optional[tuple[str, int]]  # a PUBACK's failing reason and its code, or None: accepted
Message = tuple[str, bytes, bool, tuple, int, Optional[int]]  # topic, payload, retain, headers, QoS, expiry

_EARLY_KEPT = 1024  # claimed within microseconds; a bound, should paho ever report an id twice
_UNREPORTED: Refusal = ("", -1)  # compared by identity: no report is this object


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

    def settle(self, refusal: Refusal) -> None:
        if refusal is not None:
            self.refusal, self.refusal_code = refusal
        self.done.set()


class Tickets:
    """Packet ids in flight, matched with their PUBACKs whichever comes first. Only PUBACKs come
    here (the link keeps paho's reports of written QoS 0 packets away), so no early report is
    left over to settle a later publish that paho gives the same id after 65,535 others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[PublishTicket, Message]] = {}
        self._early: dict[int, Refusal] = {}  # reports for ids not yet handed to us

    def track(self, mid: int, ticket: PublishTicket, message: Message) -> None:
        with self._lock:
            refusal = self._early.pop(mid, _UNREPORTED)
            if refusal is _UNREPORTED:
                self._pending[mid] = (ticket, message)
                return
        ticket.settle(refusal)

    def reported(self, mid: int, refusal: Refusal) -> None:
        """A PUBACK (paho's on_publish, network thread)."""
        with self._lock:
            pending = self._pending.pop(mid, None)
            if pending is None:
                self._early[mid] = refusal
                if len(self._early) > _EARLY_KEPT:
                    del self._early[next(iter(self._early))]
                return
        pending[0].settle(refusal)

    def take_unsettled(self) -> list[tuple[PublishTicket, Message]]:
        """Every QoS 1 publish still waiting, for a new client to send; the rest is forgotten."""
        with self._lock:
            unsettled = list(self._pending.values())
            self._pending.clear()
            self._early.clear()
        return unsettled

