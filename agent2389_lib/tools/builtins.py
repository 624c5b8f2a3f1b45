"""Built-in tools: echo, http_request, file_read, file_write, web_search."""

from __future__ import annotations

import json
import os
import re
import tempfile
from html.parser import HTMLParser
from typing import Any, Callable

import requests

from ..config import BUILTIN_OPTIONS, AgentConfig, ToolSpec
from ..httpsessions import (BodyDeadline, BodyError, ThreadSessions, causes, describe_failure, endpoint_session,
                            read_body)
from .base import Tool, ToolError, ToolTimeout, seconds_left
from .netguard import NetworkPolicy, guarded_session

_REFUSAL = re.compile(r"refused: .*?allowed_hosts\)")
_TRUNCATED = "\n...[truncated at {} bytes]"


def _option(spec: ToolSpec, key: str) -> Any:
    """One of the tool's options, of the type the configuration checked it for."""
    return spec.options.get(key, BUILTIN_OPTIONS[spec.name][key])


class EchoTool(Tool):
    name = "echo"
    description = "Returns the given message unchanged."
    schema = {"type": "object", "properties": {"message": {"type": "string", "description": "text to return"}},
              "required": ["message"], "additionalProperties": False}

    def __init__(self, spec: ToolSpec, config: AgentConfig):
        self.description = spec.description or self.description

    def execute(self, params: dict, deadline: float) -> str:
        return params["message"]


class _TextExtractor(HTMLParser):
    """Readable text of an HTML page: no scripts, styles or markup."""

    _SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:  # type: ignore[no-untyped-def]
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return "\n".join(line for line in lines if line)


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


class HttpRequestTool(Tool):
    name = "http_request"
    description = ("Makes an HTTP request and returns the status, content type and body "
                   "(optionally the readable text of an HTML page).")
    schema = {
        "type": "object",
        "properties": {
            "url": {"type": "string", "pattern": "^https?://", "description": "absolute http(s) URL"},
            "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "body": {"type": "string"},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
            "extract_content": {"type": "boolean", "description": "return the readable text of an HTML page"},
        },
        "required": ["url"],
        "additionalProperties": False,
    }

    def __init__(self, spec: ToolSpec, config: AgentConfig):
        self.description = spec.description or self.description
        self.max_bytes = _option(spec, "max_response_size")
        self.default_timeout = spec.timeout
        hosts = _option(spec, "allowed_hosts")
        self.policy = NetworkPolicy(bool(_option(spec, "allow_private_networks")),
                                    frozenset(h.lower().rstrip(".") for h in hosts))
        self.max_redirects = _option(spec, "max_redirects")
        self._sessions = ThreadSessions(lambda: guarded_session(self.policy, self.max_redirects))

    def execute(self, params: dict, deadline: float) -> str:
        method = params.get("method", "GET")
        timeout = seconds_left(deadline, float(params.get("timeout", self.default_timeout)))
        try:
            with self._sessions.get().request(method, params["url"], headers=params.get("headers"),
                                              data=params.get("body", "").encode("utf-8") or None,
                                              timeout=timeout, stream=True) as response:
                body = read_body(response, deadline, self.max_bytes, timeout)  # past the cap: truncated
                content_type = response.headers.get("Content-Type", "")
                status, final_url = response.status_code, response.url
        except BodyDeadline:
            raise ToolTimeout("the task deadline passed while reading the response") from None
        except BodyError as exc:
            raise ToolError(f"request failed: {exc}") from None
        except requests.TooManyRedirects:
            raise ToolError(f"more than {self.max_redirects} redirects") from None
        except requests.Timeout:
            raise ToolTimeout(f"no response within {timeout:.1f} s") from None
        except requests.RequestException as exc:
            raise ToolError(_request_failure(exc)) from None
        text = body[:self.max_bytes].decode(response.encoding or "utf-8", "replace")
        if params.get("extract_content") and "html" in content_type.lower():
            text = html_to_text(text)
        result = {"status": status, "url": final_url, "content_type": content_type, "body": text}
        if len(body) > self.max_bytes:
            result["truncated_at_bytes"] = self.max_bytes
        return json.dumps(result, ensure_ascii=False)


def _request_failure(exc: requests.RequestException) -> str:
    """The innermost readable reason (e.g. our private-address refusal), not urllib3's wrapping."""
    for reason in causes(exc):
        match = _REFUSAL.search(str(reason))
        if match:
            return match.group(0)
    return f"request failed: {describe_failure(exc)}"


