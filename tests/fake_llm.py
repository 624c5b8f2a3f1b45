"""Loopback HTTP servers that behave like the OpenAI and Anthropic APIs.

They check credentials and validate request bodies the way the real APIs do (OpenAI: its own
published JSON Schema plus the tool-message ordering rule; Anthropic: required fields,
alternating roles, tool_result placement), answering 400/401 with each API's error JSON.
A test scripts what comes next (`reply`, `tool_calls`, `status`, `hang`) and reads back every
request with its arrival time on the server's clock.
"""

from __future__ import annotations

import collections
import json
import math
import os
import select
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from jsonschema import Draft202012Validator

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _validator(name: str) -> Draft202012Validator:
    with open(os.path.join(DATA, name)) as handle:
        return Draft202012Validator(json.load(handle))


OPENAI_REQUEST = _validator("openai-chat-completions-request.schema.json")
OPENAI_RESPONSE = _validator("openai-chat-completions-response.schema.json")


class Reply:
    def __init__(self, text: str = "", tool_calls: Optional[list] = None):
        self.text, self.tool_calls = text, tool_calls or []  # tool_calls: [(name, arguments)]


class Status:
    def __init__(self, code: int, headers: Optional[dict] = None, body: Any = None):
        self.code, self.headers, self.body = code, headers or {}, body


class Hang:
    """Wait `seconds`, then answer with `then` (default: what comes next in the script)."""

    def __init__(self, seconds: float, then: Any = None):
        self.seconds, self.then = seconds, then


class Raw:
    """A 200 answer written byte by byte: `chunks` with `pause` seconds before each, under a
    Content-Length of `length` (default: their total); a shorter body then closes the connection."""

    def __init__(self, chunks, length: Optional[int] = None, pause: float = 0.0, headers: Optional[dict] = None):
        self.chunks, self.length, self.pause, self.headers = chunks, length, pause, headers or {}


class Trickle:
    """A 200 answer that keeps coming, a byte every `every` seconds for up to `seconds` (a model
    generating a long answer). `started` is set once it began; `closed` (and `closed_at`, a
    time.monotonic()) once the client closed the connection."""

    def __init__(self, seconds: float = 60.0, every: float = 0.05):
        self.seconds, self.every = seconds, every
        self.started = threading.Event()
        self.closed = threading.Event()
        self.closed_at: Optional[float] = None


class RateLimit:
    """A provider's limit as a responder: `per_minute` requests in any 60 s are answered, the rest
    get 429 with Retry-After (the whole seconds until the oldest leaves the window)."""

    def __init__(self, per_minute: int, text: str = "within the limit"):
        self.per_minute, self.text = per_minute, text
        self.window: collections.deque = collections.deque()
        self.answered = self.refused = 0
        self.lock = threading.Lock()

    def __call__(self, body: Any) -> Any:
        with self.lock:
            now = time.monotonic()
            while self.window and self.window[0] <= now - 60:
                self.window.popleft()
            if len(self.window) < self.per_minute:
                self.window.append(now)
                self.answered += 1
                return Reply(self.text)
            self.refused += 1
            return Status(429, {"Retry-After": str(max(1, math.ceil(self.window[0] + 60 - now)))})


class BadRequest(Exception):
    pass


