"""The LLM client's HTTP: keep-alive connections, servers that close them, compressed answers,
the environment's proxy and CA bundle, TLS failures."""

import base64
import gzip
import http.client
import json
import os
import select
import socket
import ssl
import threading
import time
import unittest
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from unittest import mock

from fake_llm import FakeOpenAI, Raw
from support import Mosquitto, free_port, wait_until
from test_first_hour import cli
from test_llm import OPENAI_KEY, llm_settings, loop_for, task
from test_security import Certificates

from agent2389_lib.config import AgentConfig, LlmSettings
from agent2389_lib.errors import LlmError
from agent2389_lib.llm import build_agent_loop
from agent2389_lib.llm.http import ProviderHttp
from agent2389_lib.events import Events, counted_in
from agent2389_lib.metrics import Metrics

CONNECTION_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                        "ALL_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


class Proxy:
    """A forward proxy on a free loopback port: absolute-form requests for http, CONNECT tunnels
    for https. Records what it was asked."""

    def __init__(self, tls: Optional[ssl.SSLContext] = None):
        """`tls`: the proxy itself speaks https (an https:// proxy URL)."""
        self.requests: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _record(self) -> None:
                proxy.requests.append({"method": self.command, "target": self.path, "headers": dict(self.headers)})

            def do_CONNECT(self) -> None:
                self._record()
                host, _, port = self.path.rpartition(":")
                upstream = socket.create_connection((host, int(port)))
                self.send_response(200, "Connection established")
                self.end_headers()
                self.wfile.flush()
                sockets = [self.connection, upstream]
                while True:
                    readable, _, _ = select.select(sockets, [], [], 10)
                    if not readable:
                        break
                    data = readable[0].recv(65536)
                    if not data:
                        break
                    (upstream if readable[0] is self.connection else self.connection).sendall(data)
                upstream.close()
                self.close_connection = True

            def do_POST(self) -> None:
                self._record()
                url = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                upstream = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
                forwarded = {k: v for k, v in self.headers.items() if k.lower() != "proxy-authorization"}
                upstream.request(self.command, url.path, body, forwarded)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def server_tls() -> tuple:
    """Test certificates, and a server context with the certificate for 127.0.0.1."""
    certs = Certificates()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.path("server.crt"), certs.path("server.key"))
    return certs, context


class HttpCase(unittest.TestCase):
    def fake(self, **options) -> FakeOpenAI:
        fake = FakeOpenAI(api_key=OPENAI_KEY, **options)
        self.addCleanup(fake.close)
        return fake

    def environment(self, **variables) -> None:
        """Proxy and CA variables for this test only (none from the machine running it)."""
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in CONNECTION_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(variables)

    def think(self, fake: FakeOpenAI) -> str:
        return loop_for(llm_settings(fake, "openai", OPENAI_KEY), ()).think(task(), time.monotonic() + 20)


class ConnectionTests(HttpCase):
    def setUp(self):
        self.environment()

    def test_a_thread_keeps_its_connection_alive(self):
        fake = self.fake()
        loop = loop_for(llm_settings(fake, "openai", OPENAI_KEY), ())
        for _ in range(5):
            loop.think(task(), time.monotonic() + 20)
        requests = fake.completions()
        self.assertEqual(len({r["client_port"] for r in requests}), 1, "one connection for five requests")
        self.assertTrue(requests[0]["headers"]["User-Agent"].startswith("agent2389/"))
        self.assertEqual(requests[0]["headers"]["Accept-Encoding"], "identity")

    def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_retry(self):
        fake = self.fake()
        fake.close_after_response = True
        metrics = Metrics("tester", 1)
        loop = build_agent_loop(AgentConfig(agent_id="tester", llm=llm_settings(fake, "openai", OPENAI_KEY)),
                                events=Events(counted_in(metrics)))
        for count in range(1, 4):
            self.assertEqual(loop.think(task(), time.monotonic() + 20), "fake answer")
            wait_until(lambda: fake.connections_closed >= count, 10, "the server closed the connection")
        self.assertEqual(len({r["client_port"] for r in fake.completions()}), 3)
        (stats,) = metrics.llm.values()
        self.assertEqual((stats.requests, stats.retries, stats.errors), (3, 0, 0), "no request failed on a dead connection")

    def test_a_compressed_answer_is_understood(self):
        fake = self.fake()
        body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "model-x",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": "compressed", "refusal": None}}]}
        fake.script = [Raw([gzip.compress(json.dumps(body).encode())], headers={"Content-Encoding": "gzip"})]
        self.assertEqual(self.think(fake), "compressed")


