"""Health and metrics over HTTP: /, /health, /ready, /live, /metrics, /metrics/prometheus.

A stdlib ThreadingHTTPServer on a daemon thread, hardened against slow clients (slowloris):
at most 64 connections at once (a new one evicts the oldest), each request must arrive whole
within a deadline, and clients that hang up are logged at DEBUG, never as tracebacks. So
`/live` keeps answering and the agent keeps its file descriptors for the broker.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from . import __version__
from .metrics import Metrics, prometheus_text

log = logging.getLogger("agent2389.health")

STALL_SECONDS = 300
_CLIENT_TIMEOUT = 5.0  # per socket read; also closes idle keep-alive connections
REQUEST_DEADLINE = 10.0  # for a whole request to arrive and be answered
MAX_CONNECTIONS = 64
_LISTEN_BACKLOG = 1024
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = {
    "/health": "overall health with checks (200 healthy, 503 degraded)",
    "/ready": "readiness: 200 when connected, subscribed and not saturated, else 503",
    "/live": "liveness: 200 while the process serves",
    "/metrics": "metrics as JSON (Prometheus text when Accept asks for text/plain or OpenMetrics)",
    "/metrics/prometheus": "metrics in the Prometheus text format 0.0.4",
}


@dataclass(frozen=True)
class AgentStatus:
    state: str  # starting | running | stopping | stopped
    connected: bool  # both links up and the input subscription granted
    saturated: bool  # the intake is full
    waiting: int  # tasks received and not yet started
    store_problem: Optional[str] = None  # why completed tasks are not being persisted
    mcp_servers: tuple = ()  # each MCP server's status (McpServer.status)
    approvals_pending: int = 0  # tool calls and elicitations waiting for a person (PROTOCOL.md 9)


def readiness(status: AgentStatus) -> Optional[str]:
    """Why the agent is not ready, or None when it is."""
    if status.state != "running":
        return f"agent is {status.state}"
    if not status.connected:
        return "not connected to the MQTT broker"
    if status.saturated:
        return "intake is full: all workers busy and the queue at its bound"
    if status.store_problem:
        return f"state store degraded: {status.store_problem}"
    down = _required_down(status)
    if down:
        server = down[0]
        return f"required MCP server {server['name']} is {server['state']}" + (
            f": {server['last_error']}" if server["last_error"] else "")
    return None


def _required_down(status: AgentStatus) -> list[dict]:
    return [server for server in status.mcp_servers if server["required"] and server["state"] != "up"]


def health_report(status: AgentStatus, metrics: Metrics, now: float) -> dict:
    """The deployment guide's /health document."""
    stamp = int(now)
    mqtt: dict[str, Any] = {
        "status": "healthy" if status.connected else "unhealthy",
        "message": "MQTT connection established" if status.connected else "MQTT broker unreachable or not subscribed",
        "last_check": stamp}
    last = metrics.last_task_activity
    idle = now - (last if last is not None else now - metrics.uptime())
    if status.waiting and idle > STALL_SECONDS:
        tasks: dict[str, Any] = {"status": "unhealthy",
                                 "message": f"{status.waiting} tasks waiting and no progress for {int(idle)} s"}
    elif last is not None:
        tasks = {"status": "healthy", "message": "Recent task activity"}
    else:
        tasks = {"status": "healthy", "message": "No tasks yet"}
    tasks["last_check"] = stamp
    store = {"status": "unhealthy" if status.store_problem else "healthy",
             "message": status.store_problem or "completed tasks are recorded", "last_check": stamp}
    checks: dict[str, dict[str, Any]] = {"mqtt": mqtt, "task_processing": tasks, "state_store": store}
    if status.mcp_servers:
        down = [s["name"] for s in status.mcp_servers if s["state"] != "up"]
        checks["mcp_servers"] = {"status": "unhealthy" if _required_down(status) else "healthy",
                                 "message": f"not up: {', '.join(down)}" if down else "all MCP servers up",
                                 "last_check": stamp}
    healthy = all(check["status"] == "healthy" for check in checks.values())
    report: dict[str, Any] = {"status": "healthy" if healthy else "degraded", "timestamp": stamp,
                              "agent_id": metrics.agent_id, "uptime_seconds": int(metrics.uptime()),
                              "state": status.state, "checks": checks,
                              "approvals_pending": status.approvals_pending}
    if status.mcp_servers:
        report["mcp_servers"] = [{key: s[key] for key in ("name", "transport", "state", "required", "tools",
                                                          "restarts", "last_error")} for s in status.mcp_servers]
    return report


def wants_prometheus(accept: str) -> bool:
    accept = accept.lower()
    return "application/openmetrics-text" in accept or ("text/plain" in accept and "application/json" not in accept)


