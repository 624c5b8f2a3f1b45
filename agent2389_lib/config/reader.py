"""Typed access to flat settings for the build step: each bad value becomes a problem that names
where the user wrote it, and the default is used meanwhile, so every problem is found in one pass."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional, overload
from urllib.parse import urlsplit

from .model import Secret
from .sources import Collector, Value, warn_unknown


class Reader:
    """Typed access to flat settings, recording a problem (not raising) on a bad value."""

    def __init__(self, settings: dict, out: Collector):
        self.settings = settings
        self.out = out

    def has(self, key: str) -> bool:
        return key in self.settings

    def origin(self, key: str) -> str:
        return self.settings[key].origin if key in self.settings else key

    def raw(self, key: str, default: Any = None) -> Any:
        return self.settings[key].value if key in self.settings else default

    def bad(self, key: str, shown: Any, rule: str) -> None:
        self.out.problem(f"{self.origin(key)}={shown} {rule}")

    # A default that is not None makes the result not None: the overloads tell the type checker.
    @overload
    def string(self, key: str, default: str, allow_empty: bool = True) -> str: ...
    @overload
    def string(self, key: str, default: None = None, allow_empty: bool = True) -> Optional[str]: ...

    def string(self, key: str, default: Optional[str] = None, allow_empty: bool = True) -> Optional[str]:
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            self.bad(key, json.dumps(value), "must be a string")
            return default
        if "\0" in value:
            self.out.problem(f"{self.origin(key)} must not contain NUL characters (\\u0000)")
            return default
        if not allow_empty and not value.strip():
            self.out.problem(f"{self.origin(key)} must not be empty")
            return default
        return value

    @overload
    def integer(self, key: str, default: int, lo: int, hi: Optional[int] = None) -> int: ...
    @overload
    def integer(self, key: str, default: Optional[int], lo: int, hi: Optional[int] = None) -> Optional[int]: ...

    def integer(self, key: str, default: Optional[int], lo: int, hi: Optional[int] = None) -> Optional[int]:
        return self._numeric(key, default, lo, hi, int, (int,), "a whole number")

    @overload
    def number(self, key: str, default: float, lo: float, hi: Optional[float] = None) -> float: ...
    @overload
    def number(self, key: str, default: Optional[float], lo: float, hi: Optional[float] = None) -> Optional[float]: ...

    def number(self, key: str, default: Optional[float], lo: float, hi: Optional[float] = None) -> Optional[float]:
        value = self._numeric(key, default, lo, hi, float, (int, float), "a number")
        return None if value is None else float(value)

    def _numeric(self, key: str, default: Any, lo: Any, hi: Any, parse: Callable[[str], Any], types: tuple,
                 noun: str) -> Any:
        """A number from TOML or from an environment string, range-checked."""
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = parse(value.strip())
            except ValueError:
                self.bad(key, self.raw(key), f"is not {noun}")
                return default
        if isinstance(value, bool) or not isinstance(value, types) or not math.isfinite(value):
            self.bad(key, json.dumps(self.raw(key)), f"is not {noun}")
            return default
        if value < lo or (hi is not None and value > hi):
            self.bad(key, value, f"is out of range ({lo}-{hi})" if hi is not None else f"must be at least {lo}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        self.bad(key, value, "must be true or false")
        return default

    def choice(self, key: str, default: str, choices: tuple, fold: Callable[[str], str] = str.lower) -> str:
        value = self.string(key, default)
        if value is None:
            return default
        folded = fold(value.strip())
        if folded not in choices:
            self.bad(key, value, f"must be one of {', '.join(choices)}")
            return default
        return folded

    def strings(self, key: str, default: Optional[list]) -> Optional[list]:
        """An array of strings (without NUL)."""
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) and "\0" not in item for item in value):
            self.out.problem(f"{self.origin(key)} must be an array of strings")
            return default
        return value

    def http_url(self, key: str, example: str) -> Optional[str]:
        """An absolute http(s) URL with a host, or None (a problem when it is set but is not one)."""
        value = self.string(key, None, allow_empty=False)
        if value is not None and not is_http_url(value):
            self.bad(key, value, f"must be an http:// or https:// URL with a host, e.g. {example}")
            return None
        return value

    def secret(self, key: str) -> Optional[Secret]:
        value = self.raw(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str) or "\0" in value:
            self.out.problem(f"{self.origin(key)} must be a string without NUL characters")
            return None
        return Secret(value)


def is_http_url(value: str) -> bool:
    """Whether `value` is an absolute http(s) URL with a host and a port urllib can read (urllib
    raises for `http://[bad` and for ports out of range: a bad value must not be a traceback)."""
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        return False


def table_reader(out: Collector, origin: str, table: dict, known: tuple) -> Reader:
    """A reader for one table of an array (a tool, an MCP server): unknown keys warned about,
    every problem named `{origin} {key}`."""
    for key in table:
        if key not in known:
            warn_unknown(out, origin, key, list(known))
    return Reader({k: Value(v, f"{origin} {k}") for k, v in table.items()}, out)
