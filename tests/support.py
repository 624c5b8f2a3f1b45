"""Test helpers: a real mosquitto on a free loopback port, a watching MQTT client, agent processes.

Nothing here sleeps to synchronize: every wait is on a condition with a deadline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import unittest
import uuid
from typing import Any, Callable, Optional, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests")
AGENT_SCRIPT = os.path.join(ROOT, "agent2389.py")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def program(name: str) -> str:
    """The path of an external program a test starts: the running interpreter's environment first
    (what the test extra installs there, e.g. hadolint), then PATH, then the sbin directories
    (Debian puts mosquitto in /usr/sbin, off an ordinary user's PATH). A test must not pass only
    because a copy installed by hand elsewhere happens to be on PATH."""
    search = [sysconfig.get_path("scripts"), os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"]
    found = shutil.which(name, path=os.pathsep.join(search))
    if found is None:
        raise AssertionError(f"{name} is not installed (searched {os.pathsep.join(search)}); "
                             f"bash .ci/run installs everything the tests start")
    return found


def installed(name: str) -> str:
    """A program the test setup installs into the running interpreter's environment (.ci/run: the
    test extra, and npm packages with that environment as their prefix); never one that merely
    happens to be on PATH."""
    path = os.path.join(sysconfig.get_path("scripts"), name)
    if not os.access(path, os.X_OK):
        raise AssertionError(f"{name} is not installed in {os.path.dirname(path)}; bash .ci/run installs it")
    return path


def mcp_python() -> str:
    """An interpreter with the `mcp` SDK: this one, or under Python 3.9 (which the SDK does not
    support) the `python-mcp` that .ci/run links into this environment from a newer one."""
    return sys.executable if importlib.util.find_spec("mcp") is not None else installed("python-mcp")


def http_server(case: unittest.TestCase, argv: list, env: dict, port: int) -> subprocess.Popen:
    """A server process listening on `port` (stopped at cleanup), once it accepts connections."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=log)
    case.addCleanup(log.close)
    case.addCleanup(proc.wait, 10)
    case.addCleanup(proc.terminate)

    def accepts() -> bool:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"{argv[0]} exited: {log.read()[-2000:]!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(accepts, 30, f"{os.path.basename(argv[0])} to listen on {port}")
    return proc


def sdk_server(case: unittest.TestCase, *options: str) -> str:
    """The URL of an MCP server built with the official SDK (tests/mcp_sdk_server.py), over streamable HTTP."""
    port = free_port()
    http_server(case, [mcp_python(), os.path.join(HERE, "mcp_sdk_server.py"), str(port), *options], {}, port)
    return f"http://127.0.0.1:{port}/mcp"


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(part) for part in handle.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on every interface, picked below the kernel's ephemeral range: outgoing
    connections take their local ports from that range, so one of them could take a port
    between this check and the bind of the broker or agent it is for (an agent then stops at
    startup: health port in use)."""
    low, _ = _ephemeral_ports()
    for _ in range(200):
        port = random.randint(max(1024, low - 16000), low - 1)
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the whole range below is taken: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeClock:
    """A clock a test moves by hand (`clock.now += 5`), for the decisions that take one."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test with `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}  # what an answer carries without LLM spend


def read_pids(path: str) -> list:
    """The process ids a test's program wrote to `path`, one per line (none before it wrote)."""
    try:
        with open(path) as handle:
            return [int(text) for text in handle.read().split()]
    except FileNotFoundError:
        return []


def process_gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie has: only its parent's wait is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def new_task_id() -> str:
    return str(uuid.uuid4())


def envelope(agent_id: str, *, task_id: Optional[str] = None, cid: str = "conv1", instruction: Optional[str] = "Do it",
             input: Any = None, next: Any = None, **extra: Any) -> dict:
    msg = {"task_id": task_id or new_task_id(), "conversation_id": cid,
           "topic": f"/control/agents/{agent_id}/input", "instruction": instruction, "input": input, "next": next}
    msg.update(extra)
    return msg


