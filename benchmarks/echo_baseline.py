"""The paho echo baseline: receive a task, parse it, publish a reply. Nothing else.

    python benchmarks/echo_baseline.py PORT AGENT_ID
"""

import json
import socket
import sys

import paho.mqtt.client as mqtt

PORT, AGENT = int(sys.argv[1]), sys.argv[2]


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe(f"/control/agents/{AGENT}/input", 1)


def on_message(client, userdata, message):
    task = json.loads(message.payload)
    reply = {"response": task.get("instruction") or "", "task_id": task["task_id"]}
    client.publish(f"/conversations/{task['conversation_id']}/{AGENT}", json.dumps(reply), qos=1)


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"baseline-{AGENT}", protocol=mqtt.MQTTv5)
client.on_connect = on_connect
client.on_message = on_message
client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
client.max_inflight_messages_set(1000)
client.connect("127.0.0.1", PORT, 60)
print("ready", flush=True)
client.loop_forever()
