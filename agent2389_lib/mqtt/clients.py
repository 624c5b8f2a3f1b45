"""Making paho clients: protocol version, credentials, TLS, the socket hook, and the words for
what went wrong while connecting. Shared by the agent's links and the operator commands."""

from __future__ import annotations

import functools
import logging
import ssl
import threading
from typing import Any, Optional, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers, writeUTF

from ..config import MqttSettings
from .wire import PROPERTY_TABLES, open_socket, share_property_tables

log = logging.getLogger("agent2389.transport.mqtt")

UNSUPPORTED_PROTOCOL = 0x84  # paho maps the 3.1.1 CONNACK code 1 to it too


_USER_PROPERTY = b"\x26"  # its identifier: a UTF-8 string pair, repeatable
_MESSAGE_EXPIRY = b"\x02"  # Message Expiry Interval: a four-byte integer, seconds


@functools.lru_cache(maxsize=16)
def _property_name(name: str) -> bytes:
    """A user property's identifier and name: the same few names (traceparent) on every message."""
    return _USER_PROPERTY + writeUTF(name)


class _PackedOnce(Properties):
    """PUBLISH properties that never change once made, packed once: paho packs properties on every
    send, and every message of a task carries the same ones (its trace context). Made without
    paho's constructor and packer, which build and walk a table of every property name (16 us a
    task, against 1.2 us here): the table is shared and read-only."""

    _packed: bytes

    def __init__(self, headers: tuple, expiry: Optional[int] = None):
        body = b"".join([_property_name(name) + writeUTF(value) for name, value in headers])
        named: dict = {"UserProperty": list(headers)} if headers else {}
        if expiry is not None:
            body = _MESSAGE_EXPIRY + expiry.to_bytes(4, "big") + body
            named["MessageExpiryInterval"] = expiry
        # not through paho's __setattr__, which checks every name against its table, slowly
        self.__dict__.update(PROPERTY_TABLES, packetType=PacketTypes.PUBLISH, **named,
                             _packed=VariableByteIntegers.encode(len(body)) + body)

    def pack(self) -> bytes:
        return self._packed


@functools.lru_cache(maxsize=256)
def _packed_properties(headers: tuple) -> _PackedOnce:
    return _PackedOnce(headers)


def publish_properties(headers: Sequence[tuple[str, str]], v5: bool,
                       expiry: Optional[int] = None) -> Optional[_PackedOnce]:
    """PUBLISH properties carrying `headers` (e.g. traceparent) as user properties and `expiry` as
    the Message Expiry Interval (seconds) on MQTT 5; 3.1.1 has none."""
    if not v5 or (not headers and expiry is None):
        return None
    if expiry is not None:  # seconds left: rarely the same twice, so not kept
        return _PackedOnce(tuple(headers), max(1, expiry))
    return _packed_properties(tuple(headers))


def publish_packet_size(topic: str, payload: bytes, v5: bool, properties: Optional[_PackedOnce] = None) -> int:
    """Bytes of a QoS 1 PUBLISH (fixed header, topic, packet id, properties, payload): what a
    broker's maximum packet size is compared with. paho does not check it itself."""
    packed = len(properties._packed) if properties is not None else (1 if v5 else 0)
    remaining = 2 + len(topic.encode("utf-8")) + 2 + packed + len(payload)
    length_bytes = 1 + (remaining >= 1 << 7) + (remaining >= 1 << 14) + (remaining >= 1 << 21)
    return 1 + length_bytes + remaining


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


class ProtocolVersion:
    """The MQTT version this process speaks. With `protocol = "auto"` it is MQTT 5 unless the
    broker shows that it does not speak it. A CONNACK "unsupported protocol version" (0x84, which
    paho also makes of 3.1.1's code 1) is proof, for the rest of the process. A connection closed
    right after CONNECT is only a hint (a broker still starting), and one reset before anybody read
    the CONNECT (a proxy without a backend yet) not even that (`LinkHistory`):
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


def new_client(settings: MqttSettings, client_id: str, version: str = "", **options: Any) -> mqtt.Client:
    """A paho client with the protocol version (default: the settings' choice, MQTT 5 for
    "auto"), credentials, TLS and TCP_NODELAY."""
    version = version or ("3.1.1" if settings.protocol == "3.1.1" else "5")
    share_property_tables()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311, **options)
    if settings.username:
        client.username_pw_set(settings.username, settings.password.reveal() if settings.password else None)
    if settings.tls:
        client.tls_set_context(tls_context(settings))
    client.on_socket_open = open_socket
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