class FakeLLM:
    """Base: a threaded server, a script of what to answer, a log of what was asked."""

    models_path = "/models"
    completion_path = "/chat/completions"

    def __init__(self, api_key: str = "sk-test-key-0123456789", default_text: str = "fake answer",
                 tls: Optional[ssl.SSLContext] = None):
        """`tls`: serve https with this context."""
        self.api_key = api_key
        self.default_text = default_text
        self.script: list = []
        self.responder: Optional[Callable[[dict], Any]] = None  # when the script is empty: request body -> action
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.close_after_response = False  # close each connection after one answer, without saying so
        self.connections_closed = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._record(self, None)
                if not fake.authorized(self.headers):
                    return fake.send(self, *fake.auth_error())
                if self.path == fake.models_path:
                    return fake.send(self, 200, fake.models())
                fake.send(self, 404, fake.error_body("not_found_error", f"no route {self.path}"))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                fake._record(self, body)
                if self.path != fake.completion_path:
                    return fake.send(self, 404, fake.error_body("not_found_error", f"no route {self.path}"))
                if not fake.authorized(self.headers):
                    return fake.send(self, *fake.auth_error())
                try:
                    fake.validate(self.headers, body)
                except BadRequest as exc:
                    return fake.send(self, 400, fake.error_body("invalid_request_error", str(exc)))
                fake.respond(self, body)
                self.close_connection = self.close_connection or fake.close_after_response

        class Server(ThreadingHTTPServer):
            def shutdown_request(self, request: Any) -> None:
                super().shutdown_request(request)
                with fake.lock:
                    fake.connections_closed += 1

        self.server = Server(("127.0.0.1", 0), Handler)
        self.scheme = "https" if tls else "http"
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -------------------------------------------------------------- plumbing
    def _record(self, handler: BaseHTTPRequestHandler, body: Any) -> None:
        with self.lock:
            self.requests.append({"method": handler.command, "path": handler.path, "headers": dict(handler.headers),
                                  "body": body, "at": time.monotonic(), "client_port": handler.client_address[1]})

    def send(self, handler: BaseHTTPRequestHandler, code: int, body: Any, headers: Optional[dict] = None) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    def next_action(self, body: dict) -> Any:
        with self.lock:
            if self.script:
                return self.script.pop(0)
        return self.responder(body) if self.responder else Reply(self.default_text)

    def respond(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        action = self.next_action(body)
        while isinstance(action, Hang):
            time.sleep(action.seconds)
            action = action.then if action.then is not None else self.next_action(body)
        if isinstance(action, Raw):
            return self.send_raw(handler, action)
        if isinstance(action, Trickle):
            return self.send_trickle(handler, action)
        if isinstance(action, Status):
            body_out = action.body if action.body is not None else self.error_body("api_error", "scripted failure")
            return self.send(handler, action.code, body_out, action.headers)
        self.send(handler, 200, self.completion(body, action))

    @staticmethod
    def send_raw(handler: BaseHTTPRequestHandler, action: Raw) -> None:
        chunks = action.chunks if action.length is not None else list(action.chunks)
        length = action.length if action.length is not None else sum(len(c) for c in chunks)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(length))
        for key, value in action.headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        sent = 0
        try:
            for chunk in chunks:
                time.sleep(action.pause)  # the server's pace, not synchronization
                handler.wfile.write(chunk)
                handler.wfile.flush()
                sent += len(chunk)
        except OSError:  # the client gave up
            pass
        handler.close_connection = True

    @staticmethod
    def send_trickle(handler: BaseHTTPRequestHandler, action: Trickle) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.flush()
        action.started.set()
        connection = handler.connection
        ends = time.monotonic() + action.seconds
        closed = False
        try:
            while not closed and time.monotonic() < ends:
                readable, _, _ = select.select([connection], [], [], action.every)  # the pace, and the close seen
                closed = bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
                if not closed:
                    handler.wfile.write(b"1\r\n \r\n")  # JSON may begin with whitespace
                    handler.wfile.flush()
        except OSError:
            closed = True
        handler.close_connection = True
        if closed:
            action.closed_at = time.monotonic()
            action.closed.set()

    def completions(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST"]

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeOpenAI(FakeLLM):
    @property
    def base_url(self) -> str:
        return f"{super().base_url}/v1"

    models_path = "/v1/models"
    completion_path = "/v1/chat/completions"

    def authorized(self, headers: Any) -> bool:
        return headers.get("Authorization") == f"Bearer {self.api_key}"

    def auth_error(self) -> tuple:
        return 401, {"error": {"message": "Incorrect API key provided. You can find your API key at "
                                          "https://platform.openai.com/account/api-keys.",
                               "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}

    @staticmethod
    def error_body(kind: str, message: str) -> dict:
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 1700000000,
                                            "owned_by": "system"}]}

    def validate(self, headers: Any, body: Any) -> None:
        if not isinstance(body, dict):
            raise BadRequest("We could not parse the JSON body of your request.")
        errors = sorted(OPENAI_REQUEST.iter_errors(body), key=lambda e: list(e.absolute_path))
        if errors:
            first = errors[0]
            raise BadRequest(f"Invalid value at {'.'.join(map(str, first.absolute_path))}: {first.message[:200]}")
        json_schema = (body.get("response_format") or {}).get("json_schema") or {}
        if json_schema.get("strict"):
            self.check_strict_schema(json_schema.get("schema") or {}, json_schema["name"])
        open_calls: set = set()
        for index, message in enumerate(body["messages"]):
            if message["role"] == "tool":
                if message["tool_call_id"] not in open_calls:
                    raise BadRequest(f"Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                                     f"message with 'tool_calls' (messages[{index}]).")
                open_calls.discard(message["tool_call_id"])
                continue
            if open_calls:
                raise BadRequest("An assistant message with 'tool_calls' must be followed by tool messages responding "
                                 f"to each 'tool_call_id'. Missing: {sorted(open_calls)}")
            if message["role"] == "assistant":
                open_calls = {c["id"] for c in message.get("tool_calls", [])}

    @classmethod
    def check_strict_schema(cls, schema: dict, name: str, where: str = "()") -> None:
        """Structured Outputs' strict mode: every object lists all its properties as required
        and sets additionalProperties to false (what OpenAI answers otherwise, in its words)."""
        if schema.get("type") == "object" or "properties" in schema:
            properties = schema.get("properties") or {}
            missing = sorted(set(properties) - set(schema.get("required") or []))
            if missing:
                raise BadRequest(f"Invalid schema for response_format '{name}': In context={where}, 'required' is "
                                 f"required to be supplied and to be an array including every key in properties. "
                                 f"Missing '{missing[0]}'.")
            if schema.get("additionalProperties") is not False:
                raise BadRequest(f"Invalid schema for response_format '{name}': In context={where}, "
                                 f"'additionalProperties' is required to be supplied and to be false.")
            for key, sub in properties.items():
                cls.check_strict_schema(sub, name, f"('properties', '{key}')")

    def completion(self, request: dict, action: Reply) -> dict:
        message: dict = {"role": "assistant", "content": action.text or None, "refusal": None}
        if action.tool_calls:
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                                      "function": {"name": name, "arguments": json.dumps(args)}}
                                     for name, args in action.tool_calls]
        out = {"id": f"chatcmpl-{uuid.uuid4().hex[:10]}", "object": "chat.completion", "created": int(time.time()),
               "model": request["model"],
               "choices": [{"index": 0, "message": message, "logprobs": None,
                            "finish_reason": "tool_calls" if action.tool_calls else "stop"}],
               "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
        errors = list(OPENAI_RESPONSE.iter_errors(out))
        assert not errors, errors[0].message  # the fake itself must speak the real format
        return out


class FakeAnthropic(FakeLLM):
    models_path = "/v1/models"
    completion_path = "/v1/messages"
    block_types = {"text", "image", "tool_use", "tool_result", "document", "thinking"}

    def authorized(self, headers: Any) -> bool:
        return headers.get("x-api-key") == self.api_key

    def auth_error(self) -> tuple:
        return 401, self.error_body("authentication_error", "invalid x-api-key")

    @staticmethod
    def error_body(kind: str, message: str) -> dict:
        return {"type": "error", "error": {"type": kind, "message": message}}

    def models(self) -> dict:
        return {"data": [{"type": "model", "id": "claude-sonnet-4-20250514", "display_name": "Claude Sonnet 4",
                          "created_at": "2025-05-14T00:00:00Z"}], "has_more": False,
                "first_id": "claude-sonnet-4-20250514", "last_id": "claude-sonnet-4-20250514"}

    def validate(self, headers: Any, body: Any) -> None:
        if headers.get("anthropic-version") != "2023-06-01":
            raise BadRequest("anthropic-version: header is required and must be a valid version")
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        for field, kind in (("model", str), ("max_tokens", int), ("messages", list)):
            if not isinstance(body.get(field), kind):
                raise BadRequest(f"{field}: Field required")
        if body["max_tokens"] < 1:
            raise BadRequest("max_tokens: must be greater than or equal to 1")
        if "system" in body and not isinstance(body["system"], (str, list)):
            raise BadRequest("system: Input should be a valid string")
        if "temperature" in body and not 0 <= body["temperature"] <= 1:
            raise BadRequest("temperature: Input should be less than or equal to 1")
        for index, tool in enumerate(body.get("tools", [])):
            if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict) \
                    or tool["input_schema"].get("type") != "object":
                raise BadRequest(f"tools.{index}: name and an input_schema of type object are required")
        choice = body.get("tool_choice")
        if choice is not None:
            names = {tool.get("name") for tool in body.get("tools", [])}
            if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
                raise BadRequest("tool_choice: Input tag does not match any of the expected tags: 'auto', 'any', "
                                 "'tool', 'none'")
            if choice["type"] == "tool" and choice.get("name") not in names:
                raise BadRequest(f"tool_choice.name: tool {choice.get('name')!r} is not among the tools")
        messages = body["messages"]
        if not messages or messages[0].get("role") != "user":
            raise BadRequest("messages: first message must use the \"user\" role")
        pending: set = set()
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ("user", "assistant"):
                raise BadRequest(f"messages.{index}.role: Input should be 'user' or 'assistant'")
            if index and messages[index - 1].get("role") == role:
                raise BadRequest("messages: roles must alternate between \"user\" and \"assistant\"")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list) or not blocks:
                raise BadRequest(f"messages.{index}.content: must be a string or a non-empty list of blocks")
            kinds = [b.get("type") for b in blocks]
            if any(k not in self.block_types for k in kinds):
                raise BadRequest(f"messages.{index}.content: unknown content block type")
            results = [b for b in blocks if b["type"] == "tool_result"]
            if results:
                if role != "user" or kinds[:len(results)] != ["tool_result"] * len(results):
                    raise BadRequest(f"messages.{index}: tool_result blocks must come first in a user message")
                ids = {b.get("tool_use_id") for b in results}
                if ids - pending:
                    raise BadRequest(f"messages.{index}: unexpected `tool_use_id` found in `tool_result` blocks: "
                                     f"{sorted(ids - pending)}. Each `tool_result` block must have a corresponding "
                                     "`tool_use` block in the previous message.")
            if pending and not {b.get("tool_use_id") for b in results} >= pending:
                raise BadRequest(f"messages.{index}: `tool_use` ids were found without `tool_result` blocks "
                                 f"immediately after: {sorted(pending)}")
            pending = {b["id"] for b in blocks if b["type"] == "tool_use"} if role == "assistant" else set()
            for block in blocks:
                if block["type"] == "text" and not isinstance(block.get("text"), str):
                    raise BadRequest(f"messages.{index}: text blocks need a string text")
        if pending:
            raise BadRequest("the last message has tool_use blocks without tool results")

    def completion(self, request: dict, action: Reply) -> dict:
        content: list = [{"type": "text", "text": action.text}] if action.text else []
        for name, args in action.tool_calls:
            content.append({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": name, "input": args})
        return {"id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant", "model": request["model"],
                "content": content, "stop_reason": "tool_use" if action.tool_calls else "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 13, "output_tokens": 5}}


class FakeGatekeeper(FakeLLM):
    """A routing gatekeeper: POST /route with the reference's request shape, answered with the
    scripted (or `responder`'s) decision object; `Status` and `Hang` work as for the LLMs."""

    completion_path = "/route"
    REQUEST_KEYS = {"original_query", "workflow_history", "current_output", "available_agents", "iteration_count"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/route"

    def authorized(self, headers: Any) -> bool:
        return True

    @staticmethod
    def error_body(kind: str, message: str) -> dict:
        return {"detail": message}

    def validate(self, headers: Any, body: Any) -> None:
        if not isinstance(body, dict) or not self.REQUEST_KEYS <= set(body):
            raise BadRequest(f"the request needs {sorted(self.REQUEST_KEYS)}")
        for agent in body["available_agents"]:
            if not {"agent_id", "capabilities", "load", "description"} <= set(agent):
                raise BadRequest("available_agents entries need agent_id, capabilities, load, description")

    def completion(self, request: dict, action: Any) -> dict:
        return action