class ProxyTests(HttpCase):
    def setUp(self):
        self.proxy = Proxy()
        self.addCleanup(self.proxy.close)

    def test_http_proxy_with_credentials(self):
        fake = self.fake()
        proxy = urllib.parse.urlsplit(self.proxy.url)
        self.environment(HTTP_PROXY=f"http://relay:p%40ss@{proxy.netloc}")
        self.assertEqual(self.think(fake), "fake answer")
        (request,) = self.proxy.requests
        self.assertEqual(request["target"], f"{fake.base_url}/chat/completions")
        self.assertEqual(base64.b64decode(request["headers"]["Proxy-Authorization"].split()[1]), b"relay:p@ss")
        self.assertNotIn("Proxy-Authorization", fake.completions()[0]["headers"], "credentials stay at the proxy")

    def test_no_proxy_goes_direct(self):
        """Host names, and CIDR blocks (which the standard library's proxy bypass does not know)."""
        fake = self.fake()
        for no_proxy in ("localhost,127.0.0.1", "10.0.0.0/8,127.0.0.0/8"):
            with self.subTest(no_proxy=no_proxy):
                self.environment(http_proxy=self.proxy.url, no_proxy=no_proxy)
                self.assertEqual(self.think(fake), "fake answer")
                self.assertEqual(self.proxy.requests, [])

    def test_https_through_a_connect_tunnel_with_the_ca_bundle_from_the_environment(self):
        certs, context = server_tls()
        fake = self.fake(tls=context)
        self.environment(HTTPS_PROXY=self.proxy.url, REQUESTS_CA_BUNDLE=certs.path("ca.crt"))
        self.assertEqual(self.think(fake), "fake answer")
        self.assertEqual([(r["method"], r["target"]) for r in self.proxy.requests],
                         [("CONNECT", f"127.0.0.1:{fake.port}")])

        self.environment()  # the system's trust store does not know the test CA
        with self.assertRaises(LlmError) as caught:
            loop_for(llm_settings(fake, "openai", OPENAI_KEY), ()).chain.verify()
        self.assertIn(f"{fake.base_url}/models is unreachable: TLS certificate verification failed",
                      str(caught.exception))

        self.environment(CURL_CA_BUNDLE=certs.path("ca.crt"))  # requests' other variable
        loop_for(llm_settings(fake, "openai", OPENAI_KEY), ()).chain.verify()

    def test_https_proxy(self):
        certs, context = server_tls()
        fake = self.fake(tls=context)
        proxy = Proxy(tls=context)  # TLS to the proxy, and TLS to the API inside the tunnel
        self.addCleanup(proxy.close)
        self.environment(HTTPS_PROXY=proxy.url, REQUESTS_CA_BUNDLE=certs.path("ca.crt"))
        self.assertEqual(self.think(fake), "fake answer")
        self.assertEqual([(r["method"], r["target"]) for r in proxy.requests], [("CONNECT", f"127.0.0.1:{fake.port}")])

    def test_all_proxy_is_honoured(self):
        fake = self.fake()
        self.environment(ALL_PROXY=self.proxy.url)
        self.assertEqual(self.think(fake), "fake answer")
        self.assertEqual([r["target"] for r in self.proxy.requests], [f"{fake.base_url}/chat/completions"])

    def test_a_socks_proxy_without_its_extra_names_the_extra(self):
        self.environment(HTTPS_PROXY="socks5://relay:s0cks-pass@127.0.0.1:1080")
        with self.assertRaises(LlmError) as caught:
            ProviderHttp("openai", "https://api.openai.com/v1", {}, LlmSettings(provider="openai"), lambda body: "", None)
        self.assertIn("the environment names the SOCKS proxy socks5://127.0.0.1:1080 for https://api.openai.com/v1",
                      str(caught.exception))
        self.assertIn("pip install -e '.[socks]'", str(caught.exception))
        self.assertNotIn("s0cks-pass", str(caught.exception))

    def test_a_proxy_password_appears_nowhere(self):
        """The agent starts its checks through an https:// proxy (no longer refused) that cannot be
        reached: it stops at startup naming the proxy, never its password."""
        broker = Mosquitto().start()
        self.addCleanup(broker.cleanup)
        result = cli("run", env={"AGENT_ID": "proxied", "LLM_PROVIDER": "openai", "OPENAI_API_KEY": OPENAI_KEY,
                                 "OPENAI_BASE_URL": "https://api.example.com/v1", "LOG_LEVEL": "DEBUG",
                                 "HTTPS_PROXY": f"https://bob:hunter2@127.0.0.1:{free_port()}",
                                 "MQTT_PORT": str(broker.port), "HEALTH_PORT": str(free_port())}, timeout=60)
        self.assertEqual(result.returncode, 1, result.stderr)  # like every startup failure
        self.assertIn("openai endpoint https://api.example.com/v1/models is unreachable: cannot reach the proxy: "
                      "Connection refused", result.stderr)
        self.assertNotIn("hunter2", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