class BoundedHTTPServer(ThreadingHTTPServer):
    """Tracks open connections with the time their current request began; evicts the oldest
    when full and any whose request outlived REQUEST_DEADLINE (shutdown wakes its thread). A
    connection that streams for longer (the gateway's Server-Sent Events) is `released` from that."""

    daemon_threads = True
    request_queue_size = _LISTEN_BACKLOG

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:  # a TCP server's: a socket
        with self._open_lock:
            if len(self._open) >= MAX_CONNECTIONS:
                self._hang_up(min(self._open, key=self._open.__getitem__))
            self._open[request] = time.monotonic()
        super().process_request(request, client_address)

    def release(self, request: socket.socket) -> None:
        """No deadline for this connection's request, nor eviction: it streams."""
        with self._open_lock:
            self._open.pop(request, None)

    def request_started(self, request: socket.socket) -> None:
        """A keep-alive connection's next request gets a deadline of its own."""
        with self._open_lock:
            if request in self._open:
                self._open[request] = time.monotonic()

    def service_actions(self) -> None:
        """Called by serve_forever about twice a second."""
        cutoff = time.monotonic() - REQUEST_DEADLINE
        with self._open_lock:
            for request in [r for r, began in self._open.items() if began < cutoff]:
                self._hang_up(request)

    def _hang_up(self, request: socket.socket) -> None:
        """Wakes the connection's thread (its read returns EOF); the caller holds the lock."""
        del self._open[request]
        try:
            request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        """Called inside the handler's except block: a client hanging up is no news, a bug is."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            log.debug("HTTP client %s went away mid-request (%s)", client_address, type(error).__name__)
        else:
            log.error("HTTP endpoint failed for %s: %s: %s", client_address, type(error).__name__, error)


class HealthEndpoints:
    """What /, /health, /ready, /live and /metrics answer (the agent's health server, the gateway's port)."""

    def __init__(self, metrics: Metrics, status: Callable[[], AgentStatus]):
        self.metrics = metrics
        self.status = status

    def route(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = handler.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/":
            return self.reply(handler, 200, {"service": "agent2389", "agent_id": self.metrics.agent_id,
                                             "endpoints": ENDPOINTS}, head)
        if path == "/live":
            # the reference answers {"alive": true}
            return self.reply(handler, 200, {"alive": True, "status": "alive"}, head)
        status = self.status()
        if path == "/ready":
            reason = readiness(status)
            body = {"status": "ready"} if reason is None else {"status": "not_ready", "reason": reason}
            return self.reply(handler, 200 if reason is None else 503, body, head)
        if path == "/health":
            self.metrics.health_checked()
            report = health_report(status, self.metrics, time.time())
            return self.reply(handler, 200 if report["status"] == "healthy" else 503, report, head)
        if path == "/metrics" and not wants_prometheus(handler.headers.get("Accept", "")):
            return self.reply(handler, 200, self.metrics.snapshot(), head)
        if path in ("/metrics", "/metrics/prometheus"):
            text = prometheus_text(self.metrics.read())
            return self.send(handler, 200, text.encode(), PROMETHEUS_TYPE, head)
        self.reply(handler, 404, {"error": f"no endpoint {path}", "endpoints": sorted(ENDPOINTS)}, head)

    def reply(self, handler: BaseHTTPRequestHandler, code: int, body: dict, head: bool = False,
              extra: Optional[dict] = None) -> None:
        self.send(handler, code, json.dumps(body).encode(), "application/json", head, extra)

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, code: int, data: bytes, content_type: str, head: bool = False,
             extra: Optional[dict] = None) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(data)


class HealthServer(HealthEndpoints):
    def __init__(self, metrics: Metrics, status: Callable[[], AgentStatus], port: int, bind: str = "0.0.0.0"):
        super().__init__(metrics, status)
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = _CLIENT_TIMEOUT
            protocol_version = "HTTP/1.1"
            server_version = f"agent2389/{__version__}"

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("health %s - %s", self.address_string(), fmt % args)

            def handle_one_request(self) -> None:
                server.httpd.request_started(self.connection)
                super().handle_one_request()

            def do_GET(self) -> None:
                server.route(self, head=False)

            def do_HEAD(self) -> None:
                server.route(self, head=True)

            def _not_allowed(self) -> None:
                server.reply(self, 405, {"error": f"method {self.command} not allowed", "allowed": ["GET", "HEAD"]},
                             extra={"Allow": "GET, HEAD"})

            do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        self.httpd = BoundedHTTPServer((bind, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics on http://%s:%d/ (/health, /ready, /live, /metrics)",
                 self.httpd.server_address[0], self.port)

    def close(self) -> None:
        """Stop serving (if it started) and release the port."""
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
