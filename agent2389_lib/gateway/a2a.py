"""A2A v1.0 on the wire (the JSON-RPC binding, ProtoJSON field names): what a client sends, the
tasks and events the gateway answers with, and the errors. Plain dicts: no SDK on the box."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .. import protocol

PROTOCOL_VERSION = "1.0"
JSONRPC = "JSONRPC"

SUBMITTED, WORKING, COMPLETED, FAILED = "TASK_STATE_SUBMITTED", "TASK_STATE_WORKING", "TASK_STATE_COMPLETED", \
    "TASK_STATE_FAILED"
CANCELED, INPUT_REQUIRED, REJECTED = "TASK_STATE_CANCELED", "TASK_STATE_INPUT_REQUIRED", "TASK_STATE_REJECTED"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELED, REJECTED})
INTERRUPTED = frozenset({INPUT_REQUIRED})  # a send returns here too: the client has to answer

# JSON-RPC 2.0 and A2A's own (specification 5.4)
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, \
    -32603
TASK_NOT_FOUND, TASK_NOT_CANCELABLE, PUSH_NOT_SUPPORTED, UNSUPPORTED_OPERATION = -32001, -32002, -32003, -32004
VERSION_NOT_SUPPORTED = -32009

# agent2389 error codes of a task refused, not run (PROTOCOL.md 2.5, 7)
_REFUSALS = frozenset({protocol.INVALID_INPUT, protocol.PIPELINE_DEPTH_EXCEEDED, protocol.EXPIRED})
_MAX_TEXT = 100_000  # characters of instruction a message may carry


class RpcError(Exception):
    """A JSON-RPC error to answer with."""

    def __init__(self, code: int, message: str, reason: Optional[str] = None):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason

    def body(self, request_id: Any) -> dict:
        error: dict = {"code": self.code, "message": self.message}
        if self.reason:
            error["data"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": self.reason,
                              "domain": "a2a-protocol.org"}]
        return {"jsonrpc": "2.0", "id": request_id, "error": error}


def result(request_id: Any, value: dict) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "result": value}


@dataclass
class Incoming:
    """A message a client sent: text parts make the instruction, data parts the input."""

    message_id: str
    context_id: Optional[str]
    task_id: Optional[str]  # set when it continues a task (an approval's answer)
    text: str
    data: list
    message: dict  # as the client sent it (the task's history)


def read_request(body: bytes) -> tuple[Any, str, dict]:
    """(id, method, params) of a JSON-RPC request; RpcError naming what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RpcError(PARSE_ERROR, "Invalid JSON payload") from None
    if not isinstance(request, dict) or request.get("jsonrpc") != "2.0" or not isinstance(request.get("method"), str):
        raise RpcError(INVALID_REQUEST, "Request payload validation error: a JSON-RPC 2.0 request object with a "
                                        "method is required")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, (str, int)):
        raise RpcError(INVALID_REQUEST, "Request payload validation error: id must be a string or a number")
    params = request.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object")
    return request_id, request["method"], params


def read_message(params: dict) -> Incoming:
    """SendMessageRequest.message as the gateway takes it."""
    message = params.get("message")
    if not isinstance(message, dict):
        raise RpcError(INVALID_PARAMS, "message is required")
    message_id = message.get("messageId")
    if not isinstance(message_id, str) or not message_id or len(message_id) > 200:
        raise RpcError(INVALID_PARAMS, "message.messageId is required (a string of at most 200 characters)")
    parts = message.get("parts")
    if not isinstance(parts, list) or not parts:
        raise RpcError(INVALID_PARAMS, "message.parts: at least one part is required")
    texts, data = [], []
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and "data" in part:
            data.append(part["data"])
        else:
            raise RpcError(INVALID_PARAMS, "message.parts: only text and data parts are taken (files are not)")
    text = "\n".join(texts)
    if len(text) > _MAX_TEXT:
        raise RpcError(INVALID_PARAMS, f"message text of {len(text)} characters is over {_MAX_TEXT}")
    context_id, task_id = message.get("contextId"), message.get("taskId")
    for name, value in (("contextId", context_id), ("taskId", task_id)):
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise RpcError(INVALID_PARAMS, f"message.{name} must be a string of at most 200 characters")
    return Incoming(message_id, context_id or None, task_id or None, text, data, message)


def task_id_param(params: dict) -> str:
    task_id = params.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise RpcError(INVALID_PARAMS, "id (the task's) is required")
    return task_id


def text_part(text: str) -> dict:
    return {"text": text}


def agent_message(text: str, context_id: str, task_id: str, data: Optional[dict] = None) -> dict:
    parts: list = [text_part(text)]
    if data is not None:
        parts.append({"data": data})
    return {"messageId": str(uuid.uuid4()), "contextId": context_id, "taskId": task_id, "role": "ROLE_AGENT",
            "parts": parts}


def status(state: str, stamp: str, message: Optional[dict] = None) -> dict:
    value: dict = {"state": state, "timestamp": stamp}
    if message is not None:
        value["message"] = message
    return value


def artifact(text: str) -> dict:
    return {"artifactId": "answer", "name": "answer", "parts": [text_part(text)]}


def outcome_state(payload: dict) -> tuple[str, str]:
    """The A2A state an agent's answer or error puts a task in, and its text."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return COMPLETED, str(payload.get("response", ""))
    code, text = error.get("code"), f"{error.get('code')}: {error.get('message')}"
    if code == protocol.CANCELED:
        return CANCELED, text
    return (REJECTED if code in _REFUSALS else FAILED), text
