"""TLS with client certificates, broker authentication, secret hygiene, hostile input."""

import json
import os
import random
import subprocess
import sys
import tempfile
import unittest

from fake_llm import FakeOpenAI, Reply, Status
from support import AGENT_SCRIPT, AgentProcess, Mosquitto, Watcher, envelope, free_port, wait_until
from test_observability import http_get

AGENT = "agent-sec"
INPUT = f"/control/agents/{AGENT}/input"
STATUS = f"/control/agents/{AGENT}/status"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class Certificates:
    """The deployment guide's recipe: a CA, a client certificate for the agent; plus server certificates
    (with the subjectAltName modern clients require) and a second, unrelated CA."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="certs-")
        d = self.dir
        for ca in ("ca", "other-ca"):
            openssl("genrsa", "-out", f"{ca}.key", "2048", cwd=d)
            openssl("req", "-new", "-x509", "-key", f"{ca}.key", "-out", f"{ca}.crt", "-days", "365",
                    "-subj", f"/C=US/ST=CA/L=SF/O=Agent2389/CN=mqtt-{ca}",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
        self.server("server", "DNS:localhost,IP:127.0.0.1")
        self.server("wrong-name", "DNS:broker.example.com")
        openssl("genrsa", "-aes256", "-passout", "pass:key-pass-S3CRET-77", "-out", "agent-client.key", "2048", cwd=d)
        openssl("req", "-new", "-key", "agent-client.key", "-passin", "pass:key-pass-S3CRET-77", "-out",
                "agent-client.csr", "-subj", "/C=US/ST=CA/L=SF/O=Agent2389/CN=agent-001", cwd=d)
        with open(os.path.join(d, "client.ext"), "w") as handle:
            handle.write(self.LEAF + "extendedKeyUsage=clientAuth\n")
        openssl("x509", "-req", "-in", "agent-client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-out",
                "agent-client.crt", "-days", "365", "-CAcreateserial", "-extfile", "client.ext", cwd=d)

    # what RFC 5280 asks of a leaf certificate (Python 3.13 and newer refuse one without AKI)
    LEAF = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")

    def server(self, name, san):
        d = self.dir
        with open(os.path.join(d, f"{name}.ext"), "w") as handle:
            handle.write(f"{self.LEAF}extendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
        openssl("genrsa", "-out", f"{name}.key", "2048", cwd=d)
        openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/O=Agent2389/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-out", f"{name}.crt",
                "-days", "365", "-CAcreateserial", "-extfile", f"{name}.ext", cwd=d)

    def path(self, name):
        return os.path.join(self.dir, name)


class TlsTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.certs = Certificates()
        cls.brokers = {}
        for name in ("server", "wrong-name"):
            tls_port = free_port()
            broker = Mosquitto(extra_conf="\n".join([
                f"listener {tls_port} 127.0.0.1", f"cafile {cls.certs.path('ca.crt')}",
                f"certfile {cls.certs.path(name + '.crt')}", f"keyfile {cls.certs.path(name + '.key')}",
                "require_certificate true", "use_identity_as_username true", "tls_version tlsv1.2"])).start()
            broker.tls_port = tls_port
            cls.brokers[name] = broker

    @classmethod
    def tearDownClass(cls):
        for broker in cls.brokers.values():
            broker.cleanup()

    def agent(self, broker="server", host="localhost", **mqtt):
        broker = self.brokers[broker]
        settings = {"broker_url": f"mqtts://{host}:{broker.tls_port}", "ca_cert_path": self.certs.path("ca.crt"),
                    "client_cert_path": self.certs.path("agent-client.crt"),
                    "client_key_path": self.certs.path("agent-client.key"),
                    "client_key_password": "${KEY_PASSWORD}"}
        settings.update(mqtt)
        agent = AgentProcess(broker, AGENT, mqtt={k: v for k, v in settings.items() if v is not None},
                             env={"KEY_PASSWORD": "key-pass-S3CRET-77"})
        self.addCleanup(agent.stop)
        return agent

    def test_mutual_tls_answers_a_task(self):
        broker = self.brokers["server"]
        progress = f"/control/agents/{AGENT}/progress/#"
        watcher = Watcher(broker.port, STATUS, "/conversations/#", progress)  # the plain listener, for the test's eyes
        self.addCleanup(watcher.close)
        agent = self.agent().start_and_wait_available(watcher)
        task = envelope(AGENT, cid="c-tls")
        watcher.publish(INPUT, task)
        (reply,) = watcher.wait_for(f"/conversations/c-tls/{AGENT}")
        self.assertEqual(reply["task_id"], task["task_id"])
        # progress events go into the TLS connection's send buffer beside paho's packets
        events = watcher.wait_for(progress, lambda p: p["event_type"] == "TaskComplete")
        self.assertEqual(events[0]["task_id"], task["task_id"])
        self.assertEqual([p["event_type"] for p in watcher.matching(progress)],
                         ["TaskStart", "LlmRequest", "LlmResponse", "TaskComplete"])
        self.assertIn("New client connected", broker.log())
        self.assertIn("u'agent-001'", broker.log())  # identity taken from the certificate
        self.assertNotIn("key-pass-S3CRET-77", agent.log())

    def test_refusals_are_clear(self):
        cases = [
            ({"ca_cert_path": self.certs.path("other-ca.crt")}, "server", "not trusted (unknown CA)"),
            ({}, "wrong-name", "does not match the host name"),
            ({"client_cert_path": None, "client_key_path": None, "client_key_password": None}, "server",
             "requires a client certificate"),
        ]
        for mqtt, broker, expected in cases:
            with self.subTest(expected):
                agent = self.agent(broker, **mqtt).start()
                agent.wait_log(expected, timeout=20)
                wait_until(lambda: agent.metric("mqtt.connection_failures") >= 4, 30, "retries")
                # a cause is logged when it changes, the same one again once a minute
                self.assertLess(agent.log().count("TLS with broker"), 3)
                self.assertNotIn("Traceback", agent.log())
                self.assertIsNone(agent.proc.poll(), "the agent keeps retrying")
                agent.stop()

    def test_insecure_skip_verify_accepts_name_mismatch_with_warning(self):
        broker = self.brokers["wrong-name"]
        watcher = Watcher(broker.port, STATUS)
        self.addCleanup(watcher.close)
        agent = self.agent("wrong-name", tls_insecure_skip_verify=True).start_and_wait_available(watcher)
        self.assertIn("TLS certificate and host name verification is OFF", agent.log())


class PasswordTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = Mosquitto(anonymous=False)
        password_file = os.path.join(cls.broker.dir, "passwd")
        subprocess.run(["mosquitto_passwd", "-b", "-c", password_file, "agent", "mqtt-PASS-secret-42"], check=True,
                       capture_output=True)
        subprocess.run(["mosquitto_passwd", "-b", password_file, "watcher", "watcher-pass"], check=True,
                       capture_output=True)
        cls.broker.extra_conf = f"password_file {password_file}"
        cls.broker.start()

    @classmethod
    def tearDownClass(cls):
        cls.broker.cleanup()

    def test_credentials(self):
        watcher = Watcher(self.broker.port, STATUS, "/conversations/#", username="watcher", password="watcher-pass")
        self.addCleanup(watcher.close)
        good = AgentProcess(self.broker, AGENT, env={"MQTT_USERNAME": "agent", "MQTT_PASSWORD": "mqtt-PASS-secret-42"})
        self.addCleanup(good.stop)
        good.start_and_wait_available(watcher)
        good.stop()
        bad = AgentProcess(self.broker, AGENT, env={"MQTT_USERNAME": "agent", "MQTT_PASSWORD": "wrong-password-99"})
        self.addCleanup(bad.stop)
        bad.start()
        refusal = "refused the output connection: Not authorized: the broker does not allow this client to connect"
        wait_until(lambda: bad.metric("mqtt.connection_failures") >= 2, 20, "the refusal and a retry")
        self.assertEqual(bad.log().count(refusal), 1)  # then one line a minute, with a count
        self.assertEqual(http_get(bad.env["HEALTH_PORT"], "/ready")[0], 503)
        self.assertNotIn("wrong-password-99", bad.log())


class SecretHygieneTests(unittest.TestCase):
    """Recognizable secrets through every output channel, at DEBUG with spans on."""

    OPENAI_KEY = "sk-HYGIENE-openai-key-5566"
    MQTT_PASSWORD = "mqtt-HYGIENE-pass-7788"

    def test_no_secret_anywhere(self):
        broker = Mosquitto().start()
        self.addCleanup(broker.cleanup)
        fake = FakeOpenAI(api_key=self.OPENAI_KEY)
        self.addCleanup(fake.close)
        everything = Watcher(broker.port, "#")
        self.addCleanup(everything.close)
        env_probe = f"{sys.executable} -c 'import os, json; print(json.dumps(dict(os.environ)))'"
        agent = AgentProcess(broker, AGENT, env={"OPENAI_API_KEY": self.OPENAI_KEY, "MQTT_USERNAME": "u",
                                                 "MQTT_PASSWORD": self.MQTT_PASSWORD, "LOG_SPANS": "true"},
                             llm={"provider": "openai", "base_url": fake.base_url},
                             tools={"envdump": {"impl": "external", "command": env_probe, "args": []}})
        self.addCleanup(agent.stop)
        agent.start_and_wait_available(everything)
        echoed = {"error": {"message": f"Invalid request with key {self.OPENAI_KEY} (Bearer {self.OPENAI_KEY})",
                            "type": "invalid_request_error", "code": None}}
        fake.script = [Reply(tool_calls=[("envdump", {})]), Status(400, body=echoed)]
        everything.publish(INPUT, envelope(AGENT, cid="c-secret"))
        (error,) = everything.wait_for(f"/conversations/c-secret/{AGENT}")
        self.assertEqual(error["error"]["code"], "llm_error")
        self.assertIn("[REDACTED]", error["error"]["message"])
        port = agent.env["HEALTH_PORT"]
        channels = {
            "published messages": "\n".join(repr(m.payload) for m in everything.messages),
            "/health": http_get(port, "/health")[2], "/metrics": http_get(port, "/metrics")[2],
            "/metrics/prometheus": http_get(port, "/metrics/prometheus")[2],
            "tool environment": json.dumps(fake.completions()[-1]["body"]["messages"]),
            "check-config": subprocess.run([sys.executable, AGENT_SCRIPT, "check-config", "--config", agent.config_path],
                                           env=agent.env, capture_output=True, text=True, timeout=30).stdout,
        }
        agent.stop()
        channels["log"] = agent.log()
        self.assertIn("span start", channels["log"])
        for name, text in channels.items():
            for secret in (self.OPENAI_KEY, self.MQTT_PASSWORD):
                self.assertNotIn(secret, text, f"{secret} leaked into {name}")


def hostile_payloads(count, seed=2389):
    """Seeded hostile input: deep nesting, huge strings, invalid UTF-8, wrong types, junk."""
    rng = random.Random(seed)
    task_id = "123e4567-e89b-12d3-a456-42661417400"
    fields = ["task_id", "conversation_id", "topic", "instruction", "input", "next", "version", "context",
              "routing_trace"]
    junk_values = [None, True, 0, -1, 1e308, "", "x" * 1000, [], {}, [[[]]], {"a": {"b": {}}}, "\u0000", "+", "#",
                   "/", "a/b", "\ud7ff", 10 ** 30]
    payloads = [b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000, b"\xff\xfe\xfd" * 1000,
                b"x" * 300000, json.dumps({"task_id": task_id + "0", "conversation_id": "c", "topic": INPUT,
                                           "instruction": "x" * 200000, "input": None}).encode()]
    while len(payloads) < count:
        kind = rng.randrange(6)
        if kind == 0:
            payloads.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        elif kind == 1:
            payloads.append(json.dumps(rng.choice(junk_values)).encode())
        else:
            msg = {f: rng.choice(junk_values) for f in rng.sample(fields, rng.randrange(len(fields)))}
            if rng.random() < 0.5:
                msg.update(task_id=f"{task_id}{rng.randrange(10)}", conversation_id=f"fz{rng.randrange(50)}")
            if rng.random() < 0.3:
                msg["input"] = json.loads("[" * 500 + "]" * 500)
            if rng.random() < 0.2:
                msg["next"] = {"topic": rng.choice(["/x", INPUT, 5, None]), "next": rng.choice([None, "bad", {}])}
            payloads.append(json.dumps(msg).encode())
    return payloads


class HostileInputTests(unittest.TestCase):
    def test_fuzz_5000_payloads_with_valid_tasks_mixed_in(self):
        broker = Mosquitto().start()
        self.addCleanup(broker.cleanup)
        watcher = Watcher(broker.port, STATUS, "/conversations/#")
        self.addCleanup(watcher.close)
        agent = AgentProcess(broker, AGENT, env={"LOG_LEVEL": "INFO"})
        self.addCleanup(agent.stop)
        agent.start_and_wait_available(watcher)
        valid = [envelope(AGENT, cid="c-valid") for _ in range(100)]
        infos = []
        for index, payload in enumerate(hostile_payloads(5000)):
            infos.append(watcher.publish(INPUT, payload, wait=False))
            if index % 50 == 0:
                infos.append(watcher.publish(INPUT, valid[index // 50], wait=False))
        for info in infos:
            info.wait_for_publish(60)
        replies = wait_until(lambda: self._answered(watcher, valid), 120, "all valid tasks answered")
        self.assertEqual(len(replies), 100)
        self.assertIsNone(agent.proc.poll(), "the agent died")
        codes = {"tool_execution_failed", "llm_error", "invalid_input", "pipeline_depth_exceeded", "internal_error"}
        for payload in watcher.matching("/conversations/#"):
            self.assertIsInstance(payload, dict)
            if "error" in payload:
                self.assertEqual(set(payload) - {"usage"}, {"error", "task_id"})  # usage once the envelope was read
                self.assertIn(payload["error"]["code"], codes)
                self.assertLessEqual(len(payload["error"]["message"].encode()), 500)
            else:
                self.assertEqual(set(payload), {"response", "task_id", "usage"})
        peak_mb = agent.peak_rss_kb() / 1024
        print(f"\nfuzz: 5000 hostile payloads, 100 valid tasks answered, agent peak RSS {peak_mb:.1f} MB")
        self.assertLess(peak_mb, 100)
        self.assertEqual(http_get(agent.env["HEALTH_PORT"], "/live")[0], 200)

    @staticmethod
    def _answered(watcher, valid):
        wanted = {t["task_id"] for t in valid}
        got = [r for r in watcher.matching("/conversations/c-valid/+") if r.get("task_id") in wanted]
        return got if {r["task_id"] for r in got} == wanted else None


if __name__ == "__main__":
    unittest.main()
