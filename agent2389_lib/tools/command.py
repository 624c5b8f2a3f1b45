"""Command tools: a configured program run without a shell.

Parameters reach the program three ways: an `args` template (`{param}` placeholders, each
argument substituted whole), or else the schema's properties in declaration order as
positional arguments; and always the whole parameter object as JSON on stdin. A value that
would become a whole argument and starts with `-` is refused (option injection). The child
gets PATH, LANG and the variables listed in `env` only, runs in its own process group, and
the whole group is killed (SIGTERM, then SIGKILL) at the timeout. stdout is the result,
capped at `max_output_size` while it streams; a non-zero exit reports the tail of stderr.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
from typing import IO

from .. import taskscope
from ..config import ToolSpec
from ..redaction import redact
from .base import Tool, ToolError, ToolTimeout, as_text, seconds_left

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STDERR_TAIL = 2000
_KILL_GRACE = 2.0
_CHUNK = 65536
BASE_ENV = ("PATH", "LANG")  # what a command tool gets of the agent's environment


def _truncation_marker(limit: int) -> str:
    return f"\n...[output truncated at {limit} bytes]"


class _CappedReader(threading.Thread):
    """Reads a pipe to its end, keeping at most `limit` bytes (the head, or the tail)."""

    def __init__(self, pipe: IO[bytes], limit: int, keep_tail: bool = False):
        super().__init__(daemon=True)
        self.pipe, self.limit, self.keep_tail = pipe, limit, keep_tail
        self.data = bytearray()
        self.overflow = False

    def run(self) -> None:
        while True:
            chunk = self.pipe.read1(_CHUNK) if hasattr(self.pipe, "read1") else self.pipe.read(_CHUNK)
            if not chunk:
                return
            if self.keep_tail:
                self.data = (self.data + chunk)[-self.limit:]
                continue
            room = self.limit - len(self.data)
            if len(chunk) > room:
                self.overflow = True
            if room > 0:
                self.data += chunk[:room]


def build_argv(spec: ToolSpec, params: dict) -> list[str]:
    """The program and its arguments for one call; raises ToolError on injection attempts."""
    argv = shlex.split(spec.command or "")
    if spec.args is not None:
        for template in spec.args:
            names = _PLACEHOLDER.findall(template)
            if any(n not in params or params[n] is None for n in names):
                continue  # an absent optional parameter drops its whole argument
            argv.append(_substitute(template, params, whole=template.strip() == f"{{{names[0]}}}" if names else False))
        return argv
    properties = (spec.schema or {}).get("properties", {})
    for name in properties:
        if name in params and params[name] is not None:
            argv.append(_checked(name, as_text(params[name])))
    return argv


def _substitute(template: str, params: dict, whole: bool) -> str:
    value = _PLACEHOLDER.sub(lambda m: as_text(params[m.group(1)]), template)
    return _checked(_PLACEHOLDER.findall(template)[0], value) if whole else value


def _checked(name: str, value: str) -> str:
    if value.startswith("-"):
        raise ToolError(f"parameter {name!r} may not start with '-' (it would be read as an option)")
    if "\0" in value:
        raise ToolError(f"parameter {name!r} contains a NUL byte")
    return value


class CommandTool(Tool):
    source = "command"

    def __init__(self, spec: ToolSpec, max_output_size: int):
        self.spec = spec
        self.name = spec.name
        assert spec.command, "a command tool has a command (the loader checks it)"
        self.description = spec.description or f"Runs the {spec.command.split()[0]} command."
        self.schema = spec.schema or {"type": "object"}
        self.max_output_size = max_output_size

    def initialize(self) -> None:
        program = shlex.split(self.spec.command or "")[0]
        if shutil.which(program, path=os.environ.get("PATH")) is None:
            raise ToolError(f"command {program!r} was not found on PATH")

    def child_environment(self) -> dict:
        names = BASE_ENV + tuple(self.spec.env)
        return {name: os.environ[name] for name in names if name in os.environ}

    def execute(self, params: dict, deadline: float) -> str:
        argv = build_argv(self.spec, params)
        timeout = seconds_left(deadline, self.spec.timeout)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=self.child_environment(), start_new_session=True, close_fds=True)
        except OSError as exc:
            raise ToolError(f"could not start {argv[0]}: {exc.strerror}") from None
        stdout, stderr_pipe = proc.stdout, proc.stderr
        assert stdout is not None and stderr_pipe is not None  # PIPE asked for
        out = _CappedReader(stdout, self.max_output_size)
        err = _CappedReader(stderr_pipe, _STDERR_TAIL, keep_tail=True)
        out.start()
        err.start()
        threading.Thread(target=self._feed, args=(proc, params), name=f"stdin-{self.name}", daemon=True).start()
        try:
            with taskscope.aborting(lambda: _kill_in_background(proc)):  # a cancel kills it as a timeout does
                code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise ToolTimeout(f"{self.name} did not finish within {timeout:.1f} s and was killed") from None
        except taskscope.TaskCanceled:  # before the wait began
            kill_group(proc)
            raise
        finally:
            out.join(_KILL_GRACE)
            err.join(_KILL_GRACE)
            stdout.close()
            stderr_pipe.close()
        taskscope.check()
        stderr = redact(err.data.decode("utf-8", "replace").strip())
        if code != 0:
            raise ToolError(f"{self.name} exited with status {code}" + (f": {stderr}" if stderr else ""))
        text = out.data.decode("utf-8", "replace")
        return text + _truncation_marker(self.max_output_size) if out.overflow else text

    @staticmethod
    def _feed(proc: subprocess.Popen, params: dict) -> None:
        """On its own thread, so the timeout also covers a program that never reads its stdin
        (a large write would block on the full pipe); killing the program ends the write."""
        stdin = proc.stdin
        assert stdin is not None  # PIPE asked for
        try:
            stdin.write(json.dumps(params, ensure_ascii=False).encode("utf-8"))
        except OSError:  # BrokenPipeError: the program does not read stdin
            pass
        finally:
            try:
                stdin.close()
            except OSError:  # what was buffered cannot be flushed to a program that is gone
                pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _kill_in_background(proc: subprocess.Popen) -> None:
    threading.Thread(target=kill_group, args=(proc,), name=f"kill-{proc.pid}", daemon=True).start()


def kill_group(proc: subprocess.Popen, grace: float = _KILL_GRACE) -> None:
    """SIGTERM the whole process group, then SIGKILL it: grandchildren that ignore SIGTERM or
    outlive the leader must not survive."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
