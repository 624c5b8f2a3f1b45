# agent2389: multi-stage build onto distroless Python 3 (Debian 12).
#   docker build -t agent2389:latest .
#   docker build --build-arg EXTRAS=otel -t agent2389:otel .   (with the OpenTelemetry SDK: traces exported)
#   docker run -e AGENT_ID=prod-agent-001 -e MQTT_HOST=mqtt.example.com -e OPENAI_API_KEY=sk-... -p 8080:8080 agent2389:latest

FROM debian:12-slim AS build
# Debian's python3.11: the same interpreter the distroless runtime image ships.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.* python3-venv=3.11.* \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md agent2389.py /src/
COPY agent2389_lib /src/agent2389_lib
COPY deploy/build-venv.sh /src/deploy/build-venv.sh
# optional extras of the project, comma-separated: "otel" exports traces (OTEL_EXPORTER_OTLP_ENDPOINT)
ARG EXTRAS=""
RUN sh /src/deploy/build-venv.sh /opt/agent2389 /src "$EXTRAS"

FROM gcr.io/distroless/python3-debian12:nonroot
COPY --from=build /opt/agent2389 /opt/agent2389
COPY agent.toml.example /app/agent.toml.example
WORKDIR /app
# A mounted /app/config/agent.toml is used; without it the environment alone configures the agent
# (AGENT2389_CONFIG, by contrast, must name a file that exists).
# state_dir (the completed-task store) belongs on a writable volume: the root filesystem may be read-only.
# The health server listens on every interface, for the orchestrator's probes.
# The system trust store is this bundle: SSL_CERT_FILE for mqtts:// brokers (distroless ships no
# hashed certificate directory for OpenSSL's default paths), REQUESTS_CA_BUNDLE for every HTTP call
# (LLM APIs, router, tools; requests would otherwise use certifi's bundle). A private CA: mount a
# bundle that holds it and point both variables at it.
ENV AGENT2389_DEFAULT_CONFIG=/app/config/agent.toml \
    LOG_FORMAT=json \
    STATE_DIR=/app/state \
    HEALTH_BIND=0.0.0.0 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
VOLUME ["/app/state"]
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["/opt/agent2389/bin/python", "-I", "-m", "agent2389_lib", "healthcheck"]
ENTRYPOINT ["/opt/agent2389/bin/python", "-I", "-m", "agent2389_lib"]
CMD ["run"]