class _Broker:
    """A broker process of a test's own on a free loopback port; its log explains a failed start."""

    name = "broker"
    proc: Optional[subprocess.Popen]
    port: int
    dir: str
    log_path: str

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        raise NotImplementedError

    def log(self, tail: Optional[int] = 4000) -> str:
        """The end of the broker's log (the whole of it with tail=None)."""
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()[-tail:] if tail else handle.read()
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class Mosquitto(_Broker):
    """A mosquitto broker of our own, on a free port, optionally persistent across restarts."""

    name = "mosquitto"

    def __init__(self, persistence: bool = False, extra_conf: str = "", anonymous: bool = True):
        self.anonymous = anonymous
        self.dir = tempfile.mkdtemp(prefix="mosq-")
        self.port = free_port()
        self.persistence = persistence
        self.extra_conf = extra_conf
        self.proc: Optional[subprocess.Popen] = None
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        self.log_path = os.path.join(self.dir, "mosquitto.log")

    def _write_conf(self) -> None:
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {str(self.anonymous).lower()}",
                 "set_tcp_nodelay true",
                 "max_queued_messages 0", f"persistence {'true' if self.persistence else 'false'}",
                 f"persistence_location {self.dir}/", f"log_dest file {self.dir}/mosquitto.log",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if os.geteuid() == 0:
            lines.append("user root")
        with open(self.conf, "w") as handle:
            handle.write("\n".join(lines) + "\n" + self.extra_conf + "\n")

    def start(self) -> "Mosquitto":
        self._write_conf()
        self.proc = subprocess.Popen([program("mosquitto"), "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._accepts, 10, f"mosquitto to listen on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class _JavaOrErlangBroker(_Broker):
    """A broker started as a plain process group in a temporary directory, on free ports."""

    startup_seconds = 90.0

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"{self.name}-")
        self.port = free_port()
        self.proc = None
        self.log_path = os.path.join(self.dir, "out.log")

    def command(self) -> tuple[list, dict]:
        raise NotImplementedError

    def start(self) -> "_JavaOrErlangBroker":
        argv, env = self.command()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, env={**base_env(), "HOME": self.dir, **env}, cwd=self.dir, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._accepts, self.startup_seconds, f"{self.name} to take MQTT connections on port {self.port}",
                   interval=0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


ACTIVEMQ_HOME = "/usr/share/activemq"
ACTIVEMQ_MQTT_JARS = ("mqtt-client", "hawtdispatch-transport", "hawtdispatch", "hawtbuf", "activemq-mqtt")


class ActiveMQ(_JavaOrErlangBroker):
    """ActiveMQ Classic (Amazon MQ's engine) with an MQTT transport connector and KahaDB."""

    name = "activemq"

    def command(self) -> tuple[list, dict]:
        os.makedirs(os.path.join(self.dir, "lib"), exist_ok=True)
        for jar in ACTIVEMQ_MQTT_JARS:  # the MQTT transport needs these on the broker's class path
            os.symlink(f"/usr/share/java/{jar}.jar", os.path.join(self.dir, "lib", f"{jar}.jar"))
        with open(os.path.join(self.dir, "activemq.xml"), "w") as handle:
            handle.write(f"""<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans
  http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <broker xmlns="http://activemq.apache.org/schema/core" useJmx="false" brokerName="test"
          dataDirectory="{self.dir}/data">
    <persistenceAdapter><kahaDB directory="{self.dir}/data/kahadb"/></persistenceAdapter>
    <transportConnectors>
      <transportConnector name="mqtt" uri="mqtt://127.0.0.1:{self.port}"/>
    </transportConnectors>
  </broker>
</beans>
""")
        with open(os.path.join(self.dir, "log4j.properties"), "w") as handle:
            handle.write("log4j.rootLogger=WARN, out\nlog4j.appender.out=org.apache.log4j.ConsoleAppender\n"
                         "log4j.appender.out.layout=org.apache.log4j.PatternLayout\n"
                         "log4j.appender.out.layout.ConversionPattern=%d %-5p %c - %m%n\n")
        argv = ["java", "-Xmx256M", f"-Dlog4j.configuration=file:{self.dir}/log4j.properties",
                f"-Dactivemq.home={ACTIVEMQ_HOME}", f"-Dactivemq.base={self.dir}", f"-Dactivemq.conf={self.dir}",
                f"-Dactivemq.data={self.dir}/data", "-jar", f"{ACTIVEMQ_HOME}/bin/activemq.jar", "start",
                f"xbean:file:{self.dir}/activemq.xml"]
        return argv, {}


class RabbitMQ(_JavaOrErlangBroker):
    """RabbitMQ with the rabbitmq_mqtt plugin; its own node name, epmd and distribution ports."""

    name = "rabbitmq"

    def command(self) -> tuple[list, dict]:
        self.epmd_port = free_port()
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as handle:
            handle.write(f"listeners.tcp.default = 127.0.0.1:{free_port()}\n"
                         f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
                         "mqtt.allow_anonymous = true\nloopback_users = none\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as handle:
            handle.write("[rabbitmq_mqtt].\n")
        env = {"RABBITMQ_NODENAME": f"rabbit-{os.path.basename(self.dir)}@localhost",
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_DIST_PORT": str(free_port()),
               "ERL_EPMD_PORT": str(self.epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
               "RABBITMQ_MNESIA_BASE": f"{self.dir}/mnesia", "RABBITMQ_LOG_BASE": f"{self.dir}/log",
               "RABBITMQ_LOGS": "-", "RABBITMQ_CONFIG_FILE": f"{self.dir}/rabbitmq.conf",
               "RABBITMQ_ENABLED_PLUGINS_FILE": f"{self.dir}/enabled_plugins", "RABBITMQ_PID_FILE": f"{self.dir}/pid"}
        return ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env

    def stop(self) -> None:
        super().stop()
        if getattr(self, "epmd_port", None):  # erl started an epmd daemon on our port; it outlives the node
            subprocess.run(["epmd", "-kill"], env={**base_env(), "ERL_EPMD_PORT": str(self.epmd_port)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
            self.epmd_port = None


def _shut_down(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _packet_size(data: bytes) -> Optional[int]:
    """The length of the MQTT packet at the start of `data` (fixed header included), or None if
    it is not all there yet."""
    remaining, shift = 0, 0
    for index in range(1, min(len(data), 5)):
        remaining |= (data[index] & 0x7F) << shift
        shift += 7
        if not data[index] & 0x80:
            size = index + 1 + remaining
            return size if len(data) >= size else None
    return None


class ClosingProxy:
    """A TCP relay on a free loopback port in front of a broker: it closes the first
    `close_first` connections as soon as it accepts them (a load balancer without a backend yet),
    or with `after_connect` once it read their CONNECT (a broker that refuses MQTT 5 by closing),
    and relays the rest; `drop_all()` cuts every relayed connection (the balancer restarting).
    With `cut_before` (an MQTT packet type, e.g. 7 for PUBCOMP) it cuts the connection instead of
    relaying the first such packet from the broker: a connection lost just before that packet."""

    def __init__(self, target_port: int, close_first: int, after_connect: bool = False,
                 cut_before: Optional[int] = None):
        self.target_port = target_port
        self.to_close = close_first
        self.after_connect = after_connect
        self.cut_before = cut_before
        self.closed = 0
        self.to_broker = threading.Event()  # cleared: what clients send waits in the relay (a broker that stalls)
        self.to_broker.set()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self.to_close > 0:
                    self.to_close -= 1
                    self.closed += 1
                    if self.after_connect:
                        conn.settimeout(10)
                        conn.recv(65536)
                    conn.close()
                    continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (conn, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((conn, upstream))
            threading.Thread(target=self._pump, args=(conn, upstream, self.to_broker), daemon=True).start()
            from_broker = self._pump if self.cut_before is None else self._pump_packets
            threading.Thread(target=from_broker, args=(upstream, conn), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, flowing: Optional[threading.Event] = None) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if flowing is not None:
                    flowing.wait()
                target.sendall(data)
        except OSError:
            pass
        _shut_down(source, target)

    def _pump_packets(self, source: socket.socket, target: socket.socket) -> None:
        """Relays whole packets, to cut the connection before the first of type `cut_before`."""
        buffer = b""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                buffer += data
                while (size := _packet_size(buffer)) is not None:
                    if buffer[0] >> 4 == self.cut_before:
                        self.cut_before = None  # once
                        raise OSError("cut")
                    target.sendall(buffer[:size])
                    buffer = buffer[size:]
        except OSError:
            pass
        _shut_down(source, target)

    def drop_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            _shut_down(*pair)
            for sock in pair:
                sock.close()

    def close(self) -> None:
        self._listener.close()
        self.drop_all()


class Watcher:
    """A paho client that records every message on its subscriptions and can publish."""

    def __init__(self, port: int, *topics: str, username: Optional[str] = None, password: Optional[str] = None,
                 protocol: str = "5", qos: int = 1):
        """Persistent session, resubscribing on every connect: nothing is missed across broker restarts."""
        self.qos = qos
        self.messages: list[mqtt.MQTTMessage] = []
        self.parsed: list[tuple[str, Any]] = []
        self.topics = topics
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        v5 = protocol == "5"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                  **({} if v5 else {"clean_session": False}))
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.max_inflight_messages_set(1000)
        if username:
            self.client.username_pw_set(username, password)
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
            self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=props)
        else:
            self.client.connect("127.0.0.1", port, 30)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("watcher could not subscribe")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.topics:
            client.subscribe([(t, self.qos) for t in self.topics])
        else:
            self._subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            payload = json.loads(message.payload)
        except ValueError:
            payload = message.payload
        with self._cond:
            self.messages.append(message)
            self.parsed.append((message.topic, payload))
            self._cond.notify_all()

    def publish(self, topic: str, payload: Any, retain: bool = False, qos: int = 1, wait: bool = True,
                expiry: Optional[int] = None):
        """`expiry`: an MQTT 5 Message Expiry Interval, in seconds."""
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        properties = None
        if expiry is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = expiry
        info = self.client.publish(topic, data, qos=qos, retain=retain, properties=properties)
        if wait:
            info.wait_for_publish(10)
        return info

    @staticmethod
    def _scan(items: list, topic: Optional[str], where: Callable[[Any], bool]) -> list:
        return [p for t, p in items if (topic is None or mqtt.topic_matches_sub(topic, t)) and where(p)]

    def qos_levels(self) -> list[tuple[str, int]]:
        """(topic, QoS) of every message received, as the broker delivered it."""
        with self._cond:
            return [(m.topic, m.qos) for m in self.messages]

    def matching(self, topic: Optional[str] = None, where: Callable[[Any], bool] = lambda p: True) -> list:
        with self._cond:
            return self._scan(self.parsed, topic, where)

    def wait_for(self, topic: Optional[str] = None, where: Callable[[Any], bool] = lambda p: True,
                 count: int = 1, timeout: float = 15) -> list:
        deadline = time.monotonic() + timeout
        found: list = []
        scanned = 0
        with self._cond:
            while True:
                found.extend(self._scan(self.parsed[scanned:], topic, where))
                scanned = len(self.parsed)
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {count} message(s) on {topic}; "
                                         f"got {len(found)}: {found[-3:]}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_toml(path: str, sections: dict) -> str:
    """Top-level keys first, then one [section] per dict value."""
    lines = [f"{k} = {toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"\n[{name}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def process(case: unittest.TestCase, argv: list, *, killpg: bool = False, **options: Any) -> subprocess.Popen:
    """A process the test owns: when the test ends it is killed if still running (its whole
    session with `killpg`, for a shell's children), reaped, and its pipes are closed."""
    proc = subprocess.Popen(argv, start_new_session=killpg, **options)

    def end() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL) if killpg else proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    case.addCleanup(end)
    return proc


def base_env(**extra: str) -> dict:
    """A clean environment: nothing of the developer's leaks into agent processes."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONPATH": ROOT}
    env.update(extra)
    return env


def acl_broker(users: Sequence[str], password_suffix: str) -> "Mosquitto":
    """A started mosquitto that asks for passwords (each user's is its name and `password_suffix`)
    and applies deploy/mosquitto/acl, the project's ACL."""
    broker = Mosquitto(anonymous=False)
    passwords = os.path.join(broker.dir, "passwd")
    open(passwords, "w").close()
    for user in users:
        subprocess.run(["mosquitto_passwd", "-b", passwords, user, f"{user}{password_suffix}"], check=True,
                       capture_output=True)
    broker.extra_conf = f"password_file {passwords}\nacl_file {os.path.join(ROOT, 'deploy', 'mosquitto', 'acl')}"
    return broker.start()


class AgentProcess:
    """`python agent2389.py run --config FILE` as a subprocess."""

    def __init__(self, broker: Mosquitto, agent_id: str = "agent-one", workdir: Optional[str] = None,
                 env: Optional[dict] = None, prelude: str = "", **sections: Any):
        """`prelude`: Python run in the agent process before the CLI (to change what a test cannot
        reach from outside, e.g. a dependency's behaviour)."""
        self.agent_id = agent_id
        self.prelude = prelude
        self.broker = broker
        self.dir = workdir or tempfile.mkdtemp(prefix="agent-")
        config = {"agent": {"id": agent_id, "description": "test agent", "capabilities": ["testing"]},
                  "mqtt": {"broker_url": broker.url},
                  "llm": {"provider": "echo"}}
        for name, table in sections.items():
            if isinstance(table, dict):
                config.setdefault(name, {}).update(table)
            else:
                config[name] = table
        self.config_path = write_toml(os.path.join(self.dir, "agent.toml"), config)
        self.env = base_env(**{"HEALTH_PORT": str(free_port()), "LOG_LEVEL": "DEBUG", **(env or {})})
        self.log_path = os.path.join(self.dir, "agent.log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "AgentProcess":
        if getattr(self, "_log", None) is not None:  # started again: the earlier run's copy is done
            self._log.close()
        self._log = open(self.log_path, "ab")
        program = ["-c", f"{self.prelude}\nfrom agent2389_lib.cli import main\nmain()"] if self.prelude else [AGENT_SCRIPT]
        self.proc = subprocess.Popen([sys.executable, *program, "run", "--config", self.config_path],
                                     env=self.env, cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._copier = threading.Thread(target=self._copy_log, args=(self.proc.stdout,), daemon=True)
        self._copier.start()
        return self

    def _copy_log(self, stream) -> None:
        """The log is copied by the test, so the agent writes no file of its own (a test may
        limit the agent's file sizes)."""
        for line in iter(stream.readline, b""):
            self._log.write(line)
            self._log.flush()
        stream.close()

    def start_and_wait_available(self, watcher: Watcher, timeout: float = 20) -> "AgentProcess":
        topic = f"/control/agents/{self.agent_id}/status"
        available = lambda p: p.get("status") == "available"  # noqa: E731
        before = len(watcher.matching(topic, available))
        self.start()
        watcher.wait_for(topic, available, count=before + 1, timeout=timeout)
        return self

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        """The exit code, once the whole log is copied; a process still running fails the test
        with the end of its log."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.agent_id} still running after {timeout} s; its log ends:\n"
                                 f"{self.log()[-4000:]}") from None
        self._copier.join(10)
        return code

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._copier.join(10)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def wait_log(self, text: str, timeout: float = 15) -> None:
        wait_until(lambda: text in self.log(), timeout, f"{text!r} in the log of {self.agent_id}")

    def fetch(self, path: str, accept: str = "application/json") -> str:
        """What the agent's health server answers on `path` (`text/plain`: Prometheus' format)."""
        import urllib.request
        request = urllib.request.Request(f"http://127.0.0.1:{self.env['HEALTH_PORT']}{path}", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()

    def metric(self, path: str, default: Any = 0) -> Any:
        """One figure of the agent's JSON metrics ("tasks.tasks_completed"): what it did, as it
        counts it. `default` before it serves them."""
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.env['HEALTH_PORT']}/metrics", timeout=5) as response:
                document = json.loads(response.read())
        except OSError:
            return default
        for key in path.split("."):
            document = document[key]
        return document

    def wait_metric(self, path: str, expected: Any, timeout: float = 15) -> None:
        wait_until(lambda: self.metric(path, None) == expected, timeout,
                   f"{path} = {expected!r} in the metrics of {self.agent_id}")

    def peak_rss_kb(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")


def test_failed(case: unittest.TestCase) -> bool:
    """In tearDown: whether the test failed (Python 3.11 resets `_outcome.success` for each part
    of a test, so it alone no longer tells; its result does)."""
    outcome = getattr(case, "_outcome", None)
    if outcome is None:
        return False
    if not getattr(outcome, "success", True):
        return True
    result = getattr(outcome, "result", None)
    return any(test is case for test, _ in getattr(result, "failures", []) + getattr(result, "errors", []))


class BrokerTestCase(unittest.TestCase):
    """One broker per test class; agents and watchers are cleaned up after each test."""

    broker: Mosquitto

    @classmethod
    def setUpClass(cls) -> None:
        cls.broker = Mosquitto().start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.broker.cleanup()

    def setUp(self) -> None:
        self.agents: list[AgentProcess] = []

    def tearDown(self) -> None:
        for agent in self.agents:
            agent.stop()
        if test_failed(self):  # show what the agents said
            for agent in self.agents:
                print(f"\n--- log of {agent.agent_id} ---\n{agent.log()[-3000:]}", file=sys.stderr)

    def watcher(self, *topics: str) -> Watcher:
        watcher = Watcher(self.broker.port, *topics)
        self.addCleanup(watcher.close)
        return watcher

    def agent(self, agent_id: str = "agent-one", **kwargs: Any) -> AgentProcess:
        agent = AgentProcess(self.broker, agent_id, **kwargs)
        self.agents.append(agent)
        return agent
