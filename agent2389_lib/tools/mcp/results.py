"""What an MCP tool result says to the LLM: its text, and every other content item described
(type, MIME type, size, URI) rather than dropped; capped at `max_output_size` bytes."""

from __future__ import annotations

from typing import Any

from ...protocol import compact_json
from ...redaction import truncate_utf8


def result_text(result: dict, limit: int) -> str:
    parts = [_describe(item) for item in result.get("content") or [] if isinstance(item, dict)]
    structured = result.get("structuredContent")
    if structured is not None and not any(item.get("type") == "text" for item in result.get("content") or []
                                          if isinstance(item, dict)):
        parts.append(compact_json(structured))
    return truncate_utf8("\n".join(part for part in parts if part), limit,
                         f"\n...[result truncated at {limit} bytes]")


def _describe(item: dict) -> str:
    kind = item.get("type")
    if kind == "text":
        return str(item.get("text", ""))
    if kind in ("image", "audio"):
        return f"[{kind}: {_mime(item)}, {_base64_size(item.get('data'))} bytes, not shown]"
    if kind == "resource_link":
        return f"[resource link: {_text(item.get('uri'))}{_named(item)}]"
    if kind == "resource":
        resource = item.get("resource")
        if not isinstance(resource, dict):
            resource = {}
        header = f"[resource: {_text(resource.get('uri'))}, {_mime(resource)}"
        if isinstance(resource.get("text"), str):
            return f"{header}]\n{resource['text']}"
        return f"{header}, {_base64_size(resource.get('blob'))} bytes, not shown]"
    return f"[content of type {_text(kind)}, not shown]"


def _mime(item: dict) -> str:
    return _text(item.get("mimeType")) or "no MIME type"


def _named(item: dict) -> str:
    details = [_text(item.get(key)) for key in ("name", "mimeType") if item.get(key)]
    return f" ({', '.join(details)})" if details else ""


def _text(value: Any) -> str:
    return str(value)[:200] if value is not None else ""


def _base64_size(data: Any) -> int:
    """The decoded size of base64 text, without decoding it."""
    if not isinstance(data, str):
        return 0
    return len(data) * 3 // 4 - data[-2:].count("=")
