"""The gateway's HTTP side (stdlib http.server): the Agent Cards, A2A's JSON-RPC binding on each
agent's URL (Server-Sent Events for streams), and /health, /ready, /live and /metrics. Bearer
tokens, capped bodies, TLS, and the health server's defences against slow clients."""

from __future__ import annotations

import hmac
import json
import logging
import queue
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Optional

from .. import __version__
from ..health import ENDPOINTS, BoundedHTTPServer, HealthEndpoints
from . import a2a
from .a2a import RpcError
from .cards import agent_card, gateway_card
from .service import Gateway, Stream

log = logging.getLogger("agent2389.gateway")

MAX_BODY = 1 << 20  # bytes of a JSON-RPC request
_READ_TIMEOUT = 10.0  # seconds for a client to send its request (and to finish a TLS handshake)
_KEEPALIVE = 15.0  # seconds between SSE comments on a quiet stream
_CARD = "/.well-known/agent-card.json"
_VERSIONS = ("1.0", "1")


class _GatewayHTTPServer(BoundedHTTPServer):
    tls: Optional[ssl.SSLContext] = None

    def get_request(self) -> tuple[Any, Any]:
        """TLS without the handshake: it runs on the connection's own thread, under its timeout."""
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ssl.SSLError):
            log.debug("TLS with client %s failed: %s", client_address, sys.exc_info()[1])
            return
        super().handle_error(request, client_address)


