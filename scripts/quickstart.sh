#!/usr/bin/env bash
# One command from a fresh clone to a running agent. Installs mosquitto when missing, creates a
# project virtual environment (.venv) unless one is active (Debian's python3 refuses system-wide
# pip installs, PEP 668), starts a local broker on 127.0.0.1:${MQTT_PORT:-1883} if none is
# listening, then runs the agent ${AGENT_ID:-my-agent} from agent.toml.example. The provider is the
# offline `echo` unless OPENAI_API_KEY or ANTHROPIC_API_KEY is set (or LLM_PROVIDER says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
. scripts/venv.sh

export PATH="$PATH:/usr/sbin"
if ! command -v mosquitto >/dev/null 2>&1; then
  echo "installing mosquitto (apt-get)..."
  apt_install mosquitto mosquitto-clients
fi

# Whether 127.0.0.1:$1 answers an MQTT 3.1.1 CONNECT with a CONNACK (first byte 0x20), within 3 s
speaks_mqtt() {
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf '\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00' >&3
  reply=$(timeout 3 head -c 1 <&3 | od -An -tx1 | tr -d ' ')
  exec 3>&-
  [ "$reply" = 20 ]
}

port="${MQTT_PORT:-1883}"
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  if ! speaks_mqtt "$port"; then
    echo "something listens on 127.0.0.1:$port but does not answer as an MQTT broker; stop it, or run the" \
         "quick start with another port: MQTT_PORT=1884 ./scripts/quickstart.sh" >&2
    exit 1
  fi
  echo "using the MQTT broker already listening on 127.0.0.1:$port"
else
  dir="$PWD/state/mosquitto"
  mkdir -p "$dir"
  user=""
  if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    # as root, mosquitto runs as its own user (it warns when kept as root); that user may not reach
    # a project under /root, so its files then live in a directory of its own
    user=mosquitto
    chown mosquitto "$dir"
    if ! runuser -u mosquitto -- test -w "$dir" 2>/dev/null; then
      dir="/tmp/agent2389-mosquitto-$port"
      mkdir -p "$dir" && chown mosquitto "$dir" && chmod 700 "$dir"
    fi
  elif [ "$(id -u)" = 0 ]; then
    user=root
  fi
  conf="$dir/mosquitto.conf"
  {
    echo "listener $port 127.0.0.1"
    echo "allow_anonymous true"
    echo "set_tcp_nodelay true"
    echo "max_queued_messages 0"
    echo "persistence true"
    echo "persistence_location $dir/"
    echo "log_dest file $dir/mosquitto.log"
    echo "pid_file $dir/mosquitto.pid"
    [ -z "$user" ] || echo "user $user"
  } > "$conf"
  mosquitto -c "$conf" -d
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "mosquitto did not start on 127.0.0.1:$port; its log ($dir/mosquitto.log) says:" >&2
    tail -5 "$dir/mosquitto.log" >&2 2>/dev/null || mosquitto -c "$conf" >&2
    exit 1
  fi
  shown="${dir#"$PWD"/}"
  echo "started a local mosquitto on 127.0.0.1:$port (pid $(cat "$dir/mosquitto.pid"), log $shown/mosquitto.log);" \
       "it keeps running after the agent stops: stop it with kill \$(cat $shown/mosquitto.pid)"
fi

python=$(project_python)
if ! "$python" -c "import paho.mqtt, requests, jsonschema, dotenv" 2>/dev/null; then
  echo "installing the Python dependencies into $(dirname "$(dirname "$python")") (pip)..."
  "$python" -m pip install -q --disable-pip-version-check -e .
fi

if [ -z "${LLM_PROVIDER:-}" ]; then
  if [ -n "${OPENAI_API_KEY:-}" ]; then export LLM_PROVIDER=openai
  elif [ -n "${ANTHROPIC_API_KEY:-}" ]; then export LLM_PROVIDER=anthropic
  else export LLM_PROVIDER=echo; fi
fi
agent="${AGENT_ID:-my-agent}"
# a laptop: the health server answers this machine only (the container image listens on 0.0.0.0)
export MQTT_HOST="${MQTT_HOST:-127.0.0.1}" MQTT_PORT="$port" LOG_FORMAT="${LOG_FORMAT:-text}" \
  HEALTH_BIND="${HEALTH_BIND:-127.0.0.1}"
broker_flag=""
[ "$port" = 1883 ] || broker_flag=" --broker-url mqtt://127.0.0.1:$port"
activate=""
[ "$python" = "$PWD/.venv/bin/python" ] && activate=". .venv/bin/activate && "
echo "agent $agent using the $LLM_PROVIDER provider; Ctrl-C stops it. Then, in another terminal, try:"
echo "  ${activate}agent2389 inject --agent-id $agent --message hi --wait$broker_flag"
exec "$python" agent2389.py run --config agent.toml.example
