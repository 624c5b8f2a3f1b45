"""An LLM's text as the answer's `response`: the `result` of a JSON object in it (whole, fenced
or embedded in prose), else the text itself."""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from .protocol import compact_json


def parse_json_or_none(text: str) -> Any:
    """Any JSON value, or None for text that is not JSON (or nests too deep to parse)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_MAX_OBJECT_CANDIDATES = 32


def extract_response(text: str) -> str:
    """The answer's `response`: an object's `result` when the LLM's text is or contains one, else the text."""
    found = find_json_object(text)
    if isinstance(found, dict) and "result" in found:
        result = found["result"]
        return result if isinstance(result, str) else compact_json(result)
    return text


def _loads_object(text: str) -> Optional[dict]:
    if not text.startswith("{"):  # no object: not parsed only to throw away (a failed parse raises, dearly)
        return None
    value = parse_json_or_none(text)
    return value if isinstance(value, dict) else None


def find_json_object(text: str) -> Optional[dict]:
    whole = _loads_object(text.strip())
    if whole is not None:
        return whole
    for fence in _FENCE_RE.finditer(text):
        fenced = _loads_object(fence.group(1).strip())
        if fenced is not None:
            return fenced
    start = text.find("{")
    for _ in range(_MAX_OBJECT_CANDIDATES):
        if start < 0:
            return None
        end = _balanced_end(text, start)
        if end is None:
            return None
        candidate = _loads_object(text[start:end])
        if candidate is not None:
            return candidate
        start = text.find("{", start + 1)
    return None


def _balanced_end(text: str, start: int) -> Optional[int]:
    """Index just past the `}` that closes the `{` at `start`, honouring JSON strings."""
    depth = 0
    in_string = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None