class GatewayServer:
    def __init__(self, gateway: Gateway, endpoints: HealthEndpoints, host: str, port: int,
                 tokens: frozenset = frozenset(), tls: Optional[ssl.SSLContext] = None,
                 public_url: Optional[str] = None):
        """`tokens`: the bearer tokens a JSON-RPC request needs (none: open); `public_url`: the
        base URL the cards give clients (default: the address it listens on)."""
        self.gateway, self.endpoints, self.tokens = gateway, endpoints, tokens
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = _READ_TIMEOUT
            protocol_version = "HTTP/1.1"
            server_version = f"agent2389-gateway/{__version__}"

            def setup(self) -> None:
                if isinstance(self.request, ssl.SSLSocket):
                    self.request.settimeout(_READ_TIMEOUT)
                    self.request.do_handshake()
                super().setup()

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("http %s - %s", self.address_string(), fmt % args)

            def handle_one_request(self) -> None:
                server.httpd.request_started(self.connection)
                super().handle_one_request()

            def do_GET(self) -> None:
                server.get(self)

            def do_POST(self) -> None:
                server.post(self)

        self.httpd = _GatewayHTTPServer((host, port), Handler)
        self.httpd.tls = tls
        self.port = self.httpd.server_address[1]
        scheme = "https" if tls else "http"
        self.base_url = (public_url or f"{scheme}://{host}:{self.port}").rstrip("/")
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="gateway-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("A2A gateway on %s (cards at %s%s and %s/agents/{agent_id}%s)%s", self.base_url, self.base_url,
                 _CARD, self.base_url, _CARD, "" if self.tokens else "; no --auth-token-file: requests need no token")

    def close(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    # -------------------------------------------------------------- GET
    def get(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        if path == _CARD:
            return self.endpoints.reply(handler, 200, gateway_card(self.gateway.available_agents(), self.base_url,
                                                                   bool(self.tokens)))
        parts = path.split("/")
        if len(parts) == 5 and parts[1] == "agents" and "/" + "/".join(parts[3:]) == _CARD:
            status = self.gateway.available(parts[2])
            if status is None:
                return self.endpoints.reply(handler, 404, {"error": f"agent {parts[2]} is not available"})
            return self.endpoints.reply(handler, 200, agent_card(parts[2], status, self.base_url, bool(self.tokens)))
        if (path.rstrip("/") or "/") in ENDPOINTS or path in ("/", "/live"):
            return self.endpoints.route(handler, head=False)
        self.endpoints.reply(handler, 404, {"error": f"no endpoint {path}"})

    # -------------------------------------------------------------- POST: JSON-RPC
    def post(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0].rstrip("/")
        parts = path.split("/")
        if path and not (len(parts) == 3 and parts[1] == "agents" and parts[2]):
            return self.endpoints.reply(handler, 404, {"error": f"no endpoint {path}: send to an agent's URL, "
                                                                f"/agents/{{agent_id}}, or to /"})
        if not self._authorized(handler):
            return self.endpoints.reply(handler, 401, {"error": "a bearer token of the gateway is required"},
                                        extra={"WWW-Authenticate": 'Bearer realm="agent2389"'})
        length = handler.headers.get("Content-Length")
        if length is None or not length.isdigit():
            handler.close_connection = True
            return self.endpoints.reply(handler, 411, {"error": "Content-Length is required"})
        if int(length) > MAX_BODY:
            handler.close_connection = True
            return self.endpoints.reply(handler, 413, {"error": f"a request of {length} bytes is over {MAX_BODY}"})
        body = handler.rfile.read(int(length))
        request_id: Any = None
        try:
            version = handler.headers.get("A2A-Version")
            if version is not None and version.strip() not in _VERSIONS:
                raise RpcError(a2a.VERSION_NOT_SUPPORTED, f"A2A version {version[:20]} is not supported; this gateway "
                                                          f"speaks {a2a.PROTOCOL_VERSION}", "VERSION_NOT_SUPPORTED")
            request_id, method, params = a2a.read_request(body)
            agent_id = parts[2] if path else _named_agent(params)
            if method in ("SendStreamingMessage", "SubscribeToTask"):
                return self._stream(handler, request_id, method, agent_id, params)
            if method in ("SendMessage", "CancelTask"):  # they wait for the agent: no request deadline
                self.httpd.release(handler.connection)
            value = self._call(method, agent_id, params)
        except RpcError as exc:
            return self.endpoints.reply(handler, 200, exc.body(request_id))
        except Exception:
            log.exception("JSON-RPC request to %s failed", path or "/")
            return self.endpoints.reply(handler, 200, RpcError(a2a.INTERNAL_ERROR, "Internal error").body(request_id))
        self.endpoints.reply(handler, 200, a2a.result(request_id, value))

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        if not self.tokens:
            return True
        scheme, _, token = (handler.headers.get("Authorization") or "").partition(" ")
        offered = token.strip().encode()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(offered, known) for known in self.tokens)

    def _call(self, method: str, agent_id: str, params: dict) -> dict:
        gateway = self.gateway
        if method == "SendMessage":
            configuration = params.get("configuration")
            configuration = configuration if isinstance(configuration, dict) else {}
            task, follow = gateway.send(agent_id, a2a.read_message(params), stream=True)
            assert follow is not None
            if configuration.get("returnImmediately") is True or task.finished or task.state in a2a.INTERRUPTED:
                gateway.unwatch(task.id, follow)
            else:
                gateway.wait(task.id, follow, gateway.send_wait)
            return {"task": gateway.get(task.id).to_json(_history_length(configuration))}
        if method == "GetTask":
            return gateway.get(a2a.task_id_param(params)).to_json(_history_length(params))
        if method == "CancelTask":
            return gateway.cancel(a2a.task_id_param(params)).to_json()
        if method.endswith("PushNotificationConfig") or method == "ListTaskPushNotificationConfigs":
            raise RpcError(a2a.PUSH_NOT_SUPPORTED, "push notifications are not supported", "PUSH_NOT_SUPPORTED")
        if method in ("ListTasks", "GetExtendedAgentCard"):
            raise RpcError(a2a.UNSUPPORTED_OPERATION, f"{method} is not supported by this gateway",
                           "UNSUPPORTED_OPERATION")
        raise RpcError(a2a.METHOD_NOT_FOUND, f"Method not found: {method[:60]}")

    def _stream(self, handler: BaseHTTPRequestHandler, request_id: Any, method: str, agent_id: str,
                params: dict) -> None:
        """Server-Sent Events: the task, then its updates until it finishes or needs input."""
        if method == "SendStreamingMessage":
            task, follow = self.gateway.send(agent_id, a2a.read_message(params), stream=True)
        else:
            task = self.gateway.get(a2a.task_id_param(params))
            if task.finished:
                raise RpcError(a2a.UNSUPPORTED_OPERATION, f"task {task.id} is {task.state}: there is nothing to "
                                                          f"subscribe to", "UNSUPPORTED_OPERATION")
            follow = self.gateway.watch(task.id)
        assert follow is not None
        self.httpd.release(handler.connection)
        handler.close_connection = True
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.send_header("Cache-Control", "no-store")
            handler.send_header("Connection", "close")
            handler.end_headers()
            _event(handler, a2a.result(request_id, {"task": task.to_json()}))
            # what became of it since is in `follow`; a subscriber to a task waiting for input waits with it
            if not task.finished and (method == "SubscribeToTask" or task.state not in a2a.INTERRUPTED):
                self._follow(handler, request_id, follow)
        finally:
            self.gateway.unwatch(task.id, follow)

    @staticmethod
    def _follow(handler: BaseHTTPRequestHandler, request_id: Any, follow: Stream) -> None:
        while True:
            try:
                event = follow.get(timeout=_KEEPALIVE)
            except queue.Empty:  # a comment keeps proxies from closing a quiet stream
                handler.wfile.write(b": keep-alive\n\n")
                handler.wfile.flush()
                continue
            if event is None:
                return
            _event(handler, a2a.result(request_id, event))


def _event(handler: BaseHTTPRequestHandler, message: dict) -> None:
    handler.wfile.write(b"data: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n")
    handler.wfile.flush()


def _history_length(holder: dict) -> Optional[int]:
    """`historyLength`: how many of the task's messages to give (None: all; anything else but a count: all)."""
    value = holder.get("historyLength")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _named_agent(params: dict) -> str:
    """A request to the gateway's own URL names its agent in metadata.agent_id (the request's or the message's)."""
    message = params.get("message")
    for holder in (params, message if isinstance(message, dict) else {}):
        metadata = holder.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("agent_id"), str):
            return metadata["agent_id"]
    if isinstance(params.get("id"), str):
        return ""  # a task's own methods find its agent by the task
    raise RpcError(a2a.INVALID_PARAMS, "a message to the gateway's own URL names its agent in metadata.agent_id; or "
                                       "send it to the agent's URL, /agents/{agent_id} (see the gateway's card)")
