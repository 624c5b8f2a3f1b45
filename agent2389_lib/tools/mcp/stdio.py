"""MCP's stdio transport: the server is a subprocess (argv, never a shell) speaking one JSON-RPC
message per line on stdin/stdout. Its stderr goes to the agent log, rate-limited and redacted;
a line too long to hold is dropped, never buffered whole."""

from __future__ import annotations

import logging
import os
import queue
import re
import subprocess
import threading
import time
from typing import IO, Optional

from ...logs import Throttle
from ...redaction import redact
from ..command import kill_group
from . import jsonrpc
from .session import McpError, McpSession

log = logging.getLogger("agent2389.tools.mcp")

BASE_ENV = ("PATH", "HOME", "LANG")  # what a server gets of the agent's environment, besides its `env`
MAX_LINE = 8 << 20  # bytes of one message; a server's longer line is dropped and said
MAX_UNWRITTEN = 16 << 20  # bytes waiting for a server that does not read its stdin
_STDERR_LINE = 2000  # characters of one stderr line that reach the log
_STDERR_BURST, _STDERR_WINDOW = 20, 10.0  # at most this many stderr lines per window
_STDIN_CLOSE_WAIT = 1.0  # seconds a server gets to exit on its own once its stdin is closed
_ID_NEAR_START = re.compile(rb'"id"\s*:\s*(\d+)')


class StdioChannel:
    def __init__(self, session: McpSession, argv: tuple, env: dict, cwd: Optional[str], secrets: tuple):
        self.session = session
        self.server = session.server
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.secrets = secrets
        self.protocol_version: Optional[str] = None
        self._outbox: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._unwritten = 0  # bytes in the outbox
        self._count_lock = threading.Lock()
        self._writer: Optional[threading.Thread] = None
        self._junk = Throttle()  # lines that are not messages: a line a minute about them
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        if self.cwd is not None and not os.path.isdir(self.cwd):
            raise McpError(f"cannot start MCP server {self.server}: its cwd {self.cwd} is not a directory")
        try:
            self.proc = subprocess.Popen(list(self.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=self.env, cwd=self.cwd,
                                         start_new_session=True, close_fds=True)
        except OSError as exc:
            raise McpError(f"cannot start MCP server {self.server} ({self.argv[0]}): "
                           f"{exc.strerror or exc}") from None
        threading.Thread(target=self._read, args=(self.proc.stdout,), name=f"mcp-{self.server}", daemon=True).start()
        threading.Thread(target=self._log_stderr, args=(self.proc.stderr,), name=f"mcp-{self.server}-stderr",
                         daemon=True).start()
        self._writer = threading.Thread(target=self._write, args=(self.proc.stdin,), name=f"mcp-{self.server}-stdin",
                                        daemon=True)
        self._writer.start()

    def send(self, message: dict, timeout: float) -> None:
        """Queued for the writer thread: a write to a server that stopped reading its stdin blocks
        that thread only, and the requests waiting on it end at their timeout."""
        if self._writer is None or not self._writer.is_alive():
            raise McpError(f"MCP server {self.server} is not running (its stdin is closed)")
        data = jsonrpc.encode(message) + b"\n"
        with self._count_lock:
            if self._unwritten + len(data) > MAX_UNWRITTEN:
                raise McpError(f"MCP server {self.server} is not reading its stdin ({self._unwritten} bytes wait)")
            self._unwritten += len(data)
        self._outbox.put(data)

    def _write(self, stdin: IO[bytes]) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                break
            with self._count_lock:
                self._unwritten -= len(data)
            try:
                stdin.write(data)
                stdin.flush()
            except (OSError, ValueError):  # the server is gone; the reader reports it
                break
        try:
            stdin.close()  # the server's cue to exit
        except OSError:
            pass

    # -------------------------------------------------------------- reading
    def _read(self, stdout: IO[bytes]) -> None:
        while True:
            line = stdout.readline(MAX_LINE)
            if not line:
                break
            if len(line) >= MAX_LINE and not line.endswith(b"\n"):
                self._drop_long_line(stdout, line)
                continue
            if not line.strip():
                continue
            try:
                message = jsonrpc.decode(line)
            except jsonrpc.RpcError as exc:
                count = self._junk.occurred()
                if count:
                    log.warning("MCP server %s wrote a line on stdout that is %s; ignored (stdout is for MCP "
                                "messages only: a server should log to stderr)%s", self.server, exc,
                                f" ({count} such lines since the last report)" if count > 1 else "")
                continue
            try:
                self.session.dispatch(message)
            except Exception:  # the reader must outlive a message it could not handle
                log.exception("MCP server %s: a message could not be handled", self.server)
        stdout.close()  # each reader owns its pipe
        self.session.closed(self._exit_reason())

    def _drop_long_line(self, stdout: IO[bytes], first: bytes) -> None:
        """Read past the rest of the line; the request it answered (when its id comes early, as
        servers write it) fails now rather than at its timeout."""
        size, chunk = len(first), first
        while not chunk.endswith(b"\n"):
            chunk = stdout.readline(MAX_LINE)
            if not chunk:
                break
            size += len(chunk)
        reason = f"MCP server {self.server} sent a message of {size} bytes, over the {MAX_LINE >> 20} MiB limit"
        log.error("%s; dropped", reason)
        match = _ID_NEAR_START.search(first[:200])
        if match:
            self.session.fail(int(match.group(1)), reason)

    def _exit_reason(self) -> str:
        code = None
        try:
            code = self.proc.wait(5.0) if self.proc is not None else None
        except subprocess.TimeoutExpired:
            pass
        if code is None:
            return f"MCP server {self.server} closed its stdout"
        return f"MCP server {self.server} exited with status {code}"

    def _log_stderr(self, stderr: IO[bytes]) -> None:
        window_start, shown, suppressed = time.monotonic(), 0, 0
        for raw in iter(lambda: stderr.readline(MAX_LINE), b""):
            now = time.monotonic()
            if now - window_start >= _STDERR_WINDOW:
                if suppressed:
                    log.info("MCP server %s: %d more stderr lines not shown", self.server, suppressed)
                window_start, shown, suppressed = now, 0, 0
            if shown >= _STDERR_BURST:
                suppressed += 1
                continue
            shown += 1
            text = raw.decode("utf-8", "replace").rstrip()[:_STDERR_LINE]
            if text:
                log.info("MCP server %s: %s", self.server, redact(text, self.secrets))
        stderr.close()

    # -------------------------------------------------------------- closing
    def close(self, timeout: float) -> None:
        """Close stdin (the server's cue to exit), then SIGTERM, then SIGKILL, within `timeout`."""
        proc = self.proc
        if proc is None:
            return
        self._outbox.put(None)  # the writer closes stdin after what is queued
        try:
            proc.wait(min(_STDIN_CLOSE_WAIT, timeout / 3))
        except subprocess.TimeoutExpired:
            kill_group(proc, max(0.1, timeout - min(_STDIN_CLOSE_WAIT, timeout / 3)))


def child_environment(configured: dict) -> dict:
    """PATH, HOME and LANG of the agent's, then the server's own `env`."""
    base = {name: os.environ[name] for name in BASE_ENV if name in os.environ}
    return {**base, **configured}
