"""Built-in and command tools, including the attacks they must resist."""

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

from urllib3.util import connection as urllib3_connection

from agent2389_lib.config import AgentConfig, Secret, ToolSpec, load_config
from agent2389_lib.tools import build_registry
from agent2389_lib.tools.registry import ToolStartupError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PY = sys.executable


def registry(*specs, max_output_size=1048576):
    return build_registry(AgentConfig(agent_id="tester", tools=specs, max_output_size=max_output_size))


def run(reg, name, params, seconds=20.0):
    return reg.execute(name, params, time.monotonic() + seconds)


class LoopbackServer:
    """A tiny HTTP server: /page (HTML), /redirect?to=URL, /endless (streams forever)."""

    def __init__(self):
        self.sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("to=", 1)[1])
                    self.end_headers()
                elif self.path == "/endless":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.end_headers()
                    chunk = b"x" * 65536
                    try:
                        for _ in range(800):  # 50 MiB if nobody stops reading
                            self.wfile.write(chunk)
                            server.sent += len(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                else:
                    body = b"<html><head><style>p{}</style></head><body><h1>Title</h1><script>x()</script>" \
                           b"<p>Hello &amp; welcome</p></body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class LoopbackOnly:
    """Safety net: a test fails before any connection leaves the loopback range (no stray traffic)."""

    def __init__(self, case):
        self.real = urllib3_connection.create_connection
        patcher = mock.patch.object(urllib3_connection, "create_connection", side_effect=self.connect)
        patcher.start()
        case.addCleanup(patcher.stop)

    def connect(self, address, *args, **kwargs):
        if not address[0].startswith("127."):
            raise AssertionError(f"the guard let a connection to {address[0]} through")
        return self.real(address, *args, **kwargs)


class HttpRequestTests(unittest.TestCase):
    def setUp(self):
        self.server = LoopbackServer()
        self.addCleanup(self.server.close)
        LoopbackOnly(self)

    def tool(self, **options):
        return registry(ToolSpec(name="http_request", kind="builtin", options=options))

    def test_refuses_loopback_private_and_metadata(self):
        reg = self.tool()
        for url in (self.server.url + "/page", "http://10.0.0.1/", "http://169.254.169.254/latest/meta-data/",
                    "http://[::1]:9/", "http://localhost:9/"):
            with self.subTest(url=url):
                ok, content = run(reg, "http_request", {"url": url})
                self.assertFalse(ok)
                self.assertIn("refused:", content)
                self.assertIn("private, loopback or link-local", content)

    def test_allowed_host_and_text_extraction(self):
        reg = self.tool(allowed_hosts=["127.0.0.1"])
        ok, content = run(reg, "http_request", {"url": self.server.url + "/page", "extract_content": True})
        self.assertTrue(ok, content)
        result = json.loads(content)
        self.assertEqual((result["status"], result["body"]), (200, "Title\nHello & welcome"))

    def test_redirect_hop_rechecked(self):
        reg = self.tool(allowed_hosts=["127.0.0.1"])
        for target in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/admin"):
            with self.subTest(target=target):
                ok, content = run(reg, "http_request", {"url": f"{self.server.url}/redirect?to={target}"})
                self.assertFalse(ok)
                self.assertIn("refused:", content)

    def test_too_many_redirects(self):
        reg = self.tool(allowed_hosts=["127.0.0.1"], max_redirects=2)
        loop = f"{self.server.url}/redirect?to={self.server.url}/redirect?to={self.server.url}/redirect?to=/page"
        ok, content = run(reg, "http_request", {"url": loop})
        self.assertFalse(ok)
        self.assertIn("more than 2 redirects", content)

    def test_oversized_response_stopped_while_streaming(self):
        reg = self.tool(allowed_hosts=["127.0.0.1"], max_response_size=65536)
        tracemalloc.start()
        ok, content = run(reg, "http_request", {"url": self.server.url + "/endless"})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.assertTrue(ok, content)
        self.assertEqual(json.loads(content)["truncated_at_bytes"], 65536)
        self.assertEqual(len(json.loads(content)["body"]), 65536)
        self.assertLess(peak, 8 * 1024 * 1024)
        self.assertLess(self.server.sent, 20 * 1024 * 1024, "the download went on after the cap")

    def test_schema_rejects_other_schemes(self):
        ok, content = run(self.tool(), "http_request", {"url": "file:///etc/passwd"})
        self.assertFalse(ok)
        self.assertIn("invalid parameters for http_request: $.url", content)


class FileToolTests(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="allowed-")
        self.outside = tempfile.mkdtemp(prefix="outside-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.addCleanup(shutil.rmtree, self.outside, True)
        with open(os.path.join(self.outside, "secret.txt"), "w") as handle:
            handle.write("top secret")
        with open(os.path.join(self.root, "ok.txt"), "w") as handle:
            handle.write("fine")
        os.symlink(os.path.join(self.outside, "secret.txt"), os.path.join(self.root, "link.txt"))
        os.symlink(self.outside, os.path.join(self.root, "linkdir"))
        options = {"allowed_paths": [self.root], "max_size": 100}
        self.reg = registry(ToolSpec(name="file_read", kind="builtin", options=options),
                            ToolSpec(name="file_write", kind="builtin", options=options))
        self.reg.initialize()

    def test_read_inside(self):
        self.assertEqual(run(self.reg, "file_read", {"path": "ok.txt"}), (True, "fine"))
        self.assertEqual(run(self.reg, "file_read", {"path": os.path.join(self.root, "ok.txt")}), (True, "fine"))

    def test_escapes_refused(self):
        for path in ("../" + os.path.basename(self.outside) + "/secret.txt", "link.txt", "linkdir/secret.txt",
                     os.path.join(self.outside, "secret.txt"), "/etc/passwd"):
            with self.subTest(path=path):
                ok, content = run(self.reg, "file_read", {"path": path})
                self.assertFalse(ok)
                self.assertIn("outside the allowed paths", content)
                self.assertNotIn("top secret", content)
                ok, content = run(self.reg, "file_write", {"path": path, "content": "pwned"})
                self.assertFalse(ok)
        with open(os.path.join(self.outside, "secret.txt")) as handle:
            self.assertEqual(handle.read(), "top secret")

    def test_write_atomic_and_capped(self):
        self.assertTrue(run(self.reg, "file_write", {"path": "new.txt", "content": "hello"})[0])
        with open(os.path.join(self.root, "new.txt")) as handle:
            self.assertEqual(handle.read(), "hello")
        self.assertEqual([n for n in os.listdir(self.root) if n.startswith(".tmp-")], [])
        ok, content = run(self.reg, "file_write", {"path": "big.txt", "content": "x" * 101})
        self.assertFalse(ok)
        self.assertIn("exceeds max_size", content)

    def test_read_capped(self):
        with open(os.path.join(self.root, "long.txt"), "w") as handle:
            handle.write("y" * 500)
        ok, content = run(self.reg, "file_read", {"path": "long.txt"})
        self.assertTrue(ok)
        self.assertTrue(content.startswith("y" * 100) and content.endswith("[truncated at 100 bytes]"))

    def test_allowed_paths_required(self):
        reg = registry(ToolSpec(name="file_read", kind="builtin"))
        with self.assertRaises(ToolStartupError) as caught:
            reg.initialize()
        self.assertIn("allowed_paths", str(caught.exception))


class CommandToolTests(unittest.TestCase):
    argv_printer = f"{PY} -c 'import sys, json; print(json.dumps(sys.argv[1:]))'"

    def tool(self, command, schema=None, args=None, timeout=10.0, env=(), max_output_size=1048576):
        spec = ToolSpec(name="cmd", kind="command", command=command, schema=schema,
                        args=tuple(args) if args is not None else None, timeout=timeout, env=tuple(env))
        return registry(spec, max_output_size=max_output_size)

    def test_positional_arguments_in_schema_order_passed_literally(self):
        schema = {"type": "object", "properties": {"first": {"type": "string"}, "second": {"type": "string"}}}
        reg = self.tool(self.argv_printer, schema)
        ok, out = run(reg, "cmd", {"second": "$(id)", "first": "; rm -rf /"})
        self.assertTrue(ok, out)
        self.assertEqual(json.loads(out), ["; rm -rf /", "$(id)"])

    def test_option_injection_refused(self):
        schema = {"type": "object", "properties": {"url": {"type": "string"}}}
        for reg in (self.tool(self.argv_printer, schema), self.tool(self.argv_printer, schema, args=["{url}"])):
            ok, out = run(reg, "cmd", {"url": "-o/tmp/pwned"})
            self.assertFalse(ok)
            self.assertIn("may not start with '-'", out)
        self.assertFalse(os.path.exists("/tmp/pwned"))

    def test_args_template(self):
        reg = self.tool(self.argv_printer, args=["--fixed", "--name={name}", "{path}", "{missing}"])
        ok, out = run(reg, "cmd", {"name": "a b", "path": "x;y"})
        self.assertEqual(json.loads(out), ["--fixed", "--name=a b", "x;y"])

    def test_stdin_receives_parameters(self):
        reg = self.tool(f"{PY} -c 'import sys; print(sys.stdin.read())'", {"type": "object"}, args=[])
        ok, out = run(reg, "cmd", {"q": "é", "n": [1, 2]})
        self.assertEqual(json.loads(out), {"q": "é", "n": [1, 2]})

    def test_minimal_environment(self):
        script = f"{PY} -c 'import os, json; print(json.dumps(sorted(os.environ)))'"
        with mock.patch.dict(os.environ, {"OPENAI_API_KEY": "sk-leak-me", "ALLOWED_VAR": "1"}):
            ok, out = run(self.tool(script, args=[], env=["ALLOWED_VAR"]), "cmd", {})
        names = set(json.loads(out))
        self.assertNotIn("OPENAI_API_KEY", names)
        self.assertIn("ALLOWED_VAR", names)
        self.assertLessEqual(names - {"ALLOWED_VAR", "PATH", "LANG", "LC_CTYPE"}, set())

    def test_output_truncated_with_marker(self):
        reg = self.tool(f"{PY} -c 'print(\"x\" * 100000)'", args=[], max_output_size=1024)
        ok, out = run(reg, "cmd", {})
        self.assertTrue(ok)
        self.assertTrue(out.startswith("x" * 1024))
        self.assertTrue(out.endswith("...[output truncated at 1024 bytes]"))

    def test_failure_reports_stderr_tail(self):
        reg = self.tool(f"{PY} -c 'import sys; sys.stderr.write(\"bad thing api_key=abc123\"); sys.exit(3)'", args=[])
        ok, out = run(reg, "cmd", {})
        self.assertFalse(ok)
        self.assertIn("exited with status 3: bad thing api_key=[REDACTED]", out)

    def test_timeout_kills_grandchildren(self):
        pidfile = os.path.join(tempfile.mkdtemp(), "grandchild.pid")
        reg = self.tool("sh -c 'sleep 60 & echo $! > \"$0\"; wait'", args=["{pidfile}"], timeout=1.0,
                        schema={"type": "object", "properties": {"pidfile": {"type": "string"}}})
        started = time.monotonic()
        ok, out = run(reg, "cmd", {"pidfile": pidfile})
        self.assertFalse(ok)
        self.assertIn("did not finish within 1.0 s and was killed", out)
        self.assertLess(time.monotonic() - started, 6)
        with open(pidfile) as handle:
            pid = int(handle.read())
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertFalse(_alive(pid), "the grandchild survived the timeout")

    def test_timeout_covers_parameters_the_program_never_reads(self):
        """300 KB on stdin fill the pipe of a program that does not read it: the write must not
        hold the task past the timeout."""
        reg = self.tool("sleep 20", args=[], timeout=1.0, schema={"type": "object", "properties": {"blob": {"type": "string"}}})
        ok, out = run(reg, "cmd", {"blob": "b" * 300000})
        self.assertFalse(ok)
        self.assertIn("did not finish within 1.0 s and was killed", out)

    def test_missing_program_fails_initialize(self):
        with self.assertRaises(ToolStartupError) as caught:
            self.tool("no-such-program-xyz").initialize()
        self.assertIn("'no-such-program-xyz' was not found on PATH", str(caught.exception))


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            return "\nState:\tZ" not in handle.read()
    except FileNotFoundError:
        return False


class DeploymentGuideToolsTests(unittest.TestCase):
    """The guide's [[tools]] examples (http_get with curl) plus echo and python_script in the same form."""

    def test_examples_load_and_run(self):
        server = LoopbackServer()
        self.addCleanup(server.close)
        path = os.path.join(tempfile.mkdtemp(), "agent.toml")
        with open(os.path.join(DATA, "deployment-guide-agent.toml")) as handle:
            guide = handle.read()
        with open(path, "w") as handle:
            handle.write(guide + f"""
[[tools]]
name = "echo"
command = "echo"
timeout = 5
[tools.schema]
type = "object"
properties = {{ message = {{ type = "string" }} }}
required = ["message"]

[[tools]]
name = "python_script"
command = "{PY} -c 'import sys, json; print(json.load(sys.stdin)[\\"n\\"] * 2)'"
args = []
timeout = 10
[tools.schema]
type = "object"
properties = {{ n = {{ type = "integer" }} }}
""")
        env = {"OPENAI_API_KEY": "sk-x-123456", "MQTT_USERNAME": "u", "MQTT_PASSWORD": "p"}
        config = load_config(path, environ=env).config
        reg = build_registry(config)
        reg.initialize()
        self.assertEqual(run(reg, "http_get", {"url": server.url + "/page"})[1][:6], "<html>")
        self.assertEqual(run(reg, "echo", {"message": "hi there"}), (True, "hi there\n"))
        self.assertEqual(run(reg, "python_script", {"n": 21}), (True, "42\n"))
        ok, out = run(reg, "http_get", {"url": "not a uri"})
        self.assertFalse(ok)


class WebSearchTests(unittest.TestCase):
    def test_needs_key_at_startup(self):
        reg = registry(ToolSpec(name="web_search", kind="builtin"))
        with self.assertRaises(ToolStartupError) as caught:
            reg.initialize()
        self.assertIn("set SERPER_API_KEY", str(caught.exception))

    def test_serper_request(self):
        received = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                received.append((self.headers.get("X-API-KEY"), json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                body = json.dumps({"organic": [{"title": "T", "link": "https://x", "snippet": "S", "position": 1}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        self.addCleanup(httpd.server_close)
        self.addCleanup(httpd.shutdown)
        spec = ToolSpec(name="web_search", kind="builtin", secret=Secret("serper-key-1"),
                        options={"endpoint": f"http://127.0.0.1:{httpd.server_address[1]}/search"})
        reg = registry(spec)
        reg.initialize()
        ok, out = run(reg, "web_search", {"query": "rust", "num_results": 3})
        self.assertTrue(ok, out)
        self.assertEqual(json.loads(out), [{"title": "T", "link": "https://x", "snippet": "S"}])
        self.assertEqual(received, [("serper-key-1", {"q": "rust", "num": 3})])


class RegistryTests(unittest.TestCase):
    def test_schema_messages_name_the_path(self):
        schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}}}}
        reg = registry(ToolSpec(name="cmd", kind="command", command="true", schema=schema, args=()))
        ok, out = run(reg, "cmd", {"items": [1, "two"]})
        self.assertFalse(ok)
        self.assertIn("$.items[1]: 'two' is not of type 'integer'", out)

    def test_counters_hook(self):
        reg = registry(ToolSpec(name="echo", kind="builtin"))
        seen = []
        reg.events.subscribe(lambda event: seen.append((event.tool, event.ok, event.timed_out)))
        run(reg, "echo", {"message": "a"})
        run(reg, "echo", {"bad": 1})
        self.assertEqual(seen, [("echo", True, False)])  # a refused call never ran


if __name__ == "__main__":
    unittest.main()