class _PathTool(Tool):
    """Shared by file_read and file_write: every path must resolve inside allowed_paths."""

    def __init__(self, spec: ToolSpec, config: AgentConfig):
        self.spec = spec
        self.description = spec.description or self.description
        self.roots = [os.path.realpath(p) for p in _option(spec, "allowed_paths")]
        self.max_bytes = _option(spec, "max_size")

    def initialize(self) -> None:
        if not self.roots:
            raise ToolError(f"set allowed_paths: {self.name} = {{ impl = \"builtin\", config = "
                            f"{{ allowed_paths = [\"/data\"] }} }}")
        for root in self.roots:
            if not os.path.isdir(root):
                raise ToolError(f"allowed path {root} is not a directory")

    def resolve(self, path: str) -> str:
        """The real path (symlinks followed, `..` collapsed); refused outside the allowed roots."""
        candidate = path if os.path.isabs(path) else os.path.join(self.roots[0], path)
        real = os.path.realpath(candidate)
        if not any(real == root or real.startswith(root + os.sep) for root in self.roots):
            raise ToolError(f"{path!r} is outside the allowed paths")
        return real


class FileReadTool(_PathTool):
    name = "file_read"
    description = "Reads a text file inside the allowed directories."
    schema = {"type": "object", "properties": {"path": {"type": "string", "minLength": 1}},
              "required": ["path"], "additionalProperties": False}

    def execute(self, params: dict, deadline: float) -> str:
        real = self.resolve(params["path"])
        try:
            with open(real, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise ToolError(f"{params['path']!r} does not exist") from None
        except IsADirectoryError:
            raise ToolError(f"{params['path']!r} is a directory") from None
        except OSError as exc:
            raise ToolError(f"cannot read {params['path']!r}: {exc.strerror}") from None
        text = data[: self.max_bytes].decode("utf-8", "replace")
        return text + _TRUNCATED.format(self.max_bytes) if len(data) > self.max_bytes else text


class FileWriteTool(_PathTool):
    name = "file_write"
    description = "Writes a text file inside the allowed directories (atomically: readers never see half a file)."
    schema = {"type": "object", "properties": {"path": {"type": "string", "minLength": 1},
                                               "content": {"type": "string"}},
              "required": ["path", "content"], "additionalProperties": False}

    def execute(self, params: dict, deadline: float) -> str:
        data = params["content"].encode("utf-8")
        if len(data) > self.max_bytes:
            raise ToolError(f"content of {len(data)} bytes exceeds max_size ({self.max_bytes} bytes)")
        real = self.resolve(params["path"])
        directory = os.path.dirname(real)
        if not os.path.isdir(directory):
            raise ToolError(f"the directory of {params['path']!r} does not exist")
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, real)
        except OSError as exc:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise ToolError(f"cannot write {params['path']!r}: {exc.strerror}") from None
        return f"wrote {len(data)} bytes to {params['path']}"


class WebSearchTool(Tool):
    """Serper-compatible search, as in the reference implementation."""

    name = "web_search"
    description = "Searches the web and returns the top results (title, link, snippet)."
    schema = {"type": "object", "properties": {
        "query": {"type": "string", "minLength": 1},
        "num_results": {"type": "integer", "minimum": 1, "maximum": 20}},
        "required": ["query"], "additionalProperties": False}

    def __init__(self, spec: ToolSpec, config: AgentConfig):
        self.spec = spec
        self.description = spec.description or self.description
        self.endpoint = _option(spec, "endpoint")
        self.key_var = _option(spec, "api_key_env")
        self._sessions = ThreadSessions(lambda: endpoint_session(self.endpoint))

    def initialize(self) -> None:
        if self.spec.secret is None:
            raise ToolError(f"web_search needs an API key: set {self.key_var}")

    def execute(self, params: dict, deadline: float) -> str:
        assert self.spec.secret is not None
        timeout = seconds_left(deadline, self.spec.timeout)
        try:
            response = self._sessions.get().post(self.endpoint, json={"q": params["query"],
                                                                     "num": params.get("num_results", 5)},
                                                 headers={"X-API-KEY": self.spec.secret.reveal()}, timeout=timeout)
        except requests.Timeout:
            raise ToolTimeout(f"the search service did not answer within {timeout:.1f} s") from None
        except requests.RequestException as exc:
            raise ToolError(f"the search service is unreachable: {describe_failure(exc)}") from None
        if response.status_code != 200:
            raise ToolError(f"the search service answered HTTP {response.status_code}")
        try:
            organic = response.json().get("organic", [])
        except (ValueError, AttributeError):
            raise ToolError("the search service answered with a body that is not JSON") from None
        results = [{k: item.get(k) for k in ("title", "link", "snippet")} for item in organic
                   if isinstance(item, dict)]
        return json.dumps(results[: params.get("num_results", 5)], ensure_ascii=False)


BUILTINS: dict[str, Callable[[ToolSpec, AgentConfig], Tool]] = {
    "echo": EchoTool,
    "http_request": HttpRequestTool,
    "file_read": FileReadTool,
    "file_write": FileWriteTool,
    "web_search": WebSearchTool,
}
