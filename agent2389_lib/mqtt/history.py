"""The broker connection's history, owned by the transport for both its links: why attempts fail
and connections end, told to the operator once per cause, and how long a link waits before its
next attempt. The links report what happened; this judges it: a broker that is away, one that
does not speak MQTT 5, or another process with the same client ids taking the sessions over."""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

import paho.mqtt.client as mqtt

from ..backoff import Backoff
from ..config import MqttSettings
from ..logs import Throttle
from ..metrics import Metrics
from .clients import ProtocolVersion, describe_tls_error

log = logging.getLogger("agent2389.transport.mqtt")

_BACKOFF_INITIAL = 0.5
_BACKOFF_MAX = 30.0
_TWIN_EVIDENCE_SECONDS = 120.0  # a twin's status seen this lately names a close its takeover
_TAKEOVER_DELAY = (20.0, 30.0)  # seconds; two processes with one id then take over at most 3 times a minute
_SESSION_TAKEN_OVER = 0x8E
_FAILURE_CAUSES_KEPT = 16
CONNACK_TIMEOUT = 10.0  # paho alone waits 1.5 keep-alives for a port that is not an MQTT broker
NOT_A_BROKER_HINT = "is it an MQTT broker's port? (MQTT_HOST/MQTT_PORT, [mqtt] broker_url)"


