"""The MQTT layer: the agent's two links to the broker, their connection history, publish tickets,
paho clients and the socket under them."""
