#!/usr/bin/env bash
# One command from a fresh clone to a running agent: installs mosquitto and the Python
# dependencies if missing, starts a local broker on 127.0.0.1:${MQTT_PORT:-1883} if none is
# listening, then runs the agent with agent.toml.example. The provider is the offline `echo`
# unless OPENAI_API_KEY or ANTHROPIC_API_KEY is set (or LLM_PROVIDER says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
export PATH="$PATH:/usr/sbin"

if ! command -v mosquitto >/dev/null 2>&1; then
  echo "installing mosquitto (apt-get)..."
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients
fi
if ! python3 -c "import paho.mqtt, requests, jsonschema, dotenv" 2>/dev/null; then
  echo "installing Python dependencies (pip)..."
  python3 -m pip install -q --disable-pip-version-check -e .
fi

port="${MQTT_PORT:-1883}"
mkdir -p state/mosquitto
if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  conf="state/mosquitto/mosquitto.conf"
  {
    echo "listener $port 127.0.0.1"
    echo "allow_anonymous true"
    echo "set_tcp_nodelay true"
    echo "max_queued_messages 0"
    echo "persistence true"
    echo "persistence_location $PWD/state/mosquitto/"
    echo "log_dest file $PWD/state/mosquitto/mosquitto.log"
    if [ "$(id -u)" = 0 ]; then echo "user root"; fi
  } > "$conf"
  mosquitto -c "$conf" -d
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  echo "started a local mosquitto on 127.0.0.1:$port (log: state/mosquitto/mosquitto.log)"
fi

if [ -z "${LLM_PROVIDER:-}" ]; then
  if [ -n "${OPENAI_API_KEY:-}" ]; then export LLM_PROVIDER=openai
  elif [ -n "${ANTHROPIC_API_KEY:-}" ]; then export LLM_PROVIDER=anthropic
  else export LLM_PROVIDER=echo; fi
fi
export MQTT_HOST="${MQTT_HOST:-127.0.0.1}" MQTT_PORT="$port" LOG_FORMAT="${LOG_FORMAT:-text}"
echo "agent ${AGENT_ID:-my-agent} using the $LLM_PROVIDER provider; Ctrl-C stops it"
exec python3 agent2389.py run --config agent.toml.example