class ConnectionHistory:
    """What both links share: the broker, the protocol version they speak, the clock every
    decision reads (time.monotonic; a test's own in unit tests) and the evidence of a twin."""

    def __init__(self, settings: MqttSettings, version: ProtocolVersion, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.version = version
        self.metrics = metrics
        self.clock = clock
        self.where = f"{settings.host}:{settings.port}"
        self._twin = (float("-inf"), "")  # when another process's status was last seen, and what it said

    def link(self, name: str, client_id: str) -> "LinkHistory":
        return LinkHistory(self, name, client_id)

    def twin_seen(self, text: str) -> None:
        """Another live process has our client ids (its status said so): for a while, a close of
        either link is its takeover."""
        self._twin = (self.clock(), text)

    def twin_evidence(self) -> str:
        """What the twin's status said, if it was seen lately enough to name a close."""
        seen, text = self._twin
        return text if self.clock() - seen < _TWIN_EVIDENCE_SECONDS else ""


_CLIENT_CERTIFICATE_HINT = "if it requires a client certificate, set [mqtt] client_cert_path and client_key_path"


class LinkHistory:
    """One link's part of the history: its attempts, its backoff and the causes it reported."""

    def __init__(self, history: ConnectionHistory, name: str, client_id: str):
        self.history = history
        self.name = name
        self.client_id = client_id
        self._clock = history.clock
        self.settings = history.settings
        self.version = history.version
        self.where = history.where
        self.takeover = ""  # what the last close proved, when it proved a takeover
        self.answered = False  # the broker answered the current attempt's CONNECT
        self.reset_unread = False  # the current attempt was reset before anyone read its CONNECT
        self._backoff = Backoff(_BACKOFF_INITIAL, _BACKOFF_MAX)
        self._attempt_started = 0.0
        self._last_error = ""
        self._failures: dict[str, Throttle] = {}  # by cause
        self._loop_faults = Throttle(clock=self._clock)

    # -------------------------------------------------------------- attempts
    def attempt_started(self) -> None:
        self.answered = self.reset_unread = False
        self._attempt_started = self._clock()

    def remember_error(self, client, userdata, level: int, text: str) -> None:
        """paho's on_log until CONNACK: paho only logs why a TLS connection failed."""
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = text

    def connack_overdue(self) -> bool:
        """The broker took the TCP connection but has not answered CONNECT in time (said here)."""
        if self.answered or self._clock() - self._attempt_started <= CONNACK_TIMEOUT:
            return False
        self.failed_attempt(logging.WARNING, f"broker {self.where} accepted the TCP connection ({self.name} link) "
                                             f"but did not answer CONNECT within {CONNACK_TIMEOUT:.0f} s; "
                                             f"{NOT_A_BROKER_HINT}")
        return True

    def failed_attempt(self, level: int, text: str) -> None:
        """Every failed attempt is counted; each cause is logged at once the first time, then
        once a minute with how often it happened (a broker that stays away must not flood the
        log, nor one whose failures alternate between two wordings)."""
        self.broker_away()
        if len(self._failures) > _FAILURE_CAUSES_KEPT:
            self._failures.clear()
        count = self._failures.setdefault(text, Throttle(clock=self._clock)).occurred()
        if count:
            since = f" ({count} failed attempts since the last report)" if count > 1 else ""
            log.log(level, "%s; retrying with backoff%s", text, since)

    def reset_in_handshake(self, error: OSError) -> None:
        """The broker reset the connection during the TLS handshake: what a broker that requires a
        client certificate does when its alert is lost to the reset (our next handshake messages unread)."""
        hint = f"; {_CLIENT_CERTIFICATE_HINT}" if not self.settings.client_cert_path else ""
        self.tls_failed(f"the broker reset the connection during the TLS handshake ({error.strerror or error}){hint}")

    def tls_failed(self, cause: str) -> None:
        self.failed_attempt(logging.ERROR, f"TLS with broker {self.where} failed ({self.name} link): "
                                           f"{describe_tls_error(cause)}")

    def broker_away(self) -> None:
        """An attempt failed (the broker away, or not answering as one)."""
        self.history.metrics.mqtt_connection(False, failed=True)

    def closed_before_connack(self, v5: bool) -> None:
        """The broker dropped the connection without answering CONNECT: TLS trouble (paho only
        logged why), or a broker that does not speak the version we sent."""
        cause, self._last_error = self._last_error, ""
        if cause and self.settings.tls:
            self.tls_failed(cause)
            return
        if self.reset_unread:  # says nothing about the protocol: nobody read what we sent
            self.failed_attempt(logging.WARNING, f"connection to broker {self.where} was reset before it read CONNECT "
                                                 f"({self.name} link): no broker behind it yet (a proxy or load "
                                                 f"balancer without its backend?)")
            return
        if not cause and self.settings.tls and not self.settings.client_cert_path:
            # TLS 1.3 asks for a client certificate after the handshake: a broker that requires one sends an alert
            # and closes, and the alert is lost when the close is a reset (our CONNECT unread)
            cause = f"the broker closed the connection right after the TLS handshake; {_CLIENT_CERTIFICATE_HINT}"
        cause = cause or "the broker closed the connection before answering CONNECT"
        deciding = v5 and self.version.deciding
        if self.version.closed_before_connack(v5) or v5 != self.version.v5:
            self.broker_away()
            return  # the next attempt speaks the other version
        explicit_v5 = v5 and self.version.setting == "5"
        if explicit_v5:
            hint = '; it may not speak MQTT 5: set [mqtt] protocol = "3.1.1" (or "auto")'
        elif deciding:
            hint = "; trying MQTT 5 once more, then 3.1.1 (protocol = auto)"
        else:
            hint = f"; {NOT_A_BROKER_HINT}"
        self.failed_attempt(logging.ERROR if explicit_v5 else logging.WARNING,
                            f"connection to broker {self.where} failed ({self.name} link): {cause}{hint}")

    # -------------------------------------------------------------- connections
    def accepted(self) -> None:
        """The broker is back: the next loss starts the backoff afresh (only attempts that fail
        wait longer and longer; a broker in a crash loop is rejoined at once each time)."""
        self._backoff.reset()
        self._failures.clear()  # the next outage is reported at once
        self._last_error = ""

    def closed(self, reason_code: object) -> None:
        """The broker closed an established connection. Two processes with one client id take
        the session from each other in a loop; only evidence names that, never a broker that
        went away (a crash loop closes young links too): the broker's reason 0x8E (MQTT 5), or,
        since mosquitto closes without it, the other process's status seen lately
        (`ConnectionHistory.twin_seen`). A named takeover waits 20-30 s (`delay_after_close`)."""
        self.takeover = ""
        twin = self.history.twin_evidence()
        if getattr(reason_code, "value", None) == _SESSION_TAKEN_OVER:
            self.takeover = (f"the broker closed the {self.name} link because another connection took over client "
                             f"id {self.client_id} (reason 0x8E, session taken over); another process is probably "
                             f"running with the same agent id")
        elif twin:
            self.takeover = f"the broker closed the {self.name} link of client id {self.client_id}: {twin}"
        if self.takeover:
            self.takeover += ": stop it, or give each process its own agent id (or [mqtt] client_id)"

    # -------------------------------------------------------------- waiting
    def loop_failed(self, level: int, text: str, exc_info: bool = False) -> None:
        """A fault in the network loop that may come back on every round: a line a minute, with the count."""
        count = self._loop_faults.occurred()
        if count:
            since = f" ({count} times since the last report)" if count > 1 else ""
            log.log(level, "%s; reconnecting with backoff%s", text, since, exc_info=exc_info)

    def next_delay(self) -> float:
        return self._backoff.next_delay()

    def delay_after_close(self) -> float:
        """After a connection ended in the loop: the backoff, or 20-30 s after a takeover (said with the delay)."""
        delay = self._backoff.next_delay()
        if self.takeover:
            delay = max(delay, random.uniform(*_TAKEOVER_DELAY))
            log.error("%s; next attempt in %.1f s", self.takeover, delay)
        return delay
