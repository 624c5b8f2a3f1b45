"""Outbound HTTP that refuses private networks, checked on the address actually connected to.

Every connection (the first request and each redirect hop) resolves the host once, refuses
loopback, private, link-local (cloud metadata) and other non-global addresses unless the
policy allows them, and connects to the very address it checked, so DNS rebinding cannot
swap it afterwards.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Optional

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import NewConnectionError
from urllib3.util import connection as urllib3_connection

from ..httpsessions import new_session, tracked


@dataclass(frozen=True)
class NetworkPolicy:
    allow_private_networks: bool = False
    allowed_hosts: frozenset = frozenset()

    def permits(self, host: str, address: str) -> bool:
        if self.allow_private_networks or host.lower().rstrip(".") in self.allowed_hosts:
            return True
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_global and not ip.is_multicast


class RefusedAddress(NewConnectionError):
    pass


def _guarded_connection(base: type, policy: NetworkPolicy) -> type:
    class Guarded(base):  # type: ignore[misc, valid-type]
        def _new_conn(self) -> socket.socket:
            host = self._dns_host
            try:
                infos = socket.getaddrinfo(host, self.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise NewConnectionError(self, f"cannot resolve {host}: {exc.strerror}") from None
            last: Optional[Exception] = None
            for _, _, _, _, sockaddr in infos:
                address = str(sockaddr[0])
                if not policy.permits(self.host, address):
                    raise RefusedAddress(self, f"refused: {self.host} resolves to {address}, a private, loopback "
                                               f"or link-local address (allow it with allowed_hosts)")
                try:
                    return urllib3_connection.create_connection(
                        (address, self.port), self.timeout, source_address=self.source_address,
                        socket_options=self.socket_options)
                except OSError as exc:
                    last = exc
            raise NewConnectionError(self, f"cannot connect to {self.host}: {last}")

    return Guarded


def guarded_session(policy: NetworkPolicy, max_redirects: int) -> requests.Session:
    """A Session whose every connection obeys `policy`; environment proxies are ignored."""
    session = new_session(connections=(_guarded_connection(tracked(HTTPConnection), policy),
                                       _guarded_connection(tracked(HTTPSConnection), policy)))
    session.trust_env = False  # a proxy would connect to the address instead of us, unchecked
    session.max_redirects = max_redirects
    return session
