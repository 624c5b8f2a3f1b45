"""JSON-RPC 2.0 as MCP carries it: requests, notifications and responses as plain dicts, and the
one check every incoming message gets before it is looked at."""

from __future__ import annotations

import json
from typing import Any, Optional

from ...protocol import compact_json

METHOD_NOT_FOUND = -32601
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602


class RpcError(Exception):
    """An error response from the server (its code and message), or a malformed exchange."""

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.code = code


def request(request_id: int, method: str, params: Optional[dict] = None) -> dict:
    message: dict = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def notification(method: str, params: Optional[dict] = None) -> dict:
    message: dict = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message


def error_response(request_id: Any, code: int, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": text}}


def result_response(request_id: Any, result: dict) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def encode(message: dict) -> bytes:
    """One line of UTF-8 JSON without embedded newlines (json.dumps escapes them in strings)."""
    return compact_json(message).encode("utf-8")


def decode(data: bytes | str) -> dict:
    """A message as a dict, or RpcError saying what is wrong with it."""
    try:
        message = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RpcError(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise RpcError("not a JSON-RPC 2.0 message")
    return message


def is_response(message: dict) -> bool:
    return "method" not in message and ("result" in message or "error" in message)


def response_value(message: dict) -> dict:
    """The result of a response, or RpcError carrying the server's error."""
    if "error" in message:
        error = message["error"] if isinstance(message["error"], dict) else {}
        code = error.get("code") if isinstance(error.get("code"), int) else None
        raise RpcError(str(error.get("message") or "error without a message")[:500], code)
    result = message.get("result")
    if not isinstance(result, dict):
        raise RpcError("a response whose result is not an object")
    return result
