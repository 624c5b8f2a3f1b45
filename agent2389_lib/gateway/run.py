"""`agent2389 gateway`: the parts made and stopped in order, until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from typing import Optional

from ..cli.opsclient import OperatorClient, OperatorError
from ..config import MqttSettings
from ..health import AgentStatus, HealthEndpoints
from ..metrics import Metrics
from .server import GatewayServer
from .service import Gateway
from .tasks import TaskStore

log = logging.getLogger("agent2389.gateway")

EXIT_OK, EXIT_STARTUP, EXIT_UNAVAILABLE = 0, 1, 3


def run_gateway(settings: MqttSettings, host: str, port: int, state: str, name: str, tokens: frozenset,
                tls: Optional[ssl.SSLContext], public_url: Optional[str], send_wait: float) -> int:
    metrics = Metrics(f"gateway-{name}", 1)
    try:
        store = TaskStore(state)
    except OSError as exc:
        log.error("startup failed: %s", exc)
        return EXIT_STARTUP
    # its own persistent session: an answer published while the gateway is down waits there
    client = OperatorClient(settings, session_seconds=settings.session_expiry, client_id=f"agent2389-gateway-{name}")

    def connection_changed(text: str) -> None:
        log.warning("%s", text)
        metrics.mqtt_connection(client.state.connected)

    client.on_connection_change = connection_changed
    try:
        client.connect()
    except OperatorError as exc:
        log.error("startup failed: %s", exc)
        store.close()
        return EXIT_UNAVAILABLE
    metrics.mqtt_connection(True)
    gateway = Gateway(client, store, metrics, send_wait)
    stopping = threading.Event()
    endpoints = HealthEndpoints(metrics, lambda: AgentStatus(metrics.state, client.state.connected, False, 0))
    try:
        server = GatewayServer(gateway, endpoints, host, port, tokens, tls, public_url)
    except OSError as exc:
        log.error("startup failed: cannot listen on %s:%d: %s (--listen)", host, port, exc.strerror or exc)
        client.close(keep_session=True)
        store.close()
        return EXIT_STARTUP
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stopping.set())
    try:
        gateway.start()
    except OperatorError as exc:  # a subscription the broker's ACL refuses
        log.error("startup failed: %s (the gateway reads statuses, conversations, progress and approval requests)",
                  exc)
        server.close()
        client.close(keep_session=True)
        store.close()
        return EXIT_UNAVAILABLE
    server.start()
    metrics.set_state("running")
    stopping.wait()
    log.info("stopping the gateway")
    metrics.set_state("stopping")
    server.close()
    gateway.stop()
    client.close(keep_session=True)
    store.close()
    log.info("gateway stopped")
    return EXIT_OK
